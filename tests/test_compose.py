"""Weighted sums of losses, pairwise losses on groups, pairs as groups, and metrics."""

import numpy as np
import pytest

import prefopt
from prefopt.metrics import group_metrics, pair_metrics
from tests import reference
from tests.cases import MASK
from tests.helpers import GRAD_TOL, assert_close


def pairs(rng, B=5):
    return list(rng.normal(-60.0, 15.0, size=(4, B)))


def test_combination_is_the_weighted_sum(backend, rng):
    arrays = [backend.asarray(a) for a in pairs(rng)]
    lengths = {
        k: backend.asarray(rng.integers(1, 40, 5).astype(float))
        for k in ("chosen_lengths", "rejected_lengths")
    }
    combined = prefopt.combine_losses(
        {"sigmoid": 0.8, "bco_pair": 0.2, "ipo": 0.5, "simpo": 0.1},
        options={"sigmoid": {"label_smoothing": 0.1}, "ipo": {"beta": 0.5}},
    )
    out = combined(*arrays, **lengths)
    expected = (
        0.8 * prefopt.dpo_loss(*arrays, label_smoothing=0.1)
        + 0.2 * prefopt.bco_pair_loss(*arrays)
        + 0.5 * prefopt.ipo_loss(*arrays, **lengths, beta=0.5)
        + 0.1 * prefopt.simpo_loss(*arrays[:2], **lengths)  # reference-free: no reference
    )
    assert_close(backend.to_numpy(out), backend.to_numpy(expected))


def test_group_combination(rng):
    logps, rewards = rng.normal(-30.0, 5.0, (3, 4)), rng.normal(size=(3, 4))
    combined = prefopt.combine_losses({"mpo": 1.0, "infonca": 2.0})
    np.testing.assert_allclose(
        combined(logps, None, rewards),
        prefopt.mpo_loss(logps, None, rewards) + 2.0 * prefopt.infonca_loss(logps, None, rewards),
        rtol=1e-15,
    )
    assert combined.__name__ == "combined_loss"


@pytest.mark.parametrize(
    "weights,options,error,match",
    [
        ({}, None, ValueError, "at least one loss"),
        ({"sigmod": 1.0}, None, ValueError, "combine_losses: unknown loss 'sigmod'.*'sigmoid'"),
        ({"sigmoid": float("nan")}, None, ValueError, r"weights\['sigmoid'\] must be a finite"),
        ({"sigmoid": 1.0, "mpo": 1.0}, None, ValueError, "different data.*group, pair"),
        ({"sigmoid": 1.0}, {"ipo": {}}, ValueError, r"options given for \['ipo'\]"),
        (
            {"sigmoid": 1.0},
            {"sigmoid": {"gamma": 1}},
            TypeError,
            r"sigmoid takes no option.*'gamma'",
        ),
    ],
)
def test_combination_errors(weights, options, error, match):
    with pytest.raises(error, match=match):
        prefopt.combine_losses(weights, options=options)


def test_combination_call_errors():
    combined = prefopt.combine_losses({"sigmoid": 1.0})
    x = np.array([-1.0])
    with pytest.raises(TypeError, match=r"no loss of \['sigmoid'\] takes \['rewards'\]"):
        combined(x, x, rewards=x)
    with pytest.raises(TypeError, match="at most 4 positional"):
        combined(x, x, x, x, x)


def all_pairs_reference(name, logps, ref, rewards, mask, **opts):
    out = []
    for b in range(len(logps)):
        valid = [i for i in range(len(logps[b])) if mask[b][i]]
        mean = sum(rewards[b][i] for i in valid) / max(len(valid), 1)
        pos = [i for i in valid if rewards[b][i] > mean]
        neg = [i for i in valid if i not in pos]
        losses = [
            reference.pairwise(
                name, [logps[b][i]], [logps[b][j]], [ref[b][i]], [ref[b][j]], **opts
            )[0]
            for i in pos
            for j in neg
        ]
        out.append(sum(losses) / len(losses) if losses else 0.0)
    return out


def best_worst_reference(name, logps, ref, rewards, mask, **opts):
    out = []
    for b in range(len(logps)):
        valid = [i for i in range(len(logps[b])) if mask[b][i]]
        if len(valid) < 2 or len({rewards[b][i] for i in valid}) < 2:
            out.append(0.0)
            continue
        best = max(valid, key=lambda i: (rewards[b][i], -i))
        worst = min(valid, key=lambda i: (rewards[b][i], i))
        out.append(
            reference.pairwise(
                name, [logps[b][best]], [logps[b][worst]], [ref[b][best]], [ref[b][worst]], **opts
            )[0]
        )
    return out


@pytest.mark.parametrize(
    "how,ref_fn", [("all", all_pairs_reference), ("best_worst", best_worst_reference)]
)
@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge"])
def test_pairwise_loss_on_groups(backend, rng, name, how, ref_fn):
    logps = rng.normal(-80.0, 25.0, MASK.shape)
    ref = logps + rng.normal(0.0, 3.0, MASK.shape)
    rewards = rng.normal(size=MASK.shape)
    dirty = [a.copy() for a in (logps, ref, rewards)]
    for a in dirty:
        a[~MASK] = np.nan  # padding never reaches the result
    arrays = [backend.asarray(a) for a in dirty]
    out = prefopt.group_pairwise_loss(
        name, *arrays, pairs=how, mask=backend.asarray(MASK, "bool"), beta=0.2
    )
    assert_close(backend.to_numpy(out), ref_fn(name, logps, ref, rewards, MASK, beta=0.2))


def test_pairwise_loss_on_groups_gradients(diff_backend, rng):
    backend = diff_backend
    logps = rng.normal(-80.0, 25.0, MASK.shape)
    ref = logps + rng.normal(0.0, 3.0, MASK.shape)
    rewards = rng.normal(size=MASK.shape)
    mask = backend.asarray(MASK, "bool")
    r = backend.asarray(rewards)
    _, grads = backend.value_and_grad(
        lambda lp, rf: prefopt.group_pairwise_loss("sigmoid", lp, rf, r, mask=mask),
        [backend.asarray(logps), backend.asarray(ref)],
        [0, 1],
    )
    numeric = reference.numeric_grad(
        lambda lp, rf: all_pairs_reference("sigmoid", lp, rf, rewards, MASK), [logps, ref], [0, 1]
    )
    for g, expected in zip(grads, numeric):
        assert_close(backend.to_numpy(g), expected, tol=GRAD_TOL)


def test_groups_of_two_all_pairs_and_best_worst_are_dpo(rng):
    cw, cl, rw, rl = pairs(rng)
    groups = prefopt.pairs_as_groups(cw, cl, rw, rl)
    dpo = prefopt.dpo_loss(cw, cl, rw, rl)
    for how in ("all", "best_worst"):
        got = prefopt.group_pairwise_loss(
            "sigmoid", groups["logps"], groups["ref_logps"], groups["rewards"], pairs=how
        )
        np.testing.assert_allclose(got, dpo, rtol=1e-15)
    np.testing.assert_allclose(prefopt.mpo_loss(**groups), dpo, rtol=1e-13)
    np.testing.assert_allclose(prefopt.plackett_luce_loss(**groups), dpo, rtol=1e-13)


def test_reference_free_pairwise_loss_on_groups(rng):
    logps = -rng.uniform(5.0, 50.0, (2, 3))
    lengths = rng.integers(1, 9, (2, 3)).astype(float)
    rewards = np.array([[1.0, 0.0, 0.5], [0.0, 2.0, 1.0]])
    got = prefopt.group_pairwise_loss(
        "simpo", logps, None, rewards, lengths=lengths, pairs="best_worst"
    )
    best, worst = [0, 1], [1, 0]
    expected = prefopt.simpo_loss(
        logps[[0, 1], best],
        logps[[0, 1], worst],
        chosen_lengths=lengths[[0, 1], best],
        rejected_lengths=lengths[[0, 1], worst],
    )
    np.testing.assert_allclose(got, expected, rtol=1e-15)


@pytest.mark.parametrize(
    "loss,kwargs,match",
    [
        ("aot", {}, "does not sort across the batch; got 'aot' \\(pairwise, couples the batch\\)"),
        ("kto", {}, "got 'kto' \\(unpaired\\)"),
        ("simpo", {"ref": True}, "'simpo' is reference-free; pass ref_logps=None"),
        ("sigmoid", {"lengths": True}, "'sigmoid' takes no lengths"),
        ("sigmoid", {"pairs": "some"}, "pairs must be one of 'all', 'best_worst'; got 'some'"),
        ("sigmoid", {"pairs": "best_worst", "chosen": True}, "chosen applies to pairs='all' only"),
    ],
)
def test_pairwise_loss_on_groups_errors(loss, kwargs, match):
    x = np.zeros((2, 3))
    call = {"pairs": kwargs.get("pairs", "all")}
    if kwargs.get("lengths"):
        call["lengths"] = np.ones((2, 3))
    if kwargs.get("chosen"):
        call["chosen"] = np.ones((2, 3), dtype=bool)
    with pytest.raises(ValueError, match=match):
        prefopt.group_pairwise_loss(loss, x, x if kwargs.get("ref") else None, x, **call)


def test_pair_metrics(backend, rng):
    cw, cl, rw, rl = pairs(rng)
    m = pair_metrics(*[backend.asarray(a) for a in (cw, cl, rw, rl)], beta=0.2)
    hw, hl = 0.2 * (cw - rw), 0.2 * (cl - rl)
    expected = {
        "rewards/chosen": hw.mean(),
        "rewards/rejected": hl.mean(),
        "rewards/margins": (hw - hl).mean(),
        "rewards/accuracies": np.mean([w > r for w, r in zip(hw, hl)]),
        "logps/chosen": cw.mean(),
        "logps/rejected": cl.mean(),
    }
    assert set(m) == set(expected)
    for k, v in expected.items():
        assert backend.to_numpy(m[k]).shape == ()
        assert_close(backend.to_numpy(m[k]), v)


def test_group_metrics(backend, rng):
    logps = rng.normal(-80.0, 25.0, MASK.shape)
    ref = logps + rng.normal(0.0, 3.0, MASK.shape)
    rewards = rng.normal(size=MASK.shape)
    m = group_metrics(
        *[backend.asarray(a) for a in (logps, ref, rewards)],
        mask=backend.asarray(MASK, "bool"),
        beta=0.5,
    )
    chosen_means, rejected_means, right, total, skipped = [], [], 0, 0, 0
    chosen_logps, rejected_logps = [], []
    for b in range(len(MASK)):
        valid = [i for i in range(MASK.shape[1]) if MASK[b][i]]
        mean = sum(rewards[b][i] for i in valid) / max(len(valid), 1)
        pos = [i for i in valid if rewards[b][i] > mean]
        neg = [i for i in valid if i not in pos]
        if not pos or not neg:
            skipped += 1
            continue
        s = {i: 0.5 * (logps[b][i] - ref[b][i]) for i in valid}
        chosen_means.append(np.mean([s[i] for i in pos]))
        rejected_means.append(np.mean([s[i] for i in neg]))
        chosen_logps.append(np.mean([logps[b][i] for i in pos]))
        rejected_logps.append(np.mean([logps[b][i] for i in neg]))
        for i in pos:
            for j in neg:
                total += 1
                right += (s[i] > s[j]) == (rewards[b][i] > rewards[b][j])
    expected = {
        "rewards/chosen": np.mean(chosen_means),
        "rewards/rejected": np.mean(rejected_means),
        "rewards/margins": np.mean(chosen_means) - np.mean(rejected_means),
        "rewards/accuracies": right / total,
        "logps/chosen": np.mean(chosen_logps),
        "logps/rejected": np.mean(rejected_logps),
        "groups/degenerate": skipped / len(MASK),  # a fraction, as TRL's frac_reward_zero_std
    }
    assert set(m) == set(expected)
    for k, v in expected.items():
        assert_close(backend.to_numpy(m[k]), v)


def test_group_metrics_over_no_group_are_nan_not_zero(backend):
    # every group degenerate: a 0.0 would read as a log-prob of 0 or a margin of 0
    xp = backend.xp
    logps = backend.asarray([[-3.0, -5.0], [-2.0, -4.0]])
    rewards = backend.asarray([[1.0, 1.0], [0.0, 0.0]])
    m = group_metrics(logps, logps - 1.0, rewards)
    for key in ("rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert np.isnan(backend.to_numpy(m[key])), key
    assert backend.to_numpy(m["groups/degenerate"]) == 1.0
    half = group_metrics(logps, logps - 1.0, backend.asarray([[1.0, 0.0], [0.0, 0.0]]))
    assert backend.to_numpy(half["groups/degenerate"]) == 0.5  # a fraction of the groups
    assert backend.to_numpy(half["logps/chosen"]) == -3.0
    assert xp.isdtype(m["logps/chosen"].dtype, "real floating")


def test_metrics_carry_no_gradient(rng):
    jax = pytest.importorskip("jax")
    torch = pytest.importorskip("torch")

    x = [torch.asarray(a, requires_grad=True) for a in pairs(rng)]
    assert not any(v.requires_grad for v in pair_metrics(*x).values())
    groups = [torch.asarray(a, requires_grad=True) for a in rng.normal(size=(3, 2, 4))]
    assert not any(v.requires_grad for v in group_metrics(*groups).values())
    cw, *rest = (jax.numpy.asarray(a) for a in pairs(rng))
    grad = jax.grad(lambda cw: sum(pair_metrics(cw, *rest).values()))(cw)
    assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("loss", ["aot", "aot_unpaired"])
def test_batch_loss_runs_batch_sorting_losses_on_pairs_only(backend, rng, loss):
    # A batch of pairs (chosen first or second): the pairwise loss on the sorted batch.
    cw, cl, rw, rl = pairs(rng)
    first = np.array([True, False, True, True, False])
    logps = np.stack([np.where(first, cw, cl), np.where(first, cl, cw)], axis=1)
    ref = np.stack([np.where(first, rw, rl), np.where(first, rl, rw)], axis=1)
    rewards = np.stack([first * 1.0, ~first * 1.0], axis=1)
    got = prefopt.batch_loss(
        loss, *[backend.asarray(a) for a in (logps, ref, rewards)], beta=0.3, label_smoothing=0.1
    )
    expected = np.mean(reference.pairwise(loss, cw, cl, rw, rl, beta=0.3, label_smoothing=0.1))
    assert_close(backend.to_numpy(got), expected)
    groups = np.zeros((5, 3))
    with pytest.raises(ValueError, match=f"'{loss}' sorts across the batch and runs on pairs"):
        prefopt.batch_loss(loss, *[backend.asarray(groups)] * 3)
    tied = np.ones((5, 2))
    with pytest.raises(ValueError, match=f"'{loss}' needs a chosen response; 5 pairs tie"):
        prefopt.batch_loss(loss, *[backend.asarray(tied)] * 3)
