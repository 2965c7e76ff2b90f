"""Inputs that crashed or passed silently: each test failed before the fix it guards."""

import math

import numpy as np
import pytest

import prefopt
from prefopt.losses.registry import spec, specs
from tests import reference

GROUP_LOSSES = ["mpo", "infonca", "nca", "plackett_luce", "lipo"]


# ---- 1. MPO's split does not depend on rounding ---------------------------------------


def test_split_of_a_reward_at_the_mean_ignores_order_shift_and_dtype():
    # Before: 2.384 in this order, 1.143 reversed or shifted by 0.1, and float32 differed.
    logps, rewards = np.array([[-1.0, -2.0, -3.0]]), np.array([[0.1, 0.2, 0.3]])
    base = prefopt.mpo_loss(logps, None, rewards, beta=1.0)
    np.testing.assert_allclose(
        prefopt.mpo_loss(logps[:, ::-1], None, rewards[:, ::-1], beta=1.0), base, rtol=1e-15
    )
    np.testing.assert_allclose(
        prefopt.mpo_loss(logps, None, rewards + 0.1, beta=1.0), base, rtol=1e-15
    )
    as32 = prefopt.mpo_loss(logps.astype(np.float32), None, rewards.astype(np.float32), beta=1.0)
    np.testing.assert_allclose(as32, base, rtol=1e-6)
    chosen, _, _ = prefopt.mpo_split(rewards)
    assert chosen.tolist() == [[False, False, True]]  # 0.2 is the mean: not above it


def test_integer_ratings_split_exactly_at_any_size():
    big = 2**40  # beyond float32's 2**24: the old float32 split got this wrong
    rewards = np.array([[big + 1, big + 2, big + 3], [big, big, big + 1]], dtype=np.int64)
    chosen, rejected, counted = prefopt.mpo_split(rewards)
    assert chosen.tolist() == [[False, False, True], [False, False, True]]
    assert counted.tolist() == [True, True]
    torch = pytest.importorskip("torch")
    from prefopt.backends.torch import MPOLoss

    logps = torch.randn(2, 3, dtype=torch.float64)
    per_group = prefopt.mpo_loss(logps, None, torch.from_numpy(rewards))
    mean = MPOLoss()(logps, None, torch.from_numpy(rewards))
    torch.testing.assert_close(mean, per_group.mean())  # both groups count, in module and loss


@pytest.mark.parametrize("name", ["lipo", "infonca", "nca", "plackett_luce", "mpo"])
def test_half_precision_rewards_are_computed_in_float32(name):
    # Before: lipo_loss and infonca_loss gave NaN for float16 rewards [16, 0, 5].
    logps = np.array([[-1.0, -2.0, -3.0]], dtype=np.float32)
    rewards = np.array([[16.0, 0.0, 5.0]])
    half = prefopt.get_loss(name)(logps, None, rewards.astype(np.float16))
    full = prefopt.get_loss(name)(logps, None, rewards.astype(np.float32))
    assert np.all(np.isfinite(half))
    np.testing.assert_allclose(half, full, rtol=1e-6)


# ---- 2. labels and dtypes ---------------------------------------------------------------


def test_torch_log_probs_take_any_integer_label_dtype():
    torch = pytest.importorskip("torch")
    logits = torch.randn(2, 4, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 4))
    for dtype in (torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(
            prefopt.token_logps(logits, labels.to(dtype)), prefopt.token_logps(logits, labels)
        )
    torch.testing.assert_close(
        prefopt.causal_lm_logps(logits, labels.to(torch.int32))[0],
        prefopt.causal_lm_logps(logits, labels)[0],
    )


def test_shift_labels_refuses_unsigned_labels():
    with pytest.raises(TypeError, match="shift_labels: labels must be a signed integer.*uint8"):
        prefopt.shift_labels(np.array([[3, 4, 5]], dtype=np.uint8))


def test_torch_fused_log_probs_name_the_argument_to_cast():
    torch = pytest.importorskip("torch")
    from prefopt.backends.torch import fused_linear_logps

    hidden = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="weight must have the dtype of hidden, torch.bfloat16"):
        fused_linear_logps(hidden, torch.randn(9, 4), torch.zeros(2, 3, dtype=torch.long))


# ---- 3. empty inputs ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (0, 0)])
@pytest.mark.parametrize("name", GROUP_LOSSES)
def test_empty_groups_give_empty_or_zero_losses(shape, name):
    logps, rewards = np.zeros(shape), np.zeros(shape)
    out = prefopt.get_loss(name)(logps, None, rewards)
    assert out.shape == (shape[0],) and np.all(out == 0.0)
    for reduction in ("mean", "batchmean", "sum"):
        assert prefopt.batch_loss(name, logps, None, rewards, reduction=reduction) == 0.0


@pytest.mark.parametrize("shape", [(0, 4), (3, 0)])
@pytest.mark.parametrize("name", ["mpo", "sigmoid", "lipo"])
def test_empty_batches_through_modules_are_zero_with_zero_gradient(shape, name):
    torch = pytest.importorskip("torch")
    from prefopt.backends.torch import loss_module

    logps = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    if name == "sigmoid":  # pairs: (B,) with B = shape[0] * shape[1] = 0
        flat = logps.reshape(-1)
        out = loss_module(name)(flat, flat)
    else:
        out = loss_module(name)(logps, None, torch.zeros(shape, dtype=torch.float64))
    out.backward()
    assert out.item() == 0.0 and torch.all(logps.grad == 0)


def test_empty_pairs_kto_and_log_probs():
    x = np.zeros(0)
    assert prefopt.dpo_loss(x, x).shape == (0,)
    assert prefopt.kto_kl(x, x) == 0.0
    assert prefopt.metrics.pair_metrics(x, x)["rewards/chosen"] == 0.0
    assert prefopt.token_logps(np.zeros((2, 0, 5)), np.zeros((2, 0), int)).shape == (2, 0)
    logps, lengths = prefopt.causal_lm_logps(np.zeros((2, 0, 5)), np.zeros((2, 0), int))
    assert logps.tolist() == [0.0, 0.0] and lengths.tolist() == [0.0, 0.0]


# ---- 4. the f-divergences stay finite ------------------------------------------------------


@pytest.mark.parametrize("name", ["ipo", "sppo_hard", "sigmoid"])
@pytest.mark.parametrize("f", ["forward_kl", "alpha_divergence"])
def test_f_divergence_losses_are_finite_in_float32(name, f):
    # Before: ipo and sppo_hard with forward_kl returned inf at log-ratio -45 in float32.
    h = np.array([-45.0, -1e4, 1e4, 0.0], dtype=np.float32)
    zero = np.zeros(4, dtype=np.float32)

    def loss(h, zero):
        return prefopt.get_loss(name)(h, zero, zero, zero, f_divergence=f, f_alpha=0.1)

    if name in TERM_LOSSES:  # on the host a term beyond float32 is refused; in a trace...
        with pytest.raises(ValueError, match="one is beyond float32"):
            loss(h, zero)
        jax = pytest.importorskip("jax")
        out = jax.jit(loss)(h, zero)  # ...its values cannot be read, and it saturates
    else:
        out = loss(h, zero)
    assert np.all(np.isfinite(np.asarray(out)))


F_LOSSES = [n for n, s in specs().items() if "f_divergence" in s.defaults and n != "dpo"]
F32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize("name", F_LOSSES)
@pytest.mark.parametrize(
    "f, f_alpha", [("forward_kl", 0.5), ("alpha_divergence", 0.1), ("alpha_divergence", 0.5),
                   ("alpha_divergence", 2.0)]
)  # fmt: skip
@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_f_divergence_float32_holds_the_float64_value_wherever_float32_can(name, f, f_alpha, beta):
    # The exponent clip is where float32 would overflow, no earlier: wherever the float64
    # loss and the transformed log-ratios fit float32 (with a factor 8 to spare, for the
    # rounding of e^x at |x| near 88), float32 gives the float64 value. Before, the clip at
    # half the largest exponent made hinge (alpha 0.1, beta 0.01, log-ratio -59) 2.8e16
    # against a true 1.29e21.
    grid = np.concatenate([-np.geomspace(1e-2, 120.0, 40), np.geomspace(1e-2, 120.0, 40)])
    cw, cl = np.repeat(grid, len(grid)), np.tile(grid, len(grid))
    if name in TERM_LOSSES:  # a term beyond float32 is refused (tested below): the rest
        c = -1.0 if f == "forward_kl" else f_alpha - 1.0
        big = math.log(F32_MAX)
        limit = 0.5 * (big - math.log(4.0)) if name == "sppo_hard" else big - math.log(2.0)
        limit += min(0.0, math.log(abs(c))) - 0.01  # a margin for float32's rounding of h
        keep = (c * cw <= limit) & (c * cl <= limit)
        cw, cl = cw[keep], cl[keep]
    zero = np.zeros_like(cw)
    lengths = {"chosen_lengths": np.full_like(cw, 3.0), "rejected_lengths": np.full_like(cw, 5.0)}
    kw = lengths if spec(name).lengths == "required" else {}
    opts = {"beta": beta, "f_divergence": f, "f_alpha": f_alpha}
    with np.errstate(over="ignore"):
        expected = np.array(reference.pairwise(name, cw, cl, zero, zero, **kw, **opts))
    fits = (np.abs(expected) <= F32_MAX / 8) & np.isfinite(expected)
    for h in (cw, cl):
        t = np.array([reference._f(float(x), f, f_alpha) for x in h])
        if name == "aot_unpaired":  # entry i is the i-th smallest of each side
            t = np.sort(t)
        fits &= np.abs(t) <= F32_MAX / 8
    as32 = {k: v.astype(np.float32) for k, v in kw.items()}
    args32 = [a.astype(np.float32) for a in (cw, cl, zero, zero)]
    with np.errstate(over="ignore"):  # beyond float32, an overflow to inf is the answer
        out = prefopt.get_loss(name)(*args32, **as32, **opts).astype(np.float64)
    assert not np.any(np.isnan(out))
    assert fits.sum() > len(grid)  # the comparison is not empty
    np.testing.assert_allclose(out[fits], expected[fits], rtol=2e-4, atol=1e-4)


# the losses that read each transformed term, not only beta (h_w - h_l): there a term that
# does not fit the dtype is refused where it can be read (docs/losses/pairwise.md)
TERM_LOSSES = ("nca_pair", "bco_pair", "sppo_hard", "sigmoid_norm")


@pytest.mark.parametrize("name", F_LOSSES)
@pytest.mark.parametrize("f, f_alpha", [("forward_kl", 0.5), ("alpha_divergence", 0.1)])
@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_f_divergence_float32_where_both_terms_overflow(name, f, f_alpha, beta):
    # Reference-free log-probs of long responses (-106.3 and -145.3): each transformed term
    # (1 - e^106, 1 - e^145) is beyond float32, the loss often is not (0 for a margin
    # hugely positive). Before, both terms were clipped to the same value and the margin
    # vanished: DiscoPOP gave its value at margin 0, 0.8466, where the true loss is 0.
    grid = -np.linspace(90.0, 160.0, 29)
    cw, cl = np.repeat(grid, len(grid)), np.tile(grid, len(grid))
    kw = {"chosen_lengths": np.full_like(cw, 3.0), "rejected_lengths": np.full_like(cw, 5.0)}
    kw = kw if spec(name).lengths == "required" else {}
    opts = {"beta": beta, "f_divergence": f, "f_alpha": f_alpha}

    def loss_in_float32():
        return prefopt.get_loss(name)(
            cw.astype(np.float32), cl.astype(np.float32),
            **{k: v.astype(np.float32) for k, v in kw.items()}, **opts,
        ).astype(np.float64)  # fmt: skip

    if name in TERM_LOSSES:  # a term beyond float32 would saturate: refused in one line
        with pytest.raises(ValueError, match=rf"{f}.* one is beyond float32 .* a reference"):
            loss_in_float32()
        return
    with np.errstate(over="ignore"):
        expected = np.array(reference.pairwise(name, cw, cl, None, None, **kw, **opts))
        out = loss_in_float32()
    assert not np.any(np.isnan(out))
    fits = (np.abs(expected) <= F32_MAX / 8) & np.isfinite(expected)
    assert fits.sum() >= len(grid)  # the comparison is not empty
    np.testing.assert_allclose(out[fits], expected[fits], rtol=2e-4, atol=1e-4)


def test_the_whole_margin_with_traced_options_equals_the_python_one():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    cw = jnp.array([-106.3, -145.3, -100.0, -1.0], dtype=jnp.float32)
    cl = jnp.array([-145.3, -106.3, -100.0, -2.0], dtype=jnp.float32)

    def loss(cw, cl, beta, f_alpha):
        return prefopt.discopop_loss(
            cw, cl, beta=beta, f_divergence="alpha_divergence", f_alpha=f_alpha
        ).sum()

    plain = loss(cw, cl, 0.1, 0.25)
    traced = jax.jit(loss)(cw, cl, jnp.float32(0.1), jnp.float32(0.25))
    np.testing.assert_allclose(np.asarray(traced), np.asarray(plain), rtol=1e-6)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(cw, cl, jnp.float32(0.1), jnp.float32(0.25))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_hinge_alpha_divergence_at_minus_59_is_the_true_value():
    h = np.array([-59.0], dtype=np.float32)
    zero = np.zeros(1, dtype=np.float32)
    out = prefopt.hinge_loss(h, zero, zero, zero, beta=0.01, f_divergence="alpha_divergence",
                             f_alpha=0.1)  # fmt: skip
    true = 1.0 + 0.01 * (math.exp(0.9 * 59.0) - 1.0) / 0.9
    assert float(out[0]) == pytest.approx(true, rel=1e-5)  # 1.29e21


# ---- 5. arguments --------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [None, "0.1", True, [0.1]])
def test_beta_must_be_a_real_number(beta):  # or a 0-d array: tests/test_hyperparameters.py
    x = np.array([-1.0, -2.0])
    with pytest.raises(TypeError, match=r"dpo_loss: beta must be a real number; got"):
        prefopt.dpo_loss(x, x, beta=beta)
    with pytest.raises(TypeError, match=r"mpo_loss: beta must be a real number; got"):
        prefopt.mpo_loss(x[None], None, x[None], beta=beta)


def test_xp_must_be_an_array_namespace():
    torch = pytest.importorskip("torch")
    x = torch.zeros(2)
    with pytest.raises(TypeError, match="dpo_loss: xp must be an Array API namespace.*'torch'"):
        prefopt.dpo_loss(x, x, xp=torch)


def test_lengths_must_be_finite():
    x, ones = np.array([-3.0, -4.0]), np.ones(2)
    with pytest.raises(ValueError, match="simpo_loss: chosen_lengths must be finite and > 0"):
        prefopt.simpo_loss(x, x, chosen_lengths=np.array([np.inf, 1.0]), rejected_lengths=ones)
    with pytest.raises(ValueError, match="mpo_loss: lengths must be finite and > 0"):
        prefopt.mpo_loss(x[None], None, x[None], lengths=np.array([[1.0, np.inf]]))


def test_kto_kl_array_must_not_be_negative():
    x = np.array([-1.0, -2.0])
    with pytest.raises(ValueError, match="kto_loss: kl must be >= 0"):
        prefopt.kto_loss(x, x, np.array([True, False]), kl=np.array(-0.5))


def test_pairwise_loss_on_groups_needs_the_lengths_it_requires():
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match="group_pairwise_loss: 'simpo' needs lengths"):
        prefopt.group_pairwise_loss("simpo", x, None, x)


def test_collator_refuses_an_empty_batch_and_a_zero_max_length():
    pytest.importorskip("transformers")
    from prefopt.cli.task import builtin_tokenizer
    from prefopt.integrations.transformers import PreferenceCollator

    with pytest.raises(ValueError, match="PreferenceCollator: max_length must be an int >= 1"):
        PreferenceCollator(builtin_tokenizer(), max_length=0)
    with pytest.raises(ValueError, match="PreferenceCollator: no rows"):
        PreferenceCollator(builtin_tokenizer())([])


@pytest.mark.parametrize("name", GROUP_LOSSES)
def test_no_gradient_reaches_the_rewards(name):
    # Before: mpo, infonca and nca passed a gradient to the rewards.
    torch = pytest.importorskip("torch")
    logps = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    rewards = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    out = prefopt.get_loss(name)(logps, None, rewards).sum()
    assert out.grad_fn is not None
    (grad,) = torch.autograd.grad(out, [rewards], allow_unused=True)
    assert grad is None or torch.all(grad == 0)


@pytest.mark.parametrize("name", ["mpo", "sigmoid", "infonca"])
def test_torch_func_vmap_runs_with_the_defaults(name):
    torch = pytest.importorskip("torch")
    logps, rewards = torch.randn(5, 3, 4), torch.rand(5, 3, 4)
    fn = prefopt.get_loss(name)
    if name == "sigmoid":
        out = torch.func.vmap(lambda a: fn(a[:, 0], a[:, 1]))(logps)
        expected = torch.stack([fn(a[:, 0], a[:, 1]) for a in logps])
    else:
        out = torch.func.vmap(lambda a, r: fn(a, None, r))(logps, rewards)
        expected = torch.stack([fn(a, None, r) for a, r in zip(logps, rewards)])
    torch.testing.assert_close(out, expected)


def test_kto_kl_of_an_empty_batch_is_zero_with_zero_gradient():
    torch = pytest.importorskip("torch")
    logps = torch.zeros(0, requires_grad=True)
    out = prefopt.kto_kl(logps, torch.zeros(0))
    assert out.item() == 0.0 and not math.isnan(out.item())


@pytest.mark.parametrize("name", TERM_LOSSES)
def test_a_term_that_fits_is_not_refused_and_a_trace_saturates(name):
    kw = {"chosen_lengths": np.full(2, 3.0), "rejected_lengths": np.full(2, 5.0)}
    kw = kw if spec(name).lengths == "required" else {}
    fn, opts = prefopt.get_loss(name), {"f_divergence": "forward_kl"}
    cw, cl = np.array([-40.0, -1.0], np.float32), np.array([-42.0, -2.0], np.float32)
    assert np.all(np.isfinite(fn(cw, cl, **kw, **opts)))  # below 43.7 (SPPO squares) and 88
    jax = pytest.importorskip("jax")
    far = np.array([-106.3, -1.0], np.float32)
    traced = jax.jit(lambda a, b: fn(a, b, **kw, **opts))(far, cl)  # values unread: saturates
    assert np.all(np.isfinite(np.asarray(traced)))
