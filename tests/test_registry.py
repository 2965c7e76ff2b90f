import re

import numpy as np
import pytest

import prefopt

# The names of docs/choosing.md, by kind.
CONTRACT = {
    "pairwise": [
        "sigmoid", "dpo", "robust", "ipo", "hinge", "exo_pair", "nca_pair", "bco_pair",
        "sppo_hard", "apo_zero", "apo_down", "discopop", "aot", "aot_unpaired", "sigmoid_norm",
    ],
    "reference-free": ["simpo", "cpo", "orpo"],
    "unpaired": ["kto"],
    "group": ["mpo", "infonca", "nca", "plackett_luce", "lipo"],
}  # fmt: skip


def test_every_loss_of_the_contract_is_registered_with_its_kind():
    expected = {name: kind for kind, names in CONTRACT.items() for name in names}
    assert prefopt.available_losses() == dict(sorted(expected.items()))


def test_names_map_to_the_functions():
    assert prefopt.get_loss("sigmoid") is prefopt.dpo_loss
    assert prefopt.get_loss("dpo") is prefopt.dpo_loss
    assert prefopt.get_loss("mpo") is prefopt.mpo_loss
    assert prefopt.get_loss("robust") is prefopt.robust_dpo_loss
    for name in prefopt.available_losses():
        fn = prefopt.get_loss(name)
        assert getattr(prefopt, fn.__name__) is fn


def test_registered_functions_compute():
    x = np.array([-3.0, -4.0])
    np.testing.assert_array_equal(
        prefopt.get_loss("sigmoid")(x, x[::-1]), prefopt.dpo_loss(x, x[::-1])
    )


@pytest.mark.parametrize(
    "name,suggestion", [("sigmod", "'sigmoid'"), ("mpoo", "'mpo'"), ("simPO", "'simpo'")]
)
def test_unknown_name_lists_the_valid_ones_and_suggests(name, suggestion):
    with pytest.raises(ValueError) as err:
        prefopt.get_loss(name)
    message = str(err.value)
    assert f"unknown loss {name!r}" in message
    assert f"Did you mean {suggestion}" in message  # the closest first
    assert "Known losses: aot, aot_unpaired, apo_down," in message
    assert message.count(", ") >= len(prefopt.available_losses()) - 1


def test_unrelated_name_gets_no_suggestion():
    with pytest.raises(ValueError, match="unknown loss 'xyzzy_q'. Known losses") as err:
        prefopt.get_loss("xyzzy_q")
    assert "Did you mean" not in str(err.value)


# ---- the registry is the one source of per-loss facts -------------------------------------

SPECS = prefopt.losses.registry.specs()


EXPECTED_LENGTHS = {
    "ipo": "optional",  # per-token mean log-ratios when given (TRL's IPO)
    "sigmoid_norm": "required",
    "simpo": "required",
    "orpo": "required",
    "cpo": "chosen",  # the NLL term's per-token mean
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_spec_agrees_with_the_function_signature(name):
    import inspect

    found = SPECS[name]
    params = inspect.signature(found.fn).parameters
    # `reference` and `lengths` are read from the signature; the expectations are the papers'
    assert found.reference == ("none" if name in ("simpo", "cpo", "orpo") else "optional")
    usual = "optional" if found.layout == "group" else "none"
    assert found.lengths == EXPECTED_LENGTHS.get(name, usual)
    for option, default in found.defaults.items():
        assert params[option].kind is params[option].KEYWORD_ONLY
        assert params[option].default == default


@pytest.mark.parametrize("name", sorted(n for n in SPECS if SPECS[n].lengths != "none"))
def test_uses_lengths_is_what_the_function_does_with_them(rng, name):
    # The one statement of where lengths go: a loss that `uses_lengths` gives another value
    # with them; one that does not refuses them, the function and batch_loss alike.
    found = SPECS[name]
    logps, ref, rewards, lengths = _groups(rng)
    rewards[1] = [2.0, 1.0, 0.0, 0.0, -1.0]  # no tie: every group counts
    for reference in [None, ref] if found.reference != "none" else [None]:
        call = dict(reduction="none", pairs="best_worst") if found.layout == "pair" else {}
        uses = found.uses_lengths(reference is not None)
        assert uses == (found.layout == "pair" or reference is None)
        if uses:
            with_lengths = prefopt.batch_loss(
                name, logps, reference, rewards, **call, lengths=lengths
            )
            if found.lengths == "optional":  # cpo needs them for its NLL term
                without = prefopt.batch_loss(name, logps, reference, rewards, **call)
                assert not np.allclose(with_lengths, without)
            continue
        with pytest.raises(ValueError, match="uses lengths only without ref_logps; pass lengths="):
            prefopt.batch_loss(name, logps, reference, rewards, lengths=lengths, **call)
        with pytest.raises(ValueError, match="lengths normalise the reference-free variant only"):
            found.fn(logps, reference, rewards, lengths=lengths)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_refuses_groups_is_what_batch_loss_does_on_groups_and_pairs(rng, name):
    # The one place that decides whether a loss trains on groups of n (the trainers and
    # prefopt train ask it before any data): its answer is batch_loss's on the data.
    found = SPECS[name]
    logps, ref, rewards, lengths = _groups(rng)
    rewards[1] = [2.0, 1.0, 0.0, 0.0, -1.0]
    needs = dict(lengths=lengths) if found.lengths in ("required", "chosen") else {}
    reference = None if found.reference == "none" else ref
    for n in (5, 2):
        why = found.refuses_groups(n)
        arrays = (logps[:, :n], reference[:, :n] if reference is not None else None, rewards[:, :n])
        options = {k: v[:, :n] for k, v in needs.items()}
        if why is None:
            out = prefopt.batch_loss(name, *arrays, **options)
            assert np.isfinite(out)
        else:
            with pytest.raises(ValueError, match=re.escape(why)):
                prefopt.batch_loss(name, *arrays, **options)
    assert (found.refuses_groups(None) is None) == (found.refuses_groups(5) is None)


@pytest.mark.parametrize("name", ["sigmoid", "simpo"])
def test_batch_loss_refuses_inputs_the_loss_does_not_use(rng, name):
    # Before: batch_loss dropped them silently, where the loss functions refuse them.
    logps, ref, rewards, lengths = _groups(rng)
    if name == "sigmoid":
        with pytest.raises(ValueError, match="batch_loss: 'sigmoid' takes no lengths"):
            prefopt.batch_loss(name, logps, ref, rewards, lengths=lengths)
    else:
        with pytest.raises(ValueError, match="batch_loss: 'simpo' is reference-free"):
            prefopt.batch_loss(name, logps, ref, rewards, lengths=lengths)


def test_options_are_checked_and_completed_with_the_loss_defaults():
    simpo = prefopt.losses.registry.spec("simpo")
    assert simpo.options({"gamma": 1.0}) == {"beta": 2.0, "gamma": 1.0, "label_smoothing": 0.0}
    with pytest.raises(TypeError, match=r"f: simpo takes no option\(s\) \['alpha'\]; it takes"):
        simpo.options({"alpha": 1.0}, fn="f")


def _groups(rng, B=4, n=5):
    logps = -rng.uniform(5.0, 60.0, (B, n))
    rewards = rng.normal(size=(B, n))
    rewards[1] = 0.5  # a tied group: counts for nothing
    lengths = rng.integers(1, 30, (B, n)).astype(float)
    return logps, logps + rng.normal(0.0, 1.0, (B, n)), rewards, lengths


def test_batch_loss_runs_cpo_with_chosen_lengths_only(rng):
    # Before: TypeError, cpo_loss() got an unexpected keyword argument 'rejected_lengths'.
    logps, _, rewards, lengths = _groups(rng)
    got = prefopt.batch_loss("cpo", logps, None, rewards, lengths=lengths, pairs="best_worst")
    best, worst = rewards.argmax(-1), rewards.argmin(-1)
    rows = np.arange(len(logps))
    per_pair = prefopt.cpo_loss(
        logps[rows, best], logps[rows, worst], chosen_lengths=lengths[rows, best]
    )
    per_pair[1] = 0.0  # the tied group
    np.testing.assert_allclose(got, per_pair.sum() / len(logps), rtol=1e-14)


def test_batch_loss_gives_group_losses_their_lengths_without_a_reference(rng):
    # Before: lengths were dropped, so reference-free length-normalised MPO was unreachable.
    logps, ref, rewards, lengths = _groups(rng)
    got = prefopt.batch_loss("mpo", logps, None, rewards, lengths=lengths)
    expected = prefopt.mpo_loss(logps, None, rewards, lengths=lengths).sum() / len(logps)
    np.testing.assert_allclose(got, expected, rtol=1e-14)
    # with a reference the lengths would not be used: refused, as mpo_loss refuses them
    with pytest.raises(ValueError, match="'mpo' uses lengths only without ref_logps"):
        prefopt.batch_loss("mpo", logps, ref, rewards, lengths=lengths)
    with pytest.raises(ValueError, match="lengths normalise the reference-free variant only"):
        prefopt.mpo_loss(logps, ref, rewards, lengths=lengths)


@pytest.mark.parametrize("name", ["mpo", "lipo", "infonca", "nca", "plackett_luce", "sigmoid"])
def test_every_mean_counts_the_groups_of_the_registry_rule(rng, name):
    # Before: MPOLoss, batch_loss and LiPOLoss each had their own rule.
    logps, ref, rewards, _ = _groups(rng)
    mask = np.ones(rewards.shape, dtype=bool)
    mask[2, 1:] = False  # one valid response
    per_group = prefopt.batch_loss(name, logps, ref, rewards, mask=mask, reduction="none")
    counts = SPECS[name].counts if SPECS[name].layout == "group" else "split"
    keep = {
        "split": np.array([True, False, False, True]),
        "two valid": np.array([True, True, False, True]),
        "one valid": np.array([True, True, True, True]),
    }[counts]
    mean = prefopt.batch_loss(name, logps, ref, rewards, mask=mask, reduction="mean")
    np.testing.assert_allclose(mean, per_group[keep].mean(), rtol=1e-14)
    torch = pytest.importorskip("torch")
    from prefopt.backends.torch import loss_module

    if SPECS[name].layout == "group":
        module = loss_module(name)(
            *map(torch.from_numpy, (logps, ref, rewards)), mask=torch.from_numpy(mask)
        )
        np.testing.assert_allclose(module.numpy(), mean, rtol=1e-14)


def test_batch_loss_rejects_options_the_loss_does_not_take(rng):
    logps, ref, rewards, _ = _groups(rng)
    with pytest.raises(TypeError, match=r"batch_loss: sigmoid takes no option\(s\) \['alpha'\]"):
        prefopt.batch_loss("sigmoid", logps, ref, rewards, alpha=1.0)


def test_the_registry_and_the_exports_name_the_same_losses():
    # The registry lists the losses with their facts, prefopt.losses.__all__ exports them
    # (prefopt re-exports that list): two places, held in step here, not by hand.
    registered = {s.fn.__name__ for s in prefopt.losses.registry.specs().values()}
    exported = {n for n in prefopt.losses.__all__ if n.endswith("_loss")}
    compositions = {"batch_loss", "group_pairwise_loss", "get_loss"}  # of losses, not losses
    assert exported - compositions == registered
    assert set(prefopt.losses.__all__) <= set(prefopt.__all__)


def test_a_loss_config_is_validated_once_and_frozen():
    import dataclasses

    found = prefopt.losses.registry.spec("mpo")
    config = found.config({"beta": 0.2}, fn="here")
    assert config.name == "mpo" and dict(config.options) == {**found.defaults, "beta": 0.2}
    with pytest.raises(TypeError):
        config.options["beta"] = 0.3  # read-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.options = {}
    with pytest.raises(ValueError, match=r"^mpo_loss: beta must be a finite number > 0; got -1.0$"):
        found.config({"beta": -1.0})
    with pytest.raises(TypeError, match=r"^here: mpo takes no option\(s\) \['tau'\]"):
        found.config({"tau": 1.0}, fn="here")


@pytest.mark.parametrize("name", sorted(prefopt.available_losses()))
def test_every_loss_passes_each_of_its_parameters_by_name_to_its_checks(name, monkeypatch):
    # A loss opens with pair_inputs(loss, dict(name=value, ...)): by name, so no two options
    # can be swapped; one left out would silently keep its default, which this catches.
    import inspect

    import prefopt.losses.inputs as inputs
    import prefopt.losses.pairwise as pairwise
    from tests.cases import VARIANTS, make_case

    seen = []
    original = inputs.checked_options

    def record(fn, args, *rest):
        seen.append(set(args))
        return original(fn, args, *rest)

    monkeypatch.setattr(inputs, "checked_options", record)
    monkeypatch.setattr(pairwise, "checked_options", record)  # aot_loss calls it directly
    fn = prefopt.get_loss(name)
    rng = np.random.default_rng(0)
    positional, keywords, options = make_case(name, "random", rng, VARIANTS.get(name, [{}])[0])
    fn(*positional, **keywords, **options)
    assert seen and seen[0] >= set(inspect.signature(fn).parameters), name


@pytest.mark.parametrize("name", sorted(prefopt.available_losses()))
def test_the_spec_carries_the_range_each_option_is_checked_with(name):
    found = prefopt.losses.registry.spec(name)
    numbers = {k for k, v in found.defaults.items() if isinstance(v, float)}
    assert set(found.ranges) == numbers
    fn = found.fn.__name__
    for option, rule in found.ranges.items():
        for value in (-1.0, 0.0, 0.5, 1.0, 1.5, float("inf"), float("nan")):
            try:
                rule(fn, option, value)
            except ValueError as err:  # out of the spec's range: the loss says the same
                with pytest.raises(ValueError, match=f"^{re.escape(str(err))}$"):
                    found.config({option: value})
            else:
                assert found.config({option: value}).options[option] == value


def test_a_narrower_range_is_the_losses_own():
    def check(name, option, value):
        found = prefopt.losses.registry.spec(name)
        return found.ranges[option](found.fn.__name__, option, value)

    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0.0, 0.5\); got 0.5"):
        check("robust", "label_smoothing", 0.5)
    assert check("sigmoid", "label_smoothing", 0.5) == 0.5  # cDPO: 0.5 allowed
    with pytest.raises(ValueError, match=r"tau must lie in \(0.0, 1.0\]; got 1.5"):
        check("discopop", "tau", 1.5)
    assert check("infonca", "tau", 1.5) == 1.5
