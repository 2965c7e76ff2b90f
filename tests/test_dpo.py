import math

import numpy as np
import pytest

import prefopt
from tests import reference
from tests.helpers import GRAD_TOL, assert_close, check_result


def pair_cases(rng, B=6):
    base = rng.normal(-120.0, 30.0, size=(4, B))
    zero = base.copy()
    zero[0], zero[1] = zero[2], zero[3]  # policy == reference: log-ratios exactly 0
    extreme = base.copy()
    extreme[0] = extreme[2] + np.array([1e4, -1e4, 1e4, -1e4, 0.0, 5.0])[:B]
    extreme[1] = extreme[3] + np.array([-1e4, 1e4, 1e4, -1e4, 1e4, -5.0])[:B]
    return {"random": base, "zero": zero, "extreme": extreme}


CASES = ["random", "zero", "extreme"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reference_free", [False, True])
def test_values(backend, rng, dtype, case, label_smoothing, reference_free):
    arrays = [backend.asarray(a, dtype) for a in pair_cases(rng)[case]]
    if reference_free:
        arrays[2:] = [None, None]
    out = prefopt.dpo_loss(*arrays, beta=0.3, label_smoothing=label_smoothing)
    check_result(backend, out, (6,), dtype)
    inputs = [None if a is None else backend.to_numpy(a) for a in arrays]
    expected = reference.dpo(*inputs, beta=0.3, label_smoothing=label_smoothing)
    scale = 0.3 * max(np.abs(a).max() for a in inputs if a is not None)
    assert_close(backend.to_numpy(out), expected, dtype, scale=scale)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_computes_in_float32(diff_backend, rng, dtype):
    backend = diff_backend
    arrays = [backend.asarray(a, dtype) for a in rng.normal(-20.0, 5.0, size=(4, 6))]
    out = prefopt.dpo_loss(*arrays, beta=0.1)
    check_result(backend, out, (6,), dtype)
    expected = reference.dpo(*[backend.to_numpy(a) for a in arrays], beta=0.1)
    assert_close(backend.to_numpy(out), expected, dtype)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_gradients_match_finite_differences(diff_backend, rng, case, label_smoothing):
    backend = diff_backend
    inputs = list(pair_cases(rng)[case])
    arrays = [backend.asarray(a) for a in inputs]

    def loss(*a):
        return prefopt.dpo_loss(*a, beta=0.3, label_smoothing=label_smoothing)

    out, grads = backend.value_and_grad(loss, arrays, wrt=[0, 1, 2, 3])
    numeric = reference.numeric_grad(
        lambda *a: reference.dpo(*a, beta=0.3, label_smoothing=label_smoothing),
        inputs,
        [0, 1, 2, 3],
    )
    for g, expected in zip(grads, numeric):
        assert_close(backend.to_numpy(g), expected, tol=GRAD_TOL)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_gradient_is_exactly_half_beta_at_zero_log_ratio(diff_backend, dtype):
    # DPO starts here (policy == reference). A log-sigmoid written with min/abs has gradient
    # 0.5 on one framework and 1.0 on another at this very point.
    backend = diff_backend
    x = backend.asarray(np.full(3, -7.0), dtype)
    _, grads = backend.value_and_grad(
        lambda *a: prefopt.dpo_loss(*a, beta=0.1), [x, x, x, x], [0, 1]
    )
    # -0.5 * beta in float32, then rounded to the input's dtype by the cast's backward
    half_beta = float(np.float32(-0.5) * np.float32(0.1)) if dtype != "float64" else -0.05
    expected = backend.to_numpy(backend.asarray(np.full(3, half_beta), dtype))
    np.testing.assert_array_equal(backend.to_numpy(grads[0]), expected)
    np.testing.assert_array_equal(backend.to_numpy(grads[1]), -backend.to_numpy(grads[0]))


def test_loss_at_zero_is_log_2(backend):
    x = backend.asarray(np.zeros(2))
    assert_close(backend.to_numpy(prefopt.dpo_loss(x, x)), [math.log(2.0)] * 2)
