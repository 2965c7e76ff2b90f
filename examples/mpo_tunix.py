"""MPO on tunix's GRPO learner (JAX): tunix samples and scores, prefopt's group loss trains.

``GroupPreferenceGRPOLearner`` (``prefopt.integrations.tunix``) on tunix's ``RLCluster``:
its vanilla sampler, its reward functions and training loop, MPO as the loss (raw rewards,
the reference model, whole groups). Two models:

- ``--model smollm2-135m-instruct`` (default): SmolLM2-135M-Instruct in tunix's Llama 3,
  from the checkpoint folder prefopt converts once (in an environment with torch:
  ``python -c "from prefopt.cli.models import smollm2_path; print(smollm2_path())"``), on
  the addition task of ``prefopt train``. tunix 0.1.7's attention ignores the config's
  ``rope_theta`` (always 1e6; SmolLM2's is 1e5): the script passes the checkpoint's, and
  first checks tunix's logits against prefopt's Flax Llama (itself within 1e-4 of
  transformers');
- ``--model tiny``: a random 2-layer Llama 3 and ``prefopt train``'s built-in word
  tokenizer, on its copy task (the tests use it).

    pip install -e ".[tunix]"    # an environment of its own: see the tunix docs page
    python examples/mpo_tunix.py                      # SmolLM2, 8 steps of 2 prompts x 4
    python examples/mpo_tunix.py --model tiny --steps 2   # a smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import numpy as np
import optax
from flax import nnx

from prefopt.integrations.tunix import GroupPreferenceGRPOLearner


def word_tokenizer():
    """``prefopt train``'s built-in word tokenizer, its pad token its eos (nothing downloaded)."""
    from prefopt.cli.task import builtin_tokenizer

    tokenizer = builtin_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # as many chat tokenizers: pad == eos
    return tokenizer


def mesh():
    """One CPU device, the two axes tunix's Llama 3 shards over."""
    axes = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=axes)


def tiny_models(where):
    """A random 2-layer Llama 3 over the built-in words: the policy and its reference."""
    from tunix.models.llama3 import model as llama3

    from prefopt.cli.task import VOCAB

    config = llama3.ModelConfig(
        num_layers=2, vocab_size=len(VOCAB), embed_dim=32, hidden_dim=64, num_heads=4,
        head_dim=8, num_kv_heads=2, rope_theta=10000, norm_eps=1e-5,
    )  # fmt: skip
    with jax.set_mesh(where):
        return llama3.Llama3(config, rngs=nnx.Rngs(0)), llama3.Llama3(config, rngs=nnx.Rngs(0))


def smollm2_models(where, folder):
    """SmolLM2-135M-Instruct in tunix's Llama 3, the checkpoint's rope theta passed."""
    from tunix.models.llama3 import model as llama3
    from tunix.models.llama3 import params

    c = json.loads((folder / "config.json").read_text())
    theta = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0))
    config = llama3.ModelConfig(
        num_layers=c["num_hidden_layers"], vocab_size=c["vocab_size"], embed_dim=c["hidden_size"],
        hidden_dim=c["intermediate_size"], num_heads=c["num_attention_heads"],
        head_dim=c.get("head_dim", c["hidden_size"] // c["num_attention_heads"]),
        num_kv_heads=c["num_key_value_heads"], rope_theta=int(theta),
        norm_eps=c["rms_norm_eps"], weight_tying=c.get("tie_word_embeddings", False),
    )  # fmt: skip
    # tunix 0.1.7 calls apply_rope without the config's theta (its default 1e6): pass it
    llama3.apply_rope = functools.partial(llama3.apply_rope, rope_theta=config.rope_theta)
    return tuple(params.create_model_from_safe_tensors(str(folder), config, where) for _ in "ab")


def cluster(policy, reference, tokenizer, where, *, lr, steps, max_tokens, packing=None):
    """tunix's RLCluster: one mesh for actor, reference and rollout; Adam; vanilla sampling."""
    from tunix.rl import rl_cluster as rl
    from tunix.rl.rollout import base_rollout

    training = rl.RLTrainingConfig(
        actor_optimizer=optax.adam(lr), eval_every_n_steps=10**6, max_steps=steps,
        max_seq_token_per_tpu=packing, rollout_micro_batch_size=2,
        compute_logps_micro_batch_size=2,
    )  # fmt: skip
    rollout = base_rollout.RolloutConfig(
        max_tokens_to_generate=max_tokens, max_prompt_length=64, kv_cache_size=128,
        temperature=0.7,
    )  # fmt: skip
    return rl.RLCluster(
        actor=policy,
        reference=reference,
        tokenizer=tokenizer,
        cluster_config=rl.ClusterConfig(
            role_to_mesh={rl.Role.ACTOR: where, rl.Role.REFERENCE: where, rl.Role.ROLLOUT: where},
            rollout_engine="vanilla",
            offload_to_cpu=False,
            training_config=training,
            rollout_config=rollout,
        ),
    )


def copy_reward(prompts, completions, **_):
    """The copy task: the first word equal to the prompt's last letter, a little for length."""
    return [
        float(c.split()[:1] == [p.split()[-1]]) + 0.1 * len(c.split())
        for p, c in zip(prompts, completions)
    ]


def check_rope(policy, folder, tokenizer):
    """Largest |difference| of tunix's next-token logits from prefopt's Flax Llama's."""
    import jax.numpy as jnp

    from prefopt.integrations.flax_llama import load_llama

    ids = jnp.asarray([tokenizer("What is 3 + 4? Reply with the number only.")["input_ids"]])
    L = ids.shape[1]
    ours = load_llama(folder)(ids, jnp.ones_like(ids))
    theirs, _ = policy(ids, jnp.arange(L)[None], None, jnp.tril(jnp.ones((1, L, L), bool)))
    return float(jnp.abs(ours - theirs.astype(jnp.float32)).max())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="or tiny")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="default 1e-5 (tiny: 1e-2)")
    args = parser.parse_args(argv)
    where = mesh()
    scores = []  # the mean reward of each step's completions

    if args.model == "tiny":
        tokenizer = word_tokenizer()
        policy, reference = tiny_models(where)
        prompts = [f"copy: {x} {y}" for x in "abcd" for y in "efgh"]
        score, lr, max_tokens = copy_reward, args.lr or 1e-2, 6
    else:
        from pathlib import Path

        from transformers import AutoTokenizer

        from prefopt.cli.models import SMOLLM2, smollm2_path
        from prefopt.cli.task import addition_prompts, addition_reward

        folder = smollm2_path() if args.model == SMOLLM2 else Path(args.model)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        policy, reference = smollm2_models(where, folder)
        print(f"tunix Llama 3 vs prefopt's Flax Llama: logits within "
              f"{check_rope(policy, folder, tokenizer):.2e}")  # fmt: skip
        messages = [[{"role": "user", "content": p}] for p in addition_prompts()[0]]
        prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                   for m in messages]  # fmt: skip

        def score(prompts, completions, **_):
            return [addition_reward(p, c) for p, c in zip(prompts, completions)]

        lr, max_tokens = args.lr or 1e-5, 10

    def reward(prompts, completions, **kwargs):
        values = score(prompts, completions, **kwargs)
        scores.append(float(np.mean(values)))
        return values

    from grain import python as grain
    from tunix.rl.grpo import grpo_learner

    c = cluster(policy, reference, tokenizer, where, lr=lr, steps=args.steps, max_tokens=max_tokens)
    config = grpo_learner.GRPOConfig(num_generations=4, num_iterations=1)
    learner = GroupPreferenceGRPOLearner(c, config, reward, loss="mpo", loss_options={"beta": 0.1})
    data = grain.MapDataset.source(prompts).batch(2).map(lambda x: {"prompts": x})
    start = time.perf_counter()
    learner.train(data)
    seconds = time.perf_counter() - start
    logged = c.actor_trainer.metrics_logger
    history = {k: logged.get_metric_history("actor", k, "train")
               for k in ("loss", "kl", "prefopt_margin")}  # fmt: skip
    for i, (loss, kl, margin) in enumerate(zip(*history.values())):
        print(
            f"step {i}  reward {scores[i]:.3f}  loss {loss:.4f}  kl {kl:.4f}  margin {margin:.4f}"
        )
    print(f"{len(history['loss'])} steps in {seconds:.1f} s ({seconds / args.steps:.1f} s a step, "
          "the first with its compiles)")  # fmt: skip
    return {"scores": scores, **{k: [float(v) for v in h] for k, h in history.items()}}


if __name__ == "__main__":
    main()
