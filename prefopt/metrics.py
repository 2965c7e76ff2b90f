"""What a trainer logs: implicit rewards, margins and accuracies, for pairs and for groups.

Each function returns a dict of 0-d arrays in the inputs' namespace and device, without
gradient (no device sync: call ``float()`` on them when you log). The keys follow TRL's
(``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``).
"""

from __future__ import annotations

from types import ModuleType

from prefopt._ops import Array, masked_mean, stop_gradient
from prefopt.losses.group import split
from prefopt.losses.inputs import group_inputs, pair_inputs

__all__ = ["group_metrics", "pair_metrics"]


def pair_metrics(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    beta: float = 0.1,
    xp: ModuleType | None = None,
) -> dict[str, Array]:
    r"""Implicit-reward metrics of a pairwise batch.

    With the implicit rewards $\rho_w = \beta h_w$ and $\rho_l = \beta h_l$ (DPO's
    $\beta$ times the log-ratio to the reference):

    - ``rewards/chosen``: $\operatorname{mean}(\rho_w)$; ``rewards/rejected``:
      $\operatorname{mean}(\rho_l)$;
    - ``rewards/margins``: $\operatorname{mean}(\rho_w - \rho_l)$;
    - ``rewards/accuracies``: the share of pairs with $\rho_w > \rho_l$ (ties count as
      wrong, as in TRL);
    - ``logps/chosen``, ``logps/rejected``: the mean policy log-probs.

    Args:
        chosen_logps: (B,) summed log-probabilities of the chosen responses.
        rejected_logps: (B,) the same for the rejected responses.
        ref_chosen_logps: (B,) under the reference model, or ``None`` (reference-free).
        ref_rejected_logps: (B,) under the reference model, or ``None``.
        beta: $\beta$, as passed to the loss. Default 0.1.
        xp: The array namespace, if known.

    Returns:
        A dict from metric name to a 0-d array.

    Examples:
        >>> import numpy as np
        >>> from prefopt.metrics import pair_metrics
        >>> m = pair_metrics(np.array([-5.0, -7.0]), np.array([-9.0, -6.0]), beta=1.0)
        >>> {k: float(v) for k, v in m.items()}["rewards/accuracies"]
        0.5
    """
    p = pair_inputs(
        "pair_metrics",
        dict(
            chosen_logps=chosen_logps,
            rejected_logps=rejected_logps,
            ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps,
            beta=beta,
            xp=xp,
        ),
    )
    xp = p.xp
    rw, rl = stop_gradient(p.beta * p.hw, xp=xp), stop_gradient(p.beta * p.hl, xp=xp)
    return {
        "rewards/chosen": masked_mean(rw, xp=xp),  # 0 for an empty batch
        "rewards/rejected": masked_mean(rl, xp=xp),
        "rewards/margins": masked_mean(rw - rl, xp=xp),
        "rewards/accuracies": masked_mean(xp.astype(rw > rl, rw.dtype), xp=xp),
        "logps/chosen": masked_mean(stop_gradient(xp.astype(chosen_logps, rw.dtype), xp=xp), xp=xp),
        "logps/rejected": masked_mean(
            stop_gradient(xp.astype(rejected_logps, rw.dtype), xp=xp), xp=xp
        ),
    }


def group_metrics(
    logps: Array,
    ref_logps: Array | None,
    rewards: Array,
    *,
    mask: Array | None = None,
    chosen: Array | None = None,
    lengths: Array | None = None,
    beta: float = 0.1,
    check_values: bool | None = None,
    xp: ModuleType | None = None,
) -> dict[str, Array]:
    r"""Implicit-reward metrics of a group batch, over MPO's chosen/rejected split.

    With implicit rewards $\rho_i = \beta h(y_i)$ and each group split at its mean reward
    (or by ``chosen``) into $Y^+$ and $Y^-$, over the groups where both are non-empty:

    - ``rewards/chosen``, ``rewards/rejected``: the mean over groups of the mean $\rho$ of
      $Y^+$, of $Y^-$; ``rewards/margins``: their difference;
    - ``rewards/accuracies``: the share of pairs $(i \in Y^+, j \in Y^-)$ with
      $r_i \ne r_j$ whose implicit rewards are ordered like their rewards, pooled over the
      batch;
    - ``logps/chosen``, ``logps/rejected``: the same means of the policy log-probs;
    - ``groups/degenerate``: the share of the batch's groups left out (empty $Y^+$ or
      $Y^-$), a fraction as TRL's ``frac_reward_zero_std``.

    Where no group counts (every group degenerate), the means are NaN, not 0: a 0.0 would
    read as a log-prob of 0 or a margin of 0. The trainers leave NaN values out of their
    averages and logs.

    On pairs these are TRL's ``DPOTrainer`` metrics of the same names.

    Args:
        logps: (B, n) summed log-probabilities of each response under the policy.
        ref_logps: (B, n) the same under the reference model, or ``None``.
        rewards: (B, n) scalar rewards (floating or integer).
        mask: (B, n) boolean, ``True`` on real responses. Default ``None``: all real.
        chosen: (B, n) boolean explicit chosen set. Default ``None``: the mean split.
        lengths: (B, n) token counts; only with ``ref_logps=None``.
        beta: $\beta$, as passed to the loss. Default 0.1.
        check_values: As in [`mpo_loss`][prefopt.mpo_loss]. Default ``None``.
        xp: The array namespace, if known.

    Returns:
        A dict from metric name to a 0-d array; means over no group are NaN.

    References:
        Gupta et al., "Multi-Preference Optimization", arXiv:2412.04628.
    """
    g = group_inputs(
        "group_metrics",
        dict(
            logps=logps,
            ref_logps=ref_logps,
            rewards=rewards,
            mask=mask,
            chosen=chosen,
            lengths=lengths,
            beta=beta,
            check_values=check_values,
            xp=xp,
        ),
    )
    xp, s = g.xp, stop_gradient(g.scores, xp=g.xp)
    groups = split(g, g.chosen)
    counted = groups.counted
    mean_chosen = masked_mean(masked_mean(s, groups.chosen, axis=-1, xp=xp), counted, xp=xp)
    mean_rejected = masked_mean(masked_mean(s, groups.rejected, axis=-1, xp=xp), counted, xp=xp)
    r = g.rewards

    def outer(x: Array) -> tuple[Array, Array]:
        return xp.expand_dims(x, axis=-1), xp.expand_dims(x, axis=-2)

    (ri, rj), (si, sj), (ci, _), (_, nj) = (
        outer(r),
        outer(s),
        outer(groups.chosen),
        outer(groups.rejected),
    )
    pairs = ci & nj & (ri != rj)
    right = pairs & ((si > sj) == (ri > rj))
    count = xp.sum(xp.astype(pairs, s.dtype))
    lp = stop_gradient(xp.astype(logps, s.dtype), xp=xp)

    def over_groups(x: Array, selected: Array) -> Array:
        return masked_mean(masked_mean(x, selected, axis=-1, xp=xp), counted, xp=xp)

    some = xp.any(counted)
    nan = xp.full((), xp.nan, dtype=s.dtype)

    def none_is_nan(x: Array) -> Array:  # a mean over no group: NaN, never a 0 that reads as data
        return xp.where(some, x, nan)

    return {
        "rewards/chosen": none_is_nan(mean_chosen),
        "rewards/rejected": none_is_nan(mean_rejected),
        "rewards/margins": none_is_nan(mean_chosen - mean_rejected),
        "rewards/accuracies": xp.where(
            xp.any(pairs), xp.sum(xp.astype(right, s.dtype)) / xp.clip(count, min=1.0), nan
        ),
        "logps/chosen": none_is_nan(over_groups(lp, groups.chosen)),
        "logps/rejected": none_is_nan(over_groups(lp, groups.rejected)),
        "groups/degenerate": xp.mean(xp.astype(~counted, s.dtype)),
    }
