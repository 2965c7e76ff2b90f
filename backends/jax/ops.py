"""The native ops that ``prefopt._ops`` delegates to for JAX arrays.

They keep the contract of ``prefopt._ops.NATIVE_OPS``, as ``prefopt.backends.torch.ops``
does for PyTorch. This file imports nothing of prefopt: the core reaches it, not the other
way round.
"""

from __future__ import annotations

from typing import Any

import jax


def log_sigmoid(x):
    """``log(sigmoid(x))``, natively."""
    return jax.nn.log_sigmoid(x)


def softplus(x):
    """``log(1 + e^x)``, natively."""
    return jax.nn.softplus(x)


def logsumexp(x, *, axis, keepdims):
    """The stable log-sum-exp over ``axis``, natively."""
    return jax.nn.logsumexp(x, axis=axis, keepdims=keepdims)


def any_along(x, axis):
    """Whether an entry along ``axis`` is true, natively."""
    return jax.numpy.any(x, axis=axis)


def is_concrete(x) -> bool:
    """Whether the values of ``x`` can be read (not a tracer)."""
    return not isinstance(x, jax.core.Tracer)


def all_finite(x) -> bool | None:
    """Whether every entry is finite; ``None`` when ``x`` is traced."""
    ok = jax.numpy.isfinite(x).all()
    return None if isinstance(ok, jax.core.Tracer) else bool(ok)


def on_host(x) -> bool:
    """Whether ``x`` lives in host memory (every device a CPU)."""
    return all(d.platform == "cpu" for d in x.devices())


def stop_gradient(x: Any) -> Any:
    """Block gradients through ``x`` (``jax.lax.stop_gradient``): for reference log-probs.

    Args:
        x: Any array or pytree of arrays.

    Returns:
        ``x`` with a zero gradient under ``jax.grad``.
    """
    return jax.lax.stop_gradient(x)
