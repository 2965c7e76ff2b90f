"""torch and JAX against each other: same inputs, same values and gradients to the last bits."""

import numpy as np
import pytest

import prefopt
from tests import reference
from tests.backends import make_backend
from tests.cases import MASK, group_batch

pytest.importorskip("torch")
pytest.importorskip("jax")
FRAMEWORKS = [make_backend("torch"), make_backend("jax")]


def both(fn, inputs, wrt, dtype="float64"):
    results = []
    for b in FRAMEWORKS:
        arrays = [
            None if a is None else b.asarray(a, "bool" if a.dtype == bool else dtype)
            for a in inputs
        ]
        out, grads = b.value_and_grad(fn, arrays, wrt)
        results.append((b.to_numpy(out), [b.to_numpy(g) for g in grads]))
    return results


@pytest.mark.parametrize("case", ["random", "zero", "extreme"])
@pytest.mark.parametrize("weighting", ["abs", "signed", "squared", "none"])
def test_mpo(rng, case, weighting):
    logps, ref, rewards, _ = group_batch(rng, case)

    def loss(lp, r, rw, m):
        return prefopt.mpo_loss(lp, r, rw, mask=m, beta=0.2, alpha=0.7, weighting=weighting)

    (t_out, t_grads), (j_out, j_grads) = both(loss, [logps, ref, rewards, MASK], [0, 1])
    np.testing.assert_allclose(t_out, j_out, rtol=1e-14, atol=1e-14)
    for tg, jg in zip(t_grads, j_grads):
        np.testing.assert_allclose(tg, jg, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
def test_dpo(rng, label_smoothing):
    inputs = list(rng.normal(-100.0, 30.0, size=(4, 9)))
    inputs[0][:3] = inputs[2][:3]  # zero log-ratios in three pairs
    inputs[1][:3] = inputs[3][:3]

    def loss(*a):
        return prefopt.dpo_loss(*a, beta=0.3, label_smoothing=label_smoothing)

    (t_out, t_grads), (j_out, j_grads) = both(loss, inputs, [0, 1, 2, 3])
    np.testing.assert_allclose(t_out, j_out, rtol=1e-14)
    for tg, jg in zip(t_grads, j_grads):
        np.testing.assert_allclose(tg, jg, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("fw", FRAMEWORKS, ids=str)
def test_bfloat16_gradients(fw, rng):
    # The loss of bf16 inputs is computed in float32; its gradient is rounded back to bf16,
    # a relative error of at most 2^-8 against the float64 gradient of the same inputs.
    logps, ref, rewards, _ = group_batch(rng)
    arrays = [
        fw.asarray(logps, "bfloat16"),
        fw.asarray(ref, "bfloat16"),
        fw.asarray(rewards, "float32"),
    ]
    m = fw.asarray(MASK, "bool")
    _, (grad,) = fw.value_and_grad(
        lambda lp, r, rw: prefopt.mpo_loss(lp, r, rw, mask=m), arrays, [0]
    )
    inputs = [fw.to_numpy(a) for a in arrays]
    (expected,) = reference.numeric_grad(
        lambda lp, r, rw: reference.mpo(lp, r, rw, mask=MASK), inputs, [0]
    )
    grad = fw.to_numpy(grad)
    np.testing.assert_allclose(grad, expected, rtol=2**-8, atol=1e-6)
    assert np.all(grad[~MASK] == 0.0)
