"""Forward + backward time of prefopt's mpo_loss and dpo_loss against hand-written native
code for the same formulas, measured in the same run; prints ratios (prefopt / native).

    python benchmarks/bench_losses.py            # torch eager, torch.compile, jax.jit
    python benchmarks/bench_losses.py --quick    # fewer repeats (CI smoke run)

Two measures. "Best of blocks": the best of several blocks of calls on the same inputs, the
blocks of the two implementations interleaved so that a noisy neighbour slows both alike.
"User loop" (torch eager, one thread): the median of single forward + backward calls, each on
fresh random inputs, as a training loop sees them; prefopt through its modules (MPOLoss,
DPOLoss, mean over the groups that count) against the hand-written code with the same mean,
and through the functions (``mpo_loss`` per group, summed, against the native per-group loss
summed). The CPU model comes first: a ratio holds on the machine it was measured on.
Targets: eager <= 1.2x on the user-loop measure, compiled and jit <= 1.05x. Ratios below 1
mean prefopt was faster.

``prefopt`` is the default call (value checks on host arrays included); ``prefopt -chk``
passes ``check_values=False``: the difference is the cost of reading rewards back.
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
from _measure import machine

import prefopt

SIZES = [(64, 8), (1024, 16)]
BETA, ALPHA = 0.1, 1.0


def make_data(B, n, seed=0):
    r = np.random.default_rng(seed)
    logps = r.normal(-150.0, 40.0, (B, n))
    ref = logps + r.normal(0.0, 2.0, (B, n))
    rewards = r.normal(size=(B, n))
    mask = np.ones((B, n), dtype=bool)
    mask[::3, -(n // 4) :] = False  # ragged: a quarter of the groups lose n/4 responses
    return logps.astype(np.float32), ref.astype(np.float32), rewards.astype(np.float32), mask


def compare(fns: dict, repeats: int, number: int) -> dict:
    """Best time per call of each function, blocks of ``number`` calls interleaved."""
    for fn in fns.values():  # warm-up (and compilation)
        fn()
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for label, fn in fns.items():
            start = time.perf_counter()
            for _ in range(number):
                fn()
            best[label] = min(best[label], (time.perf_counter() - start) / number)
    return best


# ---- hand-written native baselines: what a user would write without prefopt ----


def torch_mpo(logps, ref, rewards, mask):
    import torch
    import torch.nn.functional as F

    s = torch.where(mask, BETA * (logps - ref), 0.0)
    count = mask.sum(-1, keepdim=True).clamp(min=1)
    mean = torch.where(mask, rewards, 0.0).sum(-1, keepdim=True) / count
    d = torch.where(mask, rewards - mean, 0.0)
    pos = d > 0
    neg = mask & ~pos
    t = s + ALPHA * d.abs()
    lse_pos = torch.logsumexp(t.masked_fill(~pos, float("-inf")), -1)
    lse_neg = torch.logsumexp(t.masked_fill(~neg, float("-inf")), -1)
    counted = pos.any(-1) & neg.any(-1)
    return torch.where(counted, -F.logsigmoid(lse_pos - lse_neg), 0.0)


def torch_dpo(cw, cl, rw, rl):
    import torch.nn.functional as F

    return -F.logsigmoid(BETA * ((cw - rw) - (cl - rl)))


def jax_mpo(logps, ref, rewards, mask):
    import jax
    import jax.numpy as jnp

    s = jnp.where(mask, BETA * (logps - ref), 0.0)
    count = jnp.maximum(mask.sum(-1, keepdims=True), 1)
    mean = jnp.where(mask, rewards, 0.0).sum(-1, keepdims=True) / count
    d = jnp.where(mask, rewards - mean, 0.0)
    pos = d > 0
    neg = mask & ~pos
    t = s + ALPHA * jnp.abs(d)
    lse_pos = jax.nn.logsumexp(jnp.where(pos, t, -jnp.inf), -1)
    lse_neg = jax.nn.logsumexp(jnp.where(neg, t, -jnp.inf), -1)
    counted = pos.any(-1) & neg.any(-1)
    return jnp.where(counted, -jax.nn.log_sigmoid(lse_pos - lse_neg), 0.0)


def jax_dpo(cw, cl, rw, rl):
    import jax

    return -jax.nn.log_sigmoid(BETA * ((cw - rw) - (cl - rl)))


# ---- runners ----


def user_loop(fns: dict, make_inputs, calls: int, pool: int = 32) -> dict:
    """Median seconds of one forward + backward call per function, fresh inputs each call.

    ``pool`` different batches are made first and used in turn (a call never sees the
    tensors of the call before); the functions take turns call by call, so that a noisy
    neighbour slows all alike.
    """
    batches = [make_inputs(i) for i in range(pool)]
    times = {label: [] for label in fns}
    for i in range(calls + 5):  # the first 5 calls warm up
        for label, fn in fns.items():
            leaf, *rest = batches[i % pool]
            leaf = leaf.detach().clone().requires_grad_(True)
            start = time.perf_counter()
            fn(leaf, *rest).backward()
            if i >= 5:
                times[label].append(time.perf_counter() - start)
    return {label: float(np.median(t)) for label, t in times.items()}


def bench_torch_user_loop(calls: int):
    import array_api_compat.torch as torch_xp
    import torch
    from prefopt.backends.torch import DPOLoss, MPOLoss

    torch.set_num_threads(1)

    def native_mpo(logps, ref, rewards, mask):
        loss = torch_mpo(logps, ref, rewards, mask)
        d = torch.where(mask, rewards, 0.0)
        mean = d.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        above = (d > mean) & mask
        counted = above.any(-1) & (mask & ~above).any(-1)
        return loss.sum() / counted.sum().clamp(min=1)

    def native_dpo(cw, cl, rw, rl):
        return torch_dpo(cw, cl, rw, rl).mean()

    mpo_module, dpo_module = MPOLoss(beta=BETA, alpha=ALPHA), DPOLoss(beta=BETA)
    rows = []
    for B, n in SIZES:

        def group_inputs(i, B=B, n=n):
            arrays = [torch.from_numpy(a) for a in make_data(B, n, seed=i)]
            return arrays[0], arrays[1], arrays[2], arrays[3]

        def pair_inputs(i, B=B, n=n):
            logps, ref, _, _ = group_inputs(i)
            return logps[:, 0].clone(), logps[:, 1], ref[:, 0], ref[:, 1]

        mpo = user_loop(
            {
                "native": native_mpo,
                "prefopt": lambda lp, ref, r, m: mpo_module(lp, ref, r, mask=m),
                "function": lambda lp, ref, r, m: prefopt.batch_loss(
                    "mpo", lp, ref, r, mask=m, beta=BETA, alpha=ALPHA, reduction="mean", xp=torch_xp
                ),
            },
            group_inputs,
            calls,
        )
        # the per-group function, as a user calls it: each group's loss summed, no mean
        per_group = user_loop(
            {
                "native": lambda lp, ref, r, m: torch_mpo(lp, ref, r, m).sum(),
                "mpo_loss": lambda lp, ref, r, m: prefopt.mpo_loss(
                    lp, ref, r, mask=m, beta=BETA, alpha=ALPHA, xp=torch_xp
                ).sum(),
            },
            group_inputs,
            calls,
        )
        dpo = user_loop(
            {
                "native": native_dpo,
                "prefopt": dpo_module,
                "function": lambda *a: prefopt.dpo_loss(*a, beta=BETA, xp=torch_xp).mean(),
            },
            pair_inputs,
            calls,
        )
        rows += [
            ("torch eager cpu 1T", "mpo", B, n, mpo),
            ("torch eager cpu 1T", "mpo", B, n, per_group),
            ("torch eager cpu 1T", "dpo", B, n, dpo),
        ]
    return rows


def bench_torch(compiled, repeats, number, device="cpu"):
    import array_api_compat.torch as torch_xp
    import torch

    def mpo_ours(logps, ref, rewards, mask, check_values=None):
        return prefopt.mpo_loss(
            logps, ref, rewards, mask=mask, xp=torch_xp, check_values=check_values
        )

    def dpo_ours(*args, check_values=None):
        return prefopt.dpo_loss(*args, xp=torch_xp)

    rows = []
    for B, n in SIZES:
        logps, ref, rewards, mask = (torch.asarray(a, device=device) for a in make_data(B, n))
        cases = {
            "mpo": (torch_mpo, mpo_ours, (logps, ref, rewards, mask)),
            "dpo": (torch_dpo, dpo_ours, (logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1])),
        }
        for name, (native, ours, args) in cases.items():
            variants = {
                "native": native,
                "prefopt": ours,
                "prefopt -chk": functools.partial(ours, check_values=False),
            }
            if name == "dpo":  # dpo_loss reads no values: one prefopt row is enough
                del variants["prefopt -chk"]
            steps = {}
            for label, fn in variants.items():
                if compiled:
                    torch._dynamo.reset()
                    fn = torch.compile(fn, fullgraph=True)
                leaf = args[0].detach().clone().requires_grad_(True)

                def step(fn=fn, leaf=leaf):
                    leaf.grad = None
                    fn(leaf, *args[1:]).sum().backward()
                    if device != "cpu":
                        torch.cuda.synchronize()

                step()  # compile before the next variant resets dynamo
                steps[label] = step
            timings = compare(steps, repeats, number)
            rows.append(
                (f"torch {'compile' if compiled else 'eager'} {device}", name, B, n, timings)
            )
    return rows


def bench_jax(repeats, number):
    import jax
    import jax.numpy as jnp

    def mpo_ours(logps, ref, rewards, mask):
        return prefopt.mpo_loss(logps, ref, rewards, mask=mask)

    rows = []
    for B, n in SIZES:
        logps, ref, rewards, mask = (jnp.asarray(a) for a in make_data(B, n))
        cases = {
            "mpo": (jax_mpo, mpo_ours, (logps, ref, rewards, mask)),
            "dpo": (jax_dpo, prefopt.dpo_loss, (logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1])),
        }
        for name, (native, ours, args) in cases.items():
            steps = {}
            for label, fn in (("native", native), ("prefopt", ours)):
                grad = jax.jit(jax.value_and_grad(lambda x, *rest, fn=fn: fn(x, *rest).sum()))
                steps[label] = lambda grad=grad: jax.block_until_ready(grad(*args))
            rows.append(
                (
                    f"jax jit {jax.devices()[0].platform}",
                    name,
                    B,
                    n,
                    compare(steps, repeats, number),
                )
            )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke run")
    parser.add_argument("--device", default="cpu", help="torch device (cpu or cuda)")
    parser.add_argument("--only", choices=["torch", "jax"], help="run one framework")
    args = parser.parse_args()
    repeats, number = (3, 5) if args.quick else (30, 20)
    rows, loop = [], []
    print(f"machine: {machine()}")
    if args.only in (None, "torch") and args.device == "cpu":
        loop = bench_torch_user_loop(20 if args.quick else 400)
    if args.only in (None, "torch"):
        rows += bench_torch(False, repeats, number, args.device)
        rows += bench_torch(True, repeats, number, args.device)
    if args.only in (None, "jax"):
        rows += bench_jax(repeats, number)
    header = (
        f"{'path':<20}{'loss':<5}{'B':>5}{'n':>4}{'native us':>11}{'prefopt us':>12}{'ratio':>7}"
    )
    if loop:
        print("user loop: forward + backward, float32, median of single calls on fresh inputs,")
        print("one thread, modules (mean over the groups that count); ratio = prefopt / native")
        print(header.replace("loss ", "loss" + " " * 10))
        for path, name, B, n, t in loop:
            for label in (k for k in t if k != "native"):  # the module, then the function
                shown = {"prefopt": name, "function": f"{name} function"}.get(label, f"{label} sum")
                print(
                    f"{path:<20}{shown:<14}{B:>5}{n:>4}{t['native'] * 1e6:>11.1f}"
                    f"{t[label] * 1e6:>12.1f}{t[label] / t['native']:>7.3f}"
                )
        print()
    print("forward + backward, float32, best of interleaved blocks; ratio = prefopt / native")
    print(header + f"{'-chk us':>9}{'ratio':>7}")
    for path, name, B, n, t in rows:
        line = (
            f"{path:<20}{name:<5}{B:>5}{n:>4}{t['native'] * 1e6:>11.1f}{t['prefopt'] * 1e6:>12.1f}"
            f"{t['prefopt'] / t['native']:>7.3f}"
        )
        if "prefopt -chk" in t:
            line += f"{t['prefopt -chk'] * 1e6:>9.1f}{t['prefopt -chk'] / t['native']:>7.3f}"
        print(line)


if __name__ == "__main__":
    main()
