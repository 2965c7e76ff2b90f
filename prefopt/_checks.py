"""Input validation shared by every loss.

Shapes, ranks and dtypes are checked on every call, traced or not: they are static, so the
checks cost nothing under ``jit`` or ``torch.compile``. Values (finite rewards, positive
lengths) can only be read from concrete arrays and reading them from an accelerator is a
device-to-host sync, so they follow ``check_values``: ``None`` (the default) checks concrete
arrays in host memory only, ``True`` also checks concrete arrays on an accelerator (one sync
per call), ``False`` never checks. Nothing is checked inside a trace.
"""

from __future__ import annotations

from types import ModuleType

from prefopt._ops import Array, native


def floating(fn: str, name: str, x: Array, xp: ModuleType) -> None:
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{fn}: {name} must be a real floating array; got dtype {x.dtype}")


def boolean(fn: str, name: str, x: Array, xp: ModuleType) -> None:
    if x.dtype != xp.bool:
        raise TypeError(f"{fn}: {name} must be a boolean array; got dtype {x.dtype}")


def numeric(fn: str, name: str, x: Array, xp: ModuleType) -> None:
    if not xp.isdtype(x.dtype, ("real floating", "integral")):
        raise TypeError(
            f"{fn}: {name} must be a real floating or integer array; got dtype {x.dtype}"
        )


def same_shape(fn: str, layout: str, arrays: dict[str, Array | None]) -> tuple[int, ...]:
    """Check that all given arrays have rank ``len(layout)`` and the shape of the first."""
    ndim = len(layout.split(","))
    first_name, shape = None, None
    for name, x in arrays.items():
        if x is None:
            continue
        if x.ndim != ndim:
            raise ValueError(
                f"{fn}: {name} must have {ndim} dimension(s), shape ({layout}); "
                f"got shape {tuple(x.shape)}"
            )
        if shape is None:
            first_name, shape = name, tuple(x.shape)
        elif tuple(x.shape) != shape:
            raise ValueError(
                f"{fn}: {name} must have the shape of {first_name}, {shape}; "
                f"got {tuple(x.shape)}"
            )
    return shape


def compute_dtype(xp: ModuleType, *arrays: Array | None):
    """The dtype a loss computes in: the arrays' common float dtype, half precision raised
    to float32 (a bf16 loss would round log-ratio differences away)."""
    dtype = xp.result_type(*(x.dtype for x in arrays if x is not None))
    if xp.finfo(dtype).bits < 32:
        dtype = xp.float32
    return dtype


def cast(x: Array | None, dtype, xp: ModuleType) -> Array | None:
    if x is None or x.dtype == dtype:
        return x
    return xp.astype(x, dtype)


def positive(fn: str, name: str, value: float) -> float:
    value = float(value)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{fn}: {name} must be a finite number > 0; got {value}")
    return value


def in_range(fn: str, name: str, value: float, low: float, high: float) -> float:
    value = float(value)
    if not low <= value <= high:
        raise ValueError(f"{fn}: {name} must lie in [{low}, {high}]; got {value}")
    return value


def one_of(fn: str, name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
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


def finite_where(fn: str, name: str, x: Array, where: Array, xp: ModuleType) -> None:
    bad = int(xp.sum(xp.astype(where & ~xp.isfinite(x), xp.int32)))
    if bad:
        raise ValueError(f"{fn}: {name} must be finite where mask is true; got {bad} NaN or infinite value(s)")


def positive_where(fn: str, name: str, x: Array, where: Array, xp: ModuleType) -> None:
    bad = int(xp.sum(xp.astype(where & ~(x > xp.zeros_like(x)), xp.int32)))
    if bad:
        raise ValueError(f"{fn}: {name} must be > 0 where mask is true; got {bad} value(s) <= 0 or NaN")
