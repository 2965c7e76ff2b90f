"""Hyperparameters as arrays: every numeric option of every loss takes a 0-d array of the
inputs' library, traced or not (a schedule inside ``jax.jit``, ``vmap`` over beta, a 0-d
tensor under ``torch.compile`` without recompiling), and gives what the Python number gives.
See the "Hyperparameters: numbers or arrays" section of docs/losses/index.md."""

import numpy as np
import pytest

import prefopt
from prefopt.losses.registry import spec, specs
from tests.cases import make_case, to_backend

# A value inside every loss's range for each numeric option (none is a default).
VALUES = {
    "beta": 0.3, "label_smoothing": 0.2, "tau": 0.5, "f_alpha": 0.3, "alpha": 0.6,
    "gamma": 0.4, "cpo_alpha": 0.7, "delta": 0.2, "desirable_weight": 1.3,
    "undesirable_weight": 0.8,
}  # fmt: skip


def close(actual, expected):
    """Equal to rounding: the same formula, the option given another way."""
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-12, atol=1e-12)


NAMES = sorted(n for n in specs() if n != "dpo")  # "dpo" is "sigmoid"'s alias


def case(name, rng):
    """(positional, keyword arrays, numeric options) for ``name``: every option it takes."""
    found = spec(name)
    variant = {"lengths": True} if found.lengths == "required" else {}
    positional, keywords, _ = make_case(name, "random", rng, variant)
    if found.layout == "pair" and found.reference != "none":  # log-ratios of order 1
        positional[0] = positional[2] + rng.normal(0.0, 2.0, positional[2].shape)
        positional[1] = positional[3] + rng.normal(0.0, 2.0, positional[3].shape)
    options = {k: VALUES[k] for k in found.defaults if k in VALUES}
    return positional, keywords, options


def static(name):
    """The options that choose code: the alpha-divergence, so that f_alpha is used."""
    return {"f_divergence": "alpha_divergence"} if "f_divergence" in spec(name).defaults else {}


def as_arrays(backend, options, dtype="float64"):
    return {k: backend.asarray(np.array(v), dtype) for k, v in options.items()}


@pytest.mark.parametrize("name", NAMES)
def test_array_options_give_what_numbers_give(backend, rng, name):
    positional, keywords, options = case(name, rng)
    pos, kw = to_backend(backend, positional, keywords, "float64")
    kw.update(static(name))
    fn = spec(name).fn
    expected = backend.to_numpy(fn(*pos, **kw, **options))
    out = fn(*pos, **kw, **as_arrays(backend, options))
    close(backend.to_numpy(out), expected)


@pytest.mark.parametrize("name", NAMES)
def test_array_options_keep_a_float32_loss_in_float32(backend, rng, name):
    positional, keywords, options = case(name, rng)
    pos, kw = to_backend(backend, positional, keywords, "float32")
    kw.update(static(name))
    out = spec(name).fn(*pos, **kw, **as_arrays(backend, options, "float64"))
    assert out.dtype == backend.dtype("float32")


@pytest.mark.parametrize("name", NAMES)
def test_gradients_with_array_options_equal_those_with_numbers(diff_backend, rng, name):
    positional, keywords, options = case(name, rng)
    pos, kw = to_backend(diff_backend, positional, keywords, "float64")
    kw.update(static(name))
    fn, wrt = spec(name).fn, [0] if spec(name).layout != "pair" else [0, 1]
    arrays = as_arrays(diff_backend, options)
    _, expected = diff_backend.value_and_grad(lambda *a: fn(*a, **kw, **options), pos, wrt)
    _, grads = diff_backend.value_and_grad(lambda *a: fn(*a, **kw, **arrays), pos, wrt)
    for g, e in zip(grads, expected):
        close(diff_backend.to_numpy(g), diff_backend.to_numpy(e))


def test_batch_loss_and_group_composition_take_array_options(backend, rng):
    positional, _, _ = make_case("mpo", "random", rng, {})
    logps, ref, rewards = to_backend(backend, positional, {}, "float64")[0]
    for name in ("mpo", "sigmoid"):  # a group loss, and a pairwise one composed on groups
        expected = prefopt.batch_loss(name, logps, ref, rewards, beta=0.3)
        out = prefopt.batch_loss(name, logps, ref, rewards, beta=backend.asarray(np.array(0.3)))
        close(backend.to_numpy(out), backend.to_numpy(expected))


# ---- the range checks: on concrete values, as the value checks on arrays ----------------


@pytest.mark.parametrize("bad", [-0.1, 0.0, np.inf])
def test_a_concrete_array_out_of_range_gets_the_numbers_message(bad):
    x = np.array([-1.0, -2.0])
    with pytest.raises(ValueError, match=r"dpo_loss: beta must be a finite number > 0"):
        prefopt.dpo_loss(x, x, beta=np.array(bad))
    with pytest.raises(ValueError, match=r"mpo_loss: alpha must be a finite number >= 0"):
        prefopt.mpo_loss(x[None], None, x[None], alpha=np.array(-abs(bad) - 1.0))


def test_an_array_option_must_be_0d_real_and_of_the_inputs_library():
    x = np.array([-1.0, -2.0])
    with pytest.raises(ValueError, match=r"dpo_loss: beta must be a number or a 0-d array; "
                                         r"got an array of shape \(1,\)"):  # fmt: skip
        prefopt.dpo_loss(x, x, beta=np.array([0.1]))
    with pytest.raises(TypeError, match=r"dpo_loss: beta must be a real number; got a 0-d "
                                        r"array of dtype bool"):  # fmt: skip
        prefopt.dpo_loss(x, x, beta=np.array(True))
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"dpo_loss: beta must be a number or a 0-d array of "
                                        r"the inputs' library; got a torch.Tensor"):  # fmt: skip
        prefopt.dpo_loss(x, x, beta=torch.tensor(0.1))


# ---- JAX: traced, vmapped, differentiated --------------------------------------------------


@pytest.fixture
def jax():
    jax = pytest.importorskip("jax")
    from tests.conftest import SELECTED

    if "jax" not in SELECTED:
        pytest.skip("jax not selected (PREFOPT_BACKENDS)")
    return jax


def jax_case(jax, rng, name):
    """``case`` as JAX arrays: (function, positional, keyword arrays and static, options)."""
    positional, keywords, options = case(name, rng)
    pos = [jax.numpy.asarray(a) for a in positional]
    kw = {**{k: jax.numpy.asarray(v) for k, v in keywords.items()}, **static(name)}
    return spec(name).fn, pos, kw, options


@pytest.mark.parametrize("name", NAMES)
def test_jax_jit_grad_and_vmap_over_every_option(jax, rng, name):
    jnp = jax.numpy
    fn, pos, kw, options = jax_case(jax, rng, name)

    def total(first, opts):
        return fn(first, *pos[1:], **kw, **opts).sum()

    expected = jax.grad(lambda a: total(a, options))(pos[0])
    traced = jax.jit(jax.grad(total))(pos[0], {k: jnp.asarray(v) for k, v in options.items()})
    close(np.asarray(traced), np.asarray(expected))
    # vmap over beta: one call for a sweep, equal to one call per value
    betas = jnp.asarray([0.05, 0.3, 0.9])
    swept = jax.vmap(lambda b: total(pos[0], {**options, "beta": b}))(betas)
    looped = [float(total(pos[0], {**options, "beta": float(b)})) for b in betas]
    close(np.asarray(swept), np.asarray(looped))


@pytest.mark.parametrize("name", NAMES)
def test_jax_grad_with_respect_to_every_option_matches_finite_differences(jax, rng, name):
    jnp = jax.numpy
    fn, pos, kw, options = jax_case(jax, rng, name)
    for option, value in options.items():

        def total(v, option=option):
            return fn(*pos, **kw, **{**options, option: v}).sum()

        grad = float(jax.grad(total)(jnp.asarray(value)))
        h = 1e-6 * max(1.0, abs(value))
        numeric = (float(total(value + h)) - float(total(value - h))) / (2 * h)
        assert grad == pytest.approx(numeric, rel=1e-5, abs=1e-6), option


def test_a_traced_value_is_not_range_checked(jax):
    # the caller's responsibility inside jit (see the docs): no error, no host read
    x = jax.numpy.asarray([-1.0, -2.0])
    out = jax.jit(lambda b: prefopt.dpo_loss(x, x - 1.0, beta=b))(jax.numpy.asarray(-0.1))
    assert out.shape == (2,)


# ---- torch.compile: a 0-d tensor beta that changes does not recompile ---------------------


@pytest.mark.parametrize("name", ["mpo", "sigmoid"])
def test_torch_compile_does_not_recompile_for_a_new_beta(rng, name):
    torch = pytest.importorskip("torch")
    from torch._dynamo.testing import CompileCounter

    from tests.conftest import SELECTED

    if "torch" not in SELECTED:
        pytest.skip("torch not selected (PREFOPT_BACKENDS)")
    positional, keywords, _ = case(name, rng)
    pos = [torch.asarray(a) for a in positional]
    fn, counter = spec(name).fn, CompileCounter()
    compiled = torch.compile(
        lambda beta: fn(*pos, beta=beta).sum(), backend=counter, fullgraph=True
    )
    torch._dynamo.reset()
    for beta in (0.1, 0.2, 0.35):
        beta = torch.tensor(beta, dtype=torch.float64)
        torch.testing.assert_close(compiled(beta), fn(*pos, beta=beta).sum())
    assert counter.frame_count == 1
