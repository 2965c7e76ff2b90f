"""A collated batch through a Hugging Face model: log-probs, the reference, the training step.

One way through a step, for
[`PreferenceTrainer`][prefopt.integrations.transformers.PreferenceTrainer],
[`precompute_ref_logps`][prefopt.integrations.transformers.precompute_ref_logps] and
``prefopt train`` alike: [`batch_logps`][prefopt.integrations.transformers.batch_logps] runs the
model once per batch (the group layout the collator packed, the shared attention, the fused
output layer), [`reference_logps`][prefopt.integrations.transformers.reference_logps] finds the
reference, [`loss_and_metrics`][prefopt.integrations.transformers.loss_and_metrics] sums the
losses and computes the metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

import prefopt
from prefopt.backends.torch import fused_linear_logps
from prefopt.integrations import warn_once
from prefopt.integrations.attention import servable, use_group_attention
from prefopt.integrations.data import IGNORE
from prefopt.integrations.loss import group_loss_and_metrics
from prefopt.layout import PackedGroups, pack_groups
from prefopt.losses.registry import spec

__all__ = ["batch_logps", "loss_and_metrics", "precompute_ref_logps", "reference_logps"]

# Rows per output-layer chunk: about 8M logits (32 MiB in float32), and at least 256 rows,
# below which a GPU matmul of (rows, H) x (H, V) runs far from its speed.
_FUSED_ELEMENTS, _FUSED_ROWS = 2**23, 256
_SOFTCAPS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def batch_logps(
    model: Any,
    batch: dict[str, torch.Tensor],
    *,
    share_prefix: bool = True,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (B, n) and response lengths (B, n) of a collated batch.

    Prompt and padding tokens carry label -100 and count for nothing. The model is called
    once, as it is, through its own forward: accelerate's autocast, DDP, FSDP and PEFT
    wrappers and hooks run, and the model keeps them.

    - ``share_prefix=True`` (default): each group runs as **one** packed sequence, its
      prompt once and every response after it, positions restarting after the prompt
      ([`group_layout`][prefopt.layout.group_layout], packed by the collator:
      [`pack_groups`][prefopt.layout.pack_groups]). Attention is shared at the
      attention level ([`group_attention`][prefopt.integrations.attention.group_attention]):
      no (L, L) mask exists. Each response's log-prob is that of its own sequence (tested to
      1e-5 relative in float32, 1e-10 in float64, values and gradients). The first shared
      call sets the model's attention implementation ``X`` (``sdpa``, ``eager``,
      ``flash_attention_2/3``) to ``prefopt_group_X``, which runs ``X`` unchanged for every
      other call. A model the shared attention cannot serve (another implementation, logit
      soft-capping in attention, a sliding window shorter than a sequence), groups whose
      responses were cut to different prompts, and empty prompts run unshared, with one
      warning.
    - ``fused=True`` (default): no logits tensor. Only the positions that predict a
      response token go through the output layer, in chunks of about 8M logits (at least
      256 rows), recomputed in backward, with
      [`fused_linear_logps`][prefopt.backends.torch.fused_linear_logps], in the compute
      dtype (the model's, or its autocast's); tied embeddings work. A model that changes
      its logits after the output layer (a final soft-cap, a logit scale) is refused: pass
      ``fused=False``. An output layer that is not a plain ``Linear`` (an adapter on it, a
      quantised layer) runs unfused, with one warning.

    With a batch from the collator (which packs on the host), the step reads no value back
    from the device.

    Args:
        model: A Hugging Face causal LM (or a DDP/PEFT wrapper of one).
        batch: A batch from
            [`PreferenceCollator`][prefopt.integrations.transformers.PreferenceCollator].
        share_prefix: Compute each prompt once per group. Default ``True``.
        fused: Compute log-probs without the logits tensor. Default ``True``.

    Returns:
        ``(logps, lengths)``, each (B, n): float32 (float64 for a float64 model).
    """
    ids, labels, attention = batch["input_ids"], batch["labels"], batch["attention_mask"]
    B, n, T = ids.shape
    is_label = labels != IGNORE
    lengths = is_label.sum(-1)  # (B, n)
    inner = _causal_lm(model)
    fused = fused and _check_fused(inner)
    packed = _packed(inner, batch) if share_prefix else None
    if packed is None:
        rows, cols = is_label.reshape(B * n, T)[:, 1:].nonzero(as_tuple=True)
        inputs = {
            "input_ids": ids.reshape(B * n, T),
            "attention_mask": attention.reshape(B * n, T),
        }
        owner, targets = rows, labels.reshape(B * n, T)[rows, cols + 1]
    else:
        inputs = {
            "input_ids": packed.ids,
            # a 4D mask is taken as it is: no (L, L) mask is built; the group says who attends
            "attention_mask": torch.ones(B, 1, 1, 1, dtype=torch.bool, device=ids.device),
            "position_ids": packed.positions,
            "prefopt_group": packed.attention,
        }
        rows, cols, owner, targets = packed.rows, packed.cols, packed.owner, packed.targets
    token = _token_logps(model, inner, inputs, rows, cols, targets, fused)
    # one slot more: a token padded by pack_groups(pad_to_multiple_of=...) belongs to B n
    logps = torch.zeros(B * n + 1, dtype=token.dtype, device=token.device)
    logps = logps.index_add(0, owner, token)[: B * n]
    return logps.reshape(B, n), lengths.to(token.dtype)


def _causal_lm(model: Any) -> Any:
    """The Hugging Face causal LM inside DDP/accelerate and PEFT wrappers."""
    model = _unwrap(model)
    if hasattr(model, "get_base_model"):  # a PEFT model: the adapters live inside it
        model = model.get_base_model()
    return model


def _unwrap(model: Any) -> Any:
    """The model inside DDP/accelerate wrappers (a PEFT model stays one)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DistributedDataParallel
    return model


def _check_fused(inner: Any) -> bool:
    """Whether the output layer can be fused; raise for logits changed after it."""
    if not (hasattr(inner, "get_decoder") and hasattr(inner, "get_output_embeddings")):
        return False
    head = inner.get_output_embeddings()
    if head is None:
        return False
    if type(head).forward is not torch.nn.Linear.forward:  # an adapter, a quantised layer
        warn_once(
            f"batch_logps(fused=True): the output layer is a {type(head).__name__}, not a "
            "plain Linear, so its log-probs are computed from the full logits (fused=False)"
        )
        return False
    config = getattr(inner, "config", None)
    for name in _SOFTCAPS:
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 1.0:
            raise ValueError(
                f"batch_logps(fused=True): this model changes its logits after the output "
                f"layer (config.{name}={value}), which fused log-probs do not reproduce; "
                "pass fused=False (share_prefix still applies)"
            )
    return True


def _packed(inner: Any, batch: dict[str, Any]) -> PackedGroups | None:
    """The batch's group layout (packed by the collator, or now), or ``None`` for unshared."""
    packed = batch["packed"] if "packed" in batch else pack_groups(batch)
    if packed is None:
        return None
    packed = packed.to(batch["input_ids"].device)  # a no-op where the batch moved whole
    # the last dimension of the mask (P + R, or L) bounds how far a query sees back
    why = servable(inner, packed.attention.allowed.shape[-1]) or use_group_attention(inner)
    if why is not None:
        warn_once(f"batch_logps: the shared group attention cannot serve this model ({why}), "
                   "so groups run unshared")  # fmt: skip
        return None
    return packed


def _token_logps(model, inner, inputs, rows, cols, targets, fused) -> torch.Tensor:
    """Log-probs of ``targets`` predicted at (``rows``, ``cols``) of the model's outputs.

    The model is called as it is, through its own forward (accelerate's autocast, DDP,
    FSDP and PEFT wrappers all run). Fused, two hooks on the output layer, removed after
    the call, give it no position to compute and return the log-probs instead: the
    pre-hook takes the hidden states of the positions that predict a response token, the
    hook computes their log-probs with the layer's own weight, inside the call (so under
    its autocast, and before FSDP's hook reshards that weight).
    """
    if not fused:
        logits = model(**inputs, use_cache=False).logits
        return prefopt.token_logps(logits[rows, cols], targets)
    head = inner.get_output_embeddings()
    chunk = max(_FUSED_ROWS, _FUSED_ELEMENTS // head.weight.shape[0])
    taken = []

    def take(module, args):
        taken.append(args[0][rows, cols])
        return (args[0][:, :0], *args[1:])  # no position goes through the layer itself

    def logps(module, args, output):
        w, b = module.weight, module.bias
        return fused_linear_logps(taken.pop(), w, targets, bias=b, chunk_size=chunk)

    hooks = [head.register_forward_pre_hook(take), head.register_forward_hook(logps, prepend=True)]
    try:
        # the model returns what its output layer returned, in the field it calls logits
        token_logps = model(**inputs, use_cache=False).logits  # (N,) log-probs
        return token_logps
    finally:
        for hook in hooks:
            hook.remove()


def reference_logps(
    batch: dict[str, torch.Tensor],
    *,
    ref_model: Any = None,
    policy: Any = None,
    share_prefix: bool = True,
    fused: bool = True,
) -> torch.Tensor | None:
    """The batch's reference log-probs (B, n), without gradient, or ``None``.

    In this order: the batch's ``ref_logps`` column (precomputed); ``ref_model``'s
    log-probs; for a PEFT ``policy``, its base model's (the adapter disabled for the call);
    else ``None``. The one place where prefopt finds a reference: the trainer, the
    precomputation and ``prefopt train`` call it.

    Args:
        batch: A collated batch (its group layout serves the reference forward too).
        ref_model: The frozen reference model, or ``None``.
        policy: The policy, whose PEFT base is the reference when ``ref_model`` is ``None``.
        share_prefix: As for ``batch_logps``. Default ``True``.
        fused: As for ``batch_logps``. Default ``True``.

    Returns:
        (B, n) log-probs, or ``None`` when no reference can be had.
    """
    if "ref_logps" in batch:
        return batch["ref_logps"]
    how = {"share_prefix": share_prefix, "fused": fused}
    with torch.no_grad():
        if ref_model is not None:
            return batch_logps(ref_model, batch, **how)[0]
        peft = _unwrap(policy) if policy is not None else None
        if peft is not None and _is_peft(peft):
            with peft.disable_adapter():
                return batch_logps(policy, batch, **how)[0]
    return None


def _is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def loss_and_metrics(
    model: Any,
    batch: dict[str, torch.Tensor],
    *,
    ref_model: Any = None,
    loss: str | Sequence[tuple[str, float, dict[str, Any]]] = "mpo",
    pairs: str = "all",
    reference_free: bool = False,
    share_prefix: bool = True,
    fused: bool = True,
    **options: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    r"""The training loss of a collated batch, its metrics, and the policy log-probs.

    The training step of prefopt, written once: ``PreferenceTrainer.compute_loss`` and
    ``prefopt train`` call it. The loss is $\sum_k w_k L_k$ over the losses, each
    [`prefopt.batch_loss`][prefopt.batch_loss] (the mean over all groups, so gradient
    accumulation and data parallelism are exact); the reference comes from
    [`reference_logps`][prefopt.integrations.transformers.reference_logps] when some loss
    takes one and ``reference_free`` is off; the metrics are those of
    [`group_metrics`][prefopt.metrics.group_metrics] (no gradient) with the first loss's
    beta. The PyTorch twin of ``prefopt.integrations.jax.loss_and_metrics``.

    Args:
        model: The policy, a causal LM.
        batch: A batch from
            [`PreferenceCollator`][prefopt.integrations.transformers.PreferenceCollator].
        ref_model: The frozen reference model, or ``None``.
        loss: A registered loss name (its options as keyword arguments), or
            ``(name, weight, options)`` triples summed with their weights. Default ``"mpo"``.
        pairs: ``"all"`` (default) or ``"best_worst"``, for pairwise losses.
        reference_free: No reference even for a loss that takes one. Default ``False``.
        share_prefix: As for ``batch_logps``. Default ``True``.
        fused: As for ``batch_logps``. Default ``True``.
        **options: Options of the loss (``beta``...), with a loss name.

    Returns:
        ``(loss, metrics, logps)``: a 0-d tensor, a dict of 0-d tensors, and the (B, n)
        policy log-probs.
    """
    if isinstance(loss, str):
        losses = [(loss, 1.0, options)]
    elif options:
        raise TypeError(
            "loss_and_metrics: with a list of losses, give each its options in its triple; "
            f"got keyword options {sorted(options)}"
        )
    else:
        losses = list(loss)
    how = {"share_prefix": share_prefix, "fused": fused}
    logps, lengths = batch_logps(model, batch, **how)
    takes = any(spec(name, "loss_and_metrics").reference != "none" for name, _, _ in losses)
    ref = None
    if takes and not reference_free:
        ref = reference_logps(batch, ref_model=ref_model, policy=model, **how)
    total, metrics = None, None
    for name, weight, opts in losses:
        value, found = group_loss_and_metrics(
            name, logps, ref, batch, lengths, pairs=pairs, options=opts, with_metrics=total is None
        )
        total = weight * value if total is None else total + weight * value
        metrics = metrics or found  # the first loss's: the metrics use its beta
    return total, metrics, logps


@torch.no_grad()
def precompute_ref_logps(
    ref_model: Any,
    rows: Iterable[dict[str, Any]],
    collator: Any,
    batch_size: int = 8,
    *,
    model: Any = None,
    share_prefix: bool = True,
    fused: bool = True,
) -> list[dict[str, Any]]:
    """Rows with a ``ref_logps`` column: the reference model's log-prob of each response.

    Run once before training, this frees the reference model's memory and forward pass
    during training. The values are those
    [`reference_logps`][prefopt.integrations.transformers.reference_logps] computes in
    training, so training with the column equals training with the model. Run it under the
    training's autocast to get its precision (``PreferenceTrainer`` does).

    Args:
        ref_model: The reference model, or ``None`` with a PEFT ``model`` (its base, with
            the adapter disabled, is the reference).
        rows: Rows the collator takes (raw or tokenised).
        collator: The
            [`PreferenceCollator`][prefopt.integrations.transformers.PreferenceCollator]
            that training uses (same tokenisation and truncation).
        batch_size: Rows per forward pass. Default 8.
        model: The PEFT policy, when ``ref_model`` is ``None``.
        share_prefix: As for ``batch_logps``. Default ``True``.
        fused: As for ``batch_logps``. Default ``True``.

    Returns:
        New row dicts, each with ``ref_logps``: a list with one float per response.
    """
    rows = [{k: v for k, v in r.items() if k != "ref_logps"} for r in rows]
    runner = ref_model if ref_model is not None else model
    was_training = runner.training
    runner.eval()
    device = next(runner.parameters()).device
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collator(chunk).items()}
        logps = reference_logps(
            batch, ref_model=ref_model, policy=model, share_prefix=share_prefix, fused=fused
        )
        for row, values, valid in zip(chunk, logps.cpu(), batch["mask"].cpu()):
            out.append({**row, "ref_logps": [float(v) for v in values[valid]]})
    runner.train(was_training)
    return out
