"""``prefopt train``: on-policy or offline preference training.

On-policy: sample n responses per prompt, score them, update with a registered loss,
repeat; the prompts and the reward are the user's (``--prompts FILE`` with ``--reward
MODULE:FUNCTION`` or ``--reward-model DIR``) or the built-in task's. Offline: train over a
JSONL file of group or pair rows. With no arguments it runs the built-in task: a tiny
causal LM made from a config (random weights, no download) learns to repeat the last
letter of its prompt.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import random
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from prefopt.cli import models
from prefopt.cli.config import BY_MODEL, Config
from prefopt.cli.reward import (
    RewardError,
    RewardModel,
    checked_rewards,
    jsonl,
    load_reward,
    read_prompts,
)
from prefopt.cli.task import addition_prompts, addition_reward, copy_task_prompts, copy_task_reward
from prefopt.integrations.data import preference_row
from prefopt.integrations.transformers import (
    PreferenceCollator,
    loss_and_metrics,
    reference_logps,
)
from prefopt.losses.registry import spec

__all__ = ["run", "UserError"]


class UserError(Exception):
    """A mistake in the options, the data, the prompts or the reward.

    The command prints its message on one line (``prefopt train: error: ...``) and exits with
    status 2; from Python, [`run`][prefopt.cli.train.run] raises it before any step that the
    mistake would affect.
    """


class Interrupted(Exception):
    """Ctrl-C: the run stopped after a whole step and saved its checkpoint."""


# What --resume must find unchanged: the run's data, prompts, reward, loss and its options.
RESUME_FIXED = (
    "model", "dtype", "data", "prompts", "reward", "reward_model", "loss", "beta", "alpha", "extra",
    "pairs", "no_reference",
)  # fmt: skip


# ---- the loop ----------------------------------------------------------------------------


def load_model(config: Config):
    """Policy (float32 weights), tokenizer, pretrained (see ``models.load_model``)."""
    try:
        return models.load_model(config.model, seed=config.seed, dtype="float32")
    except models.ModelError as err:
        raise UserError(str(err)) from None


def compute_dtype(config: Config, pretrained: bool) -> str:
    """The dtype the run computes in: ``--dtype``, or for ``auto`` (see ``cpu_dtype``).

    ``auto`` is float32 for the tiny model and ``models.cpu_dtype()`` for a pretrained one.
    The weights and Adam's state stay float32 whatever it is: bfloat16 runs the forward
    passes and the sampling under ``torch.autocast`` (as Hugging Face's ``bf16=True``
    does). With the weights themselves in bfloat16 (8 significant bits: half a unit in the
    last place is about 2e-3 of a weight), Adam's steps of about ``lr`` = 1e-5 round away
    on every weight larger than about 5e-3: on a Xeon with AMX the main job's held-out
    reward went 0.42 -> 0.40 in 30 steps, KL 0.16.
    """
    if config.dtype != "auto":
        return config.dtype
    return models.cpu_dtype() if pretrained else "float32"


def read_rows(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of a JSONL file, each checked, and where each is (``file:line``).

    Errors name the file and the line: a line that is not UTF-8 text or not JSON, a row
    that is not a group or pair row, rewards or ``ref_logps`` that are not finite numbers.
    """
    rows, places = [], []
    try:
        for where, row in jsonl(path, "--data"):
            preference_row(row, where)
            rows.append(row)
            places.append(where)
    except (RewardError, ValueError) as err:
        raise UserError(str(err)) from None
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows, places


def check_lengths(rows, places, collator: PreferenceCollator, max_length: int) -> None:
    """Refuse a row whose prompt and a response are longer than ``max_length`` tokens."""
    for row, where in zip(rows, places):
        try:
            ids = collator.tokenize(row, where)
        except ValueError as err:
            raise UserError(str(err)) from None
        longest = len(ids["prompt_ids"]) + max(len(r) for r in ids["response_ids"])
        if longest > max_length:
            raise UserError(
                f"{where}: prompt and response are {longest} tokens, more than --max-length "
                f"{max_length}; raise --max-length or shorten the row"
            )


def is_pretrained(config: Config) -> bool:
    """Whether ``--model`` names a pretrained model (anything but the tiny built-in one)."""
    return config.model not in (None, models.TINY)


def check(config: Config) -> dict[str, Any]:
    """Reject bad options before anything is loaded; return the options the user set."""
    config = config.resolved(is_pretrained(config))
    try:
        found = spec(config.loss, "--loss")
    except ValueError as err:
        raise UserError(str(err)) from None
    why = found.refuses_groups(None)  # sampled groups, or rows of any size
    if why:
        raise UserError(f"--loss {config.loss} {why}")
    names = ("responses", "steps", "prompts_per_step", "max_new_tokens", "eval_every", "save_every")
    for name in (*names, "max_length"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(config, name)}")
    if config.responses < 2 and config.data is None:
        raise UserError(f"--responses must be >= 2 to compare responses; got {config.responses}")
    if not 0 < config.lr < math.inf:
        raise UserError(f"--lr must be a finite number > 0; got {config.lr}")
    if not 0 < config.temperature < math.inf:
        raise UserError(f"--temperature must be a finite number > 0; got {config.temperature}")
    if not 0 < config.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1]; got {config.top_p}")
    if config.data and (config.prompts or config.eval_prompts):
        raise UserError(
            "--data trains offline; --prompts and --eval-prompts are for on-policy runs"
        )
    if config.reward and config.reward_model:
        raise UserError("--reward and --reward-model both give the reward; give one")
    scorer = config.reward or config.reward_model
    if config.prompts and not scorer:
        raise UserError("--prompts needs a reward: --reward MODULE:FUNCTION or --reward-model DIR")
    if scorer and not config.prompts:
        flag = "--reward" if config.reward else "--reward-model"
        raise UserError(f"{flag} scores your prompts: give them with --prompts FILE.jsonl")
    if config.eval_prompts and not config.prompts:
        raise UserError("--eval-prompts goes with --prompts (the built-in task has its own)")
    given = {k: getattr(config, k) for k in ("beta", "alpha") if getattr(config, k) is not None}
    twice = sorted(set(given) & set(config.extra))
    if twice:
        raise UserError(f"--{twice[0]} and --option {twice[0]}=... both set {twice[0]}; give one")
    given.update(config.extra)
    unknown = sorted(set(given) - set(found.defaults))
    if unknown:
        key = unknown[0]
        flag = f"--{key}" if key in ("beta", "alpha") else f"--option {key}"
        raise UserError(
            f"{flag}: --loss {config.loss} takes no option {key!r}; "
            f"it takes {', '.join(sorted(found.defaults))}"
        )
    try:  # the loss's own checks of its options, before any model loads
        found.config(given, fn="--loss")
    except (TypeError, ValueError) as err:
        raise UserError(f"loss options: {err}") from None
    return given


def encode_prompt(tokenizer, prompt: Any) -> list[int]:
    """Token ids of a prompt: through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if isinstance(prompt, list):
        raise UserError(
            "--prompts: a conversational prompt needs a model whose tokenizer has a chat template"
        )
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return [*bos, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]


@torch.no_grad()
def sample(model, tokenizer, prompts: list[Any], n: int, config: Config):
    """``n`` sampled responses per prompt: ``(prompt_ids, [response_ids...])`` per prompt."""
    pad = tokenizer.pad_token_id
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, e in enumerate(encoded):  # left padding: generation continues every prompt at its end
        ids[i, width - len(e) :] = torch.tensor(e)
        attention[i, width - len(e) :] = 1
    model.eval()
    out = model.generate(
        input_ids=ids,
        attention_mask=attention,
        do_sample=True,
        top_k=0,
        top_p=config.top_p,
        temperature=config.temperature,
        max_new_tokens=config.max_new_tokens,
        num_return_sequences=n,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )[:, width:]
    model.train()
    groups = []
    for i, prompt_ids in enumerate(encoded):
        responses = []
        for row in out[i * n : (i + 1) * n].tolist():
            if tokenizer.eos_token_id in row:  # up to its eos; the padding after it dropped
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            while row and row[-1] == pad and pad != tokenizer.eos_token_id:
                row = row[:-1]
            responses.append(row or [tokenizer.eos_token_id])
        groups.append((prompt_ids, responses))
    return groups


def scored(model, tokenizer, prompts: list[Any], n: int, config: Config, reward, what: str):
    """Sampled groups with their rewards: ``[(prompt_ids, responses, rewards)]``."""
    groups = sample(model, tokenizer, prompts, n, config)
    flat_prompts = [p for p, (_, responses) in zip(prompts, groups) for _ in responses]
    texts = [tokenizer.decode(r, skip_special_tokens=True) for _, rs in groups for r in rs]
    try:
        values = checked_rewards(reward, flat_prompts, texts, what)
    except RewardError as err:
        raise UserError(f"{err} (no step was taken with it)") from None
    out, at = [], 0
    for prompt_ids, responses in groups:
        out.append((prompt_ids, responses, values[at : at + len(responses)]))
        at += len(responses)
    return out


def evaluate(model, tokenizer, prompts: list[Any], config: Config, step: int, reward):
    """Mean reward of 4 sampled responses for each held-out prompt, and a few of them.

    Sampled with its own seed: an evaluation never changes the training that follows, so
    a resumed run matches an uninterrupted one wherever it evaluated. The few are the
    first response to each of the first 4 prompts: ``{"step", "prompt", "response",
    "reward"}`` rows, as ``completions.jsonl`` holds them.
    """
    with torch.random.fork_rng():
        torch.manual_seed(config.seed * 100_003 + step)
        groups = scored(model, tokenizer, prompts, 4, config, reward, "the reward (held out)")
    rewards = [r for _, _, rs in groups for r in rs]
    shown = [
        {
            "step": step,
            "prompt": prompt,
            "response": tokenizer.decode(responses[0], skip_special_tokens=True),
            "reward": values[0],
        }
        for prompt, (_, responses, values) in zip(prompts[:4], groups)
    ]
    return sum(rewards) / len(rewards), shown


def task(config: Config, pretrained: bool) -> tuple[list[Any], list[Any], Any, str]:
    """Training prompts, held-out prompts, the reward function and its name."""
    try:
        if config.prompts is None and pretrained:  # the built-in addition task
            train, heldout = addition_prompts()

            def sum_reward(prompts, responses):
                return [addition_reward(p, r) for p, r in zip(prompts, responses)]

            return train, heldout, sum_reward, "the built-in reward"
        if config.prompts is None:  # the built-in copy task
            train, heldout = copy_task_prompts(config.seed)

            def copy_reward(prompts, responses):
                return [
                    copy_task_reward(p, r, config.max_new_tokens)
                    for p, r in zip(prompts, responses)
                ]

            return train, heldout, copy_reward, "the built-in reward"
        train = read_prompts(config.prompts)
        heldout = read_prompts(config.eval_prompts, "--eval-prompts") if config.eval_prompts else []
        if config.reward:
            return train, heldout, load_reward(config.reward), f"--reward {config.reward}"
        return (
            train,
            heldout,
            RewardModel(config.reward_model),
            f"--reward-model {config.reward_model}",
        )
    except RewardError as err:
        raise UserError(str(err)) from None


def refuse_unknown_text(tokenizer, texts: list[str], flag: str) -> None:
    """With the built-in tokenizer, refuse text that is mostly unknown words to it."""
    unk = tokenizer.unk_token_id
    ids = [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    share = sum(i == unk for i in ids) / max(len(ids), 1)
    if share > 0.5:
        raise UserError(
            f"{flag}: {share:.0%} of this text is unknown to the built-in tokenizer (a toy "
            "vocabulary of 12 words): training on it would learn <unk>. Pass --model DIR, a "
            "Hugging Face model with its own tokenizer"
        )


def _output(config: Config) -> tuple[Path, Path]:
    """The output folder and its checkpoint file, checked against --resume and --overwrite."""
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out}: a file, not a directory")
    state_file = out / "checkpoint" / "state.pt"
    if config.resume and not state_file.is_file():
        raise UserError(f"--resume: no checkpoint in {out}")
    if not (config.resume or config.overwrite) and (
        (out / "metrics.jsonl").exists() or (out / "checkpoint").exists()
    ):
        raise UserError(
            f"--output {out} holds a run already: --resume continues it, --overwrite replaces it"
        )
    return out, state_file


def _restore(state, model, reference, optimizer, picker) -> tuple[list[dict[str, Any]], int]:
    """Put a checkpoint's state back; its records and step."""
    model.load_state_dict(state["model"])
    if reference is not None:
        reference.load_state_dict(state["reference"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    picker.setstate(_as_tuples(state["picker"]))
    return state["records"], state["step"]


def _refuse_unknown_words(tokenizer, rows, prompts) -> None:
    """The built-in model's word vocabulary must cover --data's texts or --prompts."""
    texts = [
        r["prompt"] + "".join(r["responses"])
        for r in map(preference_row, rows or [])
        if isinstance(r["prompt"], str)
    ]
    texts += [p for p in prompts if isinstance(p, str)]
    refuse_unknown_text(tokenizer, texts, "--data" if rows else "--prompts")


def run(config: Config) -> list[dict[str, Any]]:
    """Train as ``config`` says: what ``prefopt train`` runs, callable from Python.

    Args:
        config: The run's settings (the command-line options).

    Returns:
        The logged records, one dict per step (what ``metrics.jsonl`` holds).

    Raises:
        UserError: On a mistake in the options or the inputs, before it affects a step.
    """
    options = check(config)
    pretrained = is_pretrained(config)
    config = config.resolved(pretrained)
    for warning in setting_warnings(config, pretrained):
        print(f"prefopt train: warning: {warning}", file=sys.stderr)
    rows, places = read_rows(config.data) if config.data else (None, None)
    out, state_file = _output(config)
    state = load_state(state_file, config) if config.resume else None
    torch.manual_seed(config.seed)
    model, tokenizer, _ = load_model(config)
    bf16 = compute_dtype(config, pretrained) == "bfloat16"
    amp = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=bf16)
    reference = None
    if not config.no_reference:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    picker = random.Random(config.seed)
    records: list[dict[str, Any]] = []
    start = 0
    if state is not None:
        records, start = _restore(state, model, reference, optimizer, picker)
    # offline rows are cut to max_length; sampled groups are collated uncut, as they came
    collator = PreferenceCollator(tokenizer, max_length=config.max_length if rows else None)
    if rows:
        check_lengths(rows, places, collator, config.max_length)
    train_prompts, heldout, reward, what = (
        task(config, pretrained) if rows is None else ([], [], None, "")
    )
    if not pretrained and (rows or config.prompts):
        prompts = train_prompts + heldout if config.prompts else []
        _refuse_unknown_words(tokenizer, rows, prompts)
    out.mkdir(parents=True, exist_ok=True)
    if state is None:  # a new run (or --overwrite): no completions of an earlier one
        (out / "completions.jsonl").unlink(missing_ok=True)
    progress = _progress(config, start)
    watch = _Watch()
    model.train()
    stop = _StopOnInterrupt()
    try:
        for step in range(start, config.steps):
            record: dict[str, Any] = {"step": step + 1}
            if rows is None:
                with amp():  # sampling
                    if step == 0 and heldout:
                        record["heldout_reward_start"], shown = evaluate(
                            model, tokenizer, heldout, config, 0, reward
                        )
                        _completions(out, shown, progress)
                    prompts = [picker.choice(train_prompts) for _ in range(config.prompts_per_step)]
                    groups = scored(
                        model, tokenizer, prompts, config.responses, config, reward, what
                    )
                batch = collator.collate_ids(groups)  # with its group layout, packed on the host
                record["reward"] = float(batch["rewards"][batch["mask"]].mean())
            else:
                batch = collator([picker.choice(rows) for _ in range(config.prompts_per_step)])
            with amp():  # the forward passes; backward runs outside, as autocast wants
                if reference is not None:  # once, for the loss and the KL alike
                    batch["ref_logps"] = reference_logps(batch, ref_model=reference)
                loss, metrics, logps = loss_and_metrics(
                    model, batch, ref_model=reference, loss=config.loss, pairs=config.pairs,
                    **options,
                )  # fmt: skip
            if reference is not None:  # on sampled responses: an estimate of KL(policy || ref)
                gap = (logps.detach() - batch["ref_logps"])[batch["mask"]]
                record["kl"] = float(gap.float().mean())
            if not math.isfinite(loss.item()):  # never take a step with it, never save it
                raise UserError(
                    f"step {step + 1}: the loss is {loss.item()}; "
                    f"the last good checkpoint is in {out}/"
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            record["loss"] = loss.item()
            values = {k: float(v) for k, v in metrics.items()}
            record.update({k: v for k, v in values.items() if math.isfinite(v)})  # NaN: none
            for warning in watch(record, config, pretrained):
                progress.write(f"prefopt train: warning: {warning}")
            last = step + 1 == config.steps
            if heldout and ((step + 1) % config.eval_every == 0 or last):
                with amp():
                    record["heldout_reward"], shown = evaluate(
                        model, tokenizer, heldout, config, step + 1, reward
                    )
                _completions(out, shown, progress)
            records.append(record)
            progress.update(record)
            if (step + 1) % config.save_every == 0 or last or stop.asked:
                _save(
                    out, model, reference, optimizer, picker, records, step + 1, config, tokenizer
                )
            if stop.asked and not last:
                progress.close()
                raise Interrupted(
                    f"interrupted after step {step + 1}; checkpoint saved in {out}/ "
                    "(continue with --resume)"
                )
    finally:  # Ctrl-C behaves as usual again, however the loop ended
        stop.restore()
    progress.close()
    _write_outputs(out, records)
    return records


def setting_warnings(config: Config, pretrained: bool) -> list[str]:
    """Settings far from what a pretrained model trains with (the prefopt train page)."""
    if not pretrained:
        return []
    out = []
    lr = BY_MODEL["lr"][1]
    if config.lr > 10 * lr:
        out.append(
            f"--lr {config.lr:g} is over 10x the {lr:g} recommended for a pretrained model; "
            "on SmolLM2-135M-Instruct 3e-4 and above wrecked the model within a few steps"
        )
    if config.temperature > 1.0:
        out.append(f"--temperature {config.temperature:g} samples far from what the model says")
    return out


class _Watch:
    """Says when a run is going to pieces: the loss or the KL jumps 100-fold in a step.

    A step whose groups are all degenerate (every response scored alike) has a loss of
    exactly 0 and says nothing about the run: it is not the value the next step is
    compared with. Nor is a value of exactly 0 (the KL of the first step, where the policy
    is the reference): any value is infinitely many times that; on a real model the first
    Adam step alone moved the KL from 0 to 1.02 in a run that went on to learn.
    """

    def __init__(self):
        self.last: dict[str, float] = {}

    def __call__(self, record: dict[str, Any], config: Config, pretrained: bool) -> list[str]:
        out = []
        if record.get("groups/degenerate") == 1.0:
            return out
        watched = (("loss", 0.05, "the loss"), ("kl", 0.5, "the KL to the reference"))
        for key, floor, what in watched:
            value, before = abs(record.get(key, 0.0)), self.last.get(key)
            if before is not None and value > floor and value > 100 * max(before, floor / 100):
                hint = f"; lower --lr (now {config.lr:g})" if pretrained else ""
                out.append(
                    f"step {record['step']}: {what} jumped from {before:.3g} to {value:.3g} in "
                    f"one step: the run may be going to pieces{hint}"
                )
            if record.get(key, 0.0) != 0.0:
                self.last[key] = abs(record[key])
        return out


def _completions(out: Path, shown: list[dict[str, Any]], progress: _progress) -> None:
    """Append an evaluation's sample completions to completions.jsonl; show the first."""
    with (out / "completions.jsonl").open("a") as f:
        for row in shown:
            f.write(json.dumps(row) + "\n")
    if shown:
        progress.says = f"{shown[0]['response'][:40]!r} ({shown[0]['reward']:g})"


def load_state(state_file: Path, config: Config) -> dict[str, Any]:
    """A checkpoint, read without unpickling objects; its run must match ``config``."""
    try:
        state = torch.load(state_file, weights_only=True)
        saved = state["config"]
        keys = ("model", "optimizer", "torch_rng", "picker", "records", "step")
        missing = [k for k in keys if k not in state]
    except Exception as err:  # a truncated or foreign file: any unpickling error
        reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
        raise UserError(
            f"--resume: {state_file} is not a readable checkpoint "
            f"({type(err).__name__}{': ' + reason if reason else ''})"
        ) from None
    if missing:
        raise UserError(f"--resume: {state_file} lacks {', '.join(missing)}")
    changed = [k for k in RESUME_FIXED if saved.get(k) != getattr(config, k)]
    if changed:
        what = ", ".join(f"{k} {saved.get(k)!r} -> {getattr(config, k)!r}" for k in changed)
        raise UserError(f"--resume: the run was made with other settings ({what})")
    return state


def _as_tuples(value: Any) -> Any:
    """``random.Random`` state from a checkpoint (lists back to the tuples it needs)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class _StopOnInterrupt:
    """The first Ctrl-C asks the loop to stop after the current step; a second one stops now."""

    def __init__(self):
        import signal

        self.asked = False
        self.previous = None
        try:
            self.previous = signal.signal(signal.SIGINT, self._ask)
        except ValueError:  # not the main thread: Ctrl-C behaves as usual
            pass

    def _ask(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True

    def restore(self) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def _save(out, model, reference, optimizer, picker, records, step, config, tokenizer):
    (out / "checkpoint").mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "reference": None if reference is None else reference.state_dict(),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "picker": picker.getstate(),
        "records": records,
        "step": step,
        "config": asdict(config),
    }
    torch.save(state, out / "checkpoint" / "state.tmp")
    (out / "checkpoint" / "state.tmp").replace(out / "checkpoint" / "state.pt")
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    _write_outputs(out, records)


def _write_outputs(out: Path, records: list[dict[str, Any]]) -> None:
    with (out / "metrics.jsonl").open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    plot(records, out / "training.png")


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Reward (sampled and held-out) and loss over steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    if any("reward" in r for r in records):
        top.plot(
            steps, [r.get("reward", math.nan) for r in records], alpha=0.5, label="sampled (train)"
        )
        held = [(r["step"], r["heldout_reward"]) for r in records if "heldout_reward" in r]
        start = [r["heldout_reward_start"] for r in records if "heldout_reward_start" in r]
        if start:
            held = [(0, start[0]), *held]
        if held:
            top.plot(*zip(*held), "o-", label="held-out prompts")
        top.set_ylabel("reward")
    else:
        top.plot(steps, [r["rewards/margins"] for r in records], label="implicit reward margin")
        top.set_ylabel("margin")
    top.legend()
    bottom.plot(steps, [r["loss"] for r in records])
    bottom.set_ylabel("loss")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class _progress:
    """A tqdm bar with the latest reward and loss; silent when ``progress`` is off."""

    def __init__(self, config: Config, start: int):
        self.bar = None
        self.says = None  # the latest evaluation's first completion
        if config.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=config.steps, initial=start, desc="prefopt train", unit="step")

    def update(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            shown = {
                k: f"{record[k]:.3f}"
                for k in ("loss", "kl", "reward", "heldout_reward")
                if k in record
            }
            if self.says:
                shown["says"] = self.says
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
