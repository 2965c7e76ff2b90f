"""One small adapter per array library: make arrays from NumPy, read them back, and take
gradients (for the libraries that have autodiff)."""

from __future__ import annotations

import numpy as np

ALL_BACKENDS = ["numpy", "array_api_strict", "torch", "jax", "torch-cuda", "jax-gpu"]


class Backend:
    name: str
    xp = None
    differentiable = False
    half = ()  # half-precision dtypes this library has ("bfloat16", ...)

    def asarray(self, a, dtype="float64"):
        raise NotImplementedError

    def to_numpy(self, x) -> np.ndarray:
        raise NotImplementedError

    def dtype(self, name):
        return getattr(self.xp, name)

    def __repr__(self):
        return self.name


class NumpyBackend(Backend):
    name = "numpy"

    def __init__(self):
        import array_api_compat.numpy as xp

        self.xp = xp

    def asarray(self, a, dtype="float64"):
        return np.asarray(a, dtype=dtype)

    def to_numpy(self, x):
        return np.asarray(x)


class StrictBackend(Backend):
    name = "array_api_strict"

    def __init__(self):
        import array_api_strict as xp

        self.xp = xp

    def asarray(self, a, dtype="float64"):
        return self.xp.asarray(np.asarray(a, dtype=dtype), dtype=getattr(self.xp, dtype))

    def to_numpy(self, x):
        return np.from_dlpack(x)


class TorchBackend(Backend):
    differentiable = True
    half = ("bfloat16", "float16")

    def __init__(self, device="cpu"):
        import array_api_compat.torch as xp
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
        self.torch, self.xp, self.device = torch, xp, device
        self.name = "torch" if device == "cpu" else "torch-cuda"

    def dtype(self, name):
        return getattr(self.torch, name)

    def asarray(self, a, dtype="float64"):
        a = np.asarray(a)
        if dtype == "bfloat16":
            return self.torch.asarray(a.astype(np.float64), device=self.device).to(
                self.torch.bfloat16
            )
        return self.torch.asarray(a.astype(dtype), device=self.device)

    def to_numpy(self, x):
        return (
            x.detach().to("cpu", self.torch.float64).numpy()
            if x.is_floating_point()
            else x.cpu().numpy()
        )

    def value_and_grad(self, fn, args, wrt):
        """``fn(*args)`` and the gradients of its sum with respect to ``args[i]``, i in ``wrt``."""
        args = [
            a.detach().clone().requires_grad_(i in wrt) if a is not None and i in wrt else a
            for i, a in enumerate(args)
        ]
        out = fn(*args)
        grads = self.torch.autograd.grad(out.sum(), [args[i] for i in wrt])
        return out, list(grads)


class JaxBackend(Backend):
    differentiable = True
    half = ("bfloat16", "float16")

    def __init__(self, platform="cpu"):
        import jax
        import jax.numpy as jnp

        try:
            self.jax_device = jax.devices(platform)[0]
        except RuntimeError as e:
            raise RuntimeError(f"no jax {platform} device") from e
        self.jax, self.xp = jax, jnp
        self.name = "jax" if platform == "cpu" else "jax-gpu"

    def asarray(self, a, dtype="float64"):
        a = np.asarray(a)
        if dtype in ("bfloat16", "float16"):
            out = self.xp.asarray(a.astype(np.float64)).astype(getattr(self.xp, dtype))
        else:
            out = self.xp.asarray(a.astype(dtype))
        return self.jax.device_put(out, self.jax_device)

    def to_numpy(self, x):
        x = np.asarray(x)
        return (
            x.astype(np.float64)
            if np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16"
            else x
        )

    def value_and_grad(self, fn, args, wrt):
        def summed(*diff):
            full = list(args)
            for i, a in zip(wrt, diff):
                full[i] = a
            out = fn(*full)
            return out.sum(), out

        (_, out), grads = self.jax.value_and_grad(
            summed, argnums=tuple(range(len(wrt))), has_aux=True
        )(*[args[i] for i in wrt])
        return out, list(grads)


def make_backend(name: str) -> Backend:
    if name == "numpy":
        return NumpyBackend()
    if name == "array_api_strict":
        return StrictBackend()
    if name == "torch":
        return TorchBackend("cpu")
    if name == "torch-cuda":
        return TorchBackend("cuda")
    if name == "jax":
        return JaxBackend("cpu")
    if name == "jax-gpu":
        return JaxBackend("gpu")
    raise ValueError(name)
