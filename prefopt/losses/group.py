"""Set-level (group) losses: n scored responses per prompt, shape (B, n)."""

from __future__ import annotations

from types import ModuleType

from prefopt import _checks
from prefopt._ops import Array, get_namespace, log_sigmoid, logsumexp

WEIGHTINGS = ("abs", "signed", "squared", "none")


def group_inputs(
    fn: str,
    xp: ModuleType,
    logps: Array,
    ref_logps: Array | None,
    rewards: Array,
    mask: Array | None,
    lengths: Array | None,
    check_values: bool | None,
) -> tuple[Array, Array | None, Array, Array, Array | None]:
    """Validate a group batch; return ``(logps, ref_logps, rewards, valid, lengths)``.

    Log-probs and lengths come back in the compute dtype (see ``_checks.compute_dtype``).
    """
    _checks.same_shape(
        fn,
        "B, n",
        {"logps": logps, "ref_logps": ref_logps, "rewards": rewards, "mask": mask, "lengths": lengths},
    )
    _checks.floating(fn, "logps", logps, xp)
    if ref_logps is not None:
        _checks.floating(fn, "ref_logps", ref_logps, xp)
    if lengths is not None:
        _checks.numeric(fn, "lengths", lengths, xp)
    dtype = _checks.compute_dtype(xp, logps, ref_logps)
    logps, ref_logps, lengths = (_checks.cast(x, dtype, xp) for x in (logps, ref_logps, lengths))
    valid = _valid(fn, xp, mask, logps)
    rewards = _rewards(fn, xp, rewards, valid, dtype, check_values)
    if lengths is not None and _checks.values_checked(lengths, xp, check_values):
        _checks.positive_where(fn, "lengths", lengths, valid, xp)
    return logps, ref_logps, rewards, valid, lengths


def _valid(fn: str, xp: ModuleType, mask: Array | None, like: Array) -> Array:
    if mask is None:
        return xp.ones(like.shape, dtype=xp.bool, device=_device(like))
    _checks.boolean(fn, "mask", mask, xp)
    return mask


def _rewards(fn, xp, rewards, valid, dtype, check_values):
    """Integer ratings become ``dtype``; floating rewards keep their own dtype."""
    _checks.numeric(fn, "rewards", rewards, xp)
    if not xp.isdtype(rewards.dtype, "real floating"):
        rewards = xp.astype(rewards, dtype)
    if _checks.values_checked(rewards, xp, check_values):
        _checks.finite_where(fn, "rewards", rewards, valid, xp)
    return rewards


def _device(x):
    from array_api_compat import device

    return device(x)


def scores(
    logps: Array,
    ref_logps: Array | None,
    valid: Array,
    lengths: Array | None,
    beta: float,
    xp: ModuleType,
) -> Array:
    r"""$s_i = \beta\,h(y_i)$ on valid slots, exactly 0 on padding (whatever it holds)."""
    zero = xp.zeros_like(logps)
    h = logps if ref_logps is None else logps - ref_logps
    if lengths is not None:
        h = h / xp.where(valid, lengths, xp.ones_like(lengths))
    # Padding may hold NaN or inf: replace it before anything can exp() or differentiate it.
    return beta * xp.where(valid, h, zero)


def split(rewards: Array, valid: Array, chosen: Array | None, xp: ModuleType):
    """The MPO mean split without validation: ``(deviation, chosen, rejected, counted)``."""
    zero = xp.zeros_like(rewards)
    r = xp.where(valid, rewards, zero)
    count = xp.sum(xp.astype(valid, rewards.dtype), axis=-1, keepdims=True)
    mean = xp.sum(r, axis=-1, keepdims=True) / xp.maximum(count, xp.ones_like(count))
    deviation = xp.where(valid, r - mean, zero)
    chosen = deviation > zero if chosen is None else chosen
    chosen = chosen & valid
    rejected = valid & ~chosen
    counted = xp.any(chosen, axis=-1) & xp.any(rejected, axis=-1)
    return deviation, chosen, rejected, counted


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
        mask: (B, n) boolean, ``True`` on real responses. ``None``: all are real.
        chosen: (B, n) boolean explicit chosen set, or ``None`` for the mean split.
        check_values: Whether to check that rewards are finite (see
            [Input validation](../validation.md)). Default ``None``: on host memory only.
        xp: The array namespace, if known.

    Returns:
        ``(chosen, rejected, counted)``: boolean (B, n), (B, n) and (B,).

    References:
        Gupta et al., "Multi-Preference Optimization: Generalizing DPO via Set-Level
        Contrasts", arXiv:2412.04628.
    """
    fn = "mpo_split"
    xp = get_namespace(rewards, mask, chosen, xp=xp)
    _checks.same_shape(fn, "B, n", {"rewards": rewards, "mask": mask, "chosen": chosen})
    if chosen is not None:
        _checks.boolean(fn, "chosen", chosen, xp)
    valid = _valid(fn, xp, mask, rewards)
    # Integer ratings split exactly in float32: a mean of integers is either an integer
    # (representable) or at least 1/n away from every integer.
    rewards = _rewards(fn, xp, rewards, valid, xp.float32, check_values)
    _, chosen, rejected, counted = split(rewards, valid, chosen, xp)
    return chosen, rejected, counted


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

    Example:
        >>> import numpy as np, prefopt
        >>> logps = np.array([[-4.0, -6.0, -5.0, -7.0]])
        >>> rewards = np.array([[0.9, 0.1, 0.7, 0.3]])
        >>> prefopt.mpo_loss(logps, None, rewards, weighting="none").round(6)
        array([0.64391])
    """
    fn = "mpo_loss"
    xp = get_namespace(logps, ref_logps, rewards, mask, chosen, lengths, xp=xp)
    beta = _checks.positive(fn, "beta", beta)
    alpha = _checks.in_range(fn, "alpha", alpha, 0.0, float("inf"))
    _checks.one_of(fn, "weighting", weighting, WEIGHTINGS)
    if lengths is not None and ref_logps is not None:
        raise ValueError(
            f"{fn}: lengths normalise the reference-free variant only; "
            "pass ref_logps=None or leave lengths out"
        )
    if chosen is not None:
        _checks.same_shape(fn, "B, n", {"logps": logps, "chosen": chosen})
        _checks.boolean(fn, "chosen", chosen, xp)
    logps, ref_logps, rewards, valid, lengths = group_inputs(
        fn, xp, logps, ref_logps, rewards, mask, lengths, check_values
    )
    s = scores(logps, ref_logps, valid, lengths, beta, xp)
    deviation, chosen, rejected, counted = split(rewards, valid, chosen, xp)
    if weighting != "none":
        d = xp.astype(deviation, s.dtype)
        s = s + alpha * {"abs": xp.abs(d), "signed": d, "squared": d * d}[weighting]
    zero = xp.zeros(counted.shape, dtype=s.dtype, device=_device(s))
    # A degenerate group has an empty set, whose log-sum-exp is -inf. Let both sets span
    # the whole (sanitised) row there: every value and gradient stays finite, and the
    # where() below discards the result with an exactly zero gradient.
    skip = ~counted[..., None]
    margin = logsumexp(s, mask=chosen | skip, xp=xp) - logsumexp(s, mask=rejected | skip, xp=xp)
    return xp.where(counted, -log_sigmoid(margin, xp=xp), zero)
