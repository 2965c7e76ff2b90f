"""prefopt's group losses on tunix's GRPO learner: the JAX counterpart of the TRL engine.

[tunix](https://github.com/google/tunix) (``google-tunix``) generates the completions
(vanilla sampling, vLLM or sglang-jax), scores them and runs the training loop on meshes;
[`GroupPreferenceGRPOLearner`][prefopt.integrations.tunix.GroupPreferenceGRPOLearner]
keeps all of that and trains with a prefopt group loss (MPO by default) instead of GRPO's
clipped policy gradient:

- the loss sees the **raw** combined rewards of each completion, grouped by prompt (tunix
  repeats each prompt ``num_generations`` times in a row), not GRPO's z-scored advantages;
- the reference is the cluster's reference model, whatever tunix's ``beta`` says (the
  loss has its own ``beta``); log-probs are the models' own (temperature 1);
- a micro-batch holds whole groups (tunix's micro-batches count prompts); sequence
  packing, which would split them, is refused; a completion whose reward is NaN (not
  scored) is left out of its group;
- a completion counts its tokens up to and including its first eos, so a tokenizer whose
  pad token is its eos still trains the eos (tunix's own mask, ``completion != pad``,
  drops it), and the prompt attends to an eos inside it (a chat template's turn end);
- the metrics are tunix's (``kl``: the mean per-token log-ratio to the reference,
  ``pg_clipfrac``: 0) and prefopt's ([`group_metrics`][prefopt.metrics.group_metrics],
  named ``prefopt_margin``, ``prefopt_accuracy``...; NaN for a step where every group
  had equal rewards, when MPO has nothing to contrast).

Needs ``pip install "prefopt-losses[tunix]"`` in an environment of its own: tunix 0.1.7
pins ``safetensors<0.8``, which transformers 5.13 and later refuse.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tunix.rl import common, function_registry
from tunix.rl.grpo import grpo_learner

import prefopt
from prefopt.integrations.loss import engine_loss, group_loss_and_metrics

__all__ = ["GroupPreferenceGRPOLearner", "completion_mask"]

WHERE = "GroupPreferenceGRPOLearner"
_RAW = "prefopt_raw_rewards"


@function_registry.register_advantage_estimator(_RAW)
def _raw_rewards(rewards: Any, num_generations: int, **_: Any) -> Any:
    """The rewards as they are: the group loss makes its own comparison within a group."""
    return rewards


def completion_mask(completion_ids: Any, pad_id: int, eos_id: int) -> Any:
    """1 on a completion's tokens up to and including its first eos, else 0.

    Args:
        completion_ids: (rows, C) int, right-padded with ``pad_id``.
        pad_id: The padding token (may equal ``eos_id``).
        eos_id: The end-of-sequence token.

    Returns:
        (rows, C) bool. A completion cut at the length limit counts every token.
    """
    is_eos = completion_ids == eos_id
    before = jnp.cumsum(is_eos, axis=-1) - is_eos == 0  # no eos earlier
    return before & ((completion_ids != pad_id) | is_eos)


def _forward(model, prompt_ids, completion_ids, counted, pad_id):
    """Per-token log-probs (rows, C) of the completions (temperature 1), 0 where not counted.

    The prompt is left-padded: every token from its first non-pad one is attended, an eos
    inside it (a chat template's turn end) included.
    """
    prompt_mask = jnp.cumsum(prompt_ids != pad_id, axis=-1) > 0
    mask = jnp.concatenate([prompt_mask, counted], axis=-1)
    ids = jnp.concatenate([prompt_ids, completion_ids], axis=-1)
    positions = common.build_positions_from_mask(mask)
    logits, _ = model(ids, positions, None, common.make_causal_attn_mask(mask))
    C = completion_ids.shape[1]
    logits = logits[:, -C - 1 : -1].astype(jnp.float32)
    tokens = prefopt.token_logps(logits, jnp.where(counted, completion_ids, -100))
    return tokens


@nnx.jit
def _reference_logps(model, prompt_ids, completion_ids, counted, pad_id):
    return jax.lax.stop_gradient(_forward(model, prompt_ids, completion_ids, counted, pad_id))


class GroupPreferenceGRPOLearner(grpo_learner.GRPOLearner):
    r"""tunix's ``GRPOLearner`` training with a prefopt group loss (see the module docstring).

    Each prompt's $n$ = ``num_generations`` completions form a group $g$; their summed
    log-probs under the policy and the reference and their raw rewards $r_g$ go to
    [`prefopt.batch_loss`][prefopt.batch_loss]:
    $L = \frac{1}{G}\sum_{g=1}^{G} \ell(\log\pi_\theta(y_g), \log\pi_{\text{ref}}(y_g),
    r_g)$ over the $G$ groups of a micro-batch, $\ell$ the loss's own per-group formula
    (for MPO, [`mpo_loss`][prefopt.mpo_loss]; Gupta et al., arXiv:2412.04628).

    Args:
        rl_cluster: The tunix ``RLCluster`` (actor, reference, rollout, tokenizer).
        algo_config: A tunix ``GRPOConfig``: ``num_generations`` (n >= 2) and
            ``num_iterations`` are used; its ``beta``, ``epsilon``, ``loss_algo``,
            ``advantage_estimator`` and ``policy_loss_fn`` belong to GRPO's own loss and
            are unused.
        reward_fns: tunix reward functions (their sum per completion is the reward).
        loss: A registered group or pairwise loss. Default ``"mpo"``.
        loss_options: Its options (``{"beta": 0.1, "alpha": 1.0}``...), checked here;
            the others keep the loss's defaults. Default ``None``.
        pairs: ``"all"`` (default) or ``"best_worst"``, for a pairwise loss.
        metric_fns: tunix metric functions. Default ``None``.
        data_shuffle_seed: As for tunix. Default ``None``.

    Raises:
        ValueError: Sequence packing (``max_seq_token_per_tpu``), a loss that cannot
            train on groups of ``num_generations``, an option out of range.
    """

    def __init__(
        self,
        rl_cluster: Any,
        algo_config: Any,
        reward_fns: Callable | Sequence[Callable],
        *,
        loss: str = "mpo",
        loss_options: dict[str, Any] | None = None,
        pairs: str = "all",
        metric_fns: Sequence[Callable] | None = None,
        data_shuffle_seed: int | None = None,
    ):
        n = algo_config.num_generations
        options = engine_loss(loss, loss_options, pairs, WHERE, n)
        packing = rl_cluster.cluster_config.training_config.max_seq_token_per_tpu
        if packing is not None:
            raise ValueError(
                f"{WHERE}: sequence packing (max_seq_token_per_tpu={packing}) mixes the "
                "completions of different prompts in a row and splits groups; leave it None"
            )
        # tunix's reference pass (beta != 0) and its advantages would be GRPO's: this learner
        # computes the reference itself and gives the loss the raw rewards
        algo_config = dataclasses.replace(algo_config, beta=0.0, advantage_estimator=_RAW)
        self.loss, self.pairs, self.options = loss, pairs, options
        super().__init__(
            rl_cluster=rl_cluster,
            algo_config=algo_config,
            reward_fns=reward_fns,
            metric_fns=metric_fns,
            data_shuffle_seed=data_shuffle_seed,
        )
        pad, eos = rl_cluster.rollout.pad_id(), rl_cluster.rollout.eos_id()

        def loss_fn(model, train_example, algo_config):
            return self._loss(model, train_example, n, pad)

        self.rl_cluster.actor_trainer.with_loss_fn(loss_fn, has_aux=True)
        # a micro-batch whose groups all have equal rewards has no group metric (NaN)
        logged = {"kl": np.mean, "pg_clipfrac": np.mean, **dict.fromkeys(METRICS.values(), _mean)}
        self.rl_cluster.actor_trainer.with_rl_metrics_to_log(logged)
        self._pad, self._eos = pad, eos

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """The ``train`` of tunix; refused under ``jax_enable_x64``, where its sampler fails."""
        if jax.config.jax_enable_x64:
            raise RuntimeError(
                f"{WHERE}.train: tunix 0.1.7's sampler fails under jax_enable_x64 (its KV-cache "
                "update mixes int64 and int32 indices); run with "
                'jax.config.update("jax_enable_x64", False)'
            )
        return super().train(*args, **kwargs)

    def _generate_and_compute_advantage(self, training_input, mode=None):
        """The rollout and rewards of tunix; then prefopt's mask and the reference log-probs."""
        args = (training_input,) if mode is None else (training_input, mode)
        example = super()._generate_and_compute_advantage(*args)
        counted = completion_mask(example.completion_ids, self._pad, self._eos)
        reference = self.rl_cluster.inference_worker.get_model("reference")
        ref = _reference_logps(
            reference, example.prompt_ids, example.completion_ids, counted, self._pad
        )
        return example.replace(completion_mask=counted, ref_per_token_logps=ref)

    def _loss(self, model, example, n, pad):
        counted = example.completion_mask
        tokens = _forward(model, example.prompt_ids, example.completion_ids, counted, pad)
        ref_tokens = example.ref_per_token_logps
        groups = tokens.shape[0] // n  # rows are prompt-major: a prompt's n in a row

        def grouped(x):
            return x.reshape(groups, n)

        rewards = grouped(example.advantages.astype(jnp.float32))
        scored = jnp.isfinite(rewards)  # an unscored (NaN) completion is left out of its group
        batch = {"rewards": jnp.where(scored, rewards, 0.0), "mask": scored}
        value, metrics = group_loss_and_metrics(
            self.loss, grouped(tokens.sum(-1)), grouped(ref_tokens.sum(-1)), batch,
            grouped(counted.sum(-1).astype(jnp.float32)), pairs=self.pairs, options=self.options,
        )  # fmt: skip
        kl = jnp.sum(tokens - ref_tokens) / jnp.maximum(counted.sum(), 1)
        aux = {"kl": kl, "pg_clipfrac": jnp.zeros(())}  # GRPO's clipping: none here
        aux.update({name: metrics[key] for key, name in METRICS.items()})
        return value, aux


def _mean(values: Any) -> float:
    """The mean over micro-batches that had a value (NaN when none had)."""
    values = np.asarray(values, dtype=np.float64)
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


# prefopt's metrics (group_metrics) under the names tunix logs them by
METRICS = {
    "rewards/chosen": "prefopt_chosen",
    "rewards/rejected": "prefopt_rejected",
    "rewards/margins": "prefopt_margin",
    "rewards/accuracies": "prefopt_accuracy",
    "groups/degenerate": "prefopt_degenerate",
}
