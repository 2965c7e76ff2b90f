"""JAX specifics: jit, grad, vmap, and arrays sharded over several (simulated) devices."""

import functools

import numpy as np
import pytest

import prefopt

jax = pytest.importorskip("jax")
jnp = jax.numpy
from jax.extend.core import jaxprs_in_params  # noqa: E402
from prefopt.backends.jax import shard_batch, stop_gradient  # noqa: E402


def group_batch(B=8, n=5, seed=0):
    r = np.random.default_rng(seed)
    logps = jnp.asarray(r.normal(-50.0, 10.0, (B, n)))
    ref = logps + jnp.asarray(r.normal(0.0, 1.0, (B, n)))
    rewards = jnp.asarray(r.normal(size=(B, n)))
    mask = jnp.asarray(r.random((B, n)) < 0.8)
    return logps, ref, rewards, mask


@pytest.mark.parametrize("weighting", ["abs", "signed", "squared", "none"])
def test_jit_and_grad_match_eager(weighting):
    logps, ref, rewards, mask = group_batch()
    loss = functools.partial(prefopt.mpo_loss, beta=0.2, weighting=weighting)

    def total(lp):
        return loss(lp, ref, rewards, mask=mask).sum()

    np.testing.assert_allclose(
        jax.jit(loss)(logps, ref, rewards, mask=mask),
        loss(logps, ref, rewards, mask=mask),
        rtol=1e-13,
    )
    np.testing.assert_allclose(
        jax.jit(jax.grad(total))(logps), jax.grad(total)(logps), rtol=1e-12, atol=1e-15
    )


def test_dpo_jit():
    r = np.random.default_rng(1)
    args = [jnp.asarray(r.normal(-30.0, 5.0, 6)) for _ in range(4)]
    loss = functools.partial(prefopt.dpo_loss, beta=0.3, label_smoothing=0.1)
    np.testing.assert_allclose(jax.jit(loss)(*args), loss(*args), rtol=1e-13)


def test_vmap_over_a_stack_of_batches():
    stacks = [group_batch(seed=s) for s in range(3)]
    logps, ref, rewards, mask = (jnp.stack(parts) for parts in zip(*stacks))
    out = jax.vmap(lambda a, b, c, d: prefopt.mpo_loss(a, b, c, mask=d))(logps, ref, rewards, mask)
    for i, batch in enumerate(stacks):
        np.testing.assert_allclose(out[i], prefopt.mpo_loss(*batch[:3], mask=batch[3]), rtol=1e-13)


def test_sharded_batch_matches_single_device():
    assert len(jax.devices()) >= 4, "conftest sets XLA_FLAGS for 4 simulated CPU devices"
    logps, ref, rewards, mask = group_batch(B=8)
    sharded = shard_batch((logps, ref, rewards, mask))
    assert len(sharded[0].sharding.device_set) == len(jax.devices())

    @jax.jit
    def step(lp, rf, rw, m):
        def mean_loss(x):
            loss = prefopt.mpo_loss(x, rf, rw, mask=m)
            _, _, counted = prefopt.mpo_split(rw, mask=m)
            return prefopt.masked_mean(loss, counted)

        return jax.value_and_grad(mean_loss)(lp)

    value, grad = step(*sharded)
    ref_value, ref_grad = step.__wrapped__(logps, ref, rewards, mask)
    np.testing.assert_allclose(value, ref_value, rtol=1e-13)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-15)
    assert len(grad.sharding.device_set) == len(jax.devices())


def test_shard_batch_rejects_indivisible_batches():
    with pytest.raises(ValueError, match="batch axis \\(6\\) must be a multiple of the 4 devices"):
        shard_batch(jnp.zeros((6, 2)))


def test_stop_gradient():
    assert jax.grad(lambda x: stop_gradient(x) * x)(3.0) == 3.0


@pytest.mark.parametrize("name", [n for n in prefopt.available_losses() if n != "dpo"])
def test_every_loss_jits_and_matches_eager(name):
    from tests.backends import JaxBackend
    from tests.cases import VARIANTS, make_case, to_backend

    positional, keywords, opts = make_case(
        name, "random", np.random.default_rng(3), VARIANTS[name][-1]
    )
    pos, kw = to_backend(JaxBackend(), positional, keywords, "float64")
    fn = prefopt.get_loss(name)

    def loss(*a):
        return fn(*a, **kw, **opts)

    eager = loss(*pos)
    jitted = jax.jit(loss)(*pos)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-12, atol=1e-12)
    g_eager = jax.grad(lambda x: loss(x, *pos[1:]).sum())(pos[0])
    g_jit = jax.jit(jax.grad(lambda x: loss(x, *pos[1:]).sum()))(pos[0])
    np.testing.assert_allclose(np.asarray(g_jit), np.asarray(g_eager), rtol=1e-12, atol=1e-12)


def test_train_step_runs_cpo_and_rejects_unknown_options():
    optax = pytest.importorskip("optax")
    from prefopt.integrations.jax import make_train_step

    def apply_fn(params, ids, attention):
        return jnp.take(params["embed"], ids, axis=0) @ params["out"]

    params = {"embed": jnp.ones((16, 8)) * 0.1, "out": jnp.ones((8, 16)) * 0.1}
    ids = jnp.arange(30).reshape(2, 3, 5) % 16
    batch = {"input_ids": ids, "attention_mask": ids * 0 + 1, "labels": ids,
             "rewards": jnp.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.2]]),
             "mask": jnp.ones((2, 3), bool)}  # fmt: skip
    step = make_train_step(apply_fn, optax.sgd(0.1), loss="cpo")
    _, _, value, metrics = step(params, optax.sgd(0.1).init(params), batch)
    assert np.isfinite(float(value)) and np.isfinite(float(metrics["rewards/chosen"]))
    with pytest.raises(TypeError, match=r"make_train_step: sigmoid takes no option\(s\)"):
        make_train_step(apply_fn, optax.sgd(0.1), loss="sigmoid", alpha=1.0)


def tiny_lm():
    """A bag-of-embeddings model (V 16) and a batch of 2 groups of 3: ``apply_fn, params,
    batch, ids``."""

    def apply_fn(params, ids, attention):
        return jnp.take(params["embed"], ids, axis=0) @ params["out"]

    params = {"embed": jnp.ones((16, 8)) * 0.1, "out": jnp.eye(8, 16)}
    ids = jnp.arange(30).reshape(2, 3, 5) % 16
    batch = {"input_ids": ids, "attention_mask": ids * 0 + 1, "labels": ids,
             "rewards": jnp.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.2]]),
             "mask": jnp.ones((2, 3), bool)}  # fmt: skip
    return apply_fn, params, batch, ids


def test_train_step_takes_a_traced_beta_schedule_and_compiles_once():
    optax = pytest.importorskip("optax")
    from prefopt.integrations.jax import make_train_step

    apply_fn, params, batch, ids = tiny_lm()
    state = optax.sgd(0.1).init(params)
    scheduled = make_train_step(apply_fn, optax.sgd(0.1), loss="mpo")
    for beta in (0.5, 0.3, 0.1):
        _, _, value, _ = scheduled(params, state, batch, beta=jnp.asarray(beta))
        fixed = make_train_step(apply_fn, optax.sgd(0.1), loss="mpo", beta=beta)
        assert float(value) == pytest.approx(float(fixed(params, state, batch)[2]), rel=1e-6)
    assert scheduled._cache_size() == 1
    with pytest.raises(ValueError, match="mpo_loss: beta must be a finite number > 0; got -1.0"):
        make_train_step(apply_fn, optax.sgd(0.1), loss="mpo", beta=-1.0)


def test_train_step_checks_per_call_options_and_batch_keys_in_one_line():
    # Before: beta=-0.5 per call passed silently (traced), a missing mask was KeyError: 'mask'.
    optax = pytest.importorskip("optax")
    from prefopt.integrations.jax import loss_and_metrics, make_train_step

    apply_fn, params, batch, ids = tiny_lm()
    step = make_train_step(apply_fn, optax.sgd(0.1), loss="mpo")
    state = optax.sgd(0.1).init(params)
    for beta in (-0.5, jnp.asarray(-0.5)):
        with pytest.raises(ValueError, match="mpo_loss: beta must be a finite number > 0; got"):
            step(params, state, batch, beta=beta)
    with pytest.raises(TypeError, match="make_train_step: step"):
        step(params, state, batch, tau=1.0)
    step(params, state, batch, beta=0.2)  # a good value still runs, compiled once
    assert step._cache_size() == 1 and step.jitted._cache_size() == 1
    without = {k: v for k, v in batch.items() if k != "mask"}
    with pytest.raises(ValueError, match="make_train_step: step: the batch has no 'mask'"):
        step(params, state, without)
    with pytest.raises(ValueError, match="loss_and_metrics: the batch has no 'mask'"):
        loss_and_metrics(params, without, apply_fn=apply_fn)
    wrong = {**batch, "rewards": batch["rewards"][:, :2]}
    with pytest.raises(
        ValueError, match=r"batch\['rewards'\] must have shape \(B, n\); got \(2, 2\)"
    ):
        step(params, state, wrong)
    flat = {**batch, "input_ids": ids.reshape(6, 5)}
    with pytest.raises(ValueError, match=r"batch\['input_ids'\] must have shape \(B, n, T\)"):
        jax.jit(lambda p, b: loss_and_metrics(p, b, apply_fn=apply_fn)[0])(params, flat)


def _shapes(jaxpr) -> set:
    """Every intermediate shape of a jaxpr, nested calls included."""
    found = set()
    for eqn in jaxpr.eqns:
        found |= {tuple(v.aval.shape) for v in eqn.outvars}
        for sub in jaxprs_in_params(eqn.params):
            found |= _shapes(sub)
    return found


def test_train_step_computes_the_reference_from_ref_params():
    optax = pytest.importorskip("optax")
    from prefopt.integrations.jax import loss_and_metrics, make_train_step

    apply_fn, start, batch, ids = tiny_lm()
    params = jax.tree.map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), start)
    # the reference log-probs written out: log-softmax of embed[ids] @ out, next tokens summed
    embed, out = np.asarray(start["embed"], np.float64), np.asarray(start["out"], np.float64)
    ref = np.zeros((2, 3))
    for b, i in np.ndindex(2, 3):
        seq = np.asarray(ids[b, i])
        for t in range(len(seq) - 1):
            z = embed[seq[t]] @ out
            ref[b, i] += z[seq[t + 1]] - np.log(np.exp(z - z.max()).sum()) - z.max()
    given = {**batch, "ref_logps": jnp.asarray(ref, jnp.float32)}
    sgd = optax.sgd(0.1)
    step = make_train_step(apply_fn, sgd, loss="mpo")
    a = step(params, sgd.init(params), batch, ref_params=start)
    b = step(params, sgd.init(params), given)
    assert float(a[2]) == pytest.approx(float(b[2]), rel=1e-5)
    for x, y in zip(jax.tree.leaves(a[0]), jax.tree.leaves(b[0])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    # no gradient reaches the reference
    grads = jax.grad(lambda r: loss_and_metrics(params, batch, apply_fn=apply_fn, ref_params=r)[0])(
        start
    )
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match=r"make_train_step: step: two references"):
        step(params, sgd.init(params), given, ref_params=start)


def test_train_step_fused_output_layer_equals_logits_without_the_logits():
    optax = pytest.importorskip("optax")
    from prefopt.integrations.jax import loss_and_metrics, make_train_step

    apply_fn, params, batch, ids = tiny_lm()

    def hidden_fn(params, ids, attention):  # the last hidden states and the (V, H) matrix
        return jnp.take(params["embed"], ids, axis=0), params["out"].T

    for dtype, tol in ((jnp.float64, 1e-10), (jnp.float32, 1e-5)):
        p = jax.tree.map(lambda x: x.astype(dtype), params)
        start = jax.tree.map(lambda x: x * 0.9, p)
        sgd = optax.sgd(0.1)
        plain = make_train_step(apply_fn, sgd, loss="mpo")(p, sgd.init(p), batch, ref_params=start)
        fused = make_train_step(hidden_fn, sgd, loss="mpo")(p, sgd.init(p), batch, ref_params=start)
        assert float(fused[2]) == pytest.approx(float(plain[2]), rel=tol)
        for x, y in zip(jax.tree.leaves(fused[0]), jax.tree.leaves(plain[0])):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)
    # the logits path forms the (B·n, T, V) logits; the fused one never does
    logits = (6, 5, 16)
    for fn, present in ((apply_fn, True), (hidden_fn, False)):
        traced = jax.make_jaxpr(
            jax.grad(lambda q: loss_and_metrics(q, batch, apply_fn=fn, ref_params=params)[0])
        )(params)
        assert (logits in _shapes(traced.jaxpr)) is present


def test_bucket_padding_bounds_the_compiles_and_changes_no_value():
    # collate_ids pads to each batch's longest row: T 7 then 10 compiled the step twice
    optax = pytest.importorskip("optax")
    from prefopt.integrations.data import collate_ids
    from prefopt.integrations.jax import make_train_step

    def apply_fn(params, ids, attention):  # each position sees the mean of its prefix
        e = params["embed"][ids] * attention[..., None]
        prefix = jnp.cumsum(e, axis=1) / jnp.cumsum(attention, axis=1)[..., None].clip(1)
        return jnp.tanh(prefix) @ params["out"]

    r = np.random.default_rng(0)
    params = {
        "embed": jnp.asarray(r.normal(size=(16, 8))),
        "out": jnp.asarray(r.normal(size=(8, 16))),
    }
    ragged = [
        [([1, 2, 3], [[4, 5], [6], [7, 8, 9, 10]], [0.9, 0.1, 0.5])],  # T 7
        [([3, 2], [[5], [5, 5, 6, 7, 8, 9, 1, 2], [4]], [0.0, 1.0, 0.3])],  # T 10
    ]
    sgd = optax.sgd(0.1)
    counts = {}
    for bucket in (None, 16):
        step = make_train_step(apply_fn, sgd, loss="mpo")
        values = []
        for groups in ragged:
            arrays = collate_ids(groups, pad_id=0, pad_to_multiple_of=bucket)
            batch = {k: jnp.asarray(v) for k, v in arrays.items()}
            values.append(float(step(params, sgd.init(params), batch, ref_params=params)[2]))
        counts[bucket] = (step._cache_size(), values)
    assert counts[None][0] == 2 and counts[16][0] == 1
    np.testing.assert_allclose(counts[16][1], counts[None][1], rtol=1e-12)  # padding leaks not
    assert collate_ids(ragged[1], pad_id=0, pad_to_multiple_of=4)["input_ids"].shape == (1, 3, 12)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be an int >= 1; got 0"):
        collate_ids(ragged[0], pad_id=0, pad_to_multiple_of=0)


def test_checks_true_raises_the_eager_messages_from_inside_the_compiled_step():
    # Under jit these passed silently: NaN rewards (a NaN loss), labels >= V, a traced beta
    optax = pytest.importorskip("optax")
    from prefopt.integrations.jax import make_train_step

    apply_fn, params, batch, ids = tiny_lm()
    sgd = optax.sgd(0.1)
    state = sgd.init(params)
    step = make_train_step(apply_fn, sgd, loss="mpo", checks=True)
    step(params, state, batch)  # clean data runs
    nan = {**batch, "rewards": batch["rewards"].at[1, 2].set(jnp.nan)}
    with pytest.raises(Exception, match=r"mpo_loss: rewards must be finite where mask is true"):
        step(params, state, nan)
    masked = {**nan, "mask": batch["mask"].at[1, 2].set(False)}  # a padded slot may hold NaN
    assert np.isfinite(float(step(params, state, masked)[2]))
    wide = {**batch, "labels": batch["labels"].at[0, 1, 3].set(16)}
    with pytest.raises(Exception, match=r"labels must lie in \[0, 16\) .* got 1 label\(s\)"):
        step(params, state, wide)
    unchecked = make_train_step(apply_fn, sgd, loss="mpo")  # the default: no word of it
    assert not np.isfinite(float(unchecked(params, state, nan)[2]))

    # an option computed inside the user's own compiled code is traced when the loss sees
    # it: the make_train_step check cannot read it, checkify can
    from jax.experimental import checkify

    from prefopt.integrations.jax import loss_and_metrics

    def user_loop(params, scale, loss, option):
        total = 0.0
        for i in range(2):  # the second value is out of range
            value = (
                scale * (0.1 + 0.4 * i) if option == "label_smoothing" else scale * (0.1 - 0.2 * i)
            )
            options = {option: value}
            total += loss_and_metrics(
                params, batch, apply_fn=apply_fn, checks=True, loss=loss, **options
            )[0]
        return total

    for loss, option, message in (
        ("mpo", "beta", r"mpo_loss: beta must be a finite number > 0; got -0.1"),
        (
            "robust",
            "label_smoothing",
            r"robust_dpo_loss: label_smoothing must lie in \[0.0, 0.5\); got 0.5",
        ),
    ):
        run = jax.jit(checkify.checkify(functools.partial(user_loop, loss=loss, option=option)))
        error, _ = run(params, jnp.asarray(1.0))
        with pytest.raises(Exception, match=message):
            error.throw()


def test_nnx_train_step_equals_the_functional_step_without_split_or_merge():
    optax = pytest.importorskip("optax")
    nnx = pytest.importorskip("flax.nnx")
    from prefopt.integrations.jax import make_nnx_train_step, make_train_step

    class LM(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(16, 8, rngs=rngs)
            self.out = nnx.Linear(8, 16, rngs=rngs)  # kernel (H, V), with a bias

    def forward(m, ids, attention):
        return m.out(jnp.tanh(m.embed(ids)))

    def fused(m, ids, attention):  # the fused output layer: no logits
        return jnp.tanh(m.embed(ids)), m.out.kernel[...].T, m.out.bias[...]

    _, _, batch, _ = tiny_lm()
    for fn in (forward, fused):
        model = LM(nnx.Rngs(0))
        reference = nnx.clone(model)
        graphdef, params = nnx.split(nnx.clone(model))  # a copy: the step updates in place
        ref_params = nnx.state(reference)
        tx = optax.adam(1e-2)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        step = make_nnx_train_step(fn, loss="mpo", beta=0.5)
        twin = make_train_step(lambda p, ids, a: forward(nnx.merge(graphdef, p), ids, a), tx,
                               loss="mpo", beta=0.5)  # fmt: skip
        state = tx.init(params)
        for _ in range(3):
            value, metrics = step(model, optimizer, batch, ref_model=reference)
            params, state, expected, _ = twin(params, state, batch, ref_params=ref_params)
            assert float(value) == pytest.approx(float(expected), rel=1e-5)
        assert float(value) > 0 and np.isfinite(float(metrics["rewards/margins"]))
        for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        moved = jax.tree.leaves(nnx.state(model))[0] - jax.tree.leaves(ref_params)[0]
        assert float(jnp.abs(moved).max()) > 1e-3  # it trained; the reference stayed
    with pytest.raises(ValueError, match="make_nnx_train_step: step: two references"):
        step(model, optimizer, {**batch, "ref_logps": batch["rewards"]}, ref_model=reference)


def test_the_flax_llama_refuses_what_it_does_not_implement():
    pytest.importorskip("flax")
    from prefopt.integrations.flax_llama import Llama

    config = {"vocab_size": 16, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5}  # fmt: skip
    assert Llama(config).rope_theta == 10000.0
    for extra, message in (
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_type='llama3'"),
        ({"attention_bias": True}, "attention_bias=True"),
    ):
        with pytest.raises(ValueError, match=f"Llama: {message} is not supported"):
            Llama({**config, **extra})


# ---- the shared prompt in JAX: the Flax Llama on packed groups --------------------------

LLAMA = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
         "rope_theta": 10000.0}  # fmt: skip
RAGGED = [
    [([1, 2, 3], [[4, 5], [6], [7, 8, 9, 10, 11]], [0.9, 0.1, 0.5]),
     ([3, 2, 9, 9, 4], [[5], [5, 5, 6, 7, 8, 9, 1, 2]], [0.0, 1.0])],
    [([7, 1], [[2, 3, 4, 5, 6, 7], [30, 31, 1, 2], [5, 4]], [0.2, 0.8, 0.4]),
     ([6, 6, 6], [[1, 2, 3, 4], [3, 2]], [1.0, 0.0])],
]  # fmt: skip


def packed_batch(groups, bucket=None):
    from prefopt.integrations.data import collate_ids
    from prefopt.layout import pack_groups

    arrays = collate_ids(groups, pad_id=0, pad_to_multiple_of=bucket)
    packed = pack_groups(arrays, pad_to_multiple_of=bucket)
    return {**{k: jnp.asarray(v) for k, v in arrays.items()}, "packed": packed.map(jnp.asarray)}


@pytest.mark.usefixtures("keys")
@pytest.mark.parametrize("bucket", [None, 8])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
def test_the_flax_shared_prompt_equals_the_unshared_path(dtype, tol, bucket):
    nnx = pytest.importorskip("flax.nnx")
    from prefopt.integrations.flax_llama import Llama, llama_forward, llama_group_forward
    from prefopt.integrations.jax import sequence_logps

    model = Llama(LLAMA, jnp.dtype(dtype), rngs=nnx.Rngs(1))
    batch = packed_batch(RAGGED[0], bucket)
    weights = jnp.linspace(0.5, 1.5, batch["mask"].size).reshape(batch["mask"].shape)

    def total(model, group_fn):
        logps, lengths = sequence_logps(llama_forward, model, batch, group_fn=group_fn)
        return jnp.sum(logps * weights * batch["mask"]), (logps, lengths)

    results = {}
    for name, fn in (("unshared", None), ("shared", llama_group_forward)):
        grad = nnx.jit(nnx.grad(total, has_aux=True), static_argnums=1)  # eager: 5x slower
        grads, (logps, lengths) = grad(model, fn)
        results[name] = (logps, lengths, jax.tree.leaves(grads))
    (a, la, ga), (b, lb, gb) = results["unshared"], results["shared"]
    assert a.dtype == b.dtype == jnp.dtype(dtype) and np.array_equal(la, lb)
    np.testing.assert_allclose(b, a, rtol=tol, atol=tol)
    assert np.all(np.asarray(a)[~np.asarray(batch["mask"])] == 0)  # padding leaks not
    assert len(ga) == len(gb) > 0
    for x, y in zip(gb, ga):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol * float(jnp.abs(y).max()))


@pytest.mark.usefixtures("keys")
def test_the_flax_shared_prompt_holds_no_array_of_two_packed_lengths():
    nnx = pytest.importorskip("flax.nnx")
    from prefopt.integrations.flax_llama import Llama, llama_group_forward

    model = Llama(LLAMA, rngs=nnx.Rngs(1))
    batch = packed_batch(RAGGED[0])
    L = batch["packed"].ids.shape[1]
    graphdef, state = nnx.split(model)
    traced = jax.make_jaxpr(
        lambda s: llama_group_forward(nnx.merge(graphdef, s), batch["packed"])[0]
    )(state)
    assert L not in (16, 32, 8, 4)  # no model size: an L in a shape is the packed length
    assert not [s for s in _shapes(traced.jaxpr) if s.count(L) >= 2], L
    unshared = jax.make_jaxpr(  # the check finds the (T, T) mask of the unshared forward
        lambda s: nnx.merge(graphdef, s).hidden(jnp.zeros((2, L), int))
    )(state)
    assert [s for s in _shapes(unshared.jaxpr) if s.count(L) >= 2]


def test_the_nnx_step_with_the_shared_prompt_and_a_reference_compiles_once_per_bucket():
    optax = pytest.importorskip("optax")
    nnx = pytest.importorskip("flax.nnx")
    from prefopt.integrations.flax_llama import Llama, llama_forward, llama_group_forward
    from prefopt.integrations.jax import make_nnx_train_step

    losses = {}
    for shared in (False, True):
        model = Llama(LLAMA, rngs=nnx.Rngs(1))
        reference = nnx.clone(model)
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        step = make_nnx_train_step(
            llama_forward, group_forward=llama_group_forward if shared else None, beta=0.5
        )
        losses[shared] = [
            float(step(model, optimizer, packed_batch(groups, 16), ref_model=reference)[0])
            for groups in RAGGED * 2
        ]
        assert step._cache_size() == 1  # two ragged batches in one bucket: one compile
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    assert losses[True][2] < losses[True][0]  # it trains against the reference


def test_the_nnx_step_checks_values_inside_the_compiled_step():
    optax = pytest.importorskip("optax")
    nnx = pytest.importorskip("flax.nnx")
    from prefopt.integrations.flax_llama import Llama, llama_forward, llama_group_forward
    from prefopt.integrations.jax import make_nnx_train_step

    model = Llama(LLAMA, rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.sgd(1e-3), wrt=nnx.Param)
    step = make_nnx_train_step(llama_forward, group_forward=llama_group_forward, checks=True)
    batch = packed_batch(RAGGED[0])
    assert np.isfinite(float(step(model, optimizer, batch)[0]))  # clean data runs
    nan = {**batch, "rewards": batch["rewards"].at[0, 1].set(jnp.nan)}
    with pytest.raises(Exception, match=r"mpo_loss: rewards must be finite where mask is true"):
        step(model, optimizer, nan)
    wide = {**batch, "labels": batch["labels"].at[0, 0, 4].set(32)}
    with pytest.raises(Exception, match=r"labels must lie in \[0, 32\) .* got 1 label\(s\)"):
        step(model, optimizer, wide)
    with pytest.raises(TypeError, match=r"step: batch\['packed'\] must be the PackedGroups"):
        step(model, optimizer, {**batch, "packed": {"ids": batch["input_ids"]}})
