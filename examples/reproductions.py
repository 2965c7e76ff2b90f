"""Reproductions of the MPO paper's claims, at the scale of a 2-core machine.

    python examples/reproductions.py bias     --output docs/img   # bias vs n, 2 s
    python examples/reproductions.py noise    --output docs/img   # split vs full order, 0.4 s
    python examples/reproductions.py compare  --output docs/img   # losses compared, 8 min 6 s
    python examples/reproductions.py budget   --output docs/img   # n at a fixed budget, see below
    python examples/reproductions.py all      --output docs/img   # every figure of the page
    python examples/reproductions.py all --quick --output /tmp/x  # tiny sizes (the tests)

Each writes a PNG and a JSON of its numbers to ``--output`` and prints a summary.
``bias`` and ``noise`` need only NumPy (and matplotlib for the plot); ``compare`` trains
the built-in model of ``prefopt train``; ``budget`` runs ``examples/sample_budget.py`` (its
docstring says what it does).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["alignment_bias", "compare_losses", "split_reliability"]


def _fit_slope(ns: np.ndarray, tv: np.ndarray, rng, boot: int) -> tuple[float, float, float]:
    """Log-log OLS slope of the mean TV over ``n``, and a bootstrap 95% interval.

    ``tv`` is (len(ns), trials); the bootstrap resamples trials within each ``n``.
    """

    def slope(means):
        return float(np.polyfit(np.log(ns), np.log(means), 1)[0])

    point = slope(np.nanmean(tv, axis=1))
    draws = []
    for _ in range(boot):
        idx = rng.integers(0, tv.shape[1], size=tv.shape[1])
        draws.append(slope(np.nanmean(tv[:, idx], axis=1)))
    low, high = np.percentile(draws, [2.5, 97.5])
    return point, float(low), float(high)


def alignment_bias(
    ns: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256),
    *,
    trials: int = 4000,
    responses: int = 40,
    alpha: float = 1.0,
    boot: int = 200,
    tail_from: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    r"""How far MPO's accepted set is from the acceptable distribution, as n grows.

    A finite response space of ``responses`` items with sampling probabilities $p$
    (Dirichlet(1)) and true rewards $r$ (standard normal). The acceptable set is
    $A = \{y : r(y) > \mathbb{E}_p[r]\}$ and the target $q = p$ restricted to $A$,
    renormalised. For each $n$, ``trials`` times: draw $n$ responses from $p$, split at the
    sample mean reward as MPO does, and take the empirical distribution of the accepted
    draws (unweighted, or weighted by $e^{\alpha|d_i|}$ as MPO's ``abs`` weighting); its
    total-variation distance to $q$ is the alignment bias of that draw. DPO's selection,
    one chosen response (the best of the $n$), is measured the same way. Draws where all
    $n$ rewards are equal (MPO skips them) are left out.

    Returns:
        A dict with ``ns``, the mean TV per ``n`` for ``mean_split``,
        ``mean_split_weighted`` and ``best_of_n``, and for each the fitted log-log slope
        with a bootstrap 95% interval (``slopes``: name -> (slope, low, high)), and the
        same fitted over $n \ge$ ``tail_from`` only (``tail_slopes``), where the
        empirical distributions have more draws than there are responses.
    """
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(responses))
    r = rng.normal(size=responses)
    acceptable = r > p @ r
    q = np.where(acceptable, p, 0.0) / p[acceptable].sum()
    ns_arr = np.asarray(ns)
    tv = {
        name: np.full((len(ns), trials), np.nan)
        for name in ("mean_split", "mean_split_weighted", "best_of_n")
    }
    rows = np.arange(trials)
    for k, n in enumerate(ns):
        draws = rng.choice(responses, size=(trials, n), p=p)
        rewards = r[draws]
        dev = rewards - rewards.mean(axis=1, keepdims=True)
        chosen = dev > 0
        ok = chosen.any(axis=1) & ~chosen.all(axis=1)
        for name, weight in (
            ("mean_split", chosen * 1.0),
            ("mean_split_weighted", chosen * np.exp(alpha * np.abs(dev))),
        ):
            emp = np.zeros((trials, responses))
            np.add.at(emp, (np.repeat(rows, n).reshape(trials, n), draws), weight)
            total = emp.sum(axis=1, keepdims=True)
            emp = emp / np.where(total > 0, total, 1.0)
            tv[name][k] = np.where(ok, 0.5 * np.abs(emp - q).sum(axis=1), np.nan)
        best = draws[rows, rewards.argmax(axis=1)]
        tv["best_of_n"][k] = np.where(ok, 1.0 - q[best], np.nan)  # TV(point mass, q)
    result: dict[str, Any] = {"ns": list(ns), "trials": trials, "responses": responses}
    result["mean_tv"] = {name: np.nanmean(v, axis=1).tolist() for name, v in tv.items()}
    result["slopes"] = {name: _fit_slope(ns_arr, v, rng, boot) for name, v in tv.items()}
    tail = ns_arr >= tail_from
    if tail.sum() >= 2:
        result["tail_from"] = tail_from
        result["tail_slopes"] = {
            name: _fit_slope(ns_arr[tail], v[tail], rng, boot) for name, v in tv.items()
        }
    result["skipped"] = [int(x) for x in np.isnan(tv["mean_split"]).sum(axis=1)]
    return result


def split_reliability(
    ns: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256),
    *,
    trials: int = 5000,
    noise: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    r"""Probability that a noisy mean split, and a noisy full order, are exactly right.

    True scores $s_i = i/n$, $i = 1..n$ (spacing $1/n$), observed with Gaussian noise of
    standard deviation ``noise``$/n$. The mean split is right when every response falls on
    the same side of the observed mean as its true score does of the true mean; the full
    order (what Plackett-Luce learns from) is right when the observed ranking is the true
    one.

    Returns:
        A dict with ``ns``, ``split`` and ``order`` (the probabilities) and their
        binomial standard errors ``split_se``, ``order_se``.
    """
    rng = np.random.default_rng(seed)
    result: dict[str, Any] = {"ns": list(ns), "trials": trials, "noise": noise}
    for key in ("split", "order", "split_se", "order_se"):
        result[key] = []
    for n in ns:
        true = np.arange(1, n + 1) / n
        observed = true + rng.normal(0.0, noise / n, size=(trials, n))
        true_split = true > true.mean()
        split_ok = np.all((observed > observed.mean(axis=1, keepdims=True)) == true_split, axis=1)
        order_ok = np.all(np.diff(observed, axis=1) > 0, axis=1)  # true order is increasing
        for key, ok in (("split", split_ok), ("order", order_ok)):
            prob = float(ok.mean())
            result[key].append(prob)
            result[key + "_se"].append(math.sqrt(prob * (1 - prob) / trials))
    return result


COMPARED = {
    "MPO (abs)": {"loss": "mpo", "extra": {"weighting": "abs"}},
    "MPO (signed)": {"loss": "mpo", "extra": {"weighting": "signed"}},
    "MPO (squared)": {"loss": "mpo", "extra": {"weighting": "squared"}},
    "MPO (none)": {"loss": "mpo", "extra": {"weighting": "none"}},
    "DPO best-vs-worst": {"loss": "sigmoid", "pairs": "best_worst"},
    "DPO all pairs": {"loss": "sigmoid", "pairs": "all"},
    "InfoNCA": {"loss": "infonca"},
    "Plackett-Luce": {"loss": "plackett_luce"},
}


def _one_run(job: tuple[str, int, int, str]) -> tuple[str, int, list[dict[str, Any]]]:
    import torch
    import transformers

    from prefopt.cli.train import Config, run

    name, seed, steps, out = job
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    settings = COMPARED[name]
    config = Config(
        loss=settings["loss"],
        extra=dict(settings.get("extra", {})),
        pairs=settings.get("pairs", "all"),
        beta=0.1,
        steps=steps,
        seed=seed,
        eval_every=max(steps // 6, 1),
        save_every=steps,
        output=str(Path(out) / f"{name.replace(' ', '_')}-{seed}"),
        progress=False,
    )
    return name, seed, run(config)


def compare_losses(
    *, seeds: tuple[int, ...] = (0, 1, 2, 3, 4), steps: int = 300, workers: int = 2, output: str
) -> dict[str, Any]:
    """Held-out reward of ``prefopt train``'s task after the same budget, per loss.

    Every loss sees the same setting: 8 prompts x 8 sampled responses per step, Adam at
    3e-3, beta 0.1, the same seeds (which fix the initial model, the prompts and the
    sampling stream; the samples themselves diverge once the policies do), and each loss's
    other options at their defaults.

    Returns:
        A dict with ``steps``, ``seeds`` and per loss the final held-out rewards per seed
        (``final``) and the held-out curve of each seed (``curves``).
    """
    from multiprocessing import get_context

    jobs = [(name, seed, steps, output) for name in COMPARED for seed in seeds]
    with get_context("spawn").Pool(workers) as pool:
        done = pool.map(_one_run, jobs)
    result: dict[str, Any] = {"steps": steps, "seeds": list(seeds), "losses": {}}
    for name in COMPARED:
        runs = [records for n, _, records in done if n == name]
        curves = [
            [(0, r[0]["heldout_reward_start"])]
            + [(x["step"], x["heldout_reward"]) for x in r if "heldout_reward" in x]
            for r in runs
        ]
        final = [c[-1][1] for c in curves]
        result["losses"][name] = {"final": final, "curves": curves}
    return result


def _pyplot():
    """Pyplot on matplotlib's file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_bias(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ns = np.asarray(result["ns"])
    labels = {
        "mean_split": "MPO mean split",
        "mean_split_weighted": "MPO mean split, |d| weights",
        "best_of_n": "DPO: one chosen (best of n)",
    }
    for name, label in labels.items():
        slope, low, high = result["slopes"][name]
        ax.loglog(
            ns,
            result["mean_tv"][name],
            "o-",
            label=f"{label}: slope {slope:.2f} [{low:.2f}, {high:.2f}]",
        )
    last = result["mean_tv"]["mean_split"][-1]
    ax.loglog(ns, last * np.sqrt(ns[-1] / ns), "k--", alpha=0.5, label=r"$\propto n^{-1/2}$")
    ax.set_xlabel("responses per prompt n")
    ax.set_ylabel("expected TV to the acceptable distribution")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_noise(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.semilogx(result["ns"], result["split"], "o-", label="mean split exactly right")
    ax.semilogx(result["ns"], result["order"], "s-", label="full order exactly right")
    ax.set_xlabel("responses per prompt n")
    ax.set_ylabel("probability")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"true scores i/n, Gaussian noise sd {result['noise']}/n")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_compare(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, data in result["losses"].items():
        steps = [s for s, _ in data["curves"][0]]
        values = np.array([[v for _, v in c] for c in data["curves"]])
        ax.plot(steps, values.mean(axis=0), "o-", label=name, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(f"held-out reward (mean of {len(result['seeds'])} seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Run an experiment (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=["bias", "noise", "compare", "budget", "all"])
    parser.add_argument("--output", default=".", help="directory for the PNGs and JSONs")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    chosen = (
        ["bias", "noise", "compare", "budget"] if args.experiment == "all" else [args.experiment]
    )
    for name in chosen:
        if name == "budget":  # its own script, which writes budget.json and budget.png
            import sample_budget

            sample_budget.main(["--output", str(out)] + (["--quick"] if args.quick else []))
            continue
        start = time.perf_counter()
        if name == "bias":
            kw = {"ns": (2, 4, 8, 16), "trials": 200, "boot": 20} if args.quick else {}
            result = alignment_bias(seed=args.seed, **kw)
            _plot_bias(result, out / "bias.png")
            for key, (slope, low, high) in result["slopes"].items():
                print(f"bias {key}: log-log slope {slope:.3f}, 95% CI [{low:.3f}, {high:.3f}]")
            for key, (slope, low, high) in result.get("tail_slopes", {}).items():
                print(
                    f"bias {key}, n >= {result['tail_from']}: slope {slope:.3f} "
                    f"[{low:.3f}, {high:.3f}]"
                )
        elif name == "noise":
            kw = {"ns": (4, 8, 16), "trials": 200} if args.quick else {}
            result = split_reliability(seed=args.seed, **kw)
            _plot_noise(result, out / "noise.png")
            for n, s, o in zip(result["ns"], result["split"], result["order"]):
                print(f"noise n={n}: P(split right) {s:.3f}, P(order right) {o:.3f}")
        else:
            kw = {"seeds": (0,), "steps": 2} if args.quick else {}
            with tempfile.TemporaryDirectory() as runs:  # checkpoints of 40 runs: not kept
                result = compare_losses(output=runs, **kw)
            _plot_compare(result, out / "compare.png")
            for loss, data in result["losses"].items():
                final = np.array(data["final"])
                print(f"compare {loss}: held-out reward {final.mean():.3f} +- {final.std():.3f}")
        result["seconds"] = round(time.perf_counter() - start, 1)
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        print(f"{name}: {result['seconds']} s; {out / (name + '.png')}")


if __name__ == "__main__":
    main()
