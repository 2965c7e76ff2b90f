"""``PreferenceTrainer``: a ``transformers.Trainer`` for preference rows, built like TRL's."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import transformers

from prefopt.integrations.collator import PreferenceCollator
from prefopt.integrations.config import PreferenceConfig, trainer_settings
from prefopt.integrations.data import tokenize_row
from prefopt.integrations.forward import _is_peft, loss_and_metrics, precompute_ref_logps

__all__ = ["PreferenceTrainer", "disable_dropout"]

COLUMNS = ["prompt_ids", "response_ids", "rewards", "ref_logps"]


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
        if ref_model is not None and ref_model is model and not isinstance(model, str):
            raise ValueError(
                f"{where}: ref_model is the policy itself; pass ref_model=None for a frozen "
                "copy of the policy, or another model"
            )
        model, ref_model, processing_class = _load(model, ref_model, processing_class, settings)
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
        eval_dataset = _each(eval_dataset, "eval_dataset", self._prepare)
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
        self._metrics: dict[str, list[torch.Tensor]] = {"train": [], "eval": []}
        self._tokens = 0
        if settings.precompute and settings.takes_reference:
            size = settings.precompute_batch_size or self.args.per_device_train_batch_size
            with_ref = lambda rows, name: self._with_ref_logps(rows, size)  # noqa: E731
            self.train_dataset = with_ref(self.train_dataset, "train_dataset")
            self.eval_dataset = _each(self.eval_dataset, "eval_dataset", with_ref)
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
            why = s.refuses_groups(max(sizes, default=2))
            if why:
                raise ValueError(
                    f"PreferenceTrainer: loss {s.name!r} {why}; {name} has groups of up to "
                    f"{max(sizes)} responses"
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
        with self.accelerator.autocast():  # the run's precision, as in training
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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The (weighted sum of) losses of a collated batch; records the metrics on device."""
        with self.accelerator.autocast():  # the reference in the run's precision, as TRL's
            total, metrics, logps = loss_and_metrics(
                model,
                inputs,
                ref_model=self.ref_model,
                loss=self.settings.losses,
                pairs=self.settings.pairs,
                reference_free=not self.settings.takes_reference,
                **self.settings.logps_options,
            )
        mode = "train" if model.training else "eval"
        tokens = (inputs["attention_mask"].sum(-1) * inputs["mask"]).sum()
        self._names = sorted(metrics)  # no value is read back here: log() does it
        values = [metrics[k].detach().float() for k in self._names] + [tokens.float()]
        self._metrics[mode].append(torch.stack(values))
        return (total, {"logps": logps}) if return_outputs else total

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The evaluation loss of a batch (no logits are gathered)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the metrics averaged since the last log over all processes, then log."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        if self._metrics[mode]:
            values = self.accelerator.gather(torch.stack(self._metrics[mode]))
            # a step whose groups were all degenerate has no mean (NaN): left out, not 0
            for key, value in zip(self._names, values[:, :-1].nanmean(0).tolist()):
                if value == value:
                    logs[prefix + key] = value
            if mode == "train":
                self._tokens += int(values[:, -1].sum())
        if mode == "train":
            logs["num_tokens"] = float(self._tokens)
        self._metrics[mode] = []
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


def _load(model: Any, ref_model: Any, tokenizer: Any, settings: Any) -> tuple[Any, Any, Any]:
    """Models given by path loaded (``model_init_kwargs``); the tokenizer found, with a pad."""
    where = "PreferenceTrainer"
    path = model if isinstance(model, str) else None
    if path is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, **settings.model_init_kwargs
        )
    if isinstance(ref_model, str):
        ref_model = transformers.AutoModelForCausalLM.from_pretrained(
            ref_model, **settings.model_init_kwargs
        )
    if tokenizer is None:
        source = path or getattr(getattr(model, "config", None), "_name_or_path", None)
        if not source:
            raise ValueError(f"{where}: pass processing_class (the tokenizer) for this model")
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, ref_model, tokenizer


def _each(datasets: Any, name: str, fn: Any) -> Any:
    """``fn(dataset, name)`` on an eval dataset, or on each of a dict of them."""
    if isinstance(datasets, dict):
        return {k: fn(v, f"{name}[{k!r}]") for k, v in datasets.items()}
    return fn(datasets, name)
