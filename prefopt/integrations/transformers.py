"""Hugging Face ``transformers`` integration.

A collator for group and pair rows, the log-probs and loss of such a batch, and a
``Trainer`` subclass.

Rows come in two shapes: **group** rows ``{"prompt", "responses": [...], "rewards": [...]}``
with any number of responses per prompt, and **pair** rows ``{"prompt", "chosen",
"rejected"}``, which are groups of two with rewards 1 and 0. An optional ``ref_logps``
column (one number per response, see :func:`precompute_ref_logps`) replaces the reference
model. Prompt tokens and padding never count in a log-prob.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import transformers

import prefopt
from prefopt.integrations.data import collate_ids, group_loss_and_metrics, group_rows
from prefopt.losses.registry import spec

__all__ = [
    "PreferenceCollator",
    "PreferenceTrainer",
    "batch_logps",
    "loss_and_metrics",
    "precompute_ref_logps",
]


class PreferenceCollator:
    """Tokenise group or pair rows into a padded (B, n, T) batch.

    Each response is tokenised after its prompt (``prompt + response + eos``); labels are
    the input ids with ``-100`` on the prompt and on padding, so that only response tokens
    count. Groups of different sizes are padded to the largest ``n`` of the batch and
    marked by ``mask``; a padding response still attends to one token, so that no attention
    row is empty.

    Args:
        tokenizer: A Hugging Face tokenizer with a pad token (or an eos token to use).
        max_length: Truncate prompt + response to this many tokens (from the response's
            end). Default ``None``: no truncation.
        add_eos: Append the tokenizer's eos token to each response. Default ``True``.

    Returns (when called on a list of rows): a dict of tensors ``input_ids``,
    ``attention_mask`` and ``labels`` (B, n, T), ``rewards`` (B, n) float32, ``mask``
    (B, n) bool, and ``ref_logps`` (B, n) float32 when every row has that column.
    """

    def __init__(self, tokenizer: Any, *, max_length: int | None = None, add_eos: bool = True):
        if max_length is not None and (isinstance(max_length, bool) or max_length < 1):
            raise ValueError(
                f"PreferenceCollator: max_length must be an int >= 1 or None; got {max_length!r}"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.add_eos = add_eos
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else None
        if pad is None:
            pad = tokenizer.eos_token_id
        if pad is None:
            raise ValueError("PreferenceCollator: the tokenizer has neither a pad nor an eos token")
        self.pad_id = pad

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate rows into tensors (see the class docstring)."""
        if not rows:
            raise ValueError("PreferenceCollator: no rows to collate (an empty batch)")
        groups = []
        for i, row in enumerate(rows):
            prompt, responses, rewards = group_rows(row, f"row {i}")
            prompt_ids = self.encode(prompt)
            bos = self.tokenizer.bos_token_id
            if bos is not None and (not prompt_ids or prompt_ids[0] != bos):
                prompt_ids = [bos, *prompt_ids]
            eos = [self.tokenizer.eos_token_id] if self.add_eos else []
            groups.append((prompt_ids, [self.encode(r) + eos for r in responses], rewards))
        ref = [row.get("ref_logps") for row in rows]
        batch = collate_ids(
            groups, self.pad_id, self.max_length, ref if all(r is not None for r in ref) else None
        )
        return {k: torch.from_numpy(v) for k, v in batch.items()}


def batch_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (B, n) and response lengths (B, n) of a collated batch.

    The (B, n, T) batch is run as B·n sequences; prompt and padding tokens carry label
    -100 and count for nothing (see [`prefopt.causal_lm_logps`][prefopt.causal_lm_logps]).

    Args:
        model: A causal LM returning ``logits``.
        batch: A batch from
            [`PreferenceCollator`][prefopt.integrations.transformers.PreferenceCollator].

    Returns:
        ``(logps, lengths)``, each (B, n).
    """
    B, n, T = batch["input_ids"].shape
    logits = model(
        input_ids=batch["input_ids"].reshape(B * n, T),
        attention_mask=batch["attention_mask"].reshape(B * n, T),
    ).logits
    logps, lengths = prefopt.causal_lm_logps(logits, batch["labels"].reshape(B * n, T))
    return logps.reshape(B, n), lengths.reshape(B, n)


def loss_and_metrics(
    model: Any,
    batch: dict[str, torch.Tensor],
    *,
    ref_model: Any = None,
    loss: str = "mpo",
    pairs: str = "all",
    **options: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """The training loss of a collated batch, its metrics, and the policy log-probs.

    The reference log-probs come from ``batch["ref_logps"]`` when present, else from
    ``ref_model`` (without gradient), else none; a reference-free loss never gets them.
    The loss is [`prefopt.batch_loss`][prefopt.batch_loss], the metrics those of
    [`group_metrics`][prefopt.metrics.group_metrics] (no gradient). The PyTorch twin of
    ``prefopt.integrations.jax.loss_and_metrics``; ``PreferenceTrainer`` and
    ``prefopt train`` both use it.

    Args:
        model: The policy, a causal LM returning ``logits``.
        batch: A batch from
            [`PreferenceCollator`][prefopt.integrations.transformers.PreferenceCollator].
        ref_model: The frozen reference model, or ``None``.
        loss: A registered loss name. Default ``"mpo"``.
        pairs: ``"all"`` (default) or ``"best_worst"``, for pairwise losses.
        **options: Options of the loss (``beta``...).

    Returns:
        ``(loss, metrics, logps)``: a 0-d tensor, a dict of 0-d tensors, and the (B, n)
        policy log-probs.
    """
    logps, lengths = batch_logps(model, batch)
    ref = None
    if spec(loss, "loss_and_metrics").reference != "none":
        ref = batch.get("ref_logps")
        if ref is None and ref_model is not None:
            with torch.no_grad():
                ref, _ = batch_logps(ref_model, batch)
    value, metrics = group_loss_and_metrics(
        loss, logps, ref, batch, lengths, pairs=pairs, options=options
    )
    return value, metrics, logps


class PreferenceTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains on group or pair rows with any registered loss.

    Use it with [`PreferenceCollator`][prefopt.integrations.transformers.PreferenceCollator]
    and ``TrainingArguments(remove_unused_columns=False)``. The reference log-probs come
    from the batch's ``ref_logps`` column when present, else from ``ref_model`` (frozen,
    evaluated without gradient), else none (reference-free). The logged metrics are those
    of [`prefopt.metrics.group_metrics`][prefopt.metrics.group_metrics] plus the loss,
    averaged over the steps between two logs.

    Args:
        *args: As for ``transformers.Trainer``.
        ref_model: The frozen reference model, or ``None``.
        loss: A registered loss name. Default ``"mpo"``.
        loss_options: Options of the loss, e.g. ``{"beta": 0.1, "alpha": 1.0}``.
        pairs: For pairwise losses on groups: ``"all"`` (default) or ``"best_worst"``.
        **kwargs: As for ``transformers.Trainer``.
    """

    # compute_loss returns a per-batch mean: the Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        ref_model: Any = None,
        loss: str = "mpo",
        loss_options: dict[str, Any] | None = None,
        pairs: str = "all",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        # an unknown loss or an option it does not take fails here, not at step 1
        spec(loss, "PreferenceTrainer").options(loss_options, fn="PreferenceTrainer")
        self.loss_name, self.loss_options, self.pairs = loss, dict(loss_options or {}), pairs
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
            self.ref_model = ref_model.to(self.args.device)
        self._metrics: dict[str, list[float]] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The loss of a collated batch (``loss_and_metrics``); records the metrics."""
        loss, metrics, logps = loss_and_metrics(
            model,
            inputs,
            ref_model=self.ref_model,
            loss=self.loss_name,
            pairs=self.pairs,
            **self.loss_options,
        )
        for key, value in metrics.items():
            self._metrics.setdefault(key, []).append(float(value))
        return (loss, {"logps": logps}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the averaged metrics since the last log, then log as the Trainer does."""
        for key, values in self._metrics.items():
            logs[key] = sum(values) / len(values)
        self._metrics = {}
        super().log(logs, *args, **kwargs)


@torch.no_grad()
def precompute_ref_logps(
    model: Any, rows: Iterable[dict[str, Any]], collator: PreferenceCollator, batch_size: int = 8
) -> list[dict[str, Any]]:
    """Rows with a ``ref_logps`` column: the reference model's log-prob of each response.

    Run once before training, this frees the reference model's memory and forward pass
    during training. The values are those ``batch_logps`` computes, so training with the
    column equals training with the model.

    Args:
        model: The reference model.
        rows: Group or pair rows.
        collator: The collator that training uses (same tokenisation).
        batch_size: Rows per forward pass. Default 8.

    Returns:
        New row dicts, each with ``ref_logps``: a list with one float per response.
    """
    rows = list(rows)
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = [
            {k: v for k, v in r.items() if k != "ref_logps"}
            for r in rows[start : start + batch_size]
        ]
        batch = collator(chunk)
        device = next(model.parameters()).device
        logps, _ = batch_logps(model, {k: v.to(device) for k, v in batch.items()})
        for row, values, valid in zip(chunk, logps.cpu(), batch["mask"]):
            out.append({**row, "ref_logps": [float(v) for v in values[valid]]})
    return out
