"""Namespace lookup and the few numerical ops the Array API standard lacks.

Every op takes the arrays' namespace ``xp`` and, for PyTorch and JAX, delegates to the
framework's native kernel (through :mod:`prefopt.backends`); other namespaces get a pure
Array API fallback. The backend module is imported only when the arrays come from its
framework, so ``import prefopt`` never imports torch or jax.
"""

from __future__ import annotations

import functools
import math
import sys
from types import ModuleType
from typing import Any

import array_api_compat

Array = Any

_NAMESPACE_BY_TYPE: dict[type, ModuleType] = {}


def get_namespace(
    *arrays: Array | None, xp: ModuleType | None = None, fn: str = "prefopt"
) -> ModuleType:
    """Return the Array API namespace shared by ``arrays`` (``None`` entries are skipped).

    Args:
        *arrays: The arrays of one call; ``None`` stands for an optional input left out.
        xp: A namespace the caller already knows; returned as it is, skipping the lookup.
        fn: The function to name in an error.

    Returns:
        The array-api-compat namespace of the arrays (``numpy`` arrays get
        ``array_api_compat.numpy``, torch tensors ``array_api_compat.torch``, and so on).

    Raises:
        TypeError: When the arrays come from different libraries.
    """
    if xp is not None:
        if not hasattr(xp, "__array_api_version__"):  # e.g. the bare torch module
            raise TypeError(
                f"{fn}: xp must be an Array API namespace (array_api_compat.torch, jax.numpy, "
                f"array_api_compat.numpy...); got {getattr(xp, '__name__', xp)!r}"
            )
        return xp
    found = None
    for a in arrays:
        if a is None:
            continue
        # array_namespace costs microseconds a call; a dict keyed on the array type does not.
        # Under torch.compile the dict is left alone: a graph that read it would guard on
        # its contents, and compile again once another array type had filled it.
        if _compiling():
            ns = array_api_compat.array_namespace(a)
        else:
            cls = type(a)
            ns = _NAMESPACE_BY_TYPE.get(cls)
            if ns is None:
                ns = _NAMESPACE_BY_TYPE[cls] = array_api_compat.array_namespace(a)
        if found is None:
            found = ns
        elif ns is not found:
            raise TypeError(
                f"all arrays must come from one library; got {found.__name__} and {ns.__name__}"
            )
    if found is None:
        raise TypeError("no array given: at least one argument must be an array")
    return found


def _compiling() -> bool:
    """Whether torch.compile is tracing (torch is never imported for this)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


# The native ops a backend supplies, the contract between this module and
# prefopt.backends (``prefopt.backends.torch.ops``, ``prefopt.backends.jax.ops``), tested for
# every backend against the Array API fallbacks below (tests/test_ops.py):
NATIVE_OPS = {
    "log_sigmoid": "log_sigmoid(x) -> log(sigmoid(x)), elementwise: the shape and dtype of x",
    "softplus": "softplus(x) -> log(1 + e^x), elementwise: the shape and dtype of x",
    "logsumexp": "logsumexp(x, *, axis, keepdims) -> the stable log-sum-exp over axis",
    "any_along": "any_along(x, axis) -> bool array: whether boolean x is true somewhere on axis",
    "is_concrete": "is_concrete(x) -> bool: x's values can be read (not traced, not batched)",
    "all_finite": "all_finite(x) -> bool, or None when x is not concrete",
    "on_host": "on_host(x) -> bool: x is in host memory (reading it costs no device sync)",
    "stop_gradient": "stop_gradient(x) -> x, with no gradient flowing back through it",
}


@functools.cache
def native(xp: ModuleType) -> ModuleType | None:
    """Return the module of ``xp``'s native ops (torch or jax), or ``None`` for the others.

    The module supplies every op of ``NATIVE_OPS``.
    """
    # A functools cache, not a dict: see prefopt._checks on memos under torch.compile.
    if array_api_compat.is_torch_namespace(xp):
        from prefopt.backends.torch import ops as backend
    elif array_api_compat.is_jax_namespace(xp):
        from prefopt.backends.jax import ops as backend
    else:
        backend = None
    return backend


def log_sigmoid(x: Array, *, xp: ModuleType | None = None) -> Array:
    r"""Stable $\log \sigma(x) = -\log(1 + e^{-x})$, elementwise.

    The gradient is exactly $0.5$ at $x = 0$ on every backend (the value DPO starts from,
    since the policy equals the reference at step 0), and the result is finite for
    $|x| = 10^4$ in every floating dtype.

    Args:
        x: A real floating array of any shape.
        xp: The array namespace, if known.

    Returns:
        An array of the shape and dtype of ``x``.
    """
    xp = get_namespace(x, xp=xp)
    backend = native(xp)
    if backend is not None:
        return backend.log_sigmoid(x)
    # -logaddexp(0, -x), never min(x, 0) - log1p(exp(-|x|)): the latter's gradient at 0
    # depends on how a framework differentiates abs and min.
    return -xp.logaddexp(xp.zeros_like(x), -x)


def sigmoid(x: Array, *, xp: ModuleType) -> Array:
    r"""$\sigma(x)$ as $e^{\log\sigma(x)}$: no overflow and a finite gradient for any $x$."""
    return xp.exp(log_sigmoid(x, xp=xp))


def stop_gradient(x: Array, *, xp: ModuleType) -> Array:
    """``x`` as a constant for autodiff (``detach`` / ``lax.stop_gradient``); NumPy: ``x``."""
    backend = native(xp)
    return x if backend is None else backend.stop_gradient(x)


def any_along(x: Array, axis: int, *, xp: ModuleType) -> Array:
    """``xp.any(x, axis=axis)`` for a boolean ``x``, natively where a backend has it.

    array-api-compat's torch ``any`` adds a cast to bool after the reduction: on the eager
    hot path of MPO's split that costs more than the reduction itself.
    """
    backend = native(xp)
    return xp.any(x, axis=axis) if backend is None else backend.any_along(x, axis)


def softplus(x: Array, *, xp: ModuleType | None = None) -> Array:
    r"""Stable $\operatorname{softplus}(x) = \log(1 + e^{x}) = -\log\sigma(-x)$, elementwise.

    The losses' $-\log\sigma(z)$ is ``softplus(-z)``: one kernel, +0.0 (never -0.0) where
    the margin saturates, gradient exactly $0.5$ at $0$ on every backend, finite for
    $|x| = 10^4$. PyTorch's kernel returns $x$ itself above $x = 40$, where
    $\log(1 + e^{x})$ rounds to $x$ in float64 and float32 alike (the default cut-off of
    ``torch.nn.functional.softplus``, 20, is not exact).

    Args:
        x: A real floating array of any shape.
        xp: The array namespace, if known.

    Returns:
        An array of the shape and dtype of ``x``.
    """
    xp = get_namespace(x, xp=xp)
    backend = native(xp)
    if backend is not None:
        return backend.softplus(x)
    # logaddexp(x, 0), with a zeros array: see log_sigmoid
    return xp.logaddexp(x, xp.zeros_like(x))


def logsumexp(
    x: Array,
    *,
    axis: int = -1,
    mask: Array | None = None,
    keepdims: bool = False,
    xp: ModuleType | None = None,
) -> Array:
    r"""$\log \sum_i e^{x_i}$ over ``axis``, counting only the entries where ``mask`` is true.

    A row whose entries are all masked gives $-\infty$, never NaN, and passes an exactly
    zero gradient to every entry of ``x``. Masked entries of ``x`` may hold anything
    (NaN, $\pm\infty$): they reach neither the value nor the gradient.

    Args:
        x: A real floating array.
        axis: The axis to reduce. Default ``-1``.
        mask: Optional boolean array broadcastable to ``x``; ``True`` marks the entries
            that count. ``None`` counts all.
        keepdims: Keep the reduced axis with size one. Default ``False``.
        xp: The array namespace, if known.

    Returns:
        The reduced array, in the dtype of ``x``.
    """
    xp = get_namespace(x, mask, xp=xp)
    if mask is not None:
        # Masked entries weigh e^-inf = 0. The native kernels return -inf for an all-masked
        # row; the NaN their backward computes there, exp(-inf - -inf), lands only on masked
        # entries, and this where() gives those an exactly zero gradient.
        x = xp.where(mask, x, -math.inf)
    backend = native(xp)
    if backend is not None:
        return backend.logsumexp(x, axis=axis, keepdims=keepdims)
    peak = xp.max(x, axis=axis, keepdims=True)
    finite = xp.isfinite(peak)
    total = xp.sum(xp.exp(x - xp.where(finite, peak, 0.0)), axis=axis, keepdims=True)
    # An all -inf row: log(1) + peak = -inf, without ever taking log(0).
    out = xp.log(xp.where(finite, total, 1.0)) + peak
    return out if keepdims else xp.squeeze(out, axis=axis)


def masked_mean(
    x: Array,
    mask: Array | None = None,
    *,
    axis: int | None = None,
    keepdims: bool = False,
    xp: ModuleType | None = None,
) -> Array:
    r"""Mean of ``x`` over the entries where ``mask`` is true.

    $$\operatorname{mean} = \frac{\sum_i m_i x_i}{\max(1, \sum_i m_i)}$$

    An empty selection gives $0$ (not NaN) with a zero gradient; unselected entries may hold
    anything, NaN included, and reach neither the value nor the gradient. This is how a
    batch of MPO losses is averaged over its non-degenerate groups only (see
    [`mpo_split`][prefopt.mpo_split]).

    Args:
        x: A real floating array.
        mask: Boolean array broadcastable to ``x``. ``None`` selects everything.
        axis: The axis to reduce; ``None`` reduces all. Default ``None``.
        keepdims: Keep reduced axes with size one. Default ``False``.
        xp: The array namespace, if known.

    Returns:
        The mean, in the dtype of ``x``.
    """
    xp = get_namespace(x, mask, xp=xp)
    if mask is None:
        size = math.prod(x.shape) if axis is None else x.shape[axis]
        # an empty mean is 0 with a zero gradient, as an empty selection is
        return (
            xp.mean(x, axis=axis, keepdims=keepdims)
            if size
            else xp.sum(x, axis=axis, keepdims=keepdims)
        )
    mask = xp.broadcast_to(mask, x.shape)
    total = xp.sum(xp.where(mask, x, xp.zeros_like(x)), axis=axis, keepdims=keepdims)
    count = xp.sum(xp.astype(mask, x.dtype), axis=axis, keepdims=keepdims)
    return total / xp.clip(count, min=1.0)
