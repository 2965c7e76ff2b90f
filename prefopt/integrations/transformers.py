"""Hugging Face ``transformers`` integration: a TRL-compatible ``Trainer``.

[`PreferenceTrainer`][prefopt.integrations.transformers.PreferenceTrainer] is built like
TRL's ``DPOTrainer`` (a model or a path, ``ref_model``, ``args``, the datasets, a
``processing_class``, a ``peft_config``) and takes TRL's data formats: pair rows
``{"prompt", "chosen", "rejected"}`` (explicit or implicit prompt, standard or
conversational), plus prefopt's **group** rows ``{"prompt", "responses": [...],
"rewards": [...]}`` with any number of responses per prompt. ``args`` is a
[`PreferenceConfig`][prefopt.integrations.transformers.PreferenceConfig] or a TRL
``DPOConfig``, read by [`trainer_settings`][prefopt.integrations.transformers.trainer_settings].
Prompt tokens and padding never count in a log-prob.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import transformers

import prefopt
import prefopt.layout
from prefopt.backends.torch import fused_linear_logps
from prefopt.integrations.attention import GroupAttention, servable, use_group_attention
from prefopt.integrations.data import (
    IGNORE,
    Truncation,
    _warn_once,
    collate_ids,
    group_loss_and_metrics,
    tokenize_row,
)
from prefopt.losses.inputs import check_options
from prefopt.losses.registry import spec

__all__ = [
    "PreferenceCollator",
    "PreferenceConfig",
    "PreferenceTrainer",
    "TrainerSettings",
    "batch_logps",
    "disable_dropout",
    "loss_and_metrics",
    "precompute_ref_logps",
    "trainer_settings",
]

COLUMNS = ["prompt_ids", "response_ids", "rewards", "ref_logps"]


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
    (B, n) bool, and ``ref_logps`` (B, n) float32 when every row has that column.
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

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate rows into tensors (see the class docstring)."""
        if not rows:
            raise ValueError("PreferenceCollator: no rows to collate (an empty batch)")
        rows = [self.tokenize(row, f"row {i}") for i, row in enumerate(rows)]
        groups = [(r["prompt_ids"], r["response_ids"], r["rewards"]) for r in rows]
        ref = [row.get("ref_logps") for row in rows]
        batch = collate_ids(
            groups,
            self.pad_id,
            self.truncation,
            ref if all(r is not None for r in ref) else None,
        )
        return {k: torch.from_numpy(v) for k, v in batch.items()}


def batch_logps(
    model: Any,
    batch: dict[str, torch.Tensor],
    *,
    share_prefix: bool = True,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (B, n) and response lengths (B, n) of a collated batch.

    Prompt and padding tokens carry label -100 and count for nothing.

    - ``share_prefix=True`` (default): each group runs as **one** packed sequence, its
      prompt once and every response after it, with a block-causal attention mask and
      positions that restart after the prompt ([`group_layout`][prefopt.layout.group_layout]):
      the prompt's forward is computed once instead of n times, and each response's
      log-prob is that of its own sequence (tested to 1e-5 relative in float32, 1e-10 in
      float64, values and gradients). It needs the ``sdpa`` or ``eager`` attention of a
      Hugging Face model (4D masks); other attention implementations, groups whose
      responses were cut to different prompts, and empty prompts run unshared.
    - ``fused=True`` (default): no logits tensor. Only the positions that predict a
      response token go through the output layer, in chunks of about 8M logits, with
      [`fused_linear_logps`][prefopt.backends.torch.fused_linear_logps]; tied embeddings
      work. A model that changes its logits after the output layer (a final soft-cap, a
      logit scale) is refused with ``fused=True``: pass ``fused=False``.

    Both run inside the model's own forward call, so DDP, FSDP and PEFT wrappers see a
    normal forward.

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
    shared = _shared_layout(inner, ids, is_label, attention, lengths) if share_prefix else None
    if shared is None:
        rows, cols = is_label.reshape(B * n, T)[:, 1:].nonzero(as_tuple=True)
        inputs = {
            "input_ids": ids.reshape(B * n, T),
            "attention_mask": attention.reshape(B * n, T),
        }
        owner, targets = rows, labels.reshape(B * n, T)[rows, cols + 1]
    else:
        layout, prompt_lengths, response_lengths = shared
        b_idx = torch.arange(B, device=ids.device)[:, None]
        packed = ids[b_idx, layout.response, layout.column]
        index = prefopt.layout.response_attention(layout, prompt_lengths, response_lengths)
        inputs = {
            "input_ids": packed,
            # a 4D mask is taken as it is: no (L, L) mask is built; the group says who attends
            "attention_mask": torch.ones(B, 1, 1, 1, dtype=torch.bool, device=ids.device),
            "position_ids": layout.positions,
            "prefopt_group": GroupAttention(index),
        }
        g, i, k = layout.label_mask.nonzero(as_tuple=True)
        rows, cols = g, layout.label_positions[g, i, k]
        prompt = (is_label.long().argmax(-1))[g, i]  # where each response starts in its row
        owner, targets = g * n + i, ids[g, i, prompt + k]
    token = _token_logps(model, inner, inputs, rows, cols, targets, fused)
    logps = torch.zeros(B * n, dtype=token.dtype, device=token.device).index_add(0, owner, token)
    return logps.reshape(B, n), lengths.to(token.dtype)


# Rows per output-layer chunk: about 8M logits (32 MiB in float32) whatever the vocabulary.
_CHUNK_ELEMENTS = 2**23
_SOFTCAPS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def _causal_lm(model: Any) -> Any:
    """The Hugging Face causal LM inside DDP/accelerate and PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DistributedDataParallel
    if hasattr(model, "get_base_model"):  # a PEFT model: the adapters live inside it
        model = model.get_base_model()
    return model


def _check_fused(inner: Any) -> bool:
    """Whether the output layer can be fused; raise for logits changed after it."""
    if not (hasattr(inner, "get_decoder") and hasattr(inner, "get_output_embeddings")):
        return False
    head = inner.get_output_embeddings()
    if head is None:
        return False
    if type(head).forward is not torch.nn.Linear.forward:  # an adapter, a quantised layer
        _warn_once(
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


def _shared_layout(inner, ids, is_label, attention, lengths):
    """The packed layout of the batch's groups, or ``None`` when they cannot share."""
    why = servable(inner, int((is_label.long().argmax(-1) + lengths).max()))
    if why is None:
        why = use_group_attention(inner)
    if why is not None:
        _warn_once(f"batch_logps: the shared group attention cannot serve this model ({why}), "
                   "so groups run unshared")  # fmt: skip
        return None
    T = ids.shape[-1]
    starts = is_label.long().argmax(-1)  # (B, n): prompt length of each response's row
    real = lengths > 0
    prompt = starts[:, 0]  # response 0 of a group is always real (the collator fills first)
    columns = torch.arange(T, device=ids.device)
    in_prompt = columns < prompt[:, None, None]
    in_sequence = columns < (starts + lengths)[..., None]
    same = (ids == ids[:, :1]) | ~in_prompt
    if not (
        bool(real[:, 0].all())
        and bool((prompt >= 1).all())
        and bool(((starts == prompt[:, None]) | ~real).all())
        and bool((same | ~real[..., None]).all())
        and bool(((attention == 1) | ~in_sequence | ~real[..., None]).all())
    ):
        return None
    return prefopt.layout.group_layout(prompt, lengths * real), prompt, lengths * real


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
    chunk = max(1, _CHUNK_ELEMENTS // head.weight.shape[0])
    taken = []

    def take(module, args):
        taken.append(args[0][rows, cols])
        return (args[0][:, :0], *args[1:])  # no position goes through the layer itself

    def logps(module, args, output):
        hidden = taken.pop()
        return fused_linear_logps(
            hidden, module.weight, targets, bias=module.bias, chunk_size=chunk
        )

    hooks = [head.register_forward_pre_hook(take), head.register_forward_hook(logps, prepend=True)]
    try:
        return model(**inputs, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()


def loss_and_metrics(
    model: Any,
    batch: dict[str, torch.Tensor],
    *,
    ref_model: Any = None,
    loss: str = "mpo",
    pairs: str = "all",
    share_prefix: bool = True,
    fused: bool = True,
    **options: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """The training loss of a collated batch, its metrics, and the policy log-probs.

    The reference log-probs come from ``batch["ref_logps"]`` when present, else from
    ``ref_model`` (without gradient), else none; a reference-free loss never gets them.
    The loss is [`prefopt.batch_loss`][prefopt.batch_loss], the metrics those of
    [`group_metrics`][prefopt.metrics.group_metrics] (no gradient). The PyTorch twin of
    ``prefopt.integrations.jax.loss_and_metrics``.

    Args:
        model: The policy, a causal LM returning ``logits``.
        batch: A batch from
            [`PreferenceCollator`][prefopt.integrations.transformers.PreferenceCollator].
        ref_model: The frozen reference model, or ``None``.
        loss: A registered loss name. Default ``"mpo"``.
        pairs: ``"all"`` (default) or ``"best_worst"``, for pairwise losses.
        share_prefix: As for ``batch_logps``. Default ``True``.
        fused: As for ``batch_logps``. Default ``True``.
        **options: Options of the loss (``beta``...).

    Returns:
        ``(loss, metrics, logps)``: a 0-d tensor, a dict of 0-d tensors, and the (B, n)
        policy log-probs.
    """
    how = {"share_prefix": share_prefix, "fused": fused}
    logps, lengths = batch_logps(model, batch, **how)
    ref = None
    if spec(loss, "loss_and_metrics").reference != "none":
        ref = batch.get("ref_logps")
        if ref is None and ref_model is not None:
            with torch.no_grad():
                ref, _ = batch_logps(ref_model, batch, **how)
    value, metrics = group_loss_and_metrics(
        loss, logps, ref, batch, lengths, pairs=pairs, options=options
    )
    return value, metrics, logps


# ---- configuration ------------------------------------------------------------------------


@dataclasses.dataclass
class PreferenceConfig(transformers.TrainingArguments):
    """``TrainingArguments`` plus the loss, the data limits and the reference settings.

    The names follow TRL's ``DPOConfig`` where TRL has the setting; a ``DPOConfig`` may be
    passed instead (see [`trainer_settings`][prefopt.integrations.transformers.trainer_settings]).

    Attributes:
        loss_type: A registered loss name, or a list of them summed with ``loss_weights``.
            Default ``"mpo"``.
        loss_weights: One weight per loss of ``loss_type``. Default ``None``: all 1.
        beta: The losses' beta. Default ``None``: each loss's own default (0.1; SimPO 2.0).
        loss_options: Other options by name, e.g. ``{"alpha": 1.0}`` for MPO; each loss of
            the list gets those it takes. Default ``None``.
        pairs: For pairwise losses on group rows: ``"all"`` (every chosen/rejected pair of
            the mean split, default) or ``"best_worst"``.
        reference_free: Train without a reference even though the loss takes one.
            Default ``False``: a frozen copy of the policy when no ``ref_model`` is given.
        max_length: Most tokens of prompt + response. Default 1024, as TRL.
        max_prompt_length: Most prompt tokens; the prompt keeps its end. Default ``None``.
        max_completion_length: Most response tokens; a response keeps its start.
            Default ``None``.
        truncation_mode: ``"keep_start"`` (default, TRL's) or ``"keep_end"``, for
            ``max_length``.
        disable_dropout: Turn dropout off in policy and reference. Default ``True``, as TRL.
        precompute_ref_log_probs: Compute the reference log-probs of the datasets once
            before training and free the reference model. Default ``False``.
        precompute_ref_batch_size: Rows per reference forward when precomputing.
            Default ``None``: ``per_device_train_batch_size``.
        model_init_kwargs: Keyword arguments of ``from_pretrained`` when ``model`` is a
            path. Default ``None``.
        share_prefix: Run each group's prompt once (see
            [`batch_logps`][prefopt.integrations.transformers.batch_logps]). Default ``True``.
        fused: Log-probs without the logits tensor. Default ``True``.
        remove_unused_columns: Default ``False`` (the rows' columns are prefopt's own).
    """

    loss_type: str | list[str] = "mpo"
    loss_weights: list[float] | None = None
    beta: float | None = None
    loss_options: dict[str, Any] | None = None
    pairs: str = "all"
    reference_free: bool = False
    max_length: int | None = 1024
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    truncation_mode: str = "keep_start"
    disable_dropout: bool = True
    precompute_ref_log_probs: bool = False
    precompute_ref_batch_size: int | None = None
    model_init_kwargs: dict[str, Any] | None = None
    share_prefix: bool = True
    fused: bool = True
    remove_unused_columns: bool = False


@dataclasses.dataclass(frozen=True)
class TrainerSettings:
    """What a ``PreferenceTrainer`` reads from its ``args``, checked.

    Attributes:
        losses: ``(name, weight, options)`` per loss; options complete (defaults filled in).
        pairs: ``"all"`` or ``"best_worst"``.
        reference_free: No reference even for a loss that takes one.
        truncation: The data limits.
        disable_dropout: Turn dropout off.
        precompute: Precompute the reference log-probs.
        precompute_batch_size: Rows per reference forward when precomputing, or ``None``.
        model_init_kwargs: For ``from_pretrained``.
        logps_options: ``share_prefix`` and ``fused`` for
            [`batch_logps`][prefopt.integrations.transformers.batch_logps].
    """

    losses: tuple[tuple[str, float, dict[str, Any]], ...]
    pairs: str = "all"
    reference_free: bool = False
    truncation: Truncation = Truncation()
    disable_dropout: bool = True
    precompute: bool = False
    precompute_batch_size: int | None = None
    model_init_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    logps_options: dict[str, bool] = dataclasses.field(default_factory=dict)

    @property
    def specs(self):
        """The [`LossSpec`][prefopt.losses.registry.LossSpec] of each loss."""
        return [spec(name) for name, _, _ in self.losses]

    @property
    def takes_reference(self) -> bool:
        """Whether some loss takes a reference and ``reference_free`` is off."""
        return not self.reference_free and any(s.reference != "none" for s in self.specs)


# TRL DPOConfig fields -> prefopt option names, and the losses TRL gives them to.
_TRL_OPTIONS = {
    "label_smoothing": ("label_smoothing", {"robust", "exo_pair", "aot", "aot_unpaired"}),
    "f_divergence_type": (
        "f_divergence",
        {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"},
    ),
    "f_alpha_divergence_coef": ("f_alpha", None),  # with f_divergence, where it is taken
    "discopop_tau": ("tau", {"discopop"}),
}
# DPOConfig fields prefopt does not implement: refused when set to anything but these.
_TRL_UNSUPPORTED = {
    "ld_alpha": None,
    "use_weighting": False,
    "sync_ref_model": False,
    "padding_free": False,
    "activation_offloading": False,
    "router_aux_loss_coef": None,
    "pad_token": None,
    "use_liger_kernel": False,
}


def _is_trl_config(args: Any) -> bool:
    return type(args).__name__ == "DPOConfig" and hasattr(args, "f_divergence_type")


def trainer_settings(args: Any) -> TrainerSettings:
    """The loss, data and reference settings of ``args``, checked before any step.

    ``args`` is a [`PreferenceConfig`][prefopt.integrations.transformers.PreferenceConfig],
    a TRL ``DPOConfig`` or plain ``TrainingArguments`` (MPO with its defaults). A
    ``DPOConfig`` maps by name and gives TRL's loss: ``loss_type``, ``loss_weights``,
    ``beta``, ``label_smoothing`` (to ``robust``, ``exo_pair``, ``aot``,
    ``aot_unpaired``: TRL 1.16's ``sigmoid`` ignores it, so prefopt's cDPO smoothing is
    not applied and a warning says so), ``f_divergence_type`` and
    ``f_alpha_divergence_coef``, ``discopop_tau``, ``max_length``, ``truncation_mode``,
    ``disable_dropout``, ``precompute_ref_log_probs``, ``precompute_ref_batch_size``,
    ``model_init_kwargs``. A ``DPOConfig`` field prefopt does not implement (``ld_alpha``,
    ``use_weighting``, ``sync_ref_model``, ``padding_free``, ...) raises when set.

    Args:
        args: The trainer's ``args``.

    Returns:
        A [`TrainerSettings`][prefopt.integrations.transformers.TrainerSettings].

    Raises:
        ValueError: An unknown loss, a loss no trainer data can feed (``kto``), a bad
            value, mismatched ``loss_weights``, or an unsupported ``DPOConfig`` field.
        TypeError: An option that no loss of the list takes.
    """
    where = "PreferenceTrainer"
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    names = get("loss_type", "mpo")
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError(f"{where}: loss_type is empty; give a loss name or a list of them")
    weights = get("loss_weights") or [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(
            f"{where}: loss_weights needs one weight per loss of loss_type ({len(names)}: "
            f"{names}); got {len(weights)}"
        )
    trl = _is_trl_config(args)
    if trl:
        for field, unset in _TRL_UNSUPPORTED.items():
            if get(field, unset) != unset:
                raise ValueError(
                    f"{where}: DPOConfig.{field}={get(field)!r} is not supported by prefopt; "
                    f"leave it at {unset!r} (see the 'Coming from TRL' docs page)"
                )
        if "sft" in names:
            raise ValueError(
                f"{where}: DPOConfig loss_type 'sft' is not supported by prefopt; "
                "see the 'Coming from TRL' docs page"
            )
    found = [spec(name, f"{where}: loss_type") for name in names]
    for s in found:
        if s.layout == "unpaired":
            raise ValueError(
                f"{where}: loss {s.name!r} needs unpaired data (single responses marked "
                "desirable); the trainer's rows are pairs and groups. Use prefopt.kto_loss "
                "in your own loop"
            )
    losses = []
    for name, weight, s in zip(names, weights, found):
        given = {}
        if trl:
            given["beta"] = args.beta
            for field, (option, takers) in _TRL_OPTIONS.items():
                if option not in s.defaults:
                    continue
                if takers is None or name in takers:
                    given[option] = get(field)
            if "f_divergence" in s.defaults and name not in _TRL_OPTIONS["f_divergence_type"][1]:
                if get("f_divergence_type") != "reverse_kl":
                    raise ValueError(
                        f"{where}: f_divergence_type={get('f_divergence_type')!r} is not "
                        f"supported for loss {name!r} (as in TRL); use 'reverse_kl'"
                    )
            if name in ("sigmoid", "dpo") and get("label_smoothing"):
                warnings.warn(
                    f"{where}: DPOConfig(label_smoothing={get('label_smoothing')}) is ignored "
                    "by TRL 1.16's 'sigmoid' loss and so here too; use PreferenceConfig with "
                    "loss_options={'label_smoothing': ...} for conservative DPO",
                    stacklevel=3,
                )
        else:
            if get("beta") is not None:
                given["beta"] = get("beta")
            given.update(get("loss_options") or {})
            given = {k: v for k, v in given.items() if k in s.defaults}
        losses.append((name, float(weight), given))
    if not trl:
        options = set(get("loss_options") or {})
        unused = sorted(options - {k for s in found for k in s.defaults})
        if unused:
            takes = sorted({k for s in found for k in s.defaults})
            raise TypeError(f"{where}: {names} take no option(s) {unused}; they take {takes}")
    checked = []
    for (name, weight, given), s in zip(losses, found):
        options = s.options(given, fn=where)
        check_options(where, options)
        checked.append((name, weight, options))
    pairs = get("pairs", "all")
    if pairs not in ("all", "best_worst"):
        raise ValueError(f"{where}: pairs must be 'all' or 'best_worst'; got {pairs!r}")
    try:
        truncation = Truncation(
            get("max_length"),
            get("max_prompt_length"),
            get("max_completion_length"),
            get("truncation_mode", "keep_start"),
        )
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return TrainerSettings(
        losses=tuple(checked),
        pairs=pairs,
        reference_free=bool(get("reference_free", False)),
        truncation=truncation,
        disable_dropout=bool(get("disable_dropout", True)),
        precompute=bool(get("precompute_ref_log_probs", False)),
        precompute_batch_size=get("precompute_ref_batch_size"),
        model_init_kwargs={
            **({"trust_remote_code": True} if get("trust_remote_code") else {}),
            **(get("model_init_kwargs") or {}),
        },
        logps_options={
            "share_prefix": bool(get("share_prefix", True)),
            "fused": bool(get("fused", True)),
        },
    )


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout of ``model`` to 0: ``nn.Dropout`` modules and attention dropout.

    ``nn.Dropout`` modules get ``p = 0``; modules and configs with a float
    ``attention_dropout`` (Llama, Qwen2, Mistral: applied inside the attention function,
    not by a module) get 0.0. TRL's ``DPOTrainer`` turns dropout off the same way by
    default, so that the policy and its reference agree at step 0.

    Args:
        model: A ``torch.nn.Module``; changed in place.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "attn_pdrop", "dropout"):
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def _is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


# ---- the trainer --------------------------------------------------------------------------


class PreferenceTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` for preference rows with any registered loss, built like TRL's.

    Switching from TRL's ``DPOTrainer`` takes one changed line: the arguments are the same,
    ``args`` may stay a ``DPOConfig``.

    - **Reference.** ``ref_model=None`` gives a frozen copy of the policy (or, for a PEFT
      model, the policy with its adapter disabled: no copy); a reference-free loss
      (``simpo``, ``cpo``, ``orpo``) or ``reference_free=True`` uses none; rows with
      ``ref_logps`` (or TRL's ``ref_chosen_logps``/``ref_rejected_logps``) use those.
      Passing the policy itself as ``ref_model`` is an error.
    - **Data.** Datasets (a ``datasets.Dataset`` or a list of dicts) of pair rows (explicit
      or implicit prompt, standard or conversational, ``score_chosen``/``score_rejected``
      as rewards) and group rows; they are tokenised once when the trainer is built
      ([`tokenize_row`][prefopt.integrations.data.tokenize_row]) and cut as
      ``max_length``, ``max_prompt_length``, ``max_completion_length`` say. With
      ``truncation_mode="keep_start"``, a row whose prompt alone fills ``max_length`` is
      dropped (as TRL does), with a warning that counts them.
    - **Checks.** An unknown loss, ``kto``, a batch-coupling loss (``aot``) on groups of
      more than two, an option no loss takes, a bad value: all raise here, not at step 1.
    - **Dropout** is off in policy and reference unless ``disable_dropout=False``.
    - **Loss** [`prefopt.batch_loss`][prefopt.batch_loss] (a weighted sum for a list):
      the sum of per-group losses over the number of groups, so gradient accumulation
      and data parallelism are exact.
    - **Metrics**, averaged over the logging interval and all processes: TRL's
      ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
      ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``, ``num_tokens``, plus
      ``groups/degenerate`` (see [`group_metrics`][prefopt.metrics.group_metrics]).

    Args:
        model: The policy: a causal LM module or a path for ``from_pretrained`` (with
            ``args.model_init_kwargs``).
        ref_model: The reference: a module, a path, or ``None`` (see above).
        args: A [`PreferenceConfig`][prefopt.integrations.transformers.PreferenceConfig],
            a TRL ``DPOConfig`` or ``TrainingArguments``. Default ``None``:
            ``PreferenceConfig(output_dir="prefopt-output")``.
        data_collator: Default ``None``: a
            [`PreferenceCollator`][prefopt.integrations.transformers.PreferenceCollator].
        train_dataset: Rows to train on.
        eval_dataset: Rows to evaluate on (the same metrics, prefixed ``eval_``).
        processing_class: The tokenizer. Default ``None``: loaded from ``model``'s path.
        peft_config: A ``peft`` config (e.g. ``LoraConfig``): the policy becomes a PEFT
            model trained through its adapter.
        **kwargs: As for ``transformers.Trainer`` (``callbacks``, ``optimizers``...).
    """

    # compute_loss returns a per-batch mean: the Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: Any = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        **kwargs: Any,
    ):
        where = "PreferenceTrainer"
        if args is None:
            args = PreferenceConfig(output_dir="prefopt-output")
        self.settings = settings = trainer_settings(args)
        if ref_model is not None and ref_model is model:
            raise ValueError(
                f"{where}: ref_model is the policy itself; pass ref_model=None for a frozen "
                "copy of the policy, or another model"
            )
        path = model if isinstance(model, str) else None
        if path is not None:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path, **settings.model_init_kwargs
            )
        if isinstance(ref_model, str):
            ref_model = transformers.AutoModelForCausalLM.from_pretrained(
                ref_model, **settings.model_init_kwargs
            )
        if processing_class is None:
            source = path or getattr(getattr(model, "config", None), "_name_or_path", None)
            if not source:
                raise ValueError(f"{where}: pass processing_class (the tokenizer) for this model")
            processing_class = transformers.AutoTokenizer.from_pretrained(source)
        if processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        if peft_config is not None:
            import peft

            model = peft.get_peft_model(model, peft_config)
        self.collator = PreferenceCollator(
            processing_class,
            max_length=settings.truncation.max_length,
            max_prompt_length=settings.truncation.max_prompt_length,
            max_completion_length=settings.truncation.max_completion_length,
            truncation_mode=settings.truncation.mode,
        )
        self.truncation = self.collator.truncation
        train_dataset = self._prepare(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                k: self._prepare(v, f"eval_dataset[{k!r}]") for k, v in eval_dataset.items()
            }
        else:
            eval_dataset = self._prepare(eval_dataset, "eval_dataset")
        if not settings.takes_reference:
            if ref_model is not None:
                warnings.warn(
                    f"{where}: ref_model is not used: the loss is reference-free or "
                    "reference_free=True",
                    stacklevel=2,
                )
            ref_model = None
        elif ref_model is None and not _is_peft(model) and not _has_ref_logps(train_dataset):
            ref_model = copy.deepcopy(model)
        self.ref_model = ref_model
        if settings.disable_dropout:
            for m in (model, ref_model):
                if m is not None:
                    disable_dropout(m)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator or self.collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if self.args.fsdp and not self.is_fsdp_enabled:
            raise ValueError(
                f"{where}: args.fsdp is set but accelerate did not enable FSDP (it does on "
                f"GPUs only; this run is {self.accelerator.distributed_type}): training would "
                "silently be plain data parallelism. Drop fsdp, or run on GPUs"
            )
        if self.ref_model is not None:
            self.ref_model = self.ref_model.eval().requires_grad_(False).to(self.args.device)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}
        self._tokens = 0
        if settings.precompute and settings.takes_reference:
            size = settings.precompute_batch_size or self.args.per_device_train_batch_size
            self.train_dataset = self._with_ref_logps(self.train_dataset, size)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {
                    k: self._with_ref_logps(v, size) for k, v in self.eval_dataset.items()
                }
            else:
                self.eval_dataset = self._with_ref_logps(self.eval_dataset, size)
            self.ref_model = None  # its memory is free from here on

    def _prepare(self, dataset: Any, name: str) -> Any:
        """Rows tokenised once, checked for the losses, long prompts dropped (keep_start)."""
        if dataset is None:
            return None
        tokenizer = self.collator.tokenizer
        if hasattr(dataset, "map") and hasattr(dataset, "column_names"):  # a datasets.Dataset
            rows = dataset.map(
                lambda row, i: _tokenized(tokenizer, row, f"{name}[{i}]"),
                with_indices=True,
                remove_columns=dataset.column_names,
            )
            sizes = [len(r) for r in rows["response_ids"]]
            prompts = rows["prompt_ids"]
        else:
            rows = [_tokenized(tokenizer, row, f"{name}[{i}]") for i, row in enumerate(dataset)]
            sizes = [len(r["response_ids"]) for r in rows]
            prompts = [r["prompt_ids"] for r in rows]
        for s in self.settings.specs:
            if s.couples_batch and max(sizes, default=2) > 2:
                raise ValueError(
                    f"PreferenceTrainer: loss {s.name!r} sorts across the batch and runs on "
                    f"pairs only; {name} has groups of up to {max(sizes)} responses"
                )
        long = [i for i, p in enumerate(prompts) if self.truncation.fills(p)]
        if long:
            warnings.warn(
                f"PreferenceTrainer: dropped {len(long)} of {len(sizes)} rows of {name} whose "
                f"prompt fills max_length={self.truncation.max_length} (no response token "
                "would be left), as TRL does; raise max_length or set max_prompt_length",
                stacklevel=3,
            )
            keep = sorted(set(range(len(sizes))) - set(long))
            rows = rows.select(keep) if hasattr(rows, "select") else [rows[i] for i in keep]
        if not len(rows):
            raise ValueError(f"PreferenceTrainer: {name} has no rows")
        return rows

    def _with_ref_logps(self, dataset: Any, batch_size: int) -> Any:
        """``dataset`` with a ``ref_logps`` column from the reference model."""
        if dataset is None:
            return None
        rows = list(dataset)
        with self.accelerator.autocast():
            done = precompute_ref_logps(
                self.ref_model,
                rows,
                self.collator,
                batch_size=batch_size,
                model=self.model,
                **self.settings.logps_options,
            )
        if hasattr(dataset, "add_column"):
            return dataset.remove_columns("ref_logps").add_column(
                "ref_logps", [r["ref_logps"] for r in done]
            )
        return done

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = COLUMNS

    def _reference_logps(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The batch's reference log-probs: its column, the reference model, or the base."""
        if not self.settings.takes_reference:
            return None
        if "ref_logps" in batch:
            return batch["ref_logps"]
        how = self.settings.logps_options
        with torch.no_grad(), self.accelerator.autocast():  # the run's precision, as TRL's
            if self.ref_model is not None:
                return batch_logps(self.ref_model, batch, **how)[0]
            unwrapped = self.accelerator.unwrap_model(model)
            with unwrapped.disable_adapter():  # a PEFT policy: the base model is the reference
                return batch_logps(model, batch, **how)[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The (weighted sum of) losses of a collated batch; records the metrics."""
        logps, lengths = batch_logps(model, inputs, **self.settings.logps_options)
        ref = self._reference_logps(model, inputs)
        total, metrics = 0.0, None
        for name, weight, options in self.settings.losses:
            value, found = group_loss_and_metrics(
                name, logps, ref, inputs, lengths, pairs=self.settings.pairs, options=options
            )
            total = total + weight * value
            metrics = metrics or found
        mode = "train" if model.training else "eval"
        tokens = inputs["attention_mask"].sum(-1)[inputs["mask"]].sum()
        names = sorted(metrics)
        values = torch.stack([metrics[k].detach().float() for k in names] + [tokens.float()])
        values = self.accelerator.gather(values.reshape(1, -1)).reshape(-1, len(names) + 1)
        for key, value in zip(names, values[:, :-1].mean(0).tolist()):
            self._metrics[mode].setdefault(key, []).append(value)
        if mode == "train":
            self._tokens += int(values[:, -1].sum())
        return (total, {"logps": logps}) if return_outputs else total

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The evaluation loss of a batch (no logits are gathered)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the averaged metrics since the last log, then log as the Trainer does."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for key, values in self._metrics[mode].items():
            logs[prefix + key] = sum(values) / len(values)
        if mode == "train":
            logs["num_tokens"] = float(self._tokens)
        self._metrics[mode] = {}
        super().log(logs, *args, **kwargs)


def _has_ref_logps(rows: Any) -> bool:
    """Whether every prepared row has its reference log-probs."""
    column = (
        rows["ref_logps"] if hasattr(rows, "column_names") else [r["ref_logps"] for r in rows or []]
    )
    return bool(rows) and all(v is not None for v in column)


def _tokenized(tokenizer: Any, row: Any, where: str) -> dict[str, Any]:
    """A tokenised row with every column of ``COLUMNS`` (``ref_logps`` may be ``None``)."""
    out = tokenize_row(row, tokenizer, where)
    return {"ref_logps": None, **out}


@torch.no_grad()
def precompute_ref_logps(
    ref_model: Any,
    rows: Iterable[dict[str, Any]],
    collator: PreferenceCollator,
    batch_size: int = 8,
    *,
    model: Any = None,
    share_prefix: bool = True,
    fused: bool = True,
) -> list[dict[str, Any]]:
    """Rows with a ``ref_logps`` column: the reference model's log-prob of each response.

    Run once before training, this frees the reference model's memory and forward pass
    during training. The values are those ``batch_logps`` computes, so training with the
    column equals training with the model.

    Args:
        ref_model: The reference model, or ``None`` with a PEFT ``model`` (its base, with
            the adapter disabled, is the reference).
        rows: Rows the collator takes (raw or tokenised).
        collator: The collator that training uses (same tokenisation and truncation).
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
        batch = collator(chunk)
        batch = {k: v.to(device) for k, v in batch.items()}
        how = {"share_prefix": share_prefix, "fused": fused}
        if ref_model is None:
            with model.disable_adapter():
                logps, _ = batch_logps(model, batch, **how)
        else:
            logps, _ = batch_logps(ref_model, batch, **how)
        for row, values, valid in zip(chunk, logps.cpu(), batch["mask"].cpu()):
            out.append({**row, "ref_logps": [float(v) for v in values[valid]]})
    runner.train(was_training)
    return out
