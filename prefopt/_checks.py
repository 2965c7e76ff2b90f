"""Input validation shared by every loss.

Shapes, ranks and dtypes are checked on every call, traced or not: they are static, so the
checks cost nothing under ``jit`` or ``torch.compile``. Values (finite rewards, positive
lengths) can only be read from concrete arrays and reading them from an accelerator is a
device-to-host sync, so they follow ``check_values``: ``None`` (the default) checks concrete
arrays in host memory only, ``True`` also checks concrete arrays on an accelerator (one sync
per call), ``False`` never checks. Nothing is checked inside a trace.
"""

from __future__ import annotations

import functools
import math
import numbers
from types import ModuleType

from prefopt._ops import Array, get_namespace, native

# The memos below are functools caches, not dicts filled in place: torch.compile traces
# through a cache wrapper, whereas a dict that fills during the first trace changes what
# the compiled graph guards on, and the second call compiles again.


@functools.cache
def is_kind(dtype, kind, xp: ModuleType) -> bool:
    """``xp.isdtype`` memoised: it is a hot-path call and its answer never changes."""
    return xp.isdtype(dtype, kind)


def is_floating(dtype, xp: ModuleType) -> bool:
    return is_kind(dtype, "real floating", xp)


def floating(fn: str, name: str, x: Array, xp: ModuleType) -> None:
    if not is_floating(x.dtype, xp):
        raise TypeError(f"{fn}: {name} must be a real floating array; got dtype {x.dtype}")


def boolean(fn: str, name: str, x: Array, xp: ModuleType) -> None:
    if x.dtype != xp.bool:
        raise TypeError(f"{fn}: {name} must be a boolean array; got dtype {x.dtype}")


def numeric(fn: str, name: str, x: Array, xp: ModuleType) -> None:
    if not is_kind(x.dtype, ("real floating", "integral"), xp):
        raise TypeError(
            f"{fn}: {name} must be a real floating or integer array; got dtype {x.dtype}"
        )


def same_shape(fn: str, layout: str, arrays: dict[str, Array | None]) -> None:
    """Check that the given arrays have rank ``len(layout)`` and the shape of the first."""
    first, shape = None, None
    for name, x in arrays.items():
        if x is None:
            continue
        if shape is None:
            first, shape = name, x.shape
            ndim = layout.count(",") + 1
            if x.ndim != ndim:
                raise ValueError(
                    f"{fn}: {name} must have {ndim} dimension(s), shape ({layout}); "
                    f"got shape {tuple(x.shape)}"
                )
        elif x.shape != shape:
            if x.ndim != len(shape):
                raise ValueError(
                    f"{fn}: {name} must have {len(shape)} dimension(s), shape ({layout}); "
                    f"got shape {tuple(x.shape)}"
                )
            raise ValueError(
                f"{fn}: {name} must have the shape of {first}, {tuple(shape)}; got {tuple(x.shape)}"
            )


def compute_dtype(xp: ModuleType, *arrays: Array | None):
    """The dtype a loss computes in: the arrays' common float dtype, half raised to float32.

    A bf16 loss would round log-ratio differences away.
    """
    return _compute_dtype(xp, *(x.dtype for x in arrays if x is not None))


@functools.cache
def compute_dtype_of(xp: ModuleType, dtype):
    """The compute dtype of arrays that all have ``dtype``; ``None`` unless it is a float."""
    return _compute_dtype(xp, dtype) if is_floating(dtype, xp) else None


@functools.cache
def _compute_dtype(xp: ModuleType, *dtypes):
    dtype = xp.result_type(*dtypes)
    return xp.float32 if xp.finfo(dtype).bits < 32 else dtype


@functools.cache
def eps(xp: ModuleType, dtype) -> float:
    """The machine epsilon of a floating ``dtype``."""
    return float(xp.finfo(dtype).eps)


def cast(x: Array | None, dtype, xp: ModuleType) -> Array | None:
    if x is None or x.dtype == dtype:
        return x
    return xp.astype(x, dtype)


def number(fn: str, name: str, value) -> float:
    """``value`` as a float if it is a real number (not a string, a bool, None or an array)."""
    if type(value) is float:  # the common case, before the slower isinstance on an ABC
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        got = f"{type(value).__name__} {value!r}" if len(repr(value)) < 40 else type(value).__name__
        raise TypeError(f"{fn}: {name} must be a real number; got {got}")
    return float(value)


def option(fn: str, name: str, value, rule):
    """A numeric option: a Python number checked by ``rule``, or a 0-d array.

    An array (a schedule's value, a ``jax.jit`` tracer, a ``vmap`` batch) is returned as
    it is; its value goes through ``rule`` only where it can be read without a trace or a
    device sync (see ``values_checked``): a traced value is the caller's to keep in range.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return rule(fn, name, value)
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None or isinstance(value, (str, bytes)):
        number(fn, name, value)  # raises the TypeError that names what was given
    if len(shape) != 0:
        raise ValueError(
            f"{fn}: {name} must be a number or a 0-d array; got an array of shape {tuple(shape)}"
        )
    xp = get_namespace(value, fn=fn)
    if not is_kind(dtype, ("real floating", "integral"), xp):
        raise TypeError(f"{fn}: {name} must be a real number; got a 0-d array of dtype {dtype}")
    if values_checked(value, xp, None):
        rule(fn, name, float(value))
    return value


def scalar(fn: str, name: str, value, dtype, xp: ModuleType):
    """An option in the loss's compute ``dtype``: a number as a float, an array cast.

    The cast keeps a float64 0-d array from promoting a float32 loss (NumPy 2, JAX).
    """
    if isinstance(value, numbers.Real):
        return float(value)  # NumPy scalars included: a number is a number
    if get_namespace(value) is not xp:
        raise TypeError(
            f"{fn}: {name} must be a number or a 0-d array of the inputs' library; got a "
            f"{type(value).__module__}.{type(value).__name__}"
        )
    return value if value.dtype == dtype else xp.astype(value, dtype)


def positive(fn: str, name: str, value: float) -> float:
    value = number(fn, name, value)
    if not value > 0 or value == math.inf:
        raise ValueError(f"{fn}: {name} must be a finite number > 0; got {value}")
    return value


def non_negative(fn: str, name: str, value: float) -> float:
    value = number(fn, name, value)
    if not 0 <= value < math.inf:
        raise ValueError(f"{fn}: {name} must be a finite number >= 0; got {value}")
    return value


def in_range(
    fn: str, name: str, value: float, low: float, high: float, *, open_low=False, open_high=False
) -> float:
    value = number(fn, name, value)
    above = low < value if open_low else low <= value
    below = value < high if open_high else value <= high
    if not (above and below):
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"{fn}: {name} must lie in {interval}; got {value}")
    return value


def finite(fn: str, name: str, value: float) -> float:
    value = number(fn, name, value)
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be a finite number; got {value}")
    return value


def one_of(fn: str, name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(
            f"{fn}: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}"
        )
    return value


def values_checked(x: Array, xp: ModuleType, check_values: bool | None) -> bool:
    """Whether the values of ``x`` may be read now (see the module docstring)."""
    if check_values is False:
        return False
    backend = native(xp)
    if backend is None:
        return True
    if not backend.is_concrete(x):
        return False
    return bool(check_values) or backend.on_host(x)


def count_false(flags: Array, xp: ModuleType) -> int | None:
    """How many ``flags`` are false; ``None`` when that is unknown.

    Concrete inputs used inside a ``jax.jit`` trace still give traced results.
    """
    # One all() on the common, clean path; the count only for the error message.
    ok = xp.all(flags)
    backend = native(xp)
    if backend is not None and not backend.is_concrete(ok):
        return None
    return 0 if ok else int(xp.sum(xp.astype(~flags, xp.int32)))


def all_finite(x: Array, xp: ModuleType) -> bool | None:
    """Whether every entry of ``x`` is finite; ``None`` when that is unknown (traced).

    One native call on PyTorch and JAX: this is on the hot path of every group loss.
    """
    backend = native(xp)
    if backend is not None:
        return backend.all_finite(x)
    return bool(xp.all(xp.isfinite(x)))


def positive_where(fn: str, name: str, x: Array, where: Array, xp: ModuleType) -> bool:
    """Raise if ``x`` is not finite and > 0 where ``where``; return whether it could be checked."""
    bad = count_false(~where | ((x > 0.0) & (x < math.inf)), xp)
    if bad:
        raise ValueError(
            f"{fn}: {name} must be finite and > 0 where mask is true; "
            f"got {bad} value(s) <= 0, infinite or NaN"
        )
    return bad is not None
