import math

import numpy as np
import pytest

import prefopt
from tests import reference
from tests.helpers import assert_close, check_result

EXTREMES = [-1e4, -800.0, -40.0, -1.0, 0.0, 1e-12, 1.0, 40.0, 800.0, 1e4]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_log_sigmoid_and_softplus(backend, dtype):
    x = backend.asarray(EXTREMES, dtype)
    xs = backend.to_numpy(x)
    ls = prefopt.log_sigmoid(x)
    sp = prefopt.softplus(x)
    check_result(backend, ls, (len(EXTREMES),), dtype)
    assert_close(backend.to_numpy(ls), [reference.log_sigmoid(v) for v in xs], dtype)
    assert_close(backend.to_numpy(sp), [-reference.log_sigmoid(-v) for v in xs], dtype)


def test_log_sigmoid_gradient(diff_backend):
    x = diff_backend.asarray(EXTREMES)
    _, (g,) = diff_backend.value_and_grad(lambda a: prefopt.log_sigmoid(a), [x], [0])
    expected = [1.0 / (1.0 + math.exp(v)) if v < 700 else 0.0 for v in EXTREMES]
    np.testing.assert_allclose(diff_backend.to_numpy(g), expected, rtol=1e-14, atol=1e-300)
    assert diff_backend.to_numpy(g)[EXTREMES.index(0.0)] == 0.5


def _lse_rows(x, mask):
    out = []
    for row, m in zip(x, mask):
        vals = [v for v, keep in zip(row, m) if keep]
        if not vals:
            out.append(-math.inf)
            continue
        top = max(vals)
        out.append(top + math.log(sum(math.exp(v - top) for v in vals)))
    return out


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_masked_logsumexp(backend, rng, dtype):
    x = rng.normal(0.0, 50.0, size=(5, 7))
    x[1, 3] = 1e4
    mask = rng.random((5, 7)) < 0.6
    mask[2] = False  # an all-masked row
    mask[3] = True
    garbage = x.copy()
    garbage[~mask] = np.resize([np.nan, np.inf, -np.inf], int((~mask).sum()))
    xb = backend.asarray(garbage, dtype)
    out = prefopt.logsumexp(xb, axis=-1, mask=backend.asarray(mask, "bool"))
    check_result(backend, out, (5,), dtype)
    expected = _lse_rows(backend.to_numpy(backend.asarray(x, dtype)), mask)
    got = backend.to_numpy(out)
    assert got[2] == -math.inf
    keep = [0, 1, 3, 4]
    assert_close(got[keep], np.asarray(expected)[keep], dtype, scale=1e4)
    full = prefopt.logsumexp(backend.asarray(x, dtype), axis=0, keepdims=True)
    check_result(backend, full, (1, 7), dtype)
    assert_close(
        backend.to_numpy(full)[0],
        _lse_rows(backend.to_numpy(backend.asarray(x, dtype)).T, np.ones((7, 5))),
        dtype,
        scale=1e4,
    )


def test_masked_logsumexp_gradient_is_zero_outside_the_mask(diff_backend, rng):
    b = diff_backend
    x = rng.normal(size=(3, 4))
    mask = np.array([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    x[~mask] = np.nan
    mb = b.asarray(mask, "bool")
    # the empty row's value is -inf and its upstream gradient 1: its entries still get 0
    _, (g,) = b.value_and_grad(lambda a: prefopt.logsumexp(a, mask=mb), [b.asarray(x)], [0])
    g = b.to_numpy(g)
    assert np.all(g[~mask] == 0.0)
    for r in (0, 2):
        e = np.exp(x[r, mask[r]] - x[r, mask[r]].max())
        np.testing.assert_allclose(g[r, mask[r]], e / e.sum(), rtol=1e-14)


def test_masked_mean(backend):
    x = backend.asarray([[1.0, 2.0, np.nan], [np.inf, 5.0, 6.0]])
    mask = backend.asarray(np.array([[1, 1, 0], [0, 0, 0]], dtype=bool), "bool")
    per_row = backend.to_numpy(prefopt.masked_mean(x, mask, axis=1))
    np.testing.assert_array_equal(per_row, [1.5, 0.0])
    assert float(backend.to_numpy(prefopt.masked_mean(x, mask))) == 1.5
    assert float(backend.to_numpy(prefopt.masked_mean(backend.asarray([1.0, 3.0])))) == 2.0


# ---- the native-op contract (prefopt._ops.NATIVE_OPS): every backend supplies every op ----


def test_every_native_backend_keeps_the_op_contract(diff_backend, rng):
    from prefopt._ops import NATIVE_OPS, get_namespace, native

    ops = native(get_namespace(diff_backend.asarray([0.0])))
    assert ops is not None
    assert all(callable(getattr(ops, name, None)) for name in NATIVE_OPS)
    data = rng.normal(0.0, 30.0, (3, 5))
    x = diff_backend.asarray(data, "float32")
    for name, expected in (
        ("log_sigmoid", [[reference.log_sigmoid(v) for v in row] for row in data]),
        ("softplus", [[-reference.log_sigmoid(-v) for v in row] for row in data]),
    ):
        out = getattr(ops, name)(x)
        assert out.shape == x.shape and out.dtype == x.dtype, name
        assert_close(diff_backend.to_numpy(out), expected, "float32")
    top = data.max(axis=-1, keepdims=True)
    lse = top + np.log(np.exp(data - top).sum(axis=-1, keepdims=True))
    out = ops.logsumexp(x, axis=-1, keepdims=True)
    assert out.shape == (3, 1) and out.dtype == x.dtype
    assert_close(diff_backend.to_numpy(out), lse, "float32")
    assert ops.is_concrete(x) is True and ops.on_host(x) is (diff_backend.name in ("torch", "jax"))
    assert ops.all_finite(x) is True
    assert ops.all_finite(diff_backend.asarray([1.0, np.inf])) is False
    assert ops.all_finite(diff_backend.asarray([np.nan, 1.0])) is False
    big = diff_backend.asarray([3e38, 3e38], "float32")  # finite entries, an infinite sum
    assert ops.all_finite(big) is True
    flags = diff_backend.asarray([[True, False], [False, False]], "bool")
    out = ops.any_along(flags, -1)
    assert out.shape == (2,) and out.dtype == get_namespace(flags).bool
    assert diff_backend.to_numpy(out).tolist() == [True, False]
    _, (g,) = diff_backend.value_and_grad(lambda a: ops.stop_gradient(a) * a, [x], [0])
    assert_close(diff_backend.to_numpy(g), diff_backend.to_numpy(x), "float32")  # d(c a)/da = c
