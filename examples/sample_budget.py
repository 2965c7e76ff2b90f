"""At a fixed sample budget, does n > 2 responses per prompt help, and does MPO use it better?

    python examples/sample_budget.py --output docs/img            # the docs' figures
    python examples/sample_budget.py --quick --output /tmp/x      # tiny sizes (the tests)

Every step samples the same number of responses (64), split as 32 prompts x 2, 16 x 4,
8 x 8 or 4 x 16. Three losses train on the same samples' kind of data: MPO, and DPO on
each group through ``group_pairwise_loss`` (the best against the worst response, or every
above-mean against every below-mean response). Two tasks:

- ``copy``: the task of ``prefopt train`` (prompt ``copy: x y``; reward = the share of the
  6 response words equal to ``y``): one right answer, rewards exact.
- ``letters``: the prompt holds 3 distinct letters; reward = the share of them that the
  6 response words contain, plus Gaussian noise of sd 0.15: many different responses are
  fully right, and the reward the losses see is noisy.

The policy is small enough for the hundreds of runs that intervals need on 2 CPU cores: for
each of the 6 response positions a softmax over the 8 letters, whose logits are a bias plus
one learned table per prompt slot (a linear model of the prompt; positions are sampled
independently). Its held-out reward is computed exactly from the probabilities (no sampling
noise, no reward noise). The reference is the initial policy; Adam, learning rate 0.05.

Hyperparameters are tuned per task, loss and split on tuning seeds (1000+), over beta in
{0.003, 0.01, 0.03, 0.1, 0.3} and, for MPO, alpha in {0.5, 1, 2}; the comparison then runs on fresh
seeds (0, 1, ...). The same seed gives every loss the same initial model, held-out prompts
and random numbers (common random numbers), so differences are paired by seed; intervals
are 95% percentile bootstraps over seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["sample_budget"]

LETTERS, LENGTH, NOISE, LR = 8, 6, 0.15, 0.05
SPLITS = ((32, 2), (16, 4), (8, 8), (4, 16))  # (prompts, responses per prompt): 64 a step
LOSSES = {
    "MPO": ("mpo", {}),
    "DPO best vs worst": ("sigmoid", {"pairs": "best_worst"}),
    "DPO all pairs": ("sigmoid", {"pairs": "all"}),
}
BASELINE = "DPO best vs worst"
BETAS, ALPHAS = (0.003, 0.01, 0.03, 0.1, 0.3), (0.5, 1.0, 2.0)
TUNING_SEED = 1000


def prompts(task: str, seed: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Training and held-out prompts (tuples of letter indices): 16 held out."""
    if task == "copy":  # prefopt train's own prompts and split: 48 train, 16 held out
        from prefopt.cli.task import LETTERS as WORDS
        from prefopt.cli.task import copy_task_prompts

        def ids(texts):
            return [tuple(WORDS.index(w) for w in t.split()[1:]) for t in texts]

        train, held = copy_task_prompts(seed)
        return ids(train), ids(held)
    rng = random.Random(seed)
    pool = [tuple(rng.sample(c, 3)) for c in itertools.combinations(range(LETTERS), 3)]
    rng.shuffle(pool)
    return pool[16:], pool[:16]


def expected_reward(task: str, probs, batch):
    """Exact expected (noiseless) reward of the policy ``probs`` (P, LENGTH, LETTERS)."""
    if task == "copy":  # mean over positions of p(the prompt's last letter)
        target = batch[:, -1][:, None, None].expand(-1, LENGTH, 1)
        return probs.gather(-1, target).mean(dim=(1, 2))
    absent = (1 - probs.gather(-1, batch[:, None, :].expand(-1, LENGTH, -1))).prod(dim=1)
    return (1 - absent).mean(dim=-1)  # mean over the prompt's letters of P(it appears)


def reward(task: str, batch, responses):
    """Noiseless reward of sampled ``responses`` (P, n, LENGTH) for prompts ``batch``."""
    if task == "copy":
        return (responses == batch[:, -1][:, None, None]).double().mean(dim=-1)
    present = (responses[..., None] == batch[:, None, None, :]).any(dim=2)  # (P, n, 3)
    return present.double().mean(dim=-1)


def run(job: tuple) -> tuple[tuple, float]:
    """Train one policy; return the job and its exact held-out reward after the last step."""
    import torch

    import prefopt

    task, loss_name, split, seed, beta, alpha, steps = job
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(seed)
    train, held = (torch.tensor(p) for p in prompts(task, seed))
    slots = train.shape[1]
    table = (0.1 * torch.randn(slots, LETTERS, LENGTH, LETTERS, generator=gen)).double()
    bias = torch.zeros(LENGTH, LETTERS, dtype=torch.float64)
    params = [table.requires_grad_(), bias.requires_grad_()]
    start = [p.detach().clone() for p in params]

    def logits(weights, batch):  # (P, LENGTH, LETTERS)
        t, b = weights
        return b + sum(t[s, batch[:, s]] for s in range(slots))

    optimizer = torch.optim.Adam(params, lr=LR)
    loss, options = LOSSES[loss_name]
    per_step, n = split
    for _ in range(steps):
        batch = train[torch.randint(len(train), (per_step,), generator=gen)]
        logp = torch.log_softmax(logits(params, batch), dim=-1)  # (P, LENGTH, LETTERS)
        # inverse-CDF sampling from uniforms: the same seed draws the same uniforms for
        # every loss (common random numbers), whatever the policies have become
        u = torch.rand(per_step, n, LENGTH, 1, generator=gen, dtype=torch.float64)
        cdf = logp.detach().exp().cumsum(-1)[:, None]  # (P, 1, LENGTH, LETTERS)
        responses = (u > cdf).sum(-1).clamp(max=LETTERS - 1)  # (P, n, LENGTH)
        r = reward(task, batch, responses)
        if task == "letters":
            r = r + NOISE * torch.randn(r.shape, generator=gen, dtype=torch.float64)
        pick = responses.transpose(1, 2)  # (P, LENGTH, n)
        logps = logp.gather(-1, pick).sum(1)  # (P, n)
        with torch.no_grad():
            ref = torch.log_softmax(logits(start, batch), dim=-1).gather(-1, pick).sum(1)
        if loss == "mpo":
            per_group = prefopt.mpo_loss(logps, ref, r, beta=beta, alpha=alpha)
        else:
            per_group = prefopt.group_pairwise_loss(loss, logps, ref, r, beta=beta, **options)
        counted = prefopt.mpo_split(r)[2]  # groups with both a better and a worse response
        optimizer.zero_grad()
        prefopt.masked_mean(per_group, counted).backward()
        optimizer.step()
    with torch.no_grad():
        probs = torch.softmax(logits(params, held), dim=-1)
        return job, float(expected_reward(task, probs, held).mean())


def _grid(loss_name: str) -> list[tuple[float, float]]:
    alphas = ALPHAS if LOSSES[loss_name][0] == "mpo" else (1.0,)
    return [(b, a) for b in BETAS for a in alphas]


def _interval(values: np.ndarray, rng, boot: int) -> list[float]:
    """Mean and 95% percentile-bootstrap interval over seeds."""
    means = values[rng.integers(0, len(values), size=(boot, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return [float(values.mean()), float(low), float(high)]


def sample_budget(
    *,
    tasks: tuple[str, ...] = ("copy", "letters"),
    steps: int = 100,
    tuning_seeds: int = 8,
    seeds: int = 100,
    boot: int = 2000,
    workers: int = 2,
) -> dict[str, Any]:
    """Held-out reward per task, loss and split of a fixed 64-sample step budget.

    Returns:
        A dict with the settings, ``tuned`` (the chosen beta and alpha per task, loss and
        split, with each grid point's mean tuning reward), ``final`` (per task, loss and
        split: the held-out reward of each final seed), ``reward`` (mean and 95% interval),
        ``vs_baseline`` and ``vs_all_pairs`` (the paired difference to DPO best-vs-worst
        and to DPO on all pairs, mean and interval), ``vs_n2`` (each loss's paired
        difference to its own n = 2 run) and ``seconds``.
    """
    from multiprocessing import get_context

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    with get_context("spawn").Pool(workers) as pool:
        # 1. tuning: every grid point on the tuning seeds
        jobs = [
            (task, loss, split, TUNING_SEED + s, beta, alpha, steps)
            for task in tasks
            for loss in LOSSES
            for split in SPLITS
            for beta, alpha in _grid(loss)
            for s in range(tuning_seeds)
        ]
        scores: dict[tuple, list[float]] = {}
        for job, value in pool.imap_unordered(run, jobs, chunksize=8):
            scores.setdefault(job[:3] + job[4:6], []).append(value)
        tuned = {}
        for task, loss, split in itertools.product(tasks, LOSSES, SPLITS):
            grid = {g: float(np.mean(scores[(task, loss, split, *g)])) for g in _grid(loss)}
            tuned[(task, loss, split)] = (max(grid, key=grid.get), grid)
        # 2. the comparison: the tuned setting of each on fresh seeds 0, 1, ...
        jobs = [
            (task, loss, split, s, *tuned[(task, loss, split)][0], steps)
            for task, loss, split in tuned
            for s in range(seeds)
        ]
        final: dict[tuple, np.ndarray] = {k: np.zeros(seeds) for k in tuned}
        for job, value in pool.imap_unordered(run, jobs, chunksize=8):
            final[job[:3]][job[3]] = value
    result: dict[str, Any] = {
        "steps": steps,
        "samples_per_step": 64,
        "tuning_seeds": tuning_seeds,
        "seeds": seeds,
        "noise": NOISE,
        "lr": LR,
        "splits": [list(s) for s in SPLITS],
    }
    for key in ("tuned", "final", "reward", "vs_baseline", "vs_all_pairs", "vs_n2"):
        result[key] = {t: {loss: {} for loss in LOSSES} for t in tasks}
    for (task, loss, split), values in final.items():
        n = str(split[1])
        (beta, alpha), grid = tuned[(task, loss, split)]
        result["tuned"][task][loss][n] = {
            "beta": beta,
            "alpha": alpha,
            "grid": {f"beta={b} alpha={a}": v for (b, a), v in grid.items()},
        }
        result["final"][task][loss][n] = values.tolist()
        result["reward"][task][loss][n] = _interval(values, rng, boot)
        base = final[(task, BASELINE, split)]
        result["vs_baseline"][task][loss][n] = _interval(values - base, rng, boot)
        pairs = final[(task, "DPO all pairs", split)]
        result["vs_all_pairs"][task][loss][n] = _interval(values - pairs, rng, boot)
        result["vs_n2"][task][loss][n] = _interval(
            values - final[(task, loss, SPLITS[0])], rng, boot
        )
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """Held-out reward against n, one panel per task, with 95% intervals."""
    from reproductions import _pyplot  # its neighbour in examples/

    plt = _pyplot()
    tasks = list(result["reward"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, (loss, by_n) in enumerate(result["reward"][task].items()):
            ns = np.array([int(n) for n in by_n]) * (1 + 0.03 * (i - 1))  # side by side
            mean, low, high = (np.array(v) for v in zip(*by_n.values()))
            ax.errorbar(ns, mean, yerr=[mean - low, high - mean], fmt="o-", capsize=3, label=loss)
        ax.set_xscale("log", base=2)
        ax.set_xticks([2, 4, 8, 16], ["32 x 2", "16 x 4", "8 x 8", "4 x 16"])
        ax.set_xlabel("prompts x responses per prompt (64 samples a step)")
        ax.set_ylabel("held-out reward (exact), mean and 95% interval")
        ax.set_title(f"{task}: {result['seeds']} seeds, {result['steps']} steps")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Run the experiment; write budget.json and budget.png to --output; print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=".", help="directory for budget.json and .png")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = parser.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    kw = {"steps": 3, "tuning_seeds": 1, "seeds": 3, "boot": 50} if args.quick else {}
    result = sample_budget(**kw)
    (out / "budget.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "budget.png")
    for task, losses in result["reward"].items():
        for loss, by_n in losses.items():
            cells = [f"n={n} {m:.3f} [{lo:.3f}, {hi:.3f}]" for n, (m, lo, hi) in by_n.items()]
            print(f"{task} {loss}: " + "; ".join(cells))
        against = {"vs_baseline": BASELINE, "vs_all_pairs": "DPO all pairs", "vs_n2": "its n = 2"}
        for what, other in against.items():
            for loss, diffs in result[what][task].items():
                if loss == other:
                    continue
                cells = [
                    f"n={n} {m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for n, (m, lo, hi) in diffs.items()
                ]
                print(f"{task} {loss} - {other}: " + "; ".join(cells))
    print(f"budget: {result['seconds']} s; {out / 'budget.png'}")


if __name__ == "__main__":
    main()
