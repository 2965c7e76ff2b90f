"""Set-level (group) losses: n scored responses per prompt, shape (B, n)."""

from __future__ import annotations

import math
from types import ModuleType
from typing import NamedTuple

from array_api_compat import device

from prefopt import _checks
from prefopt._ops import (
    Array,
    any_along,
    get_namespace,
    log_sigmoid,
    logsumexp,
    native,
    softplus,
    stop_gradient,
)
from prefopt.losses.inputs import (
    WEIGHTINGS,
    Group,
    group_inputs,
    nan_where_unchecked,
    reward_group,
    valid_of,
)

__all__ = ["WEIGHTINGS"]  # re-exported for the docs of weighting


class Split(NamedTuple):
    """MPO's mean split of a group batch (see ``split``)."""

    deviation: Array  # (B, n) r_i - mean over the valid r; finite garbage on padding
    chosen: Array  # (B, n) bool
    rejected: Array  # (B, n) bool
    counted: Array  # (B,) bool: both sets non-empty


def split(group: Group, chosen: Array | None = None) -> Split:
    r"""The MPO mean split of a checked group batch, or the explicit ``chosen`` set.

    "Above the mean" does not depend on rounding. Integer ratings compare exactly:
    $n\,r_i > \sum_j r_j$ in their integer dtype. Floating rewards count as above the mean
    only when $d_i > 4 n \epsilon \max_j |r_j|$ ($\epsilon$ the dtype's machine epsilon):
    the sum of $n$ rewards is exact to about $n \epsilon \max|r|$, so a reward within that
    of the mean (the middle of ``[0.1, 0.2, 0.3]``) is never chosen because of the order of
    the group, a constant shift or the float dtype.
    """
    xp, r, valid = group.xp, group.rewards, group.valid
    if valid is None:
        count = float(r.shape[-1])
    else:
        count = xp.clip(xp.sum(xp.astype(valid, r.dtype), axis=-1, keepdims=True), min=1.0)
    deviation = r - group.total / count
    if chosen is None and group.ratings is not None:
        q = group.ratings
        n = (
            r.shape[-1]
            if valid is None
            else xp.sum(xp.astype(valid, q.dtype), axis=-1, keepdims=True)
        )
        chosen = q * n > xp.sum(q, axis=-1, keepdims=True)
    elif chosen is None:
        scale = xp.max(xp.abs(r), axis=-1, keepdims=True)
        chosen = deviation > (4.0 * _checks.eps(xp, r.dtype)) * count * scale
    if valid is None:
        rejected = ~chosen
    else:
        chosen = chosen & valid
        rejected = valid ^ chosen
    # Both any()s are needed even for the mean split: a group of one valid response has an
    # empty chosen set, a group of equal rewards too.
    counted = any_along(chosen, -1, xp=xp) & any_along(rejected, -1, xp=xp)
    return Split(deviation, chosen, rejected, counted)


def mpo_split(
    rewards: Array,
    *,
    mask: Array | None = None,
    chosen: Array | None = None,
    check_values: bool | None = None,
    xp: ModuleType | None = None,
) -> tuple[Array, Array, Array]:
    r"""MPO's split of each group into a chosen and a rejected set, and which groups count.

    With $\bar r$ the mean reward over the valid responses of a group, the chosen set is
    $Y^+ = \{i : r_i > \bar r\}$ (strictly above the mean) and the rejected set is the rest
    of the valid responses. An explicit ``chosen`` mask replaces the mean split (it is
    intersected with ``mask``). A group *counts* when both sets are non-empty; the others
    (all rewards equal, fewer than two valid responses) have MPO loss 0.

    Average a batch over the groups that count, so that skipped groups do not dilute it:

        >>> import numpy as np, prefopt
        >>> logps = np.log(np.full((2, 3), 0.3)); rewards = np.array([[1.0, 0, 0], [2, 2, 2]])
        >>> loss = prefopt.mpo_loss(logps, None, rewards)
        >>> chosen, rejected, counted = prefopt.mpo_split(rewards)
        >>> counted
        array([ True, False])
        >>> float(prefopt.masked_mean(loss, counted)) == float(loss[0])
        True

    Args:
        rewards: (B, n) real rewards; padding slots may hold anything.
        mask: (B, n) boolean, ``True`` on real responses. Default ``None``: all are real.
        chosen: (B, n) boolean explicit chosen set. Default ``None``: the mean split.
        check_values: Whether to check that valid rewards are finite: ``None`` (default)
            on arrays in host memory only, ``True`` also on an accelerator (a device
            sync), ``False`` never.
        xp: The array namespace, if known. Default ``None``: looked up.

    Returns:
        ``(chosen, rejected, counted)``: boolean (B, n), (B, n) and (B,).

    References:
        Gupta et al., "Multi-Preference Optimization: Generalizing DPO via Set-Level
        Contrasts", arXiv:2412.04628.
    """
    fn = "mpo_split"
    xp = get_namespace(rewards, mask, chosen, xp=xp)
    _checks.same_shape(fn, "B, n", {"rewards": rewards, "mask": mask, "chosen": chosen})
    for name, x in (("mask", mask), ("chosen", chosen)):
        if x is not None:
            _checks.boolean(fn, name, x, xp)
    _checks.numeric(fn, "rewards", rewards, xp)
    if rewards.shape[-1] == 0:  # no response: empty sets, no group counts
        empty = xp.zeros(rewards.shape, dtype=xp.bool, device=device(rewards))
        return empty, empty, xp.zeros(rewards.shape[:1], dtype=xp.bool, device=device(rewards))
    group = reward_group(fn, rewards, mask, xp, check_values, xp.float32)
    groups = split(group, chosen)
    return groups.chosen, groups.rejected, groups.counted


def mpo_loss(
    logps: Array,
    ref_logps: Array | None,
    rewards: Array,
    *,
    mask: Array | None = None,
    chosen: Array | None = None,
    lengths: Array | None = None,
    beta: float = 0.1,
    alpha: float = 1.0,
    weighting: str = "abs",
    check_values: bool | None = None,
    xp: ModuleType | None = None,
) -> Array:
    r"""Multi-Preference Optimization loss, per group.

    For the valid responses of one prompt with scores $s_i = \beta\,h(y_i)$, deviations
    $d_i = r_i - \bar r$ from the mean reward, the chosen set $Y^+ = \{i : d_i > 0\}$ and
    the rejected set $Y^-$ (the other valid responses):

    $$
    \ell = -\log \frac{\sum_{i\in Y^+} w_i e^{s_i}}{\sum_{i\in Y^+\cup Y^-} w_i e^{s_i}}
         = -\log\sigma\Big(\operatorname{LSE}_{Y^+}(s_i + \log w_i)
                          - \operatorname{LSE}_{Y^-}(s_i + \log w_i)\Big)
    $$

    with deviation weights $\log w_i$: ``"abs"`` $\alpha|d_i|$ (default: outliers on both
    sides weigh more), ``"signed"`` $\alpha d_i$, ``"squared"`` $\alpha d_i^2$, ``"none"`` 0.
    The second form is the one computed: it has full relative precision when $Y^+$
    dominates, and with $n = 2$ it is exactly DPO's $-\log\sigma(\beta(h_w - h_l))$.

    A group whose $Y^+$ or $Y^-$ is empty (all rewards equal, fewer than two valid
    responses) has loss exactly 0 and gradient exactly 0. Average over the groups that count
    with [`mpo_split`][prefopt.mpo_split] and [`masked_mean`][prefopt.masked_mean].

    Reward scale matters: the weights are $e^{\alpha d_i}$, so rewards in [0, 100] with
    $\alpha = 1$ let one response dominate its set. Scale rewards or $\alpha$ so that
    $\alpha |d_i|$ stays of order 1.

    Without a reference (``ref_logps=None``) $h(y) = \log\pi(y)$, or $\log\pi(y)/|y|$ when
    ``lengths`` are given (the reference-free, length-normalised variant).

    This is *Multi*-Preference Optimization (arXiv:2412.04628), not TRL's ``loss_type="mpo"``
    ("Mixed Preference Optimization", arXiv:2411.10442, a weighted sum of pairwise losses).

    Args:
        logps: (B, n) summed log-probabilities of each response under the policy.
        ref_logps: (B, n) the same under the frozen reference model, or ``None``.
        rewards: (B, n) scalar rewards (floating or integer ratings). Treated as data.
        mask: (B, n) boolean, ``True`` on real responses; padding slots may hold any value
            (NaN included) and get an exactly zero gradient. ``None``: all real.
        chosen: (B, n) boolean chosen set replacing the mean split, e.g. top-k chosen,
            bottom-k rejected, with the middle dropped through ``mask``. Default ``None``.
        lengths: (B, n) token counts (> 0 on valid slots); only with ``ref_logps=None``.
        beta: $\beta > 0$. Default 0.1.
        alpha: $\alpha \ge 0$, the strength of the deviation weights. Default 1.0.
        weighting: ``"abs"`` (default), ``"signed"``, ``"squared"`` or ``"none"``.
        check_values: Check that rewards are finite and lengths positive on valid slots:
            ``None`` (default) on arrays in host memory only, ``True`` also on an
            accelerator (a device sync), ``False`` never. Never inside ``jit``/``compile``.
            Where rewards are not checked, a group with a non-finite reward gets loss NaN.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per group in the log-probs' floating dtype (float32 for half precision).

    Raises:
        ValueError: On wrong ranks or mismatched shapes, ``lengths`` with a reference,
            hyperparameters out of range, non-finite rewards or non-positive lengths.
        TypeError: On non-floating log-probs, non-numeric rewards, a non-boolean mask.

    References:
        Gupta et al., "Multi-Preference Optimization: Generalizing DPO via Set-Level
        Contrasts", arXiv:2412.04628 (earlier titled SWEPO).

    Examples:
        >>> import numpy as np, prefopt
        >>> logps = np.array([[-4.0, -6.0, -5.0, -7.0]])
        >>> rewards = np.array([[0.9, 0.1, 0.7, 0.3]])
        >>> prefopt.mpo_loss(logps, None, rewards, weighting="none").round(6)
        array([0.598139])
    """
    return mpo_terms(mpo_loss, dict(
        logps=logps, ref_logps=ref_logps, rewards=rewards, mask=mask, chosen=chosen,
        lengths=lengths, beta=beta, alpha=alpha, weighting=weighting, check_values=check_values,
        xp=xp,
    ))[0]  # fmt: skip


def mpo_terms(fn, args) -> tuple[Array, Array]:
    """MPO's formula: ``(loss, counted)`` per group, from ``mpo_loss``'s arguments.

    ``MPOLoss`` takes ``counted`` from here for its mean instead of splitting again.
    """
    g = group_inputs(fn, args)
    groups = split(g, g.chosen)
    xp, s = g.xp, g.scores
    weighting = args["weighting"]
    if weighting != "none":
        d = _checks.cast(groups.deviation, s.dtype, xp)
        log_w = xp.abs(d) if weighting == "abs" else d * d if weighting == "squared" else d
        s = s + g.options["alpha"] * log_w
    lse_rejected = logsumexp(s, mask=groups.rejected, xp=xp)
    if g.valid is not None and native(xp) is None:
        # A group with no valid response has two empty sets, -inf - -inf: NaN, which the
        # where() below discards (with a zero gradient), but NumPy would warn about it.
        lse_rejected = xp.where(xp.any(g.valid, axis=-1), lse_rejected, 0.0)
    gap = lse_rejected - logsumexp(s, mask=groups.chosen, xp=xp)  # minus the margin
    # -log(sigmoid(margin)) = softplus(gap). A degenerate group gets gap -inf, where the
    # loss and its gradient are exactly +0.0; replacing it before the softplus keeps the
    # NaN it had (-inf - -inf) out of every backward.
    loss = softplus(xp.where(groups.counted, gap, -math.inf), xp=xp)
    return nan_where_unchecked(loss, g), groups.counted


def _log_softmax(x: Array, valid: Array, xp: ModuleType) -> Array:
    """Log-softmax over the valid slots of each row; ``x`` must be finite on padding."""
    lse = logsumexp(x, mask=valid, keepdims=True, xp=xp)
    # a row without valid slots: subtract 0, not -inf (its entries are discarded anyway)
    return x - xp.where(xp.any(valid, axis=-1, keepdims=True), lse, 0.0)


def _target(r: Array, valid: Array, tau: float, dtype, xp: ModuleType) -> Array:
    r"""$p = \operatorname{softmax}(r/\tau)$ over the valid slots, in ``dtype``."""
    return xp.exp(_checks.cast(_log_softmax(r / tau, valid, xp), dtype, xp))


def infonca_loss(
    logps: Array,
    ref_logps: Array | None,
    rewards: Array,
    *,
    mask: Array | None = None,
    lengths: Array | None = None,
    beta: float = 0.1,
    tau: float = 1.0,
    check_values: bool | None = None,
    xp: ModuleType | None = None,
) -> Array:
    r"""InfoNCA: cross-entropy from reward-softmax targets to implicit-reward softmax, per group.

    With scores $s_i = \beta\,h(y_i)$ and targets $p = \operatorname{softmax}(r/\tau)$
    over the valid responses of a prompt:

    $$
    \ell = -\sum_i p_i \log \operatorname{softmax}(s)_i
    $$

    With two responses and $\tau \to 0$ it is DPO. It uses the reward values, not only their
    order; a group with one valid response has loss 0.

    Args:
        logps: (B, n) summed log-probabilities of each response under the policy.
        ref_logps: (B, n) the same under the reference model, or ``None``.
        rewards: (B, n) scalar rewards (floating or integer). Treated as data.
        mask: (B, n) boolean, ``True`` on real responses; padding may hold anything.
            Default ``None``: all real.
        lengths: (B, n) token counts; only with ``ref_logps=None`` ($h = \log\pi/|y|$).
        beta: $\beta > 0$. Default 0.1.
        tau: $\tau > 0$, the temperature of the reward softmax. Default 1.0.
        check_values: Check rewards (finite) and lengths (> 0), as in
            [`mpo_loss`][prefopt.mpo_loss]. Default ``None``: on host arrays.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per group in the log-probs' floating dtype (float32 for half precision).

    References:
        Chen et al., "Noise Contrastive Alignment of Language Models with Explicit
        Rewards", NeurIPS 2024, arXiv:2402.05369.
    """
    g = group_inputs(infonca_loss, dict(
        logps=logps, ref_logps=ref_logps, rewards=rewards, mask=mask, lengths=lengths, beta=beta,
        tau=tau, check_values=check_values, xp=xp,
    ))  # fmt: skip
    valid = valid_of(g)
    terms = _target(g.rewards, valid, g.options["tau"], g.scores.dtype, g.xp) * _log_softmax(
        g.scores, valid, g.xp
    )
    loss = 0.0 - g.xp.sum(g.xp.where(valid, terms, 0.0), axis=-1)
    return nan_where_unchecked(loss, g)


def nca_loss(
    logps: Array,
    ref_logps: Array | None,
    rewards: Array,
    *,
    mask: Array | None = None,
    lengths: Array | None = None,
    beta: float = 0.1,
    tau: float = 1.0,
    check_values: bool | None = None,
    xp: ModuleType | None = None,
) -> Array:
    r"""NCA: Noise Contrastive Alignment over a group, per group.

    With scores $s_i = \beta\,h(y_i)$, targets $p = \operatorname{softmax}(r/\tau)$ and
    $n$ valid responses:

    $$
    \ell = -\sum_i p_i \log\sigma(s_i) - \frac{1}{n}\sum_i \log\sigma(-s_i)
    $$

    Each response is scored on its own scale (not only relative to the others), which
    keeps the likelihood of good responses from decreasing, unlike DPO and InfoNCA.

    Args:
        logps: (B, n) summed log-probabilities of each response under the policy.
        ref_logps: (B, n) the same under the reference model, or ``None``.
        rewards: (B, n) scalar rewards (floating or integer). Treated as data.
        mask: (B, n) boolean, ``True`` on real responses; padding may hold anything.
            Default ``None``: all real.
        lengths: (B, n) token counts; only with ``ref_logps=None``.
        beta: $\beta > 0$. Default 0.1.
        tau: $\tau > 0$, the temperature of the reward softmax. Default 1.0.
        check_values: Check rewards and lengths, as in [`mpo_loss`][prefopt.mpo_loss].
            Default ``None``: on host arrays.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per group in the log-probs' floating dtype (float32 for half precision);
        0 for a group without valid responses.

    References:
        Chen et al., "Noise Contrastive Alignment of Language Models with Explicit
        Rewards", NeurIPS 2024, arXiv:2402.05369.
    """
    g = group_inputs(nca_loss, dict(
        logps=logps, ref_logps=ref_logps, rewards=rewards, mask=mask, lengths=lengths, beta=beta,
        tau=tau, check_values=check_values, xp=xp,
    ))  # fmt: skip
    xp, s, valid = g.xp, g.scores, valid_of(g)
    count = xp.clip(xp.sum(xp.astype(valid, s.dtype), axis=-1, keepdims=True), min=1.0)
    p = _target(g.rewards, valid, g.options["tau"], s.dtype, xp)
    terms = p * log_sigmoid(s, xp=xp) + log_sigmoid(-s, xp=xp) / count
    loss = 0.0 - xp.sum(xp.where(valid, terms, 0.0), axis=-1)
    return nan_where_unchecked(loss, g)


def _ranked_before(x: Array, valid: Array, xp: ModuleType) -> Array:
    """(B, n, n): slot j is ranked before slot i (x descending, ties by position)."""
    xi, xj = xp.expand_dims(x, axis=-1), xp.expand_dims(x, axis=-2)
    index = xp.arange(x.shape[-1], device=device(x))
    earlier = xp.expand_dims(index, axis=0) < xp.expand_dims(index, axis=1)
    return ((xj > xi) | ((xj == xi) & earlier)) & xp.expand_dims(valid, axis=-2)


def plackett_luce_loss(
    logps: Array,
    ref_logps: Array | None,
    rewards: Array,
    *,
    mask: Array | None = None,
    lengths: Array | None = None,
    beta: float = 0.1,
    check_values: bool | None = None,
    xp: ModuleType | None = None,
) -> Array:
    r"""Listwise DPO under the Plackett-Luce model, per group.

    With the valid responses ordered by reward, best first (ties keep their order in the
    group), and scores $s_{(k)} = \beta\,h(y_{(k)})$ in that order:

    $$
    \ell = -\sum_{k=1}^{n-1}\Big(s_{(k)} - \log\sum_{j \ge k} e^{s_{(j)}}\Big)
    $$

    the negative log-likelihood of the full ranking: the best response is picked first
    among all, the second among the rest, and so on. It uses only the order of the rewards.
    With $n = 2$ it is DPO. A group with fewer than two valid responses has loss 0.

    Args:
        logps: (B, n) summed log-probabilities of each response under the policy.
        ref_logps: (B, n) the same under the reference model, or ``None``.
        rewards: (B, n) scalar rewards (floating or integer) that define the order.
        mask: (B, n) boolean, ``True`` on real responses; padding may hold anything.
            Default ``None``: all real.
        lengths: (B, n) token counts; only with ``ref_logps=None``.
        beta: $\beta > 0$. Default 0.1.
        check_values: Check rewards and lengths, as in [`mpo_loss`][prefopt.mpo_loss].
            Default ``None``: on host arrays.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per group in the log-probs' floating dtype (float32 for half precision).

    References:
        Rafailov et al., "Direct Preference Optimization", NeurIPS 2023, arXiv:2305.18290,
        appendix A.3 (the Plackett-Luce model).
    """
    g = group_inputs(plackett_luce_loss, dict(
        logps=logps, ref_logps=ref_logps, rewards=rewards, mask=mask, lengths=lengths, beta=beta,
        check_values=check_values, xp=xp,
    ))  # fmt: skip
    xp, s, valid = g.xp, g.scores, valid_of(g)
    # The responses still to be placed when slot i is picked: i and all ranked after it.
    # The last one's term is s - logsumexp({s}) = 0 exactly, so k runs over all slots.
    remaining = ~_ranked_before(g.rewards, valid, xp) & xp.expand_dims(valid, axis=-2)
    lse = logsumexp(xp.expand_dims(s, axis=-2), mask=remaining, xp=xp)
    loss = 0.0 - xp.sum(xp.where(valid, s - lse, 0.0), axis=-1)
    return nan_where_unchecked(loss, g)


def lipo_loss(
    logps: Array,
    ref_logps: Array | None,
    rewards: Array,
    *,
    mask: Array | None = None,
    lengths: Array | None = None,
    beta: float = 0.1,
    check_values: bool | None = None,
    xp: ModuleType | None = None,
) -> Array:
    r"""LiPO-$\lambda$: listwise preference optimization with LambdaLoss weights, per group.

    Over the pairs of valid responses with $r_i > r_j$, with scores $s = \beta\,h$:

    $$
    \ell = -\sum_{r_i > r_j} \Delta_{ij}\,\log\sigma(s_i - s_j), \qquad
    \Delta_{ij} = |G_i - G_j|\,\Big|\frac{1}{D(\tau_i)} - \frac{1}{D(\tau_j)}\Big|
    $$

    with gains $G_i = (2^{r_i} - 1)/\mathrm{maxDCG}$, the ideal DCG
    $\mathrm{maxDCG} = \sum_k (2^{r_{(k)}} - 1)/\log_2(1 + k)$ (rewards sorted descending),
    discounts $D(\tau) = \log_2(1 + \tau)$ and $\tau_i$ the 1-based rank of $s_i$ among the
    group's scores (ties by position). The weights are constants (no gradient). Rewards are
    graded labels (the paper uses 0 to 10ish); $2^r$ overflows float32 above $r \approx 127$.
    A group with no pair of distinct rewards has loss 0.

    Args:
        logps: (B, n) summed log-probabilities of each response under the policy.
        ref_logps: (B, n) the same under the reference model, or ``None``.
        rewards: (B, n) graded rewards (floating or integer). Treated as data.
        mask: (B, n) boolean, ``True`` on real responses; padding may hold anything.
            Default ``None``: all real.
        lengths: (B, n) token counts; only with ``ref_logps=None``.
        beta: $\beta > 0$. Default 0.1.
        check_values: Check rewards and lengths, as in [`mpo_loss`][prefopt.mpo_loss].
            Default ``None``: on host arrays.
        xp: The array namespace, if known.

    Returns:
        (B,) loss per group in the log-probs' floating dtype (float32 for half precision).

    References:
        Liu et al., "LiPO: Listwise Preference Optimization through Learning-to-Rank",
        arXiv:2402.01878.
    """
    g = group_inputs(lipo_loss, dict(
        logps=logps, ref_logps=ref_logps, rewards=rewards, mask=mask, lengths=lengths, beta=beta,
        check_values=check_values, xp=xp,
    ))  # fmt: skip
    xp, s, r, valid = g.xp, g.scores, g.rewards, valid_of(g)
    gain = xp.expm1(r * math.log(2.0))  # 2^r - 1; 0 on padding
    ideal_rank = 1.0 + xp.sum(xp.astype(_ranked_before(r, valid, xp), r.dtype), axis=-1)
    max_dcg = xp.sum(xp.where(valid, gain / xp.log2(1.0 + ideal_rank), 0.0), axis=-1, keepdims=True)
    gain = gain / xp.where(max_dcg == 0.0, 1.0, max_dcg)
    rank = 1.0 + xp.sum(
        xp.astype(_ranked_before(stop_gradient(s, xp=xp), valid, xp), s.dtype), axis=-1
    )
    discount = 1.0 / xp.log2(1.0 + rank)
    delta = xp.abs(xp.expand_dims(gain, axis=-1) - xp.expand_dims(gain, axis=-2))
    delta = _checks.cast(delta, s.dtype, xp) * xp.abs(
        xp.expand_dims(discount, axis=-1) - xp.expand_dims(discount, axis=-2)
    )
    pairs = (
        (xp.expand_dims(r, axis=-1) > xp.expand_dims(r, axis=-2))
        & xp.expand_dims(valid, axis=-1)
        & xp.expand_dims(valid, axis=-2)
    )
    margins = xp.expand_dims(s, axis=-1) - xp.expand_dims(s, axis=-2)
    terms = stop_gradient(delta, xp=xp) * log_sigmoid(margins, xp=xp)
    loss = 0.0 - xp.sum(xp.where(pairs, terms, 0.0), axis=(-2, -1))
    return nan_where_unchecked(loss, g)
