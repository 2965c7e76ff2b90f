"""Every registered loss against its plain-loop float64 reference, on every backend."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import prefopt
from tests import reference
from tests.cases import KIND, MASK, VARIANTS, make_case, to_backend
from tests.helpers import GRAD_TOL, assert_close, check_result

NAMES = [name for name in prefopt.available_losses() if name != "dpo"]  # dpo: alias

PARAMS = [(name, i) for name in NAMES for i in range(len(VARIANTS[name]))]


def test_every_registered_loss_is_tested():
    assert set(VARIANTS) == set(NAMES)


def reference_fn(name):
    if KIND[name] == "pairwise":
        return functools.partial(reference.pairwise, name)
    return getattr(reference, name)


def read(backend, arrays):
    return [None if a is None else backend.to_numpy(a) for a in arrays]


def scale(positional, name):
    """How much float32 rounding of the log-ratios moves the loss: |d loss / d h| at most."""
    beta = {"simpo": 2.0, "ipo": 10.0, "sppo_hard": 10.0}.get(name, 0.1)
    return beta * max(np.abs(a).max() for a in positional if a is not None and a.dtype != bool)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", ["random", "zero", "extreme"])
@pytest.mark.parametrize("name,variant", PARAMS)
def test_values(backend, rng, name, variant, case, dtype):
    positional, keywords, opts = make_case(name, case, rng, VARIANTS[name][variant])
    pos, kw = to_backend(backend, positional, keywords, dtype)
    out = prefopt.get_loss(name)(*pos, **kw, **opts)
    check_result(backend, out, (6,), dtype)
    inputs = read(backend, pos)
    expected = reference_fn(name)(*inputs, **dict(zip(kw, read(backend, kw.values()))), **opts)
    assert_close(backend.to_numpy(out), expected, dtype, scale=scale(inputs, name))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_computes_in_float32(diff_backend, rng, name, dtype):
    backend = diff_backend
    positional, keywords, opts = make_case(name, "random", rng, VARIANTS[name][-1])
    positional = [a if a.dtype == bool else a / 8 for a in positional]  # inside fp16's range
    pos, kw = to_backend(backend, positional, keywords, dtype)
    out = prefopt.get_loss(name)(*pos, **kw, **opts)
    check_result(backend, out, (6,), dtype)
    expected = reference_fn(name)(
        *read(backend, pos), **dict(zip(kw, read(backend, kw.values()))), **opts
    )
    assert_close(backend.to_numpy(out), expected, dtype, scale=scale(read(backend, pos), name))


# LiPO's rank weights jump where scores tie, and at zero log-ratios all of them do.
GRAD_PARAMS = [(*p, c) for p in PARAMS for c in ("random", "zero") if p[0] != "lipo" or c != "zero"]


@pytest.mark.parametrize("name,variant,case", GRAD_PARAMS)
def test_gradients_match_finite_differences(diff_backend, rng, name, variant, case):
    backend = diff_backend
    positional, keywords, opts = make_case(name, case, rng, VARIANTS[name][variant])
    wrt = [i for i, a in enumerate(positional) if a.dtype != bool][
        : 4 if KIND[name] != "group" else 2
    ]
    pos, kw = to_backend(backend, positional, keywords, "float64")
    fn = prefopt.get_loss(name)
    _, grads = backend.value_and_grad(lambda *a: fn(*a, **kw, **opts), pos, wrt)
    kw_np = dict(zip(kw, read(backend, kw.values())))
    numeric = reference.numeric_grad(
        lambda *a: reference_fn(name)(*a, **kw_np, **opts), read(backend, pos), wrt
    )
    for g, expected in zip(grads, numeric):
        assert_close(backend.to_numpy(g), expected, tol=GRAD_TOL)


GROUP_NAMES = [n for n in NAMES if KIND[n] == "group"]


@pytest.mark.parametrize("name", GROUP_NAMES)
def test_padding_garbage_changes_nothing(diff_backend, rng, name):
    backend = diff_backend
    positional, keywords, opts = make_case(name, "random", rng, {})
    clean = [a.copy() for a in positional]
    dirty = [a.copy() for a in positional]
    for a, junk in zip(dirty, (np.nan, -np.inf, np.inf)):
        a[~MASK] = junk
    results = []
    for arrays in (clean, dirty):
        pos, kw = to_backend(backend, arrays, keywords, "float64")
        results.append(
            backend.value_and_grad(lambda *a: prefopt.get_loss(name)(*a, **kw, **opts), pos, [0, 1])
        )
    (out_clean, grads_clean), (out_dirty, grads_dirty) = results
    np.testing.assert_array_equal(backend.to_numpy(out_dirty), backend.to_numpy(out_clean))
    for gc, gd in zip(grads_clean, grads_dirty):
        gd = backend.to_numpy(gd)
        np.testing.assert_array_equal(gd, backend.to_numpy(gc))
        assert np.all(gd[~MASK] == 0.0)


@pytest.mark.parametrize("name", GROUP_NAMES)
def test_degenerate_groups_are_exactly_zero(diff_backend, name):
    backend = diff_backend
    # no valid response; one valid response (NCA alone still has a loss there)
    mask = np.array([[0, 0, 0], [0, 1, 0]], dtype=bool)
    logps = backend.asarray(np.array([[-3.0, -4.0, -5.0], [-6.0, -7.0, -8.0]]))
    rewards = backend.asarray(np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]))
    mask_b = backend.asarray(mask, "bool")
    out, (grad,) = backend.value_and_grad(
        lambda lp: prefopt.get_loss(name)(lp, None, rewards, mask=mask_b), [logps], [0]
    )
    out, grad = backend.to_numpy(out), backend.to_numpy(grad)
    assert out[0] == 0.0 and not np.signbit(out[0]) and np.all(grad[0] == 0.0)
    if name != "nca":
        assert out[1] == 0.0 and not np.signbit(out[1]) and np.all(grad[1] == 0.0)
    assert np.all(grad[~mask] == 0.0)


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge", "apo_zero", "aot_unpaired"])
def test_f_divergences(backend, rng, name, divergence):
    positional, _, _ = make_case(name, "random", rng, {})
    positional = [
        positional[2] + rng.normal(0.0, 2.0, 6),
        positional[3] + rng.normal(0.0, 2.0, 6),
        positional[2],
        positional[3],
    ]  # log-ratios of order 1: exp(-h) stays moderate
    pos, _ = to_backend(backend, positional, {}, "float64")
    opts = {"f_divergence": divergence, "f_alpha": 0.3}
    out = prefopt.get_loss(name)(*pos, **opts)
    assert_close(backend.to_numpy(out), reference.pairwise(name, *positional, **opts))


def test_alpha_divergence_at_alpha_one_is_reverse_kl(rng):
    args = list(rng.normal(-50.0, 5.0, size=(4, 5)))
    np.testing.assert_array_equal(
        prefopt.dpo_loss(*args, f_divergence="alpha_divergence", f_alpha=1.0),
        prefopt.dpo_loss(*args),
    )


@pytest.mark.parametrize("divergence", ["forward_kl", "alpha_divergence"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_f_divergence_exponent_is_clipped_to_stay_finite(diff_backend, divergence, dtype):
    backend = diff_backend
    cw = backend.asarray(np.array([-1e4, -300.0, 300.0]), dtype)
    cl = backend.asarray(np.array([300.0, -300.0, -1e4]), dtype)
    zero = backend.asarray(np.zeros(3), dtype)
    out, grads = backend.value_and_grad(
        lambda a, b: prefopt.dpo_loss(a, b, zero, zero, f_divergence=divergence),
        [cw, cl],
        [0, 1],
    )
    assert np.all(np.isfinite(backend.to_numpy(out)))
    assert all(np.all(np.isfinite(backend.to_numpy(g))) for g in grads)


def test_orpo_is_finite_for_a_certain_response(backend):
    zero = backend.asarray(np.array([0.0, -1e-30, -2.0]))
    other = backend.asarray(np.array([-3.0, -1e-30, 0.0]))
    ones = backend.asarray(np.ones(3))
    out = prefopt.orpo_loss(zero, other, chosen_lengths=ones, rejected_lengths=ones)
    assert np.all(np.isfinite(backend.to_numpy(out)))


def test_kto_kl_is_a_clamped_detached_mean(diff_backend):
    backend = diff_backend
    logps = backend.asarray(np.array([-3.0, -5.0, np.nan]))
    ref = backend.asarray(np.array([-4.0, -5.5, 0.0]))
    mask = backend.asarray(np.array([True, True, False]), "bool")
    kl = prefopt.kto_kl(logps, ref, mask=mask)
    assert backend.to_numpy(kl).shape == () and backend.to_numpy(kl) == 0.75
    assert backend.to_numpy(prefopt.kto_kl(ref, logps, mask=mask)) == 0.0  # clamped at 0
    # no gradient flows through the reference point: the same as with a constant kl
    logps = backend.asarray(np.array([-3.0, -5.0, -9.0]))
    grads = [
        backend.value_and_grad(
            lambda lp: prefopt.kto_loss(lp, ref, mask, kl=kl_of(lp)), [logps], [0]
        )[1][0]
        for kl_of in (lambda lp: prefopt.kto_kl(lp, ref, mask=mask), lambda lp: 0.75)
    ]
    np.testing.assert_array_equal(backend.to_numpy(grads[0]), backend.to_numpy(grads[1]))
