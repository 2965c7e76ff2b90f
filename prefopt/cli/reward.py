"""Rewards and prompts for on-policy ``prefopt train``: a Python function or a reward model.

A reward function takes ``(prompts, responses)``, two lists of the same length (a prompt
as written in the prompts file, a response as decoded text), and returns one finite number
per response. A reward model is a local Hugging Face sequence-classification checkpoint
with one output, scoring the prompt and response through its own tokenizer (and its chat
template, when it has one).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class RewardError(Exception):
    """A reward, or a prompts or data file, that cannot be used (a one-line message)."""


def load_reward(spec: str) -> Callable:
    """The function that ``--reward MODULE:FUNCTION`` or ``FILE.py:FUNCTION`` names."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise RewardError(f"--reward: expected MODULE:FUNCTION or FILE.py:FUNCTION; got {spec!r}")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise RewardError(f"--reward: no such file: {where}")
            loaded = importlib.util.spec_from_file_location(f"_prefopt_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except RewardError:
        raise
    except Exception as err:  # the user's module failed to import: say which and why
        raise RewardError(f"--reward: cannot import {where}: {type(err).__name__}: {err}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"--reward: {where} has no function {name!r}")
    return fn


def checked_rewards(
    fn: Callable, prompts: list[Any], responses: list[str], what: str
) -> list[float]:
    """Call a reward on a batch; a raise, a wrong length or a non-finite value is an error."""
    try:
        values = fn(prompts, responses)
    except Exception as err:
        raise RewardError(f"{what} raised {type(err).__name__}: {err}") from None
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        try:
            values = list(values)
        except TypeError:
            raise RewardError(
                f"{what} returned {type(values).__name__}; expected a list of numbers"
            ) from None
    if len(values) != len(responses):
        raise RewardError(f"{what} returned {len(values)} values for {len(responses)} responses")
    out = []
    for i, value in enumerate(values):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RewardError(
                f"{what} returned {value!r} for response {i}; expected a number"
            ) from None
        if not math.isfinite(number):
            raise RewardError(f"{what} returned {number} for response {i}; rewards must be finite")
        out.append(number)
    return out


class RewardModel:
    """Scores with a local sequence-classification checkpoint (``--reward-model DIR``)."""

    def __init__(self, path: str, batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not Path(path).is_dir():
            raise RewardError(f"--reward-model: no such directory: {path}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RewardError(f"--reward-model {path}: not a reward model ({first})") from None
        if self.model.config.num_labels != 1:
            raise RewardError(
                f"--reward-model {path}: a reward model has one output; this one has "
                f"{self.model.config.num_labels} (num_labels)"
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size

    def text(self, prompt: Any, response: str) -> str:
        """Prompt and response as the reward model reads them."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(
                [*messages, {"role": "assistant", "content": response}], tokenize=False
            )
        if isinstance(prompt, list):
            raise RewardError(
                "--reward-model: a conversational prompt needs a reward model tokenizer with "
                "a chat template"
            )
        return prompt + response

    def __call__(self, prompts: list[Any], responses: list[str]) -> list[float]:
        """One score per response, in batches."""
        import torch

        scores = []
        texts = [self.text(p, r) for p, r in zip(prompts, responses)]
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[start : start + self.batch_size], padding=True, return_tensors="pt"
                )
                scores += self.model(**enc).logits[:, 0].float().tolist()
        return scores


def jsonl(path: str, flag: str):
    """``(where, value)`` for each non-blank line of a JSONL file, ``where`` = ``file:line``.

    A missing file, a line that is not UTF-8 text or not JSON: a ``RewardError`` naming
    the file and the line (``prefopt train`` reports it in one line).
    """
    file = Path(path)
    if not file.is_file():
        raise RewardError(f"{flag}: no such file: {path}")
    with file.open("rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise RewardError(
                    f"{where}: not UTF-8 text ({err.reason} at byte {err.start})"
                ) from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise RewardError(f"{where}: not valid JSON ({err.msg})") from None


def read_prompts(path: str, flag: str = "--prompts") -> list[Any]:
    """Prompts from a JSONL file of ``{"prompt": str}`` or ``{"prompt": [messages]}`` rows."""
    prompts = []
    for where, row in jsonl(path, flag):
        prompt = row.get("prompt") if isinstance(row, dict) else None
        chat = isinstance(prompt, list) and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in prompt
        )
        if not (isinstance(prompt, str) and prompt) and not (chat and prompt):
            raise RewardError(
                f"{where}: a row needs 'prompt': a string or a list of "
                "{'role', 'content'} messages"
            )
        prompts.append(prompt)
    if not prompts:
        raise RewardError(f"{path}: no prompts")
    return prompts
