"""Losses built from registered ones: weighted sums, pairwise losses on groups, pairs as groups."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from array_api_compat import device

from prefopt import _checks
from prefopt._ops import Array, get_namespace
from prefopt.losses.group import mpo_split, split
from prefopt.losses.inputs import group_arrays, nan_where_unchecked, reward_group
from prefopt.losses.registry import INPUTS, POSITIONAL, LossSpec, spec

REDUCTIONS = ("mean", "batchmean", "sum", "none")
# The pairs a pairwise loss takes from a group; the CLI and the trainer config read this.
PAIRS = ("all", "best_worst")


def combine_losses(
    weights: Mapping[str, float], *, options: Mapping[str, Mapping[str, Any]] | None = None
) -> Callable[..., Array]:
    r"""A weighted sum of registered losses on the same batch (TRL's ``loss_type`` list).

    $$
    \ell = \sum_k w_k\,\ell_k
    $$

    per example. The returned function takes the batch the way its losses do (positionally
    ``chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps`` for pairs,
    ``logps, ref_logps, rewards`` for groups, or all by keyword) and hands each loss the
    inputs it takes: reference log-probs go to the losses that use a reference, lengths to
    those that use lengths, a keyword such as ``mask`` or ``kl`` to each loss that has it.
    Pairwise and reference-free losses combine; group losses combine with group losses;
    KTO stands alone.

    TRL's "Mixed Preference Optimization" recipe (arXiv:2411.10442) is
    ``combine_losses({"sigmoid": 0.8, "bco_pair": 0.2})`` plus an SFT term, which prefopt
    leaves to the trainer.

    Args:
        weights: Loss names (from [`available_losses`][prefopt.available_losses]) and their
            finite weights $w_k$, e.g. ``{"sigmoid": 1.0, "bco_pair": 1.0}``.
        options: Keyword options per loss name, e.g. ``{"sigmoid": {"beta": 0.2}}``.
            Default ``None``: every loss with its defaults.

    Returns:
        ``combined(*arrays, **inputs)``, returning the (B,) weighted sum of the losses.

    Raises:
        ValueError: For an unknown name (with suggestions), a non-finite weight, losses
            whose data do not mix, or options for a loss that is not in ``weights``.
        TypeError: For an option a loss does not take.

    References:
        TRL's ``DPOConfig(loss_type=[...], loss_weights=[...])``; Wang et al., "Enhancing
        the Reasoning Ability of Multimodal Large Language Models via Mixed Preference
        Optimization", arXiv:2411.10442.

    Examples:
        >>> import numpy as np, prefopt
        >>> loss_fn = prefopt.combine_losses({"sigmoid": 0.5, "ipo": 0.5},
        ...                                  options={"ipo": {"beta": 0.5}})
        >>> x = np.array([-3.0, -5.0])
        >>> loss_fn(x, x[::-1]).round(4)
        array([0.7991, 4.8991])
    """
    fn = "combine_losses"
    options = dict(options or {})
    if not weights:
        raise ValueError(f"{fn}: weights must name at least one loss; got an empty mapping")
    stray = sorted(set(options) - set(weights))
    if stray:
        raise ValueError(f"{fn}: options given for {stray}, which are not in weights")
    parts = []
    for name, weight in weights.items():
        found: LossSpec = spec(name, fn)
        weight = _checks.finite(fn, f"weights[{name!r}]", weight)
        found.options(options.get(name), fn=fn)  # an option the loss does not take raises
        parts.append((found, weight, dict(options.get(name, {}))))
    layouts = {found.layout for found, _, _ in parts}
    if len(layouts) > 1:
        raise ValueError(
            f"{fn}: losses of different data cannot be summed; got {', '.join(sorted(layouts))} "
            f"losses in {sorted(weights)}"
        )
    layout = layouts.pop()
    positional = POSITIONAL[layout]

    def combined(*arrays: Array, **inputs: Array) -> Array:
        if len(arrays) > len(positional):
            raise TypeError(f"combined loss: at most {len(positional)} positional arrays")
        bound = dict(zip(positional, arrays))
        twice = sorted(set(bound) & set(inputs))
        if twice:
            raise TypeError(f"combined loss: {twice} given positionally and by keyword")
        bound.update(inputs)
        unused = sorted(set(bound) - set(INPUTS[layout]) - {"xp"})
        if unused:
            raise TypeError(f"combined loss: no loss of {sorted(weights)} takes {unused}")
        total = None
        for found, weight, opts in parts:
            loss = weight * found.fn(**found.takes(bound), **opts)
            total = loss if total is None else total + loss
        return total

    combined.__name__ = combined.__qualname__ = "combined_loss"
    combined.__doc__ = f"Weighted sum of {dict(weights)} (see prefopt.combine_losses)."
    return combined


def group_pairwise_loss(
    loss: str,
    logps: Array,
    ref_logps: Array | None,
    rewards: Array,
    *,
    pairs: str = "all",
    mask: Array | None = None,
    chosen: Array | None = None,
    lengths: Array | None = None,
    check_values: bool | None = None,
    xp: ModuleType | None = None,
    **options: Any,
) -> Array:
    r"""A pairwise loss applied to groups of n scored responses, per group.

    ``pairs="all"``: every (chosen, rejected) pair across MPO's mean split (the chosen set
    $Y^+ = \{i : r_i > \bar r\}$, or an explicit ``chosen``), averaged per group:

    $$
    \ell = \frac{1}{|Y^+|\,|Y^-|}\sum_{i \in Y^+}\sum_{j \in Y^-}
           \ell_{pair}(y_i, y_j)
    $$

    ``pairs="best_worst"``: the single pair of the highest and the lowest reward (first
    position on ties), as DPO is usually run on scored samples. A group without both a
    chosen and a rejected response (all rewards equal, fewer than two valid) has loss 0.
    This puts DPO and its family on the same group data as [`mpo_loss`][prefopt.mpo_loss].
    Losses that sort across the batch (``aot``, ``aot_unpaired``) are refused: pairs of
    different groups would be matched.

    Args:
        loss: The name of a pairwise or reference-free loss, e.g. ``"sigmoid"``.
        logps: (B, n) summed log-probabilities of each response under the policy.
        ref_logps: (B, n) the same under the reference model, or ``None``.
        rewards: (B, n) scalar rewards (floating or integer). Treated as data.
        pairs: ``"all"`` (default) or ``"best_worst"``.
        mask: (B, n) boolean, ``True`` on real responses; padding may hold anything.
            Default ``None``: all real.
        chosen: (B, n) boolean chosen set replacing the mean split (``pairs="all"`` only).
        lengths: (B, n) token counts, for losses that take lengths. Default ``None``.
        check_values: Check that valid rewards are finite, as in
            [`mpo_loss`][prefopt.mpo_loss]. Default ``None``: on host arrays.
        xp: The array namespace, if known.
        **options: Options of the pairwise loss, e.g. ``beta=0.1``.

    Returns:
        (B,) loss per group in the log-probs' floating dtype (float32 for half precision).

    Raises:
        ValueError: For an unknown or batch-coupled loss, a reference given to a
            reference-free loss, lengths given to a loss that takes none, bad shapes.

    References:
        Rafailov et al., "Direct Preference Optimization", arXiv:2305.18290; the all-pairs
        and best-vs-worst constructions compared in Gupta et al., "Multi-Preference
        Optimization", arXiv:2412.04628.
    """
    fn = "group_pairwise_loss"
    found = spec(loss, fn)
    if found.layout != "pair" or found.couples_batch:
        raise ValueError(
            f"{fn}: loss must be a pairwise loss that does not sort across the batch; "
            f"got {loss!r} ({found.kind}{', couples the batch' if found.couples_batch else ''})"
        )
    _checks.one_of(fn, "pairs", pairs, PAIRS)
    if pairs == "best_worst" and chosen is not None:
        raise ValueError(f"{fn}: chosen applies to pairs='all' only")
    options = found.options(options, fn=fn)
    check_taken(fn, found, ref_logps, lengths)
    xp, logps, ref_logps, rewards, mask, lengths = group_arrays(
        fn, logps, ref_logps, rewards, mask, lengths, chosen, xp
    )
    if logps.shape[-1] == 0:  # no response: no pair, loss 0
        return xp.zeros(logps.shape[:1], dtype=logps.dtype, device=device(logps))
    group = reward_group(fn, rewards, mask, xp, check_values, logps.dtype)
    groups = split(group, chosen)
    valid = groups.chosen | groups.rejected
    # Padding may hold NaN: replace it before any arithmetic (its pairs are dropped below).
    arrays = {"logps": xp.where(valid, logps, 0.0)}
    if ref_logps is not None:
        arrays["ref_logps"] = xp.where(valid, ref_logps, 0.0)
    if lengths is not None:
        arrays["lengths"] = xp.where(valid, lengths, 1.0)
    B, n = logps.shape
    if pairs == "all":
        take = (groups.chosen, groups.rejected)
        selected = xp.expand_dims(take[0], axis=-1) & xp.expand_dims(take[1], axis=-2)

        def side(x: Array, axis: int) -> Array:
            return xp.reshape(xp.broadcast_to(xp.expand_dims(x, axis=axis), (B, n, n)), (-1,))

        sides = (
            {k: side(v, -1) for k, v in arrays.items()},
            {k: side(v, -2) for k, v in arrays.items()},
        )
    else:
        index = xp.arange(n, device=device(logps))
        best = xp.argmax(xp.where(valid, group.rewards, -math.inf), axis=-1)
        worst = xp.argmin(xp.where(valid, group.rewards, math.inf), axis=-1)
        sides = tuple(
            {
                k: xp.sum(xp.where(index == xp.expand_dims(at, axis=-1), v, 0.0), axis=-1)
                for k, v in arrays.items()
            }
            for at in (best, worst)
        )
    call = {"chosen_logps": sides[0]["logps"], "rejected_logps": sides[1]["logps"]}
    if ref_logps is not None:
        call.update(
            ref_chosen_logps=sides[0]["ref_logps"], ref_rejected_logps=sides[1]["ref_logps"]
        )
    if lengths is not None:
        call.update(chosen_lengths=sides[0]["lengths"], rejected_lengths=sides[1]["lengths"])
    per_pair = found.fn(**found.takes(call), **options, xp=xp)
    if pairs == "all":
        per_pair = xp.reshape(per_pair, (B, n, n))
        count = xp.sum(xp.astype(selected, per_pair.dtype), axis=(-2, -1))
        total = xp.sum(xp.where(selected, per_pair, 0.0), axis=(-2, -1))
        loss = total / xp.clip(count, min=1.0)
    else:
        loss = xp.where(groups.counted, per_pair, 0.0)
    return nan_where_unchecked(loss, group)


def check_taken(fn: str, found, ref_logps: Array | None, lengths: Array | None) -> None:
    """Refuse a reference or lengths that the loss would not use, and missing lengths it needs.

    ``found`` is the loss's ``LossSpec``; where lengths go is its ``uses_lengths``.
    """
    loss = found.name
    if ref_logps is not None and found.reference == "none":
        raise ValueError(f"{fn}: {loss!r} is reference-free; pass ref_logps=None")
    if lengths is not None and not found.uses_lengths(ref_logps is not None):
        why = "takes no lengths"
        if found.lengths != "none":
            why = "uses lengths only without ref_logps"
        raise ValueError(f"{fn}: {loss!r} {why}; pass lengths=None")
    if lengths is None and found.lengths == "required":
        raise ValueError(f"{fn}: {loss!r} needs lengths (response token counts), shape (B, n)")


def batch_loss(
    loss: str,
    logps: Array,
    ref_logps: Array | None,
    rewards: Array,
    *,
    mask: Array | None = None,
    lengths: Array | None = None,
    pairs: str = "all",
    reduction: str = "batchmean",
    xp: ModuleType | None = None,
    **options: Any,
) -> Array:
    r"""Any registered loss on a group batch, reduced to one training loss.

    With the default ``reduction="batchmean"``:

    $$
    L = \frac{1}{B}\sum_{b=1}^{B} \ell_b
    $$

    over all B groups, degenerate ones (loss 0) included: the mean of the losses of
    equal-sized micro-batches, or of equal-sized per-device batches, is then exactly the
    loss of the whole batch, so gradient accumulation and data parallelism give the
    gradient of one large batch. ``reduction="mean"`` divides by the number of groups that
    count instead (the loss's counting rule, as the torch modules' ``"mean"``).

    Group losses take the groups as they are, with ``lengths`` only when ``ref_logps`` is
    ``None`` (the reference-free, length-normalised variant). Pairwise and reference-free
    losses run through [`group_pairwise_loss`][prefopt.group_pairwise_loss] (pair rows,
    groups of two with rewards 1 and 0, give the plain pairwise loss), the reference-free
    ones without ``ref_logps``, and those that take token counts with ``lengths``. An input
    the loss does not use is refused, never dropped:
    [`LossSpec.uses_lengths`][prefopt.losses.registry.LossSpec.uses_lengths] says where
    lengths go. Losses
    that sort across the batch (``aot``, ``aot_unpaired``) run on a batch of pairs only
    (n = 2, the higher reward chosen). This is what the trainer integrations and
    ``prefopt train`` minimise.

    Args:
        loss: A registered name (``"mpo"``, ``"sigmoid"``...). ``"kto"`` is refused: it
            needs unpaired data.
        logps: (B, n) summed response log-probs under the policy.
        ref_logps: (B, n) the same under the reference, or ``None``.
        rewards: (B, n) rewards.
        mask: (B, n) boolean, the real responses. Default ``None``: all.
        lengths: (B, n) response token counts, for the losses that use them. Default
            ``None``.
        pairs: ``"all"`` (default) or ``"best_worst"``, for pairwise losses.
        reduction: ``"batchmean"`` (default), ``"mean"`` (over the groups that count),
            ``"sum"`` or ``"none"`` ((B,) per group).
        xp: The array namespace, if known.
        **options: Options of the loss, e.g. ``beta=0.1``; the loss's own defaults apply
            to the others.

    Returns:
        A 0-d array ((B,) with ``reduction="none"``).

    Raises:
        ValueError: For an unknown or unpaired loss, a loss that sorts across the batch on
            groups (or on tied pairs), missing lengths that the loss needs, lengths or a
            reference that it does not use, or a bad reduction.
        TypeError: For an option the loss does not take.

    References:
        Gupta et al., "Multi-Preference Optimization", arXiv:2412.04628 (the group losses);
        Goyal et al., "Accurate, Large Minibatch SGD", arXiv:1706.02677 (why equal-weight
        per-replica means make data parallelism match one large batch).

    Examples:
        >>> import numpy as np, prefopt
        >>> logps = np.array([[-4.0, -6.0, -5.0], [-3.0, -3.5, -9.0]])
        >>> rewards = np.array([[1.0, 0.0, 0.5], [2.0, 2.0, 2.0]])  # group 2: degenerate
        >>> per_group = prefopt.mpo_loss(logps, None, rewards)
        >>> bool(prefopt.batch_loss("mpo", logps, None, rewards) == per_group.sum() / 2)
        True
        >>> bool(prefopt.batch_loss("mpo", logps, None, rewards, reduction="mean") == per_group[0])
        True
    """
    fn = "batch_loss"
    found = spec(loss, fn)
    _checks.one_of(fn, "reduction", reduction, REDUCTIONS)
    why = found.refuses_groups(2)  # a batch-sorting loss: checked on the data below
    if why:
        raise ValueError(f"{fn}: {loss!r} {why}")
    options = found.options(options, fn=fn)
    xp = get_namespace(logps, ref_logps, rewards, mask, lengths, xp=xp)
    check_taken(fn, found, ref_logps, lengths)
    if found.layout == "group":
        if reduction == "mean" and found.terms is not None:  # one split, not two
            arrays = {"logps": logps, "ref_logps": ref_logps, "rewards": rewards, "mask": mask}
            per_group, kept = found.terms(
                found.fn, {**arrays, "lengths": lengths, "xp": xp, **options}
            )
            return reduce(per_group, reduction, kept, xp=xp)
        per_group = found.fn(
            logps, ref_logps, rewards, mask=mask, lengths=lengths, xp=xp, **options
        )
        counts = found.counts
    elif found.couples_batch:
        per_group = _sorted_pairs(found, logps, ref_logps, rewards, mask, xp, options)
        counts = "all"
    else:
        if lengths is not None and mask is not None:
            lengths = xp.where(mask, lengths, 1.0)  # padding slots: any positive count
        per_group = group_pairwise_loss(
            loss,
            logps,
            ref_logps,
            rewards,
            mask=mask,
            lengths=lengths,
            pairs=pairs,
            xp=xp,
            **options,
        )
        counts = "split"  # the groups with a chosen and a rejected response
    if reduction == "mean":
        return reduce(per_group, reduction, counted(counts, rewards, mask, xp=xp), xp=xp)
    return reduce(per_group, reduction, None, xp=xp)


def _sorted_pairs(found, logps, ref_logps, rewards, mask, xp, options) -> Array:
    """A batch-sorting pairwise loss (``aot``) on a batch of pairs: (B,) losses.

    Every row must be a pair (n = 2, both real) with two different rewards; the higher is
    chosen. Such a loss compares pairs across the batch, so it never runs on groups.
    """
    fn = "batch_loss"
    n = logps.shape[-1]
    bad = None if mask is None else _checks.count_false(xp.all(mask, axis=-1), xp)
    if n != 2 or bad:
        raise ValueError(
            f"{fn}: {found.name!r} sorts across the batch and runs on pairs only; got groups "
            f"of {n} responses" + (f" ({bad} rows with padding)" if bad else "")
        )
    ties = _checks.count_false(rewards[..., 0] != rewards[..., 1], xp)
    if ties:
        raise ValueError(f"{fn}: {found.name!r} needs a chosen response; {ties} pairs tie")
    first = rewards[..., 0] > rewards[..., 1]

    def pick(x, winner):
        return None if x is None else xp.where(first == winner, x[..., 0], x[..., 1])

    return found.fn(
        pick(logps, True),
        pick(logps, False),
        pick(ref_logps, True),
        pick(ref_logps, False),
        xp=xp,
        **options,
    )


def counted(
    counts: str,
    rewards: Array,
    mask: Array | None = None,
    chosen: Array | None = None,
    *,
    xp: ModuleType,
) -> Array | None:
    """The (B,) examples that a mean counts under the rule ``counts``; ``None``: all of them.

    Args:
        counts: A [`LossSpec.counts`][prefopt.losses.registry.LossSpec] rule.
        rewards: (B, n) rewards of a group batch, or any (B,) array for ``"all"``.
        mask: (B, n) boolean, the real responses, or ``None``: all.
        chosen: (B, n) explicit chosen set (MPO), or ``None``.
        xp: The array namespace.

    Returns:
        A boolean (B,) array, or ``None`` for ``"all"``.
    """
    if counts == "all":
        return None
    if counts == "split":
        return mpo_split(rewards, mask=mask, chosen=chosen, check_values=False, xp=xp)[2]
    need = 2 if counts == "two valid" else 1
    if mask is None:
        return xp.full(rewards.shape[:1], rewards.shape[-1] >= need, device=device(rewards))
    return xp.sum(xp.astype(mask, xp.int32), axis=-1) >= need


def reduce(loss: Array, reduction: str, counted: Array | None, *, xp: ModuleType) -> Array:
    """Reduce per-example losses: the one definition of every ``reduction``.

    ``"none"``: as they are; ``"sum"``; ``"batchmean"``: the sum over the batch size;
    ``"mean"``: the sum over the number of ``counted`` examples (all when ``None``). An
    empty selection, or an empty batch, gives 0 with a zero gradient.
    """
    if reduction == "none":
        return loss
    if reduction == "mean" and counted is None and loss.shape[0]:
        return xp.mean(loss)  # one kernel, where sum and divide are two
    total = xp.sum(loss)
    if reduction == "sum":
        return total
    if counted is None or reduction == "batchmean":
        return total / max(loss.shape[0], 1)
    return total / xp.clip(xp.sum(xp.astype(counted, loss.dtype)), min=1.0)


def pairs_as_groups(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    xp: ModuleType | None = None,
) -> dict[str, Array | None]:
    r"""A pairwise batch viewed as groups of two, for the group losses.

    Response 0 of each group is the chosen one (reward 1), response 1 the rejected one
    (reward 0). With the default weighting, [`mpo_loss`][prefopt.mpo_loss] on these groups
    equals [`dpo_loss`][prefopt.dpo_loss] on the pairs.

    Args:
        chosen_logps: (B,) summed log-probabilities of the chosen responses.
        rejected_logps: (B,) the same for the rejected responses.
        ref_chosen_logps: (B,) under the reference model, or ``None``.
        ref_rejected_logps: (B,) under the reference model, or ``None``.
        chosen_lengths: (B,) token counts of the chosen responses, or ``None``.
        rejected_lengths: (B,) token counts of the rejected responses, or ``None``.
        xp: The array namespace, if known.

    Returns:
        A dict with ``logps``, ``ref_logps``, ``rewards`` and ``lengths``, each (B, 2) or
        ``None``, to pass as keyword arguments to a group loss.

    Examples:
        >>> import numpy as np, prefopt
        >>> groups = prefopt.pairs_as_groups(np.array([-5.0]), np.array([-9.0]))
        >>> groups["rewards"]
        array([[1., 0.]])
        >>> bool(prefopt.mpo_loss(**groups) == prefopt.dpo_loss(np.array([-5.0]), np.array([-9.0])))
        True
    """
    fn = "pairs_as_groups"
    xp = get_namespace(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, xp=xp)
    _checks.same_shape(
        fn,
        "B",
        {
            "chosen_logps": chosen_logps,
            "rejected_logps": rejected_logps,
            "ref_chosen_logps": ref_chosen_logps,
            "ref_rejected_logps": ref_rejected_logps,
            "chosen_lengths": chosen_lengths,
            "rejected_lengths": rejected_lengths,
        },
    )
    _checks.floating(fn, "chosen_logps", chosen_logps, xp)

    def stack(a: Array | None, b: Array | None, name: str) -> Array | None:
        if (a is None) != (b is None):
            raise ValueError(f"{fn}: pass both chosen and rejected {name}, or neither")
        return None if a is None else xp.stack([a, b], axis=-1)

    logps = stack(chosen_logps, rejected_logps, "log-probs")
    rewards = xp.stack([xp.ones_like(chosen_logps), xp.zeros_like(chosen_logps)], axis=-1)
    return {
        "logps": logps,
        "ref_logps": stack(ref_chosen_logps, ref_rejected_logps, "reference log-probs"),
        "rewards": rewards,
        "lengths": stack(chosen_lengths, rejected_lengths, "lengths"),
    }
