import numpy as np
import pytest

import prefopt
from tests import reference
from tests.cases import MASK, group_batch
from tests.helpers import GRAD_TOL, assert_close, check_result

WEIGHTINGS = ["abs", "signed", "squared", "none"]


# Real responses per group: full, ragged with holes, two, one (degenerate), none (degenerate).
def mpo_inputs(backend, rng, case, dtype, *, ragged=True, reference_free=False, with_lengths=False):
    logps, ref, rewards, lengths = group_batch(rng, case)
    mask = MASK if ragged else None
    arrays = dict(
        logps=backend.asarray(logps, dtype),
        ref_logps=None if reference_free else backend.asarray(ref, dtype),
        rewards=backend.asarray(rewards, "float64" if dtype == "float64" else "float32"),
        mask=None if mask is None else backend.asarray(mask, "bool"),
        lengths=backend.asarray(lengths, dtype) if with_lengths else None,
    )
    return arrays


def read(backend, arrays):
    return {k: None if v is None else backend.to_numpy(v) for k, v in arrays.items()}


def call_mpo(arrays, **kw):
    a = dict(arrays)
    return prefopt.mpo_loss(a.pop("logps"), a.pop("ref_logps"), a.pop("rewards"), **a, **kw)


def call_reference(inputs, **kw):
    a = dict(inputs)
    return reference.mpo(a.pop("logps"), a.pop("ref_logps"), a.pop("rewards"), **a, **kw)


def input_scale(inputs, beta):
    return beta * max(
        np.abs(inputs[k]).max() for k in ("logps", "ref_logps") if inputs[k] is not None
    )


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", ["random", "zero", "extreme"])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("ragged", [True, False])
def test_values(backend, rng, dtype, case, weighting, ragged):
    arrays = mpo_inputs(backend, rng, case, dtype, ragged=ragged)
    kw = dict(beta=0.2, alpha=0.7, weighting=weighting)
    out = call_mpo(arrays, **kw)
    check_result(backend, out, (MASK.shape[0],), dtype)
    inputs = read(backend, arrays)
    assert_close(
        backend.to_numpy(out), call_reference(inputs, **kw), dtype, scale=input_scale(inputs, 0.2)
    )


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_reference_free_length_normalised(backend, rng, dtype):
    arrays = mpo_inputs(backend, rng, "random", dtype, reference_free=True, with_lengths=True)
    out = call_mpo(arrays, beta=2.0)
    inputs = read(backend, arrays)
    assert_close(backend.to_numpy(out), call_reference(inputs, beta=2.0), dtype, scale=2.0 * 160)


def test_explicit_chosen_overrides_the_mean_split(backend, rng):
    arrays = mpo_inputs(backend, rng, "random", "float64")
    chosen = np.zeros(MASK.shape, dtype=bool)
    chosen[:, :2] = True  # includes padding slots: they must stay out
    out = call_mpo(arrays, chosen=backend.asarray(chosen, "bool"))
    inputs = read(backend, arrays)
    assert_close(backend.to_numpy(out), call_reference(inputs, chosen=chosen))


def test_integer_rewards(backend, rng):
    arrays = mpo_inputs(backend, rng, "random", "float64")
    ratings = rng.integers(1, 11, size=MASK.shape)
    arrays["rewards"] = backend.asarray(ratings, "int64")
    out = call_mpo(arrays, alpha=0.3)
    inputs = read(backend, arrays)
    assert_close(backend.to_numpy(out), call_reference(inputs, alpha=0.3))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_computes_in_float32(diff_backend, rng, dtype):
    backend = diff_backend
    arrays = mpo_inputs(backend, rng, "random", dtype)
    out = call_mpo(arrays)
    check_result(backend, out, (MASK.shape[0],), dtype)
    inputs = read(backend, arrays)
    assert_close(backend.to_numpy(out), call_reference(inputs), "float32", scale=0.1 * 200)


@pytest.mark.parametrize("case", ["random", "zero", "extreme"])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_gradients_match_finite_differences(diff_backend, rng, case, weighting):
    backend = diff_backend
    arrays = mpo_inputs(backend, rng, case, "float64")
    inputs = read(backend, arrays)
    kw = dict(beta=0.2, alpha=0.7, weighting=weighting)
    keys = list(arrays)

    def loss(*a):
        return call_mpo(dict(zip(keys, a)), **kw)

    _, grads = backend.value_and_grad(loss, list(arrays.values()), wrt=[0, 1])
    numeric = reference.numeric_grad(
        lambda *a: call_reference(dict(zip(keys, a)), **kw), list(inputs.values()), [0, 1]
    )
    for g, expected in zip(grads, numeric):
        g = backend.to_numpy(g)
        assert_close(g, expected, tol=GRAD_TOL)
        assert np.all(g[~MASK] == 0.0)


def test_gradients_agree_across_frameworks_at_zero_log_ratio(rng):
    # policy == reference, so every score is 0: the start of training.
    from tests.backends import make_backend

    pytest.importorskip("torch")
    pytest.importorskip("jax")
    results = []
    for name in ("torch", "jax"):
        b = make_backend(name)
        arrays = mpo_inputs(b, rng, "zero", "float64")
        _, grads = b.value_and_grad(
            lambda *a: call_mpo(dict(zip(arrays, a))), list(arrays.values()), [0]
        )
        results.append(b.to_numpy(grads[0]))
        rng = np.random.default_rng(20241206)
    np.testing.assert_allclose(results[0], results[1], rtol=1e-14, atol=1e-16)


def test_padding_garbage_changes_nothing(diff_backend, rng):
    backend = diff_backend
    clean = mpo_inputs(backend, rng, "random", "float64", reference_free=False)
    logps, ref, rewards, _ = (
        backend.to_numpy(clean[k]) for k in ("logps", "ref_logps", "rewards", "logps")
    )
    garbage = {}
    for name, a in (("logps", logps), ("ref_logps", ref), ("rewards", rewards)):
        a = a.copy()
        a[~MASK] = np.resize([np.nan, np.inf, -np.inf, 1e30], int((~MASK).sum()))
        garbage[name] = backend.asarray(a)
    dirty = dict(clean, **garbage)
    outs, grads = [], []
    for arrays in (clean, dirty):
        out, g = backend.value_and_grad(
            lambda *a: call_mpo(dict(zip(arrays, a))), list(arrays.values()), [0, 1]
        )
        outs.append(backend.to_numpy(out))
        grads.append([backend.to_numpy(x) for x in g])
    np.testing.assert_array_equal(outs[0], outs[1])
    for g_clean, g_dirty in zip(grads[0], grads[1]):
        np.testing.assert_array_equal(g_clean, g_dirty)
        assert np.all(g_dirty[~MASK] == 0.0)


def test_padding_garbage_in_lengths(backend, rng):
    clean = mpo_inputs(backend, rng, "random", "float64", reference_free=True, with_lengths=True)
    lengths = backend.to_numpy(clean["lengths"]).copy()
    lengths[~MASK] = 0.0
    dirty = dict(clean, lengths=backend.asarray(lengths))
    np.testing.assert_array_equal(
        backend.to_numpy(call_mpo(clean)), backend.to_numpy(call_mpo(dirty))
    )


def test_degenerate_groups_give_exactly_zero_loss_and_gradient(diff_backend, rng):
    backend = diff_backend
    logps, ref, rewards, _ = group_batch(rng)
    rewards[0] = 3.25  # all equal
    # all equal, and their computed mean (5 valid) rounds *below* them: all "above the mean"
    rewards[5] = 7.300473036790027
    arrays = dict(
        logps=backend.asarray(logps),
        ref_logps=backend.asarray(ref),
        rewards=backend.asarray(rewards),
        mask=backend.asarray(MASK, "bool"),
    )
    out, grads = backend.value_and_grad(
        lambda *a: call_mpo(dict(zip(arrays, a))), list(arrays.values()), [0, 1]
    )
    out = backend.to_numpy(out)
    degenerate = [0, 3, 4, 5]  # equal rewards, equal rewards, one response, no response
    assert np.all(out[degenerate] == 0.0) and not np.any(np.signbit(out[degenerate]))
    assert out[1] > 0 and out[2] > 0
    for g in grads:
        g = backend.to_numpy(g)
        assert np.all(np.isfinite(g))
        assert np.all(g[degenerate] == 0.0)
    _, _, counted = prefopt.mpo_split(arrays["rewards"], mask=arrays["mask"])
    np.testing.assert_array_equal(
        backend.to_numpy(counted), [False, True, True, False, False, False]
    )


@pytest.mark.parametrize("weighting", ["abs", "squared", "none"])
def test_two_responses_equal_dpo(diff_backend, rng, weighting):
    backend = diff_backend
    logps = rng.normal(-50.0, 10.0, size=(8, 2))
    ref = logps + rng.normal(0.0, 2.0, size=(8, 2))
    rewards = rng.normal(size=(8, 2))
    win = np.argmax(rewards, axis=1)
    rows = np.arange(8)
    lose = 1 - win
    group = [backend.asarray(a) for a in (logps, ref, rewards)]
    pair = [
        backend.asarray(a)
        for a in (logps[rows, win], logps[rows, lose], ref[rows, win], ref[rows, lose])
    ]
    mpo_out, (mpo_grad,) = backend.value_and_grad(
        lambda lp, r, rw: prefopt.mpo_loss(lp, r, rw, beta=0.3, alpha=2.0, weighting=weighting),
        group,
        [0],
    )
    dpo_out, dpo_grads = backend.value_and_grad(
        lambda *a: prefopt.dpo_loss(*a, beta=0.3), pair, [0, 1]
    )
    np.testing.assert_allclose(backend.to_numpy(mpo_out), backend.to_numpy(dpo_out), rtol=1e-13)
    mpo_grad = backend.to_numpy(mpo_grad)
    np.testing.assert_allclose(mpo_grad[rows, win], backend.to_numpy(dpo_grads[0]), rtol=1e-12)
    np.testing.assert_allclose(mpo_grad[rows, lose], backend.to_numpy(dpo_grads[1]), rtol=1e-12)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_permutation_and_reward_shift_invariance(backend, rng, weighting):
    arrays = mpo_inputs(backend, rng, "random", "float64")
    inputs = read(backend, arrays)
    base = backend.to_numpy(call_mpo(arrays, weighting=weighting, alpha=0.5))
    perm = rng.permutation(MASK.shape[1])
    permuted = {
        k: None if v is None else backend.asarray(v[:, perm], "bool" if k == "mask" else "float64")
        for k, v in inputs.items()
    }
    np.testing.assert_allclose(
        backend.to_numpy(call_mpo(permuted, weighting=weighting, alpha=0.5)), base, rtol=1e-12
    )
    shifted = dict(arrays, rewards=backend.asarray(inputs["rewards"] + 17.0))
    np.testing.assert_allclose(
        backend.to_numpy(call_mpo(shifted, weighting=weighting, alpha=0.5)), base, rtol=1e-10
    )


def test_masked_mean_over_counted_groups(backend, rng):
    arrays = mpo_inputs(backend, rng, "random", "float64")
    loss = call_mpo(arrays)
    _, _, counted = prefopt.mpo_split(arrays["rewards"], mask=arrays["mask"])
    mean = backend.to_numpy(prefopt.masked_mean(loss, counted))
    expected = np.mean(
        [v for v, m in zip(call_reference(read(backend, arrays)), MASK.sum(1)) if m >= 2]
    )
    assert_close(mean, expected)


@pytest.mark.parametrize("reference_free", [False, True])
def test_padding_garbage_values_on_every_backend(backend, rng, reference_free):
    # -inf is what a masked log-softmax leaves in padding; NaN and inf are plain garbage.
    # Warnings are errors in this suite, so NumPy may not even warn about them.
    clean = mpo_inputs(
        backend,
        rng,
        "random",
        "float64",
        reference_free=reference_free,
        with_lengths=reference_free,
    )
    dirty = dict(clean)
    for name in ("logps", "ref_logps", "rewards", "lengths"):
        if clean[name] is None:
            continue
        a = backend.to_numpy(clean[name]).copy()
        a[~MASK] = np.resize([-np.inf, np.nan, np.inf, 0.0], int((~MASK).sum()))
        dirty[name] = backend.asarray(a)
    np.testing.assert_array_equal(
        backend.to_numpy(call_mpo(clean)), backend.to_numpy(call_mpo(dirty))
    )
