"""The settings of ``PreferenceTrainer``: prefopt's config, and TRL's ``DPOConfig`` read by name."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
import transformers

from prefopt import _checks
from prefopt.integrations.data import Truncation
from prefopt.losses.compose import PAIRS
from prefopt.losses.registry import spec

__all__ = ["PreferenceConfig", "TrainerSettings", "trainer_settings"]


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
        model_init_kwargs: Keyword arguments of ``from_pretrained`` when ``model`` (or
            ``ref_model``) is a path. Default ``None``: ``dtype`` float32, as TRL's trainers
            load a path (``from_pretrained`` alone would take the checkpoint's dtype, often
            bfloat16); pass ``{"dtype": "auto"}`` for the checkpoint's.
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


# TRL DPOConfig fields -> prefopt option names; a loss's spec says which TRL passes it
# (LossSpec.trl_options).
_TRL_FIELDS = {
    "label_smoothing": "label_smoothing",
    "f_divergence_type": "f_divergence",
    "f_alpha_divergence_coef": "f_alpha",
    "discopop_tau": "tau",
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


def _refuse_unsupported(args: Any, names: list[str], where: str) -> None:
    """Raise for a ``DPOConfig`` field or loss that prefopt does not implement."""
    for field, unset in _TRL_UNSUPPORTED.items():
        if getattr(args, field, unset) != unset:
            raise ValueError(
                f"{where}: DPOConfig.{field}={getattr(args, field)!r} is not supported by "
                f"prefopt; leave it at {unset!r} (see the 'Coming from TRL' docs page)"
            )
    if "sft" in names:
        raise ValueError(
            f"{where}: DPOConfig loss_type 'sft' is not supported by prefopt; "
            "see the 'Coming from TRL' docs page"
        )


def _trl_options(args: Any, name: str, found: Any, where: str) -> dict[str, Any]:
    """The options a ``DPOConfig`` gives loss ``name`` (its spec ``found``), as TRL does."""
    given = {"beta": args.beta}
    for field, option in _TRL_FIELDS.items():
        if option in found.trl_options:
            given[option] = getattr(args, field)
    if "f_divergence" in found.defaults and "f_divergence" not in found.trl_options:
        if args.f_divergence_type != "reverse_kl":
            raise ValueError(
                f"{where}: f_divergence_type={args.f_divergence_type!r} is not "
                f"supported for loss {name!r} (as in TRL); use 'reverse_kl'"
            )
    if name in ("sigmoid", "dpo") and args.label_smoothing:
        warnings.warn(
            f"{where}: DPOConfig(label_smoothing={args.label_smoothing}) is ignored "
            "by TRL 1.16's 'sigmoid' loss and so here too; use PreferenceConfig with "
            "loss_options={'label_smoothing': ...} for conservative DPO",
            stacklevel=4,
        )
    return given


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
        _refuse_unsupported(args, names, where)
    found = [spec(name, f"{where}: loss_type") for name in names]
    for s in found:
        why = s.refuses_groups(2)  # a batch-sorting loss: checked on the data (trainer.py)
        if why:
            raise ValueError(
                f"{where}: loss {s.name!r} {why}. Use prefopt.{s.fn.__name__} in your own loop"
            )
    if trl:
        given = [_trl_options(args, name, s, where) for name, s in zip(names, found)]
    else:
        options = get("loss_options") or {}
        unused = sorted(set(options) - {k for s in found for k in s.defaults})
        if unused:
            takes = sorted({k for s in found for k in s.defaults})
            raise TypeError(f"{where}: {names} take no option(s) {unused}; they take {takes}")
        beta = {} if get("beta") is None else {"beta": get("beta")}
        given = [{k: v for k, v in {**beta, **options}.items() if k in s.defaults} for s in found]
    checked = [
        (name, float(weight), dict(s.config(opts, fn=where).options))
        for name, weight, s, opts in zip(names, weights, found, given)
    ]
    pairs = get("pairs", "all")
    _checks.one_of(where, "pairs", pairs, PAIRS)
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
            "dtype": torch.float32,  # as TRL's trainers: not the checkpoint's, unless asked
            **({"trust_remote_code": True} if get("trust_remote_code") else {}),
            **(get("model_init_kwargs") or {}),
        },
        logps_options={
            "share_prefix": bool(get("share_prefix", True)),
            "fused": bool(get("fused", True)),
        },
    )
