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


class Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every op that runs, forward and backward."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_plain_dpo_runs_its_formula_and_no_more_kernels_than_hand_written_code():
    # The eager cost of a small loss is its kernels: plain DPO (and DPOLoss's mean) runs
    # the formula's subtractions, one product, one softplus, nothing to check or cast.
    leaf, *rest = pair_batch()
    leaf.requires_grad_(True)
    with Ops() as ours:
        DPOLoss(beta=0.3)(leaf, *rest).backward()
    with Ops() as native:
        cw, cl, rw, rl = leaf, *rest
        (-torch.nn.functional.logsigmoid(0.3 * ((cw - rw) - (cl - rl)))).mean().backward()
    assert ours.names[:6] == ["sub", "sub", "sub", "mul", "softplus", "mean"]
    assert len(ours.names) < len(native.names), (ours.names, native.names)


def test_base_class_needs_a_loss():
    from prefopt.backends.torch import PreferenceLoss

    with pytest.raises(TypeError, match="PreferenceLoss names no loss"):
        PreferenceLoss()


def test_module_rejects_unknown_options():
    with pytest.raises(TypeError, match="unexpected keyword argument 'gamma'"):
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


def test_rewards_with_nan_padding_get_no_gradient_and_leak_no_nan():
    logps, ref, rewards, mask = group_batch()
    logps = logps.clone().requires_grad_(True)
    rewards = rewards.clone()
    rewards[~mask] = np.nan
    rewards.requires_grad_(True)
    prefopt.mpo_loss(logps, ref, rewards, mask=mask).sum().backward()
    assert rewards.grad is None  # rewards are data
    assert torch.all(torch.isfinite(logps.grad))


CATALOGUE = [name for name in prefopt.available_losses() if name != "dpo"]


def catalogue_case(name, dtype="float64"):
    from tests.backends import TorchBackend
    from tests.cases import VARIANTS, make_case, to_backend

    positional, keywords, opts = make_case(
        name, "random", np.random.default_rng(3), VARIANTS[name][-1]
    )
    pos, kw = to_backend(TorchBackend(), positional, keywords, dtype)
    if "kl" in opts:  # an input of KTO, not an option: forward takes it
        kw["kl"] = opts.pop("kl")
    return pos, kw, opts


@pytest.mark.parametrize("name", CATALOGUE)
def test_every_loss_compiles_fullgraph_without_breaks_and_matches_eager(name):
    from prefopt.backends.torch import loss_module

    pos, kw, opts = catalogue_case(name)
    fn = prefopt.get_loss(name)
    assert _graph_breaks(lambda *a, **k: fn(*a, **k, **opts), *pos, **kw) == 0
    module = loss_module(name, **opts)
    assert _graph_breaks(module, *pos, **kw) == 0
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    results = []
    for f in (module, compiled):
        leaf = pos[0].detach().clone().requires_grad_(True)
        out = f(leaf, *pos[1:], **kw)
        out.backward()
        results.append((out.detach(), leaf.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", CATALOGUE)
def test_every_loss_has_a_module_with_reductions(name):
    from prefopt.backends import torch as backend

    pos, kw, opts = catalogue_case(name)
    found = prefopt.losses.registry.spec(name)
    module = backend.loss_module(name, **opts)
    assert type(module).__name__ == found.title + "Loss" and type(module).loss == name
    assert getattr(backend, type(module).__name__) is type(module)
    per_example = found.fn(*pos, **kw, **opts)
    none = backend.loss_module(name, reduction="none", **opts)(*pos, **kw)
    assert torch.equal(none, per_example)
    assert torch.equal(
        backend.loss_module(name, reduction="sum", **opts)(*pos, **kw), per_example.sum()
    )
    torch.testing.assert_close(
        backend.loss_module(name, reduction="batchmean", **opts)(*pos, **kw),
        per_example.sum() / per_example.shape[0],
        rtol=1e-14,
        atol=0,
    )
    if found.layout == "group":  # the registry's counting rule, written out here
        mask = kw["mask"]
        valid = mask.sum(-1)
        r = torch.where(mask, pos[2], 0.0)
        above = (r > r.sum(-1, keepdim=True) / valid.clamp(min=1)[:, None]) & mask
        split = above.any(-1) & (mask & ~above).any(-1)
        counted = {"split": split, "two valid": valid >= 2, "one valid": valid >= 1}[found.counts]
        expected = per_example[counted].mean()
    else:
        expected = per_example.mean()
    torch.testing.assert_close(module(*pos, **kw), expected, rtol=1e-14, atol=0)


def test_module_classes_agree_with_the_registry():
    import inspect

    from prefopt.backends import torch as backend

    titles = {found.title + "Loss" for found in prefopt.losses.registry.specs().values()}
    assert set(backend.MODULES) <= titles
    for name, cls in backend.MODULES.items():
        found = prefopt.losses.registry.spec(cls.loss)
        assert found.title + "Loss" == name
        params = inspect.signature(cls.__init__).parameters
        init = {k: p.default for k, p in params.items() if k not in ("self", "reduction")}
        assert init == dict.fromkeys(found.defaults), name  # the loss's options, None each
        assert cls().config.options == found.defaults, name  # None: the function's default
        # one forward, the base class's, under a code object of each class's own
        code, base = cls.forward.__code__, backend.PreferenceLoss.forward.__code__
        assert code is not base and code.co_code == base.co_code, name


# A value out of range for each numeric option (robust DPO's and EXO's narrower ranges too).
BAD = {
    "beta": -1.0, "label_smoothing": 0.7, "tau": 0.0, "f_alpha": 0.0, "alpha": -1.0,
    "gamma": -0.5, "cpo_alpha": -1.0, "delta": float("inf"), "desirable_weight": -1.0,
    "undesirable_weight": -1.0,
}  # fmt: skip


@pytest.mark.parametrize(
    "name", sorted({s.title + "Loss" for s in prefopt.losses.registry.specs().values()})
)
def test_a_module_with_a_bad_option_fails_when_built_as_the_function_does(name):
    from prefopt.backends import torch as backend

    cls = backend.MODULES[name]
    found = prefopt.losses.registry.spec(cls.loss)
    pos, kw, _ = catalogue_case(cls.loss)
    for option in found.defaults.keys() & BAD.keys():
        with pytest.raises(ValueError) as built:
            cls(**{option: BAD[option]})
        with pytest.raises(ValueError) as called:
            found.fn(*pos, **kw, **{option: BAD[option]})
        assert str(built.value) == str(called.value), option
        assert str(built.value).startswith(f"{found.fn.__name__}: {option} must ")
    robust = backend.MODULES["RobustDPOLoss"]
    with pytest.raises(
        ValueError, match=r"robust_dpo_loss: label_smoothing must lie in \[0.0, 0.5\)"
    ):
        robust(label_smoothing=0.5)


@pytest.mark.parametrize("name", ["ipo", "mpo", "kto"])
def test_any_registered_loss_is_a_module_by_name(name):
    from prefopt.backends.torch import PreferenceLoss, loss_module

    pos, kw, opts = catalogue_case(name)
    generic = PreferenceLoss(loss=name, **opts)
    torch.testing.assert_close(generic(*pos, **kw), loss_module(name, **opts)(*pos, **kw))


def test_lipo_module_mean_leaves_out_tied_groups():
    from prefopt.backends.torch import LiPOLoss

    logps = torch.randn(3, 4, dtype=torch.float64)
    rewards = torch.tensor([[1.0, 0.0, 2.0, 1.0], [3.0, 3.0, 3.0, 3.0], [0.0, 1.0, 0.0, 0.0]])
    per_group = prefopt.lipo_loss(logps, None, rewards)
    assert per_group[1] == 0.0
    torch.testing.assert_close(LiPOLoss()(logps, None, rewards), per_group[[0, 2]].mean())


def test_compiled_module_compiles_one_graph_for_repeated_calls():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(MPOLoss(), fullgraph=True)
    logps, ref, rewards, mask = group_batch()
    for _ in range(3):
        compiled(logps, ref, rewards, mask=mask)
    assert counters["stats"]["unique_graphs"] == 1


def test_every_loss_module_compiles_in_one_process():
    from prefopt.backends.torch import loss_module

    torch._dynamo.reset()
    for name in CATALOGUE:  # more modules than dynamo's recompile limit (8)
        pos, kw, opts = catalogue_case(name)
        module = loss_module(name, **opts)
        compiled = torch.compile(module, fullgraph=True)
        torch.testing.assert_close(compiled(*pos, **kw), module(*pos, **kw), rtol=1e-12, atol=0)


def test_group_modules_average_over_the_groups_that_count():
    from prefopt.backends.torch import InfoNCALoss, NCALoss

    logps, ref, rewards, mask = group_batch()  # group 2 has one response
    per_group = prefopt.infonca_loss(logps, ref, rewards, mask=mask)
    assert per_group[2] == 0.0
    torch.testing.assert_close(
        InfoNCALoss()(logps, ref, rewards, mask=mask), per_group[[0, 1, 3]].mean()
    )
    torch.testing.assert_close(
        NCALoss()(logps, ref, rewards, mask=mask),
        prefopt.nca_loss(logps, ref, rewards, mask=mask).mean(),
    )


def test_loss_module_by_unknown_name():
    from prefopt.backends.torch import loss_module

    with pytest.raises(ValueError, match="loss_module: unknown loss 'ipoo'.*Did you mean 'ipo'"):
        loss_module("ipoo")
