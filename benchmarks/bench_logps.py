"""Peak memory and time of forward + backward for token log-probs from hidden states:
the naive path (full logits, then log_softmax, then gather) against prefopt's fused,
chunked ``fused_linear_logps`` (recomputing each chunk's logits in backward, and keeping
them: ``fused_kept``) and, on a GPU where it is installed, Liger-Kernel's fused linear
cross-entropy (``liger``), each measured in its own process, in the same run.

    python benchmarks/bench_logps.py                  # 16 x 512 tokens, H 1024, V 32000
    python benchmarks/bench_logps.py --quick          # tiny sizes: a smoke run (CI)
    python benchmarks/bench_logps.py --framework jax  # the JAX paths
    python benchmarks/bench_logps.py --device cuda --dtype bfloat16 --vocab 128256
    python benchmarks/bench_logps.py --model smollm2-135m-instruct --rows 8 --seq 114

Targets: peak memory at most 30% of the naive path's, time at most 1.3x.
Memory on CPU is the process's peak resident set (``ru_maxrss``), reported whole and as
the growth over the resident set once the inputs exist; on CUDA it is
``torch.cuda.max_memory_allocated``. Time is the best of ``--repeats`` forward + backward
passes (the first is a warm-up). The processes of the paths alternate over ``--rounds``
rounds so that a noisy neighbour slows both alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.util import find_spec

from _measure import measure, measurement_options, rounds, rss_mib, table

MODES = {
    "torch": ("naive", "token_logps", "fused", "fused_kept"),
    "jax": ("naive", "fused"),
}


def torch_worker(args) -> dict:
    import torch
    from prefopt.backends.torch import fused_linear_logps

    import prefopt

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    if args.model:  # the model's own output layer: its width, vocabulary and weight
        from prefopt.cli.models import load_model

        head = load_model(args.model, dtype=args.dtype)[0].get_output_embeddings()
        weight = head.weight.detach().to(dev).clone()
        args.vocab, args.hidden = weight.shape
    else:
        weight = (torch.randn(args.vocab, args.hidden, device=dev) / args.hidden**0.5).to(dtype)
    hidden = torch.randn(args.rows, args.seq, args.hidden, device=dev, dtype=dtype)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    labels = torch.randint(0, args.vocab, (args.rows, args.seq), device=dev)
    labels[:, : args.seq // 4] = -100  # a prompt
    mask = labels != -100

    if args.mode == "liger":  # Liger-Kernel's fused linear cross-entropy (Triton, CUDA only)
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")  # -(the counted log-probs)

    def step():
        if args.mode == "liger":
            flat = hidden.reshape(-1, args.hidden)
            loss = -liger(weight, flat, labels.reshape(-1))
            loss.backward()
            hidden.grad = weight.grad = None
            return loss.item()
        if args.mode in ("fused", "fused_kept"):  # kept: no logits recomputed in backward
            keep = 2**40 if args.mode == "fused_kept" else 0
            per_token = fused_linear_logps(
                hidden, weight, labels, chunk_size=args.chunk, keep_logits_bytes=keep
            )
        elif args.mode == "token_logps":
            per_token = prefopt.token_logps(hidden @ weight.T, labels)
        else:
            logits = (hidden @ weight.T).float()
            safe = labels.clamp(min=0)
            per_token = logits.log_softmax(-1).gather(-1, safe[..., None])[..., 0]
        loss = (per_token * mask).sum()
        loss.backward()
        hidden.grad = weight.grad = None
        return loss.item()

    return measure(step, dev, args.repeats)


def jax_worker(args) -> dict:
    import jax
    import jax.numpy as jnp
    from prefopt.backends.jax import fused_linear_logps

    import prefopt

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    dtype = getattr(jnp, args.dtype)
    hidden = jax.random.normal(k1, (args.rows, args.seq, args.hidden), dtype)
    weight = (jax.random.normal(k2, (args.vocab, args.hidden)) / args.hidden**0.5).astype(dtype)
    labels = jax.random.randint(k3, (args.rows, args.seq), 0, args.vocab)
    labels = labels.at[:, : args.seq // 4].set(-100)
    mask = labels != -100

    def loss(hidden, weight):
        if args.mode == "fused":
            per_token = fused_linear_logps(hidden, weight, labels, chunk_size=args.chunk)
        else:
            logits = (hidden @ weight.T).astype(jnp.float32)
            safe = jnp.maximum(labels, 0)
            lsm = jax.nn.log_softmax(logits, axis=-1)
            per_token = jnp.take_along_axis(lsm, safe[..., None], axis=-1)[..., 0]
        return prefopt.masked_mean(per_token, mask) * mask.sum()

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    jax.block_until_ready((hidden, weight))
    base = rss_mib()
    times = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(step(hidden, weight))
        times.append(time.perf_counter() - start)
    return {"base": base, "peak": rss_mib(), "time": min(times[1:])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--framework", choices=sorted(MODES), default="torch")
    parser.add_argument("--rows", type=int, default=16, help="sequences (B * n)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument(
        "--model",
        help="a real model's output layer (torch): smollm2-135m-instruct, a .gguf file or a "
        "checkpoint folder; --hidden and --vocab are then the model's",
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk", type=int, default=1024, help="rows per chunk (fused)")
    measurement_options(parser)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.seq, args.hidden, args.vocab = 4, 64, 32, 1000
        args.chunk, args.repeats, args.rounds = 64, 1, 1
    if args.model and args.framework != "torch":
        parser.error("--model: the torch paths only")
    if args.model and not args.mode:  # the header below shows the model's sizes
        from transformers import AutoConfig

        from prefopt.cli.models import SMOLLM2, smollm2_path

        config = AutoConfig.from_pretrained(smollm2_path() if args.model == SMOLLM2 else args.model)
        args.hidden, args.vocab = config.hidden_size, config.vocab_size
    if args.mode:  # a worker process
        worker = torch_worker if args.framework == "torch" else jax_worker
        print(json.dumps(worker(args)))
        return
    argv = [a for a in sys.argv[1:] if a != "--quick"]
    if args.quick:
        argv += ["--rows", "4", "--seq", "64", "--hidden", "32", "--vocab", "1000"]
        argv += ["--chunk", "64", "--repeats", "1"]
    modes = MODES[args.framework]
    if args.framework == "torch" and args.device != "cpu" and find_spec("liger_kernel"):
        modes = (*modes, "liger")  # compared where it installs
    results = rounds(__file__, argv, modes, args.rounds)
    print(
        f"{args.framework} {args.device} {args.dtype}: {args.rows} x {args.seq} tokens, "
        f"hidden {args.hidden}, vocab {args.vocab}, chunk {args.chunk}; "
        f"best of {args.repeats} (+1 warm-up) x {args.rounds} rounds"
    )
    summary = table(results, args.device)
    naive = summary["naive"]
    for mode, (peak, growth, best) in summary.items():
        if mode != "naive":
            print(
                f"{mode} / naive: peak {peak / naive[0]:.2f}, growth {growth / naive[1]:.2f}, "
                f"time {best / naive[2]:.2f}"
            )


if __name__ == "__main__":
    main()
