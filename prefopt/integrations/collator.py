"""The collator of preference rows for PyTorch: a padded (B, n, T) batch and its group layout."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from prefopt.integrations.data import Truncation, collate_ids, tokenize_row
from prefopt.layout import pack_groups

__all__ = ["PreferenceCollator"]


class PreferenceCollator:
    """Tokenise rows (or take tokenised ones) into a padded (B, n, T) batch.

    Rows are those [`tokenize_row`][prefopt.integrations.data.tokenize_row] accepts, or
    its output (``prompt_ids``, ``response_ids``, ``rewards``). Labels are the input ids
    with ``-100`` on the prompt and on padding, so that only response tokens count. Groups
    of different sizes are padded to the largest ``n`` of the batch and marked by
    ``mask``; a padding response still attends to one token, so that no attention row is
    empty.

    Args:
        tokenizer: A Hugging Face tokenizer with a pad token (or an eos token to use).
        max_length: Most tokens of prompt + response. Default ``None``: no limit.
        max_prompt_length: Most prompt tokens (the prompt keeps its end and its bos).
        max_completion_length: Most response tokens (a response keeps its start).
        truncation_mode: ``"keep_start"`` (default, TRL's) or ``"keep_end"``, for
            ``max_length``.
        add_eos: Append the eos token to standard responses. Default ``True``.

    Returns (when called on a list of rows): a dict of tensors ``input_ids``,
    ``attention_mask`` and ``labels`` (B, n, T), ``rewards`` (B, n) float32, ``mask``
    (B, n) bool, ``ref_logps`` (B, n) float32 when every row has that column, and, when
    its groups share their prompts, ``packed``: the batch's
    [`PackedGroups`][prefopt.layout.PackedGroups] (each prompt once, then its responses), a
    batch value that moves with ``.to(device)`` as the tensors do. The layout is computed
    here, on the host, once per batch: the policy's and the reference's forward both use
    it, and neither reads a value back from the device.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        max_completion_length: int | None = None,
        truncation_mode: str = "keep_start",
        add_eos: bool = True,
    ):
        try:
            self.truncation = Truncation(
                max_length,
                max_prompt_length,
                max_completion_length,
                truncation_mode,
                tokenizer.bos_token_id,
            )
        except ValueError as err:
            raise ValueError(f"PreferenceCollator: {err}") from None
        self.tokenizer = tokenizer
        self.add_eos = add_eos
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        if pad is None:
            raise ValueError("PreferenceCollator: the tokenizer has neither a pad nor an eos token")
        self.pad_id = pad

    def tokenize(self, row: dict[str, Any], where: str = "row") -> dict[str, Any]:
        """The token ids of a row (a tokenised row is returned as it is)."""
        if "prompt_ids" in row:
            return row
        return tokenize_row(row, self.tokenizer, where, add_eos=self.add_eos)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Collate rows into tensors (see the class docstring)."""
        if not rows:
            raise ValueError("PreferenceCollator: no rows to collate (an empty batch)")
        rows = [self.tokenize(row, f"row {i}") for i, row in enumerate(rows)]
        groups = [(r["prompt_ids"], r["response_ids"], r["rewards"]) for r in rows]
        ref = [row.get("ref_logps") for row in rows]
        return self.collate_ids(groups, ref if all(r is not None for r in ref) else None)

    def collate_ids(
        self,
        groups: Sequence[tuple[list[int], list[list[int]], list[float]]],
        ref_logps: Sequence[Sequence[float]] | None = None,
        label_masks: Sequence[Sequence[Sequence[int]]] | None = None,
    ) -> dict[str, Any]:
        """Collate token-id groups ``(prompt_ids, [response_ids...], rewards)`` into tensors.

        Args:
            groups: As for [`collate_ids`][prefopt.integrations.data.collate_ids].
            ref_logps: Per group, one reference log-prob per response, or ``None``.
            label_masks: Per group, per response, 1 for each token whose log-prob counts and
                0 for context only (a tool's result), or ``None`` (every token counts).

        Returns:
            The batch of the class docstring.
        """
        batch = collate_ids(groups, self.pad_id, self.truncation, ref_logps, label_masks)
        packed = pack_groups(batch)
        batch = {k: torch.from_numpy(v) for k, v in batch.items()}
        if packed is not None:
            batch["packed"] = packed.map(torch.from_numpy)
        return batch
