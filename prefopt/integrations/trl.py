"""On-policy group losses on TRL's GRPO engine: ``GroupPreferenceGRPOTrainer``.

TRL's ``GRPOTrainer`` generates ``num_generations`` completions per prompt (with vLLM or
transformers), scores them with its reward functions, and trains on GRPO's per-completion
loss. [`GroupPreferenceGRPOTrainer`][prefopt.integrations.trl.GroupPreferenceGRPOTrainer]
keeps everything up to the scores and replaces the loss: each prompt's completions are one
group of a registered group loss (MPO by default), their log-probs come from prefopt's
group forward (the prompt once per group), and the loss sees the raw combined rewards.
Needs the ``trl`` extra (``pip install "prefopt-losses[trl]"``).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import trl
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import create_model_from_path, split_tensor_dict

from prefopt.integrations.collator import PreferenceCollator
from prefopt.integrations.forward import _is_peft, loss_and_metrics
from prefopt.integrations.loss import engine_loss
from prefopt.integrations.trainer import disable_dropout

__all__ = ["GroupPreferenceGRPOTrainer"]

WHERE = "GroupPreferenceGRPOTrainer"


class GroupPreferenceGRPOTrainer(trl.GRPOTrainer):
    r"""TRL's ``GRPOTrainer`` with a set-level loss: MPO (or any group loss) on its groups.

    Takes ``GRPOTrainer``'s arguments unchanged (``model`` or a path, ``reward_funcs``,
    ``args`` a ``GRPOConfig``, datasets, ``processing_class``,
    ``reward_processing_classes``, ``peft_config``, ``callbacks``...) plus ``loss``,
    ``loss_options`` and ``pairs``. Generation (vLLM or transformers), the reward functions
    and their weights, and the logging of completions stay TRL's; what changes is the loss:

    - **What the loss sees.** For the $n$ = ``num_generations`` completions of a prompt:
      their sequence log-probs under the policy and under the reference (completion tokens
      only; padding out) and their **raw combined reward**
      $r = \sum_k w_k r_k$ (``reward_weights``), not GRPO's standardised advantages. A
      completion that no reward function scored (all ``None``) and an empty completion are
      left out of their group (its mask is off).
    - **A reference, always**: a frozen copy of the policy, or for a PEFT policy its base
      with the adapter disabled, whatever GRPO's own ``beta`` (its KL coefficient) says;
      ``beta=0.0`` (TRL's default) spares GRPO's own reference forward.
    - **Groups stay whole**: the completions of a prompt are in one micro-batch on one
      process. The generation batch is shuffled by whole groups, not by completion, and
      cut into ``steps_per_generation`` micro-batches of whole groups; the groups are
      found by their prompt tokens. ``per_device_train_batch_size`` must be a multiple of
      ``num_generations`` (checked when built).
    - **Log-probs** from [`loss_and_metrics`][prefopt.integrations.transformers.loss_and_metrics]:
      each group packed once, the prompt computed once per group (not ``num_generations``
      times as in GRPO's forward), the shared attention, the fused output layer, under the
      accelerator's autocast.
    - **The loss** is [`prefopt.batch_loss`][prefopt.batch_loss] (the mean over the groups
      of the micro-batch, degenerate ones included), divided by the gradient accumulation
      steps as GRPO's is: the mean over the generation batch's groups.
    - **Metrics**: TRL's own (``reward``, ``reward_std``, ``frac_reward_zero_std``,
      completion lengths...) plus prefopt's ``rewards/chosen``, ``rewards/rejected``,
      ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``,
      ``groups/degenerate`` (see [Metrics](../metrics.md)); a mean over no group is left
      out, never logged as 0. TRL's ``entropy`` is not logged: the fused output layer never
      forms the token distributions. The completions table's "advantage" column holds each
      completion's deviation from its group's mean reward (what the loss splits on: above
      0 chosen), not GRPO's standardised advantage.

    - **Tool calls and environments**: the tokens TRL's ``tool_mask`` marks 0 (a tool's
      result) stay in the sequence as context and are left out of the log-prob.

    Not supported yet (refused when used): multimodal inputs.

    Args:
        model: As for ``GRPOTrainer``.
        reward_funcs: As for ``GRPOTrainer``.
        args: A ``trl.GRPOConfig``.
        *positional: ``GRPOTrainer``'s other positional arguments.
        loss: A registered loss that takes groups: ``"mpo"`` (default), ``"infonca"``,
            ``"nca"``, ``"plackett_luce"``, ``"lipo"``, or a pairwise loss (every chosen /
            rejected pair of the mean split, through
            [`group_pairwise_loss`][prefopt.group_pairwise_loss]).
        loss_options: The loss's options, e.g. ``{"beta": 0.1, "alpha": 1.0}``. Default
            ``None``: its defaults.
        pairs: For a pairwise loss, which pairs of a group it trains on: ``"all"`` (default;
            every response above the group's mean reward against every one at or below it,
            averaged) or ``"best_worst"`` (the highest against the lowest reward, as DPO is
            usually run on scored samples). Refused with a group loss.
        **kwargs: ``GRPOTrainer``'s keyword arguments.

    Raises:
        ValueError: An unknown loss, a loss that needs other data (``kto``), or that sorts
            across the batch (``aot``) with more than two generations, a bad option value,
            a per-device batch that is not a multiple of ``num_generations``, multimodal
            inputs, ``pairs`` other than ``"all"`` or ``"best_worst"``, or ``"best_worst"``
            with a group loss.
        TypeError: An option the loss does not take.

    Examples:
        See the "On-policy at scale with TRL" docs page; ``examples/mpo_trl_grpo.py`` runs
        on the CPU as it stands.
    """

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: Any = None,
        *positional: Any,
        loss: str = "mpo",
        loss_options: dict[str, Any] | None = None,
        pairs: str = "all",
        **kwargs: Any,
    ):
        n = getattr(args, "num_generations", None)
        options = engine_loss(loss, loss_options, pairs, WHERE, n)
        if args is not None:
            per_device = args.per_device_train_batch_size
            if per_device % n:
                fit = -(-per_device // n) * n
                raise ValueError(
                    f"{WHERE}: per_device_train_batch_size ({per_device}) must be a multiple of "
                    f"num_generations ({n}), so that a micro-batch holds whole groups: set "
                    f"per_device_train_batch_size={fit} (with gradient_accumulation_steps to "
                    "keep the memory), or a num_generations that divides it"
                )
        if (
            len(positional) < 3  # processing_class: after train_dataset and eval_dataset
            and kwargs.get("processing_class") is None
            and not isinstance(model, str)
            and not getattr(getattr(model, "config", None), "_name_or_path", "")
        ):
            raise ValueError(
                f"{WHERE}: this model has no path to load a tokenizer from; pass "
                "processing_class (its tokenizer)"
            )

        # The reference is copied before GRPOTrainer patches the policy's forward with its
        # fused LM head: a copy made after would keep calling the policy's own forward.
        reference = None
        beta = getattr(args, "beta", 0.0)
        if beta == 0.0 and kwargs.get("peft_config") is None and not _is_peft(model):
            if isinstance(model, str):  # loaded as GRPOTrainer loads the policy: same dtype
                init = dict(getattr(args, "model_init_kwargs", None) or {})
                init.setdefault("trust_remote_code", getattr(args, "trust_remote_code", False))
                reference = create_model_from_path(model, **init)
            else:
                reference = copy.deepcopy(model)
        super().__init__(model, reward_funcs, args, *positional, **kwargs)
        self.losses = [(loss, 1.0, options)]
        self.pairs = pairs
        self.collator = PreferenceCollator(self.processing_class)
        if self.ref_model is None and reference is not None:
            if self.args.disable_dropout:
                disable_dropout(reference)
            reference = reference.eval().requires_grad_(False)
            if self.is_deepspeed_enabled:
                self.ref_model = prepare_deepspeed(reference, self.accelerator)
            elif self.is_fsdp_enabled:
                self.ref_model = prepare_fsdp(reference, self.accelerator)
            else:
                self.ref_model = self.accelerator.prepare_model(reference, evaluation_mode=True)
        if self.args.beta != 0.0:
            warnings.warn(
                f"{WHERE}: GRPOConfig.beta={self.args.beta} makes GRPO compute its own KL "
                f"reference forward, which the {loss!r} loss does not use (it has its own "
                "reference); set beta=0.0 to skip it",
                stacklevel=2,
            )

    # ---- the data: whole groups, raw rewards ----------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(
            inputs, prompts, completions, completion_ids_list
        )
        self._rewards_per_func = rewards_per_func  # all processes' (TRL gathers them)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if any(k in out for k in ("pixel_values", "image_grid_thw")):
            raise ValueError(f"{WHERE}: multimodal inputs are not supported yet")
        per_func = self._rewards_per_func
        combined = (per_func * self.reward_weights.to(per_func.device)[None]).nansum(dim=1)
        combined[torch.isnan(per_func).all(dim=1)] = torch.nan  # no reward function scored it
        local = out["prompt_ids"].shape[0]
        start = self.accelerator.process_index * local
        out["raw_rewards"] = combined[start : start + local]
        # the completions table's "advantage": the deviation from the group's mean reward
        # that the group losses split on, not GRPO's standardised advantage it never uses
        n = self.num_generations if self.model.training else self.num_generations_eval
        groups = combined.view(-1, n)
        deviation = (groups - groups.nanmean(1, keepdim=True)).view(-1).nan_to_num(0.0)
        logged = self._logs["advantages"]
        for _ in range(min(len(deviation), len(logged))):
            logged.pop()
        logged.extend(deviation.tolist())
        return out

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:  # evaluation: one local batch of whole groups
            return self._generate_and_score_completions(generation_batch)
        steps = self.args.steps_per_generation
        if self._step % (steps * self.num_iterations) == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            batch = _shuffle_groups(batch, self.num_generations)
            self._buffered_inputs = split_tensor_dict(batch, steps)
        return self._buffered_inputs[self._step % steps]

    def _group_batch(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """GRPO's completions as prefopt's collated batch: one group per prompt."""
        n = self.num_generations if self.model.training else self.num_generations_eval
        prompts = _rows(inputs["prompt_ids"], inputs["prompt_mask"])
        completions = _rows(inputs["completion_ids"], inputs["completion_mask"])
        # tool calls and environments: 0 on the tokens the model read but did not write
        tools = inputs.get("tool_mask")
        if tools is not None:
            flags = _rows(tools, inputs["completion_mask"])
        else:
            flags = [[1] * len(c) for c in completions]
        rewards = inputs["raw_rewards"].tolist()
        groups, masks = [], []
        for g in range(0, len(prompts), n):
            if any(prompts[i] != prompts[g] for i in range(g, g + n)):
                raise RuntimeError(f"{WHERE}: a micro-batch split a group (a prefopt bug)")
            keep = [i for i in range(g, g + n) if any(flags[i]) and rewards[i] == rewards[i]]
            if not keep:  # nothing scorable: a group of one token that counts for nothing
                keep, rewards[g] = [g], 0.0
                completions[g], flags[g] = inputs["completion_ids"][g, :1].tolist(), [1]
            groups.append((prompts[g], [completions[i] for i in keep], [rewards[i] for i in keep]))
            masks.append([flags[i] for i in keep])
        batch = self.collator.collate_ids(groups, label_masks=masks)
        device = inputs["prompt_ids"].device
        return {k: v.to(device) for k, v in batch.items()}

    # ---- the loss -------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The group loss of a micro-batch of whole groups; records prefopt's metrics."""
        if return_outputs:
            raise ValueError(f"{WHERE} does not return outputs")
        batch = self._group_batch(inputs)
        with self.accelerator.autocast():
            loss, metrics, _ = loss_and_metrics(
                model, batch, ref_model=self.ref_model, loss=self.losses, pairs=self.pairs
            )
        mode = "train" if self.model.training else "eval"
        values = torch.stack([metrics[k].detach().float() for k in sorted(metrics)])
        gathered = self.accelerator.gather(values[None]).nanmean(0)
        for key, value in zip(sorted(metrics), gathered.tolist()):
            if value == value:  # NaN: no group counted here, so no mean (never logged as 0)
                self._metrics[mode][key].append(value)
        if mode == "train":
            loss = loss / self.current_gradient_accumulation_steps  # as GRPO's own loss
        return loss


def _rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """The tokens of each row where ``mask`` is 1 (left or right padding removed)."""
    return [row[keep].tolist() for row, keep in zip(ids.cpu(), mask.cpu().bool())]


def _shuffle_groups(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """``batch`` with its groups of ``n`` consecutive rows in a random order, each whole."""
    rows = batch["prompt_ids"].shape[0]
    order = torch.randperm(rows // n)
    index = (order[:, None] * n + torch.arange(n)[None]).reshape(-1)
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == rows:
            out[key] = value[index.to(value.device)]
        elif isinstance(value, list) and len(value) == rows:
            out[key] = [value[i] for i in index.tolist()]
        else:
            out[key] = value
    return out
