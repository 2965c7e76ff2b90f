"""Preference rows to padded arrays, shared by the PyTorch and JAX integrations (NumPy only)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

import prefopt
from prefopt._ops import stop_gradient
from prefopt.losses.registry import spec

__all__ = ["collate_ids", "group_rows", "group_loss_and_metrics"]

IGNORE = -100


def group_rows(row: dict[str, Any], where: str = "row") -> tuple[str, list[str], list[float]]:
    """``(prompt, responses, rewards)`` of a group or pair row; raises ``ValueError`` on a bad one.

    Args:
        row: ``{"prompt", "responses", "rewards"}`` or ``{"prompt", "chosen", "rejected"}``.
        where: How to name the row in an error (e.g. ``"data.jsonl:7"``).

    Returns:
        The prompt, the responses and one finite float reward per response.
    """
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise ValueError(f"{where}: a row needs a string 'prompt'")
    if "chosen" in row or "rejected" in row:
        if not (isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str)):
            raise ValueError(f"{where}: a pair row needs strings 'chosen' and 'rejected'")
        _check_ref_logps(row, 2, where)
        return row["prompt"], [row["chosen"], row["rejected"]], [1.0, 0.0]
    responses, rewards = row.get("responses"), row.get("rewards")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise ValueError(
            f"{where}: a group row needs 'responses', a list of strings "
            "(or 'chosen' and 'rejected' for a pair)"
        )
    if not isinstance(rewards, list) or len(rewards) != len(responses):
        got = len(rewards) if isinstance(rewards, list) else type(rewards).__name__
        raise ValueError(
            f"{where}: 'rewards' must be a list with one number per response; "
            f"got {len(responses)} responses and {got} rewards"
        )
    rewards = _numbers(row["rewards"], where, "rewards")
    if not responses:
        raise ValueError(f"{where}: a group row needs at least one response")
    _check_ref_logps(row, len(responses), where)
    return row["prompt"], responses, rewards


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


def _check_ref_logps(row: dict[str, Any], n: int, where: str) -> None:
    """An optional ``ref_logps`` column: one finite number per response."""
    if "ref_logps" not in row:
        return
    ref = row["ref_logps"]
    if not isinstance(ref, list) or len(ref) != n:
        got = len(ref) if isinstance(ref, list) else type(ref).__name__
        raise ValueError(
            f"{where}: 'ref_logps' must be a list with one number per response; "
            f"got {n} responses and {got}"
        )
    _numbers(ref, where, "ref_logps")


def collate_ids(
    groups: Sequence[tuple[list[int], list[list[int]], list[float]]],
    pad_id: int,
    max_length: int | None = None,
    ref_logps: Sequence[Sequence[float]] | None = None,
) -> dict[str, np.ndarray]:
    """Pad token-id groups ``(prompt_ids, [response_ids...], rewards)`` into NumPy arrays.

    Args:
        groups: Per prompt: its token ids, the token ids of each response (eos included
            if wanted), and one reward per response.
        pad_id: The token id of padding.
        max_length: Keep at most the last ``max_length`` tokens of each sequence.
        ref_logps: Per prompt, one reference log-prob per response, or ``None``.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` (B, n, T) int64 (labels -100 on
        prompt and padding), ``rewards`` (B, n) float32, ``mask`` (B, n) bool, and
        ``ref_logps`` (B, n) float32 when given.
    """
    if not groups:
        raise ValueError("collate_ids: no groups to collate (an empty batch)")
    if max_length is not None and max_length < 1:
        raise ValueError(f"collate_ids: max_length must be >= 1 or None; got {max_length}")
    B = len(groups)
    n = max(len(g[1]) for g in groups)
    seqs = [[(g[0] + r) for r in g[1]] for g in groups]
    if max_length is not None:
        seqs = [[s[-max_length:] for s in group] for group in seqs]
    T = max(len(s) for group in seqs for s in group)
    input_ids = np.full((B, n, T), pad_id, dtype=np.int64)
    attention = np.zeros((B, n, T), dtype=np.int64)
    labels = np.full((B, n, T), IGNORE, dtype=np.int64)
    rewards = np.zeros((B, n), dtype=np.float32)
    mask = np.zeros((B, n), dtype=bool)
    for b, (_, responses, rs) in enumerate(groups):
        for i, seq in enumerate(seqs[b]):
            length = len(seq)
            response = len(responses[i])
            input_ids[b, i, :length] = seq
            attention[b, i, :length] = 1
            first = max(length - response, 0)
            labels[b, i, first:length] = input_ids[b, i, first:length]
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


def group_loss_and_metrics(
    loss: str,
    logps: Any,
    ref_logps: Any,
    batch: dict[str, Any],
    lengths: Any,
    *,
    pairs: str = "all",
    options: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The training loss of a group batch's log-probs, and its metrics (both integrations).

    The PyTorch and JAX ``loss_and_metrics`` compute the log-probs and call this. The loss
    is [`prefopt.batch_loss`][prefopt.batch_loss] with the loss's own defaults for the
    options not given; the metrics are
    [`group_metrics`][prefopt.metrics.group_metrics] (no gradient) with the ``beta`` the
    loss used, per token when the loss averages log-probs per token (reference-free).

    Args:
        loss: A registered loss name.
        logps: (B, n) summed response log-probs under the policy.
        ref_logps: (B, n) under the reference, or ``None``; dropped for reference-free losses.
        batch: The batch's ``rewards`` and ``mask``, each (B, n).
        lengths: (B, n) response token counts.
        pairs: ``"all"`` (default) or ``"best_worst"``, for pairwise losses.
        options: Options of the loss; the others keep the loss's defaults.

    Returns:
        ``(loss, metrics)``: a 0-d array and a dict of 0-d arrays.
    """
    found = spec(loss, "loss_and_metrics")
    options = found.options(options, fn="loss_and_metrics")
    if found.reference == "none":
        ref_logps = None
    value = prefopt.batch_loss(
        loss,
        logps,
        ref_logps,
        batch["rewards"],
        mask=batch["mask"],
        lengths=lengths,
        pairs=pairs,
        **options,
    )
    per_token = ref_logps is None and found.lengths in ("optional", "required")
    xp = prefopt._ops.get_namespace(logps)
    metrics = prefopt.metrics.group_metrics(
        stop_gradient(logps, xp=xp),
        ref_logps,
        batch["rewards"],
        mask=batch["mask"],
        lengths=lengths if per_token else None,
        beta=options["beta"],
        xp=xp,
    )
    return value, metrics
