import re

import numpy as np
import pytest

import prefopt


def f64(*shape, value=-3.0):
    return np.full(shape, value)


def raises(exc, *fragments):
    pattern = ".*".join(re.escape(f) for f in fragments)
    return pytest.raises(exc, match=re.compile(pattern, re.S))


class TestDPO:
    def test_mismatched_shapes(self):
        with raises(ValueError, "dpo_loss", "rejected_logps", "(4,)", "got (3,)"):
            prefopt.dpo_loss(f64(4), f64(3))

    def test_wrong_rank(self):
        with raises(ValueError, "dpo_loss", "chosen_logps", "1 dimension", "(B)", "(4, 2)"):
            prefopt.dpo_loss(f64(4, 2), f64(4, 2))

    def test_integer_logps(self):
        with raises(TypeError, "dpo_loss", "rejected_logps", "real floating", "int64"):
            prefopt.dpo_loss(f64(4), np.zeros(4, dtype=np.int64))

    def test_one_reference_only(self):
        with raises(ValueError, "ref_chosen_logps and ref_rejected_logps"):
            prefopt.dpo_loss(f64(4), f64(4), f64(4))

    @pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
    def test_bad_beta(self, beta):
        with raises(ValueError, "dpo_loss", "beta", "> 0", str(beta)):
            prefopt.dpo_loss(f64(4), f64(4), beta=beta)

    def test_bad_label_smoothing(self):
        with raises(ValueError, "label_smoothing", "[0.0, 0.5]", "0.7"):
            prefopt.dpo_loss(f64(4), f64(4), label_smoothing=0.7)

    def test_mixed_libraries(self):
        torch = pytest.importorskip("torch")
        with raises(TypeError, "one library", "numpy", "torch"):
            prefopt.dpo_loss(f64(4), torch.zeros(4, dtype=torch.float64))


class TestMPO:
    def test_wrong_rank(self):
        with raises(ValueError, "mpo_loss", "logps", "2 dimension", "(B, n)", "got shape (4,)"):
            prefopt.mpo_loss(f64(4), None, f64(4))

    def test_mismatched_rewards(self):
        with raises(ValueError, "mpo_loss", "rewards", "shape of logps, (2, 4)", "got (2, 3)"):
            prefopt.mpo_loss(f64(2, 4), None, f64(2, 3))

    def test_mismatched_mask(self):
        with raises(ValueError, "mask", "(2, 4)", "got (4, 2)"):
            prefopt.mpo_loss(f64(2, 4), None, f64(2, 4), mask=np.ones((4, 2), bool))

    def test_non_boolean_mask(self):
        with raises(TypeError, "mpo_loss", "mask", "boolean", "int64"):
            prefopt.mpo_loss(f64(2, 4), None, f64(2, 4), mask=np.ones((2, 4), np.int64))

    def test_non_boolean_chosen(self):
        with raises(TypeError, "mpo_loss", "chosen", "boolean", "float64"):
            prefopt.mpo_loss(f64(2, 4), None, f64(2, 4), chosen=f64(2, 4))

    def test_integer_logps(self):
        with raises(TypeError, "mpo_loss", "logps", "real floating", "int32"):
            prefopt.mpo_loss(np.zeros((2, 4), np.int32), None, f64(2, 4))

    def test_boolean_rewards(self):
        with raises(TypeError, "rewards", "floating or integer", "bool"):
            prefopt.mpo_loss(f64(2, 4), None, np.ones((2, 4), bool))

    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
    def test_non_finite_rewards(self, bad):
        rewards = np.arange(8.0).reshape(2, 4)
        rewards[1, 2] = bad
        with raises(ValueError, "mpo_loss", "rewards", "finite", "in 1 group"):
            prefopt.mpo_loss(f64(2, 4), None, rewards)

    def test_non_finite_rewards_in_padding_are_fine(self):
        rewards = np.arange(8.0).reshape(2, 4)
        rewards[1, 2] = np.nan
        mask = np.ones((2, 4), bool)
        mask[1, 2] = False
        assert np.all(np.isfinite(prefopt.mpo_loss(f64(2, 4), None, rewards, mask=mask)))

    def test_value_checks_can_be_switched_off(self):
        rewards = np.arange(8.0).reshape(2, 4)
        rewards[0, 0] = np.nan
        with np.errstate(invalid="ignore"):  # the NaN then reaches the loss, as asked
            out = prefopt.mpo_loss(f64(2, 4), None, rewards, check_values=False)
        assert np.isnan(out[0]) and np.isfinite(out[1])

    def test_lengths_with_reference(self):
        with raises(ValueError, "lengths", "reference-free"):
            prefopt.mpo_loss(f64(2, 4), f64(2, 4), f64(2, 4), lengths=f64(2, 4, value=3.0))

    def test_non_positive_lengths(self):
        lengths = np.full((2, 4), 5)
        lengths[0, 1] = 0
        with raises(ValueError, "lengths", "> 0", "1 value"):
            prefopt.mpo_loss(f64(2, 4), None, np.arange(8.0).reshape(2, 4), lengths=lengths)

    def test_unknown_weighting(self):
        with raises(ValueError, "weighting", "'abs', 'signed', 'squared', 'none'", "'linear'"):
            prefopt.mpo_loss(f64(2, 4), None, f64(2, 4), weighting="linear")

    @pytest.mark.parametrize("alpha", [-1.0, float("inf"), float("nan")])
    def test_bad_alpha(self, alpha):
        with raises(ValueError, "mpo_loss", "alpha", ">= 0", str(alpha)):
            prefopt.mpo_loss(f64(2, 4), None, f64(2, 4), alpha=alpha)

    def test_split_validates_too(self):
        with raises(ValueError, "mpo_split", "rewards", "finite"):
            prefopt.mpo_split(np.array([[1.0, np.nan]]))
        with raises(ValueError, "mpo_split", "mask", "(1, 2)", "(1, 3)"):
            prefopt.mpo_split(np.array([[1.0, 2.0]]), mask=np.ones((1, 3), bool))


def test_value_checks_on_torch_tensors():
    torch = pytest.importorskip("torch")
    rewards = torch.tensor([[1.0, float("nan")]])
    with raises(ValueError, "rewards", "finite"):
        prefopt.mpo_loss(torch.zeros(1, 2), None, rewards)


def test_value_checks_on_jax_arrays_and_not_under_jit():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rewards = jnp.array([[1.0, jnp.nan]])
    with raises(ValueError, "rewards", "finite"):
        prefopt.mpo_loss(jnp.zeros((1, 2)), None, rewards)
    # inside a trace the values are unknown: no check, no ConcretizationTypeError
    out = jax.jit(prefopt.mpo_loss)(
        jnp.zeros((2, 2)), None, jnp.array([[1.0, jnp.nan], [1.0, 2.0]])
    )
    # ...and the poisoned group says so with NaN instead of being skipped silently
    assert bool(jnp.isnan(out[0])) and bool(jnp.isfinite(out[1]))


def test_concrete_rewards_closed_over_in_jit_poison_their_group():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rewards = jnp.array([[1.0, jnp.nan], [1.0, 2.0]])
    out = jax.jit(lambda lp: prefopt.mpo_loss(lp, None, rewards))(jnp.zeros((2, 2)))
    assert bool(jnp.isnan(out[0])) and bool(jnp.isfinite(out[1]))


class TestCatalogue:
    @pytest.mark.parametrize("name", [n for n in prefopt.available_losses() if n != "dpo"])
    def test_every_loss_names_itself_and_the_argument_on_a_shape_error(self, name):
        fn = prefopt.get_loss(name)
        kind = prefopt.available_losses()[name]
        if kind == "group":
            args, kw = (f64(3, 4), None, f64(3, 5)), {}
            fragments = ("rewards", "(3, 4)", "got (3, 5)")
        elif kind == "unpaired":
            args, kw = (f64(4), None, np.ones(3, dtype=bool)), {}
            fragments = ("desirable", "(4,)", "got (3,)")
        else:
            args, kw = (f64(4), f64(3)), {}
            takes = prefopt.losses.registry.spec(name).lengths
            if takes in ("required", "chosen"):
                kw = {"chosen_lengths": f64(4, value=2.0), "rejected_lengths": f64(4, value=2.0)}
                if takes == "chosen":
                    kw.pop("rejected_lengths")
            fragments = ("rejected_logps", "(4,)", "got (3,)")
        with raises(ValueError, fn.__name__, *fragments):
            fn(*args, **kw)

    @pytest.mark.parametrize("name", ["sigmoid_norm", "simpo", "orpo"])
    def test_required_lengths(self, name):
        with raises(ValueError, name, "chosen_lengths and rejected_lengths", "required", "None"):
            prefopt.get_loss(name)(f64(4), f64(4), chosen_lengths=None, rejected_lengths=None)

    def test_cpo_needs_chosen_lengths_for_its_nll_term(self):
        with raises(ValueError, "cpo_loss", "chosen_lengths", "required", "cpo_alpha=0"):
            prefopt.cpo_loss(f64(4), f64(4))
        prefopt.cpo_loss(f64(4), f64(4), cpo_alpha=0.0)  # no term, no lengths needed

    def test_lengths_both_or_neither_and_positive(self):
        with raises(ValueError, "ipo_loss", "both chosen_lengths and rejected_lengths"):
            prefopt.ipo_loss(f64(4), f64(4), chosen_lengths=f64(4, value=2.0))
        with raises(ValueError, "ipo_loss", "rejected_lengths", "> 0", "1 value(s)"):
            prefopt.ipo_loss(
                f64(4),
                f64(4),
                chosen_lengths=f64(4, value=2.0),
                rejected_lengths=np.array([1.0, 2.0, 0.0, 3.0]),
            )
        with raises(
            ValueError, "simpo_loss", "chosen_lengths", "shape of chosen_logps", "(4,)", "(3,)"
        ):
            prefopt.simpo_loss(f64(4), f64(4), chosen_lengths=f64(3), rejected_lengths=f64(4))

    @pytest.mark.parametrize(
        "name,option,value,fragment",
        [
            ("robust", "label_smoothing", 0.5, "[0.0, 0.5)"),
            ("exo_pair", "label_smoothing", 0.0, "(0.0, 0.5]"),
            ("discopop", "tau", 1.5, "(0.0, 1.0]"),
            ("bco_pair", "delta", float("nan"), "finite"),
            ("sigmoid", "f_divergence", "kl", "'reverse_kl', 'forward_kl'"),
            ("ipo", "f_alpha", 0.0, "> 0"),
            ("simpo", "gamma", -1.0, ">= 0"),
            ("cpo", "cpo_alpha", -1.0, ">= 0"),
            ("kto", "kl", -0.5, ">= 0"),
            ("kto", "desirable_weight", -1.0, ">= 0"),
            ("infonca", "tau", 0.0, "> 0"),
            ("nca", "beta", -1.0, "> 0"),
            ("lipo", "beta", 0.0, "> 0"),
        ],
    )
    def test_options_out_of_range(self, name, option, value, fragment):
        fn = prefopt.get_loss(name)
        kind = prefopt.available_losses()[name]
        args = {
            "group": (f64(2, 3), None, f64(2, 3)),
            "unpaired": (f64(4), None, np.ones(4, dtype=bool)),
        }.get(kind, (f64(4), f64(4)))
        kw = {}
        if kind == "reference-free":
            kw = {"chosen_lengths": f64(4, value=2.0)}
            if name != "cpo":
                kw["rejected_lengths"] = f64(4, value=2.0)
        with raises(ValueError, fn.__name__, option, fragment):
            fn(*args, **kw, **{option: value})
        spec = prefopt.losses.registry.spec(name)
        if option in spec.defaults:  # an option (kto's kl is an input): its config says alike
            with raises(ValueError, fn.__name__, option, fragment):
                spec.config({option: value})

    def test_kto_inputs(self):
        with raises(TypeError, "kto_loss", "desirable", "boolean", "float64"):
            prefopt.kto_loss(f64(4), None, f64(4))
        with raises(ValueError, "kto_loss", "kl", "0-d array", "(4,)"):
            prefopt.kto_loss(f64(4), None, np.ones(4, dtype=bool), kl=f64(4))

    def test_group_rewards_must_be_finite(self):
        rewards = np.array([[1.0, np.nan, 0.0], [1.0, 2.0, 3.0]])
        for name in ("infonca", "nca", "plackett_luce", "lipo"):
            with raises(ValueError, f"{name}_loss", "rewards must be finite", "1 group(s)"):
                prefopt.get_loss(name)(f64(2, 3), None, rewards)
