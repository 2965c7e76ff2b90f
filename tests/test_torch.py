"""PyTorch specifics: the nn.Module wrappers and torch.compile(fullgraph=True)."""

import numpy as np
import pytest

import prefopt

torch = pytest.importorskip("torch")
from prefopt.backends.torch import DPOLoss, MPOLoss  # noqa: E402


def group_batch(seed=0, B=4, n=6):
    g = torch.Generator().manual_seed(seed)
    logps = -50 + 10 * torch.randn(B, n, generator=g, dtype=torch.float64)
    ref = logps + torch.randn(B, n, generator=g, dtype=torch.float64)
    rewards = torch.randn(B, n, generator=g, dtype=torch.float64)
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False  # one response: degenerate
    return logps, ref, rewards, mask


def pair_batch(seed=0, B=5):
    g = torch.Generator().manual_seed(seed)
    return [-50 + 10 * torch.randn(B, generator=g, dtype=torch.float64) for _ in range(4)]


def test_mpo_module_reductions():
    logps, ref, rewards, mask = group_batch()
    per_group = prefopt.mpo_loss(logps, ref, rewards, mask=mask, beta=0.2)
    counted = torch.tensor([True, True, False, True])
    assert torch.equal(
        MPOLoss(beta=0.2, reduction="none")(logps, ref, rewards, mask=mask), per_group
    )
    assert torch.equal(
        MPOLoss(beta=0.2, reduction="sum")(logps, ref, rewards, mask=mask), per_group.sum()
    )
    mean = MPOLoss(beta=0.2)(logps, ref, rewards, mask=mask)
    torch.testing.assert_close(mean, per_group[counted].mean(), rtol=1e-15, atol=0)


def test_mpo_module_mean_of_only_degenerate_groups_is_zero_with_zero_gradient():
    logps = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    out = MPOLoss()(logps, None, torch.ones(2, 3, dtype=torch.float64))
    out.backward()
    assert out.item() == 0.0 and torch.all(logps.grad == 0)


def test_dpo_module():
    args = pair_batch()
    torch.testing.assert_close(
        DPOLoss(beta=0.3, label_smoothing=0.1)(*args),
        prefopt.dpo_loss(*args, beta=0.3, label_smoothing=0.1).mean(),
    )
    assert "beta=0.3" in repr(DPOLoss(beta=0.3))


def test_base_class_needs_a_loss():
    from prefopt.backends.torch import PreferenceLoss

    with pytest.raises(TypeError, match="PreferenceLoss has no loss_fn"):
        PreferenceLoss()


def test_module_rejects_unknown_options():
    with pytest.raises(TypeError, match="MPOLoss: unknown option.*'gamma'.*expected.*'alpha'"):
        MPOLoss(gamma=1.0)
    with pytest.raises(ValueError, match="reduction must be one of.*got 'avg'"):
        DPOLoss(reduction="avg")


def _graph_breaks(fn, *args, **kwargs):
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args, **kwargs).graph_break_count


@pytest.mark.parametrize("weighting", ["abs", "signed", "squared", "none"])
def test_mpo_traces_without_graph_breaks(weighting):
    logps, ref, rewards, mask = group_batch()
    assert (
        _graph_breaks(
            lambda *a, **k: prefopt.mpo_loss(*a, **k, weighting=weighting),
            logps,
            ref,
            rewards,
            mask=mask,
        )
        == 0
    )


def test_modules_and_dpo_trace_without_graph_breaks():
    logps, ref, rewards, mask = group_batch()
    assert _graph_breaks(MPOLoss(), logps, ref, rewards, mask=mask) == 0
    assert _graph_breaks(MPOLoss(), logps, None, rewards, lengths=torch.full((4, 6), 7.0)) == 0
    assert _graph_breaks(DPOLoss(label_smoothing=0.1), *pair_batch()) == 0
    assert _graph_breaks(prefopt.dpo_loss, *pair_batch()) == 0


@pytest.mark.parametrize("module", [MPOLoss(beta=0.2), DPOLoss(beta=0.2, label_smoothing=0.1)])
def test_compiled_fullgraph_matches_eager(module):
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    if isinstance(module, MPOLoss):
        logps, ref, rewards, mask = group_batch()
        args, kwargs = (logps, ref, rewards), {"mask": mask}
    else:
        args, kwargs = tuple(pair_batch()), {}
    results = []
    for fn in (module, compiled):
        leaf = args[0].detach().clone().requires_grad_(True)
        out = fn(leaf, *args[1:], **kwargs)
        out.backward()
        results.append((out.detach(), leaf.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-12, atol=1e-14)


def test_stop_gradient():
    from prefopt.backends.torch import stop_gradient

    x = torch.ones(3, requires_grad=True)
    assert not stop_gradient(x * 2).requires_grad


def test_reward_gradients_do_not_leak_nan_from_padding():
    logps, ref, rewards, mask = group_batch()
    rewards = rewards.clone()
    rewards[~mask] = np.nan
    rewards.requires_grad_(True)
    prefopt.mpo_loss(logps, ref, rewards, mask=mask).sum().backward()
    assert torch.all(torch.isfinite(rewards.grad))
