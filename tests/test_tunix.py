"""prefopt's group losses on tunix's GRPO learner (prefopt.integrations.tunix).

tunix lives in an environment of its own (its safetensors pin conflicts with the pinned
transformers): CI runs this file there with ``PREFOPT_TUNIX=1``, which makes a missing
tunix a failure; elsewhere the file is skipped. A 2-layer random ``tunix.models.llama3``
and prefopt train's built-in word tokenizer (examples/mpo_tunix.py): nothing is downloaded.
"""

import os

import numpy as np
import pytest

if os.environ.get("PREFOPT_TUNIX") != "1":
    pytest.importorskip("tunix", reason="tunix: its own environment (PREFOPT_TUNIX=1 in CI)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import prefopt  # noqa: E402
from examples import mpo_tunix  # noqa: E402
from prefopt.integrations.tunix import GroupPreferenceGRPOLearner, completion_mask  # noqa: E402

PAD = EOS = 2  # the word tokenizer's pad token is its eos, as for many chat models
N = 4
SCORED = []  # what the reward function returned, call by call


@pytest.fixture(autouse=True)
def x32():
    """tunix's sampler needs JAX's default 32-bit mode (the suite's conftest turns x64 on),
    in every thread: its rollout runs in a worker thread."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", before)


def reward(prompts, completions, **kwargs):
    """The example's graded copy reward, recorded."""
    SCORED.append(mpo_tunix.copy_reward(prompts, completions, **kwargs))
    return SCORED[-1]


def cluster(packing=None):
    """The example's tiny cluster: a random 2-layer Llama 3, 3 steps of Adam 1e-2."""
    where = mpo_tunix.mesh()
    policy, reference = mpo_tunix.tiny_models(where)
    return mpo_tunix.cluster(
        policy, reference, mpo_tunix.word_tokenizer(), where, lr=1e-2, steps=3, max_tokens=6,
        packing=packing,
    )  # fmt: skip


def learner(c, **options):
    from tunix.rl.grpo import grpo_learner

    config = grpo_learner.GRPOConfig(num_generations=N, num_iterations=1)
    options = {"loss_options": {"beta": 0.1}, **options}
    return GroupPreferenceGRPOLearner(c, config, reward, **options)


def params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_completion_mask_counts_up_to_the_first_eos_when_pad_is_eos():
    ids = jnp.array([[5, 6, 1, 1, 1], [5, 6, 7, 8, 9], [1, 1, 1, 1, 1], [5, 1, 6, 1, 1]])
    expected = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert completion_mask(ids, pad_id=1, eos_id=1).astype(int).tolist() == expected
    # pad 0, eos 1: the same, and padding never counts
    ids = jnp.array([[5, 6, 1, 0, 0], [5, 6, 0, 0, 0]])
    expected = [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert completion_mask(ids, pad_id=0, eos_id=1).astype(int).tolist() == expected


def test_the_loss_sees_raw_rewards_whole_groups_and_its_own_reference():
    c = cluster()
    trainer = learner(c)
    prompts = ["copy: a e", "copy: b <eos> f"]  # an eos inside a prompt is attended
    example = trainer._generate_and_compute_advantage(
        {"prompts": np.array([p for p in prompts for _ in range(N)])}
    )
    # the raw rewards, not GRPO's z-scored advantages
    np.testing.assert_allclose(example.advantages, SCORED[-1], rtol=1e-6)
    assert len(set(SCORED[-1])) > 1  # graded: z-scoring would have changed them
    counted = np.asarray(example.completion_mask)
    ids = np.asarray(example.completion_ids)
    for row, keep in zip(ids, counted):  # a completion's eos counts, padding never
        k = int(keep.sum())
        assert keep[:k].all() and not keep[k:].any()
        assert (EOS not in row[: k - 1]) and (k == len(row) or row[k - 1] == EOS)

    def one_at_a_time(model):  # each row alone, unpadded, positions 0..: (rows,) float64
        out = []
        for prompt, row, keep in zip(np.asarray(example.prompt_ids), ids, counted):
            p = prompt[np.argmax(prompt != PAD) :]
            seq = np.concatenate([p, row[keep]])
            L = len(seq)
            logits, _ = model(
                jnp.asarray(seq)[None], jnp.arange(L)[None], None, jnp.tril(jnp.ones((1, L, L)))
            )
            x = np.asarray(logits[0], np.float64)
            logp = x - x.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            out.append(sum(logp[len(p) - 1 + t, tok] for t, tok in enumerate(row[keep])))
        return np.array(out)

    reference = c.inference_worker.get_model("reference")
    np.testing.assert_allclose(
        np.asarray(example.ref_per_token_logps).sum(-1), one_at_a_time(reference), rtol=1e-5
    )
    actor = c.actor_trainer.model
    value, aux = trainer._loss(actor, example, N, PAD)
    logps = one_at_a_time(actor).reshape(2, N)
    ref = np.asarray(example.ref_per_token_logps).sum(-1).reshape(2, N)
    rewards = np.array(example.advantages).reshape(2, N)
    expected = prefopt.batch_loss("mpo", logps, ref, rewards, beta=0.1)
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    assert float(aux["kl"]) == pytest.approx(0.0, abs=1e-6)  # the policy is the reference
    # an unscored completion (NaN reward) is left out of its group, not a NaN loss
    unscored = example.replace(advantages=example.advantages.at[0].set(jnp.nan))
    rewards[0, 0], mask = 0.0, np.ones((2, N), bool)
    mask[0, 0] = False
    value, _ = trainer._loss(actor, unscored, N, PAD)
    expected = prefopt.batch_loss("mpo", logps, ref, rewards, mask=mask, beta=0.1)
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    assert set(aux) >= {"kl", "pg_clipfrac", "prefopt_margin", "prefopt_accuracy"}
    assert mpo_tunix.word_tokenizer().pad_token_id == EOS == mpo_tunix.word_tokenizer().eos_token_id


def test_three_steps_train_the_policy_and_log_tunix_and_prefopt_metrics():
    c = cluster()
    trainer = learner(c)
    reference = c.inference_worker.get_model("reference")
    before, ref_before = params(c.actor_trainer.model), params(reference)
    from grain import python as grain

    prompts = [f"copy: {x} {y}" for x in "abcd" for y in "efgh"]
    trainer.train(grain.MapDataset.source(prompts).batch(2).map(lambda x: {"prompts": x}))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(params(c.actor_trainer.model), before))
    assert moved > 1e-3  # trained
    assert all(np.array_equal(a, b) for a, b in zip(params(reference), ref_before))
    logger = c.actor_trainer.metrics_logger
    history = {k: np.asarray(logger.get_metric_history("actor", k, "train"))
               for k in ("loss", "kl", "pg_clipfrac", "prefopt_margin")}  # fmt: skip
    assert all(len(v) == 3 and np.all(np.isfinite(v)) for v in history.values())
    assert history["kl"][0] == pytest.approx(0.0, abs=1e-6) and history["kl"][-1] != 0.0


def test_training_under_x64_is_refused_in_one_line():
    trainer = learner(cluster())
    jax.config.update("jax_enable_x64", True)  # the x32 fixture restores the mode
    with pytest.raises(RuntimeError, match="sampler fails under jax_enable_x64"):
        trainer.train([])


def test_what_would_split_groups_or_break_the_loss_is_refused():
    with pytest.raises(ValueError, match=r"sequence packing \(max_seq_token_per_tpu=64\)"):
        learner(cluster(packing=64))
    c = cluster()
    with pytest.raises(ValueError, match="mpo_loss: beta must be a finite number > 0; got -1.0"):
        learner(c, loss_options={"beta": -1.0})
    with pytest.raises(ValueError, match="pairs must be 'all' or 'best_worst'; got 'x'"):
        learner(c, pairs="x")
    with pytest.raises(ValueError, match="pairs='best_worst' is for a pairwise loss"):
        learner(c, pairs="best_worst")
    assert learner(c, loss="sigmoid", loss_options={"beta": 0.2}, pairs="best_worst").pairs
