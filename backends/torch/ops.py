"""The native ops prefopt's core delegates to for PyTorch tensors (see ``prefopt._ops``).

The contract every backend's op module keeps (``prefopt._ops.NATIVE_OPS``, tested for every
backend in ``tests/test_ops.py``):

- ``log_sigmoid(x)``, ``softplus(x)``: elementwise, shape and dtype of ``x``.
- ``logsumexp(x, *, axis, keepdims)``: the framework's stable reduction.
- ``any_along(x, axis)``: ``any`` of a boolean ``x`` over one axis.
- ``is_concrete(x)``: whether ``x``'s values can be read (not traced, not batched).
- ``all_finite(x)``: ``bool``, or ``None`` when ``x`` is not concrete.
- ``on_host(x)``: whether ``x`` lives in host memory (reading it costs no device sync).
- ``stop_gradient(x)``: ``x`` with no gradient flowing back through it.
"""

from __future__ import annotations

import math
import warnings

import torch

# prefopt memoises dtype facts and a loss's lengths kind with functools caches (pure functions),
# which torch.compile traces through, as it does array-api-compat's own (_helpers.py, under
# a trace, where prefopt's type cache is not read); its warning about them is not news.
warnings.filterwarnings(
    "ignore",
    message=r"Dynamo detected a call to a `functools.lru_cache`-wrapped function "
    r"at '(_checks|_ops|group|inputs|_helpers)\.py",
    category=UserWarning,
)


def log_sigmoid(x):
    """``log(sigmoid(x))``, natively."""
    return torch.nn.functional.logsigmoid(x)


def softplus(x):
    """``log(1 + e^x)``, natively."""
    # log(1 + e^x) rounds to x above 40 in float32 and float64: the cut-off is exact there
    return torch.nn.functional.softplus(x, beta=1.0, threshold=40.0)


def logsumexp(x, *, axis, keepdims):
    """The stable log-sum-exp over ``axis``, natively."""
    return torch.logsumexp(x, dim=axis, keepdim=keepdims)


def any_along(x, axis):
    """Whether an entry along ``axis`` is true, natively (a boolean tensor stays boolean)."""
    return torch.any(x, dim=axis)


def is_concrete(x) -> bool:
    """Whether the values of ``x`` can be read."""
    # not inside torch.compile, nor a torch.func.vmap batch (whose values cannot be read)
    return not torch.compiler.is_compiling() and not torch._C._functorch.is_batchedtensor(x)


def all_finite(x) -> bool | None:
    """Whether every entry is finite; ``None`` when ``x`` is not concrete."""
    if not is_concrete(x):
        return None
    # A finite sum proves every entry finite in one kernel (isfinite().all() takes two, and
    # 5x the time on a CPU); only an infinite or NaN sum, which overflow can also give,
    # needs the entries looked at.
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


def on_host(x) -> bool:
    """Whether ``x`` is in host memory."""
    return x.device.type == "cpu"


def stop_gradient(x: torch.Tensor) -> torch.Tensor:
    """Block gradients through ``x`` (``Tensor.detach``): for reference log-probs.

    Args:
        x: Any tensor.

    Returns:
        ``x`` detached from the autograd graph (same storage, no copy).
    """
    return x.detach()
