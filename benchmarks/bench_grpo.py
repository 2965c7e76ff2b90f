"""One on-policy step on TRL's GRPO engine: stock ``GRPOTrainer`` against prefopt's
``GroupPreferenceGRPOTrainer`` (MPO), same model, prompts and config.

The training part (``compute_loss`` and backward on the same generated completions) and
the whole step (generation and scoring included) are measured in separate processes, the
paths alternating over ``--rounds``. Stock GRPO runs each completion with its own copy of
the prompt and, at ``beta=0.0`` (TRL's default), no reference; MPO runs each prompt once
per group and always a reference forward.

    python benchmarks/bench_grpo.py            # Llama H 256, 4 layers, V 32000, 2 prompts
                                               # of 256 tokens x 8 completions of 64, CPU
    python benchmarks/bench_grpo.py --quick    # tiny sizes: a smoke run (CI)
    python benchmarks/bench_grpo.py --device cuda --dtype bfloat16 --vocab 128256

Target: the training part several times cheaper with the group forward.
"""

from __future__ import annotations

import argparse
import json

from _measure import measure, measurement_options, rounds, table
from bench_step import tokenizer

MODES = ("grpo_train", "mpo_train", "grpo_step", "mpo_step")


def worker(args) -> dict:
    import datasets
    import torch
    import transformers
    import trl

    from prefopt.integrations.trl import GroupPreferenceGRPOTrainer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    torch.manual_seed(0)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    tok = tokenizer(args.vocab)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 1),
        max_position_embeddings=args.prompt + args.completion + 8, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(dev, dtype)
    g = torch.Generator().manual_seed(1)
    prompts = [
        " ".join(f"w{i}" for i in torch.randint(0, args.vocab - 2, (args.prompt,), generator=g))
        for _ in range(args.groups)
    ]

    def reward(prompts, completions, **kwargs):
        return [float(len(c) % 7) for c in completions]

    cfg = trl.GRPOConfig(
        output_dir="/tmp/prefopt-bench-grpo", num_generations=args.n,
        per_device_train_batch_size=args.groups * args.n, max_completion_length=args.completion,
        report_to=[], use_cpu=args.device == "cpu", bf16=args.dtype == "bfloat16",
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    cls = GroupPreferenceGRPOTrainer if args.mode.startswith("mpo") else trl.GRPOTrainer
    data = datasets.Dataset.from_list([{"prompt": p} for p in prompts])
    trainer = cls(model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by train(); one micro-batch a step
    rows = [{"prompt": p} for p in prompts for _ in range(args.n)]  # as TRL's sampler gives them
    inputs = trainer._generate_and_score_completions(rows)

    def step():
        batch = trainer._generate_and_score_completions(rows) if "step" in args.mode else inputs
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        trainer.model.zero_grad(set_to_none=True)

    return measure(step, dev, args.repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--groups", type=int, default=2, help="prompts per step")
    parser.add_argument("--n", type=int, default=8, help="completions per prompt")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--completion", type=int, default=64, help="most completion tokens")
    measurement_options(parser, repeats=2, rounds=1)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.prompt, args.completion = 32, 1, 500, 16, 4
        args.repeats, args.rounds = 1, 1
    if args.mode:  # a worker process
        print(json.dumps(worker(args)))
        return
    argv = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("quick", "mode")]
    results = rounds(__file__, argv, MODES, args.rounds)
    print(
        f"{args.device} {args.dtype}: Llama H {args.hidden}, {args.layers} layers, "
        f"V {args.vocab}; {args.groups} prompts of {args.prompt} x {args.n} completions of "
        f"<= {args.completion}; best of {args.repeats} (+1 warm-up) x {args.rounds} rounds"
    )
    summary = table(results, args.device, width=12)
    for part in ("train", "step"):
        (_, g0, t0), (_, g1, t1) = summary[f"grpo_{part}"], summary[f"mpo_{part}"]
        growth = g1 / max(g0, 1e-9)
        print(f"mpo / grpo ({part}): time {t1 / t0:.2f}, peak memory growth {growth:.2f}")


if __name__ == "__main__":
    main()
