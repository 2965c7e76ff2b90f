"""Preference rows to padded arrays, shared by the PyTorch and JAX integrations (NumPy only).

Rows and their tokenisation (``preference_row``, ``tokenize_row``), how long sequences are
cut (``Truncation``) and the padded batch (``collate_ids``). What a batch becomes next is
elsewhere: its group layout in ``prefopt.layout.pack_groups``, its loss and metrics in
``prefopt.integrations.loss``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from prefopt.integrations import warn_once

__all__ = [
    "Truncation",
    "collate_ids",
    "preference_row",
    "tokenize_row",
]

IGNORE = -100


def _is_messages(value: Any) -> bool:
    """A conversation: a non-empty list of ``{"role", "content"}`` dicts."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def _split_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """The shared start of ``chosen`` and ``rejected`` as the prompt (TRL's implicit prompt).

    Conversations share their leading messages; strings share their leading characters,
    less a space that then starts both completions.
    """
    i = 0
    while i < min(len(chosen), len(rejected)) and chosen[i] == rejected[i]:
        i += 1
    if isinstance(chosen, str) and 0 < i < min(len(chosen), len(rejected)) and chosen[i - 1] == " ":
        i -= 1
    return chosen[:i], chosen[i:], rejected[i:]


def preference_row(row: Any, where: str = "row") -> dict[str, Any]:
    """One accepted row as ``{"prompt", "responses", "rewards"}`` (and ``"ref_logps"``).

    Accepted rows, standard (strings) or conversational (lists of ``{"role", "content"}``
    messages):

    - group: ``{"prompt", "responses": [...], "rewards": [...]}``;
    - pair, as in TRL: ``{"prompt", "chosen", "rejected"}``, rewards ``score_chosen`` and
      ``score_rejected`` when given, else 1 and 0; without ``"prompt"`` the shared start of
      ``chosen`` and ``rejected`` is the prompt (the implicit prompt).

    Reference log-probs: ``ref_logps`` (one per response), or TRL's ``ref_chosen_logps`` and
    ``ref_rejected_logps``.

    Args:
        row: The row.
        where: How to name the row in an error (e.g. ``"data.jsonl:7"``).

    Returns:
        A new dict; rewards and ``ref_logps`` as lists of floats.

    Raises:
        ValueError: For a row of no accepted shape, naming ``where`` and what is wrong.
    """
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: a row must be a dict; got {type(row).__name__}")
    # a datasets.Dataset of mixed rows has every column in every row, None where absent
    row = {k: v for k, v in row.items() if v is not None}
    if "chosen" in row or "rejected" in row:
        chosen, rejected = row.get("chosen"), row.get("rejected")
        if (
            "prompt" not in row
            and isinstance(chosen, (str, list))
            and type(chosen) is type(rejected)
        ):
            prompt, chosen, rejected = _split_prompt(chosen, rejected)
        else:
            prompt = row.get("prompt")
        responses = [chosen, rejected]
        scores = [row.get("score_chosen"), row.get("score_rejected")]
        rewards = [1.0, 0.0] if scores == [None, None] else scores
        ref = row.get("ref_logps")
        if ref is None and ("ref_chosen_logps" in row or "ref_rejected_logps" in row):
            ref = [row.get("ref_chosen_logps"), row.get("ref_rejected_logps")]
    else:
        prompt, responses, rewards = row.get("prompt"), row.get("responses"), row.get("rewards")
        ref = row.get("ref_logps")
        if not isinstance(responses, list) or not responses:
            raise ValueError(
                f"{where}: a group row needs 'responses', a non-empty list "
                "(or 'chosen' and 'rejected' for a pair)"
            )
    text = isinstance(prompt, str) and all(isinstance(r, str) for r in responses)
    chat = _is_messages(prompt) and all(_is_messages(r) for r in responses)
    if not (text or chat):
        raise ValueError(
            f"{where}: 'prompt' and the responses must all be strings or all be conversations "
            "(lists of {'role', 'content'} messages); got prompt "
            f"{type(prompt).__name__} and responses {[type(r).__name__ for r in responses]}"
        )
    if not isinstance(rewards, list) or len(rewards) != len(responses):
        got = len(rewards) if isinstance(rewards, list) else type(rewards).__name__
        raise ValueError(
            f"{where}: 'rewards' must be a list with one number per response; "
            f"got {len(responses)} responses and {got} rewards"
        )
    out = {"prompt": prompt, "responses": responses, "rewards": _numbers(rewards, where, "rewards")}
    if ref is not None:
        if not isinstance(ref, list) or len(ref) != len(responses):
            got = len(ref) if isinstance(ref, list) else type(ref).__name__
            raise ValueError(
                f"{where}: 'ref_logps' must be a list with one number per response; "
                f"got {len(responses)} responses and {got}"
            )
        out["ref_logps"] = _numbers(ref, where, "ref_logps")
    return out


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return i


def tokenize_row(
    row: Any, tokenizer: Any, where: str = "row", *, add_eos: bool = True
) -> dict[str, Any]:
    """Token ids of one row, as TRL's ``DPOTrainer`` makes them.

    A standard row: the prompt is tokenised with the tokenizer's special tokens (its
    ``<bos>`` if it adds one), and each response as part of ``prompt + response`` (with the
    eos text appended when ``add_eos`` and absent); the response starts where the two
    token lists part. A conversational row goes through the tokenizer's chat template,
    the prompt with the generation prompt. Write a standard row's responses as they follow
    the prompt (``" blue."`` after ``"The sky is"``): nothing is inserted between them.

    Args:
        row: A row that [`preference_row`][prefopt.integrations.data.preference_row] accepts.
        tokenizer: A Hugging Face tokenizer.
        where: How to name the row in an error.
        add_eos: Append the eos token to standard responses. Default ``True``.

    Returns:
        ``{"prompt_ids", "response_ids", "rewards"}`` (``"ref_logps"`` when the row has it):
        a list of ints, a list of such lists, a list of floats.
    """
    row = preference_row(row, where)
    prompt, responses = row["prompt"], row["responses"]
    if isinstance(prompt, str):
        eos = tokenizer.eos_token if add_eos else None
        prompt_ids = list(tokenizer(text=prompt)["input_ids"])
        full = [
            list(
                tokenizer(text=prompt + r + (eos if eos and not r.endswith(eos) else ""))[
                    "input_ids"
                ]
            )
            for r in responses
        ]
    else:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"{where}: a conversational row needs a tokenizer with a chat template; "
                "this one has none (set tokenizer.chat_template)"
            )

        def chat(messages, **kw):
            return list(
                tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)[
                    "input_ids"
                ]
            )

        prompt_ids = chat(prompt, add_generation_prompt=True)
        full = [chat(prompt + r) for r in responses]
    start = min(_common_prefix(prompt_ids, ids) for ids in full)
    if start < len(prompt_ids):
        warn_once(
            "prefopt: a tokenized prompt is not a prefix of prompt + response (tokens merge "
            "across the boundary, or the chat template renders the prompt differently); the "
            "response starts where they part. Standard rows: start each response with the "
            "text that follows the prompt, e.g. a space."
        )
    out = {
        "prompt_ids": prompt_ids[:start],
        "response_ids": [ids[start:] for ids in full],
        "rewards": row["rewards"],
    }
    if "ref_logps" in row:
        out["ref_logps"] = row["ref_logps"]
    return out


@dataclass(frozen=True)
class Truncation:
    """How long sequences are cut, as TRL's ``DPOConfig`` says, plus prompt/response limits.

    Attributes:
        max_length: Most tokens of prompt + response; ``None``: no limit.
        max_prompt_length: Most prompt tokens; the prompt keeps its **end** (and its first
            token when that is ``bos_id``). ``None``: no limit.
        max_completion_length: Most response tokens; a response keeps its **start**.
        mode: For ``max_length``: ``"keep_start"`` (TRL's default: the sequence keeps its
            start, so responses lose their end) or ``"keep_end"``.
        bos_id: The tokenizer's bos token id, kept at the head of a cut prompt.
    """

    max_length: int | None = None
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    mode: str = "keep_start"
    bos_id: int | None = None

    def __post_init__(self):
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ValueError(f"{name} must be an int >= 1 or None; got {value!r}")
        if self.mode not in ("keep_start", "keep_end"):
            raise ValueError(
                f"truncation_mode must be 'keep_start' or 'keep_end'; got {self.mode!r}"
            )

    def prompt(self, ids: list[int]) -> list[int]:
        """The prompt cut to ``max_prompt_length``, keeping its end (and its bos)."""
        m = self.max_prompt_length
        if m is None or len(ids) <= m:
            return ids
        if self.bos_id is not None and ids[0] == self.bos_id and m > 1:
            return [ids[0], *ids[len(ids) - m + 1 :]]
        return ids[len(ids) - m :]

    def __call__(self, prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
        """One sequence's prompt and response ids after every limit."""
        prompt = self.prompt(prompt)
        if self.max_completion_length is not None:
            response = response[: self.max_completion_length]
        m = self.max_length
        if m is not None and len(prompt) + len(response) > m:
            if self.mode == "keep_start":
                prompt, response = prompt[:m], response[: max(m - len(prompt), 0)]
            else:
                response = response[-m:]
                prompt = prompt[len(prompt) - (m - len(response)) :] if m > len(response) else []
        return prompt, response

    def fills(self, prompt: list[int]) -> bool:
        """Whether ``keep_start`` truncation would leave no response token after ``prompt``."""
        m = self.max_length
        return self.mode == "keep_start" and m is not None and len(self.prompt(prompt)) >= m


# Rewards and log-probs are collated as float32: larger magnitudes would become inf.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _numbers(values: Any, where: str, name: str) -> list[float]:
    """Finite numbers that fit float32, as floats; a ValueError naming the row otherwise."""
    shown = repr(values) if len(repr(values)) < 80 else repr(values)[:77] + "..."
    numbers = []
    for value in values:
        if isinstance(value, (bool, str)):
            raise ValueError(f"{where}: {name} must be numbers; got {shown}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            number = math.inf
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {name} must be numbers; got {shown}") from None
        if not (math.isfinite(number) and abs(number) <= _FLOAT32_MAX):
            raise ValueError(
                f"{where}: {name} must be finite and at most 3.4e38 in size; got {shown}"
            )
        numbers.append(number)
    return numbers


def collate_ids(
    groups: Sequence[tuple[list[int], list[list[int]], list[float]]],
    pad_id: int,
    truncation: Truncation | None = None,
    ref_logps: Sequence[Sequence[float]] | None = None,
    label_masks: Sequence[Sequence[Sequence[int]]] | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, np.ndarray]:
    """Pad token-id groups ``(prompt_ids, [response_ids...], rewards)`` into NumPy arrays.

    Args:
        groups: Per prompt: its token ids, the token ids of each response (eos included
            if wanted), and one reward per response.
        pad_id: The token id of padding.
        truncation: How to cut long sequences, or ``None`` (no limit).
        ref_logps: Per prompt, one reference log-prob per response, or ``None``.
        label_masks: Per prompt, per response, one flag per response token: 1 where the
            token's log-prob counts, 0 where the token is context only (a tool's result in
            a multi-turn completion: the model reads it but did not write it). Default
            ``None``: every response token counts.
        pad_to_multiple_of: Round the padded length T up to a multiple of it (a bucket),
            so that a jitted step sees few distinct shapes and compiles a bounded number of
            times (at most ``max_length / pad_to_multiple_of``). Default ``None``: T is the
            batch's longest sequence. The extra positions are padding: no label, no
            attention, no effect on any log-prob.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` (B, n, T) int64 (labels -100 on
        prompt, padding and tokens whose flag is 0), ``rewards`` (B, n) float32, ``mask``
        (B, n) bool, and ``ref_logps`` (B, n) float32 when given.

    Raises:
        ValueError: For an empty batch, a label mask whose length is not its response's,
            or a response with no counted token left after truncation.
    """
    if not groups:
        raise ValueError("collate_ids: no groups to collate (an empty batch)")
    bucket = pad_to_multiple_of
    if bucket is not None and (type(bucket) is not int or bucket < 1):
        raise ValueError(f"collate_ids: pad_to_multiple_of must be an int >= 1; got {bucket!r}")
    cut = truncation or Truncation()
    seqs, flags = [], []
    for b, (prompt, responses, _) in enumerate(groups):
        marks = [[1] * len(r) for r in responses] if label_masks is None else label_masks[b]
        if len(marks) != len(responses) or any(len(m) != len(r) for m, r in zip(marks, responses)):
            raise ValueError(
                f"collate_ids: label_masks[{b}] must hold one flag per token of each response "
                f"(lengths {[len(r) for r in responses]}); got lengths {[len(m) for m in marks]}"
            )
        # each flag travels with its token through the cut
        cuts = [cut(prompt, list(zip(r, m))) for r, m in zip(responses, marks)]
        seqs.append([(p, [t for t, _ in r]) for p, r in cuts])
        flags.append([[bool(f) for _, f in r] for _, r in cuts])
        for i, kept in enumerate(flags[-1]):
            if not any(kept):
                raise ValueError(
                    f"collate_ids: group {b}, response {i} has no counted token left after "
                    f"truncation (prompt {len(prompt)} tokens, response {len(responses[i])}, "
                    f"{sum(map(bool, marks[i]))} counted, {cut})"
                )
    B, n = len(groups), max(len(g[1]) for g in groups)
    T = max(len(p) + len(r) for group in seqs for p, r in group)
    if bucket:
        T = -(-T // bucket) * bucket
    input_ids = np.full((B, n, T), pad_id, dtype=np.int64)
    attention = np.zeros((B, n, T), dtype=np.int64)
    labels = np.full((B, n, T), IGNORE, dtype=np.int64)
    rewards = np.zeros((B, n), dtype=np.float32)
    mask = np.zeros((B, n), dtype=bool)
    for b, (_, _, rs) in enumerate(groups):
        for i, (p, r) in enumerate(seqs[b]):
            length = len(p) + len(r)
            input_ids[b, i, :length] = p + r
            attention[b, i, :length] = 1
            labels[b, i, len(p) : length] = np.where(flags[b][i], r, IGNORE)
            rewards[b, i] = rs[i]
            mask[b, i] = True
        attention[b, len(seqs[b]) :, 0] = 1  # padding responses: one attended token, no label
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "rewards": rewards,
        "mask": mask,
    }
    if ref_logps is not None:
        ref = np.zeros((B, n), dtype=np.float32)
        for b, values in enumerate(ref_logps):
            ref[b, : len(values)] = [float(v) for v in values]
        batch["ref_logps"] = ref
    return batch
