"""One preference training step with groups: the unshared path against the group forward.

A step is the policy's forward and backward, the reference's forward (no gradient) and
the MPO loss, on B groups of n responses. ``unshared`` runs B·n full sequences and their
whole logits (the path before the group forward: ``share_prefix=False, fused=False``);
``shared`` runs each group's prompt once in a packed sequence (the shared attention) and
only response positions through the output layer, in chunks (the defaults of
``batch_logps``). With ``--pairs``,
n = 2 and the step of prefopt's ``PreferenceTrainer`` is timed against TRL's
``DPOTrainer`` (``trl``) on the same model and batch (TRL must be installed).

    python benchmarks/bench_step.py            # Llama H 256, 4 layers, V 32000, B 2, n 8,
                                               # prompt 256, responses 64, float32, CPU
    python benchmarks/bench_step.py --pairs    # n = 2, B 8: PreferenceTrainer vs DPOTrainer
    python benchmarks/bench_step.py --quick    # tiny sizes: a smoke run (CI)
    python benchmarks/bench_step.py --prompt 2048 --response 128   # a long prompt
    python benchmarks/bench_step.py --device cuda --dtype bfloat16 --vocab 128256
    python benchmarks/bench_step.py --device cuda --attn flash_attention_2   # with flash_attn
    python benchmarks/bench_step.py --model smollm2-135m-instruct --prompt 50 --response 64
                                               # the real model: plain, shared, shared + fused

Targets (groups, the bench size): time at most 0.24x, peak memory growth at most 0.12x of
``unshared`` (measure with ``MALLOC_MMAP_THRESHOLD_=65536`` on the CPU: freed blocks then
leave the resident set);
(pairs): at most 1.0x TRL's time. Each path runs in its own process, alternating over
``--rounds``; time is the best of ``--repeats`` steps after a warm-up; memory is the growth
of the peak resident set over the one once model and batch exist (CUDA: allocated).
"""

from __future__ import annotations

import argparse
import json

from _measure import measure, measurement_options, rounds, table

# the step's paths: plain (B·n full sequences, whole logits), the shared prompt alone, and the
# defaults of batch_logps (shared prompt and fused output layer)
PATHS = {
    "unshared": {"share_prefix": False, "fused": False},
    "shared_unfused": {"share_prefix": True, "fused": False},
    "shared": {"share_prefix": True, "fused": True},
}


def tokenizer(vocab: int):
    """A word-level tokenizer over ``vocab`` words ``w0 w1 ...`` (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", *(f"w{i}" for i in range(vocab - 2))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def worker(args) -> dict:
    import copy

    import torch
    import transformers

    from prefopt.integrations.data import collate_ids
    from prefopt.integrations.transformers import loss_and_metrics

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.model:  # a real model: its vocabulary, width, GQA heads and tied embeddings
        from prefopt.cli.models import load_model

        policy = load_model(args.model, dtype=args.dtype)[0].to(dev)
        policy.set_attn_implementation(args.attn)
        args.vocab = policy.config.vocab_size
    else:
        config = transformers.LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=max(args.hidden // 64, 1),
            max_position_embeddings=args.prompt + args.response + 8,
            tie_word_embeddings=False,
        )
        config._attn_implementation = args.attn
        policy = transformers.LlamaForCausalLM(config).to(dev, dtype)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)

    def ids(k):
        return torch.randint(2, args.vocab, (k,), generator=g).tolist()

    rewards = [float(i) for i in range(args.n)]
    groups = [
        (ids(args.prompt), [ids(args.response) for _ in range(args.n)], rewards)
        for _ in range(args.groups)
    ]
    batch = {k: torch.from_numpy(v).to(dev) for k, v in collate_ids(groups, pad_id=0).items()}

    if args.mode in PATHS:
        how = PATHS[args.mode]

        def step():
            loss, _, _ = loss_and_metrics(policy, batch, ref_model=reference, loss="mpo", **how)
            loss.backward()
            policy.zero_grad(set_to_none=True)
    else:  # a trainer's compute_loss on the same pairs: TRL's layout or prefopt's
        import datasets

        tok = tokenizer(args.vocab)
        data = datasets.Dataset.from_list([{"prompt": "w1", "chosen": " w2", "rejected": " w3"}])
        if args.mode == "trl":
            import trl

            cls = trl.DPOTrainer
            chosen = [p + r[0] for p, r, _ in groups]
            rejected = [p + r[1] for p, r, _ in groups]
            rows = chosen + rejected
            inputs = {
                "input_ids": torch.tensor(rows, device=dev),
                "attention_mask": torch.ones(len(rows), len(rows[0]), dtype=torch.long, device=dev),
                "completion_mask": torch.tensor(
                    [[0] * args.prompt + [1] * args.response] * len(rows), device=dev
                ),
            }
        else:
            from prefopt.integrations.transformers import PreferenceTrainer

            cls, inputs = PreferenceTrainer, batch
        import trl

        cfg = trl.DPOConfig(
            output_dir="/tmp/prefopt-bench-step",
            loss_type=["sigmoid"],
            bf16=args.dtype == "bfloat16",
            use_cpu=args.device == "cpu",
            gradient_checkpointing=False,
            report_to=[],
            max_length=None,
        )
        trainer = cls(
            model=policy, ref_model=reference, args=cfg, train_dataset=data, processing_class=tok
        )
        model = trainer.model.train()

        def step():
            loss = trainer.compute_loss(model, inputs)
            loss.backward()
            model.zero_grad(set_to_none=True)

    return measure(step, dev, args.repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--pairs", action="store_true", help="n = 2: against TRL's DPOTrainer")
    parser.add_argument(
        "--model",
        help="a real model instead of a random Llama: smollm2-135m-instruct, a .gguf file or a "
        "checkpoint folder (prefopt.cli.models.load_model); --hidden, --layers, --vocab unused",
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--groups", type=int, default=None, help="B (default 2; 8 with --pairs)")
    parser.add_argument("--n", type=int, default=8, help="responses per prompt")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--response", type=int, default=64, help="tokens per response")
    parser.add_argument("--attn", default="sdpa", help="attention implementation of the model")
    measurement_options(parser)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.prompt, args.response = 32, 1, 500, 16, 4
        args.repeats, args.rounds = 1, 1
    if args.pairs:
        args.n = 2
    if args.groups is None:
        args.groups = 8 if args.pairs else 2
    if args.mode:  # a worker process
        print(json.dumps(worker(args)))
        return
    if args.pairs:
        modes = ("trl", "prefopt")
    else:  # with a real model, also the shared prompt without the fused output layer
        modes = ("unshared", "shared_unfused", "shared") if args.model else ("unshared", "shared")
    skip = ("quick", "pairs", "mode")
    argv = [f"--{k}={v}" for k, v in vars(args).items() if k not in skip and v is not None]
    results = rounds(__file__, argv, modes, args.rounds)
    what = args.model or f"Llama H {args.hidden}, {args.layers} layers, V {args.vocab}"
    print(
        f"{args.device} {args.dtype} {args.attn}: {what}; "
        f"B {args.groups} x n {args.n}, prompt {args.prompt}, responses {args.response}; "
        f"best of {args.repeats} (+1 warm-up) x {args.rounds} rounds"
    )
    summary = table(results, args.device, width=14)
    _, g0, t0 = summary[modes[0]]
    for mode in modes[1:]:
        _, g1, t1 = summary[mode]
        print(
            f"{mode} / {modes[0]}: time {t1 / t0:.2f}, peak memory growth {g1 / max(g0, 1e-9):.2f}"
        )


if __name__ == "__main__":
    main()
