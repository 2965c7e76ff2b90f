"""The inputs of a loss, checked and prepared: the pair, group and unpaired layouts side by side.

Each loss opens with one call, ``pair_inputs(loss, dict(name=value, ...))``,
``group_inputs(...)`` or ``unpaired_inputs(...)``, every parameter passed by its name (no
order to get wrong; a test checks that each loss passes all of its parameters): the call
checks shapes, dtypes and options, and returns a small named structure: the namespace, the
log-ratios (or scores) in the compute dtype, and the checked options. The loss's body is
then its formula. A ``dict`` of keywords is what ``torch.compile(fullgraph=True)`` traces
on every supported torch (``locals()`` only on torch 2.13 and later).

Shapes, ranks, dtypes and options are checked on every call, traced or not (they are
static). Values (finite rewards, positive lengths) follow ``check_values``; see
``prefopt._checks``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any, NamedTuple

from array_api_compat import device

from prefopt import _checks
from prefopt._ops import Array, get_namespace, log_sigmoid, native, stop_gradient

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
WEIGHTINGS = ("abs", "signed", "squared", "none")


# The checks of the numeric options, which mean the same in every loss; a loss with a
# narrower range (robust DPO's label_smoothing < 0.5, DiscoPOP's tau <= 1) adds one line of
# its own. Each option is a Python number or a 0-d array of the inputs' library, which may
# be traced (a schedule inside ``jax.jit``, ``vmap`` over beta, a 0-d tensor that
# ``torch.compile`` does not specialise on).
_OPTION_CHECKS = {
    "beta": _checks.positive,
    "tau": _checks.positive,
    "f_alpha": _checks.positive,
    "alpha": _checks.non_negative,
    "gamma": _checks.non_negative,
    "cpo_alpha": _checks.non_negative,
    "desirable_weight": _checks.non_negative,
    "undesirable_weight": _checks.non_negative,
    "label_smoothing": functools.partial(_checks.in_range, low=0.0, high=0.5),
    "delta": _checks.finite,
}
NUMERIC = frozenset(_OPTION_CHECKS)
# The options that choose code (static strings), and their choices.
CHOICES = {"f_divergence": F_DIVERGENCES, "weighting": WEIGHTINGS}


def _range(low: float, high: float, **open_end: bool):
    # a partial, not a lambda: the JAX step's traced checks read its bounds
    return functools.partial(_checks.in_range, low=low, high=high, **open_end)


def narrower(**ranges: tuple[float, float, dict[str, bool]]):
    """Give a loss a narrower range for an option than the common rule, where it is defined.

    ``@narrower(tau=(0.0, 1.0, {"open_low": True}))`` above a loss: ``(low, high, open
    ends)``, checked with the loss's name wherever its options are (its calls, its
    ``LossConfig``).
    """

    def mark(loss):
        loss.option_ranges = {k: _range(low, high, **e) for k, (low, high, e) in ranges.items()}
        return loss

    return mark


def reads_terms(loss):
    """Mark a pairwise loss that reads each f-transformed log-ratio alone.

    Not only their difference (NCA, BCO, SPPO, sigmoid-norm): a term beyond the dtype is
    refused there (see ``pair_inputs``).
    """
    loss.reads_terms = True
    return loss


def option_rule(fn, name: str):
    """The check of numeric option ``name`` for loss ``fn``, or ``None`` where it has none.

    The loss's narrower range where it states one (``@narrower``), else the common rule. A
    rule is ``rule(fn_name, name, value)``, raising for a bad value and returning it as a
    float: ``_checks.positive``, ``non_negative``, ``finite`` or a partial of
    ``_checks.in_range`` with its bounds.
    """
    return getattr(fn, "option_ranges", {}).get(name, _OPTION_CHECKS.get(name))


def checked_options(fn, args: Mapping[str, Any], dtype=None, xp=None) -> dict[str, Any]:
    """Check every option of ``args`` that has a rule (raises naming it); return the numbers.

    ``fn`` is the loss function (its name for the message, its narrower ranges), or a
    caller's name. The numeric options come back as floats, or as 0-d arrays cast to the
    compute ``dtype`` of namespace ``xp`` (with ``xp=None``: as given). An array is checked
    where its value can be read (see ``_checks.option``).
    """
    where, narrow, out = _name(fn), getattr(fn, "option_ranges", {}), {}
    for name, value in args.items():
        rule = _OPTION_CHECKS.get(name)
        if rule is None:  # an array, xp, a choice
            if name in CHOICES:
                _checks.one_of(where, name, value, CHOICES[name])
            continue
        rule = narrow.get(name, rule)  # as option_rule
        if type(value) is float or type(value) is int:  # the common case: a plain number
            out[name] = rule(where, name, value)
        else:
            value = _checks.option(where, name, value, rule)
            out[name] = value if xp is None else _checks.scalar(where, name, value, dtype, xp)
    return out


def _name(fn) -> str:
    return fn if isinstance(fn, str) else fn.__name__


# ---- pairs: (B,) chosen and rejected ------------------------------------------------------


class Pair(NamedTuple):
    """A checked pairwise batch (see ``pair_inputs``)."""

    xp: ModuleType
    hw: Array  # (B,) h(y_w), the chosen log-ratio (log-prob without a reference), f-transformed
    hl: Array  # (B,) h(y_l), the rejected one
    z: Array | None  # (B,) beta (hw - hl) of an f-divergence (f_margin); None: see margin
    lw: Array | None  # (B,) |y_w|, token counts in the compute dtype, or None
    ll: Array | None  # (B,) |y_l|
    beta: float | Array  # a number, or a 0-d array in the compute dtype
    options: dict[str, Any]  # every numeric option likewise (see checked_options)

    def margin(self, negated: bool = False) -> Array:
        r"""$\beta (h_w - h_l)$, or with ``negated`` $\beta (h_l - h_w)$.

        The negated one is the same to the last bit, one kernel fewer than negating after.
        """
        if self.z is not None:
            return -self.z if negated else self.z
        return self.beta * (self.hl - self.hw if negated else self.hw - self.hl)


def pair_inputs(fn, args, *, squared: bool = False) -> Pair:
    """Check a pairwise loss's arguments; return a ``Pair``.

    Args:
        fn: The loss function (its name for errors, its narrower option ranges), or a
            caller's name (the metrics).
        args: Its arguments by name: ``chosen_logps``, ``rejected_logps``, optionally the
            reference and lengths arrays, ``beta``, ``f_divergence``/``f_alpha`` and ``xp``.
        squared: The loss squares a difference of transformed log-ratios (IPO, SPPO): the
            f-divergence exponent is clipped where that square would overflow.
    """
    lengths = lengths_kind(fn) if callable(fn) else "optional"  # the metrics: optional
    loss, fn = fn, _name(fn)  # the function (its own option ranges), and its name
    arrays = pair_arrays(
        fn,
        args["chosen_logps"],
        args["rejected_logps"],
        args.get("ref_chosen_logps"),
        args.get("ref_rejected_logps"),
        args.get("xp"),
    )
    xp, hw, hl, rw, rl = arrays
    if rw is not None:
        hw, hl = hw - rw, hl - rl
    options = checked_options(loss, args, hw.dtype, xp)
    f_divergence = args.get("f_divergence", "reverse_kl")
    if f_divergence != "reverse_kl":
        f_alpha = options["f_alpha"]
        if getattr(loss, "reads_terms", False):
            _terms_fit(fn, hw, hl, f_divergence, f_alpha, xp, squared)
        z = f_margin(hw, hl, f_divergence, f_alpha, options["beta"], xp, squared=squared)
        hw, hl = (f_transform(h, f_divergence, f_alpha, xp, squared=squared) for h in (hw, hl))
    else:
        z = None
    lw = ll = None
    if "chosen_lengths" in args:
        counts = args["chosen_lengths"], args.get("rejected_lengths")
        lw, ll = pair_lengths(fn, *counts, hw, xp, lengths)
    return Pair(xp, hw, hl, z, lw, ll, options["beta"], options)


def _terms_fit(fn, hw, hl, f_divergence, f_alpha, xp, squared) -> None:
    """Raise where a loss reading each transformed term alone gets one beyond the dtype.

    ``f_transform`` would saturate it. Only where the values can be read (on the host,
    outside a trace); elsewhere the term saturates, as documented.
    """
    found = _exponent(hw.dtype, f_divergence, f_alpha, xp, squared)
    if found is None or not _checks.values_checked(hw, xp, None):
        return  # nothing can overflow, or a traced alpha or value that is not read
    c, limit = found
    worst = float(xp.max(xp.maximum(c * hw, c * hl)))
    if worst > limit:
        h = worst / c
        raise ValueError(
            f"{fn}: f_divergence={f_divergence!r} needs each transformed log-ratio alone, "
            f"and at a log-ratio of {h:.4g} one is beyond {xp.finfo(hw.dtype).dtype} (the "
            f"exponent {worst:.4g} > {limit:.4g}); give log-ratios against a reference "
            "(ref_chosen_logps, ref_rejected_logps), not log-probs, or a wider dtype"
        )


@functools.cache
def lengths_kind(loss) -> str:
    """How a loss takes token counts, read from its signature (the registry reads it here).

    ``"none"`` (no lengths parameter), ``"chosen"`` (a pairwise loss with
    ``chosen_lengths`` only), ``"required"`` (no default) or ``"optional"`` (default ``None``).
    """
    params = inspect.signature(loss).parameters
    counts = params.get("lengths") or params.get("chosen_lengths")
    if counts is None:
        return "none"
    if "chosen_lengths" in params and "rejected_lengths" not in params:
        return "chosen"
    return "required" if counts.default is inspect.Parameter.empty else "optional"


def pair_arrays(
    fn: str,
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array | None,
    ref_rejected_logps: Array | None,
    xp: ModuleType | None,
) -> tuple[ModuleType, Array, Array, Array | None, Array | None]:
    """Validate a pairwise batch; return the namespace and its four arrays in the compute dtype."""
    xp = get_namespace(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, xp=xp, fn=fn
    )
    both_or_neither(
        fn, "ref_chosen_logps", ref_chosen_logps, "ref_rejected_logps", ref_rejected_logps
    )
    given = (chosen_logps, rejected_logps)
    if ref_chosen_logps is not None:
        given += (ref_chosen_logps, ref_rejected_logps)
    first = given[0]
    shape, dtype = first.shape, first.dtype
    # The common case, one shape and one float dtype that needs no cast, in a few
    # comparisons (a hot path in eager PyTorch); anything else goes through the checks that
    # name the argument.
    uniform = len(shape) == 1
    for x in given[1:]:
        uniform = uniform and x.shape == shape and x.dtype == dtype
    if uniform and _checks.compute_dtype_of(xp, dtype) == dtype:
        return xp, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    names = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    arrays = dict(zip(names, (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)))
    _checks.same_shape(fn, "B", arrays)
    for name, x in arrays.items():
        if x is not None:
            _checks.floating(fn, name, x, xp)
    dtype = _checks.compute_dtype(xp, *given)
    return (
        xp,
        _checks.cast(chosen_logps, dtype, xp),
        _checks.cast(rejected_logps, dtype, xp),
        _checks.cast(ref_chosen_logps, dtype, xp),
        _checks.cast(ref_rejected_logps, dtype, xp),
    )


def both_or_neither(fn: str, name_a: str, a: Array | None, name_b: str, b: Array | None) -> None:
    """Raise unless both optional arrays are given or neither is."""
    if (a is None) != (b is None):
        raise ValueError(f"{fn}: pass both {name_a} and {name_b}, or neither; got only one")


def f_transform(
    h: Array, f_divergence: str, f_alpha: float | Array, xp: ModuleType, *, squared: bool = False
) -> Array:
    r"""The f-divergence transform of log-ratios $h$ (TRL's ``f_divergence_type``).

    ``forward_kl`` $1 - e^{-h}$, ``js_divergence`` $\log 2 + \log\sigma(h)$,
    ``alpha_divergence`` $(e^{(\alpha - 1) h} - 1) / (\alpha - 1)$ ($h$ at $\alpha = 1$).
    """
    # The exponent x is clipped only where the result would overflow the dtype. The
    # transform is bounded on one side (by 1, or 1/|alpha - 1|), so a difference of two
    # overflows only where one of them does: x is clipped where |f| = e^x / |alpha - 1|
    # would pass half the dtype's largest number (at log(max/2), lowered by
    # log|alpha - 1| < 0), and for a loss that squares the difference (squared: IPO, SPPO)
    # where the square, or its gradient, would (at half of log(max/4), likewise lowered).
    # Beyond the clip the transform is flat (gradient 0); below it every value is exact.
    limit = _exponent_limit(h.dtype, xp, squared)
    if f_divergence == "forward_kl":
        return 1.0 - xp.exp(xp.clip(-h, max=limit))
    if f_divergence == "js_divergence":
        return math.log(2.0) + log_sigmoid(h, xp=xp)
    if f_divergence != "alpha_divergence":
        return h  # reverse_kl
    if isinstance(f_alpha, (int, float)):
        if f_alpha == 1.0:
            return h  # the limit at alpha = 1
        c = f_alpha - 1.0
        limit += min(0.0, math.log(abs(c)))
        return (xp.exp(xp.clip(c * h, max=limit)) - 1.0) / c
    # a 0-d array alpha (traced): the same, with alpha = 1 chosen by a where, not an if
    one = f_alpha == 1.0
    c = xp.where(one, xp.ones_like(f_alpha), f_alpha - 1.0)  # safe: no 0 / 0 in the gradient
    limit = limit + xp.minimum(xp.log(xp.abs(c)), xp.zeros_like(c))
    return xp.where(one, h, (xp.exp(xp.minimum(c * h, limit + xp.zeros_like(h))) - 1.0) / c)


def _exponent(dtype, f_divergence: str, f_alpha, xp: ModuleType, squared: bool):
    """``(c, limit)``: the transform's exponent is $x = c h$, clipped at ``limit``.

    For a number ``f_alpha``; ``None`` where no exponent can overflow (``js_divergence``,
    alpha 1) or alpha is an array (traced).
    """
    if f_divergence == "forward_kl":
        c = -1.0
    elif f_divergence == "alpha_divergence" and isinstance(f_alpha, (int, float)):
        if f_alpha == 1.0:
            return None
        c = f_alpha - 1.0
    else:
        return None
    return c, _exponent_limit(dtype, xp, squared) + min(0.0, math.log(abs(c)))


def _exponent_limit(dtype, xp: ModuleType, squared: bool) -> float:
    """Where ``f_transform`` clips its exponent, before the ``log|alpha - 1|`` adjustment."""
    big = math.log(float(xp.finfo(dtype).max))
    return 0.5 * (big - math.log(4.0)) if squared else big - math.log(2.0)


def f_margin(
    hw: Array,
    hl: Array,
    f_divergence: str,
    f_alpha: float | Array,
    beta: float | Array,
    xp: ModuleType,
    *,
    squared: bool = False,
) -> Array:
    r"""$\beta (f(h_w) - f(h_l))$, the margin of f-transformed log-ratios (see ``f_transform``).

    Where neither exponent reaches the clip, it is $\beta$ times the difference of the two
    transforms, to the last bit. Beyond it, each term alone would be clipped to the same
    value and the margin would vanish (reference-free ``forward_kl`` at log-probs -106 and
    -145: a huge positive margin became 0). There the margin is computed without forming
    the terms: with $x = c h$ ($c = -1$ for ``forward_kl``, $\alpha - 1$ for
    ``alpha_divergence``) and $m$ the larger exponent,
    $\beta (e^{x_w} - e^{x_l}) / c = \pm e^{m + \log(1 - e^{-|x_w - x_l|}) + \log\beta} / c$,
    its exponent clipped only where the margin itself would overflow.
    """
    naive = beta * (
        f_transform(hw, f_divergence, f_alpha, xp, squared=squared)
        - f_transform(hl, f_divergence, f_alpha, xp, squared=squared)
    )
    if f_divergence not in ("forward_kl", "alpha_divergence"):
        return naive  # js_divergence: the terms never overflow
    found = _exponent(hw.dtype, f_divergence, f_alpha, xp, squared)
    if found is not None:
        c, limit = found
    elif isinstance(f_alpha, (int, float)):
        return naive  # alpha = 1: h itself, nothing overflows
    else:  # a 0-d array alpha: at alpha = 1 nothing overflows, and the naive margin is used
        c = xp.where(f_alpha == 1.0, xp.ones_like(f_alpha), f_alpha - 1.0)
        limit = _exponent_limit(hw.dtype, xp, squared)
        limit = limit + xp.minimum(xp.log(xp.abs(c)), xp.zeros_like(c))
    xw, xl = c * hw, c * hl
    top = xp.maximum(xw, xl)
    gap = -xp.abs(xw - xl)  # <= 0
    tie = gap == 0.0
    log1m = xp.log(-xp.expm1(xp.where(tie, -xp.ones_like(gap), gap)))  # finite at a tie
    log_beta = math.log(beta) if isinstance(beta, (int, float)) else xp.log(beta)
    far = xp.exp(xp.minimum(top + log1m + log_beta, limit + xp.zeros_like(top))) / c
    far = xp.where(tie, xp.zeros_like(far), xp.where(xw >= xl, far, -far))
    return xp.where(top > limit, far, naive)


def pair_lengths(
    fn: str,
    chosen_lengths: Array | None,
    rejected_lengths: Array | None,
    like: Array,
    xp: ModuleType,
    lengths: str = "optional",
) -> tuple[Array | None, Array | None]:
    """Validate token counts (B,) (> 0 where values can be read); cast to ``like.dtype``."""
    if lengths == "chosen":
        if chosen_lengths is None:
            return None, None
        return lengths_of(fn, "chosen_lengths", chosen_lengths, like, xp), None
    both_or_neither(fn, "chosen_lengths", chosen_lengths, "rejected_lengths", rejected_lengths)
    if chosen_lengths is None:
        if lengths == "required":
            raise ValueError(
                f"{fn}: chosen_lengths and rejected_lengths (token counts, shape (B,)) are "
                "required; got None"
            )
        return None, None
    return (
        lengths_of(fn, "chosen_lengths", chosen_lengths, like, xp),
        lengths_of(fn, "rejected_lengths", rejected_lengths, like, xp),
    )


def lengths_of(fn: str, name: str, lengths: Array, like: Array, xp: ModuleType) -> Array:
    """One (B,) array of token counts, checked and cast to ``like.dtype``."""
    _checks.same_shape(fn, "B", {"chosen_logps": like, name: lengths})
    _checks.numeric(fn, name, lengths, xp)
    lengths = _checks.cast(lengths, like.dtype, xp)
    if _checks.values_checked(lengths, xp, None):
        _checks.positive_where(fn, name, lengths, xp.ones_like(lengths, dtype=xp.bool), xp)
    return lengths


# ---- groups: (B, n) scored responses ------------------------------------------------------


class Group(NamedTuple):
    """A checked group batch (see ``group_inputs``)."""

    xp: ModuleType
    scores: Array  # (B, n) s = beta * h, exactly 0 on padding
    rewards: Array  # (B, n) rewards as data (no gradient), 0 on padding, floating:
    # integer ratings in the compute dtype, half precision in float32
    valid: Array | None  # (B, n) bool: the real responses; None: all are real
    total: Array  # (B, 1) sum of the valid rewards: non-finite exactly when one of them is
    checked: bool  # whether the rewards were checked to be finite
    ratings: Array | None  # (B, n) integer rewards as given, 0 on padding; None for floats
    beta: float | Array  # a number, or a 0-d array in the compute dtype
    chosen: Array | None = None  # (B, n) explicit chosen set (MPO), or None: the mean split
    options: dict[str, Any] | None = None  # every numeric option (see checked_options)


def group_inputs(fn, args) -> Group:
    """Check a group loss's arguments; return a ``Group``.

    Args:
        fn: The loss function (its name for errors, its narrower option ranges), or a
            caller's name (the metrics).
        args: Its arguments by name: ``logps``, ``ref_logps``, ``rewards``, optionally ``mask``,
            ``chosen`` and ``lengths``, ``beta``, ``check_values`` and ``xp``.

    Groups of no response (n = 0) are one padding slot each: every group loss is then 0
    for them, as for any group without a valid response.
    """
    loss, fn = fn, _name(fn)  # the function (its own option ranges), and its name
    check_values, chosen = args.get("check_values"), args.get("chosen")
    xp, logps, ref_logps, rewards, mask, lengths = group_arrays(
        fn,
        args["logps"],
        args["ref_logps"],
        args["rewards"],
        args.get("mask"),
        args.get("lengths"),
        chosen,
        args.get("xp"),
    )
    options = checked_options(loss, args, logps.dtype, xp)
    if logps.shape[-1] == 0:  # no response at all: one padding slot, so no empty reduction
        xp, logps, ref_logps, rewards, mask, lengths, chosen = _one_slot(
            xp, logps, ref_logps, rewards, lengths, chosen
        )
    if lengths is not None and ref_logps is not None:
        raise ValueError(
            f"{fn}: lengths normalise the reference-free variant only; "
            "pass ref_logps=None or leave lengths out"
        )
    if lengths is not None and _checks.values_checked(lengths, xp, check_values):
        valid = xp.ones_like(lengths, dtype=xp.bool) if mask is None else mask
        _checks.positive_where(fn, "lengths", lengths, valid, xp)
    # Padding may hold NaN or -inf (a masked log-softmax): replaced before any arithmetic
    # that could carry it into a value, a gradient or a NumPy warning. On the native
    # backends one where() after the difference does (its backward gives padding an exact
    # 0, and a difference has no backward that could turn it into NaN).
    if mask is None or ref_logps is None:
        h = logps if mask is None else xp.where(mask, logps, 0.0)
        if ref_logps is not None:
            h = h - ref_logps
    elif native(xp) is not None:
        h = xp.where(mask, logps - ref_logps, 0.0)
    else:
        h = xp.where(mask, logps, 0.0) - xp.where(mask, ref_logps, 0.0)
    if lengths is not None:
        h = h / (lengths if mask is None else xp.where(mask, lengths, 1.0))
    beta = options["beta"]
    r = group_rewards(fn, rewards, mask, xp, check_values, h.dtype)
    return Group(xp, beta * h, *r, beta, chosen, options)


def _one_slot(xp, logps, ref_logps, rewards, lengths, chosen):
    """A (B, 0) group batch as (B, 1) with the slot masked out."""

    def slot(x, dtype=None):
        if x is None:
            return None
        pad = xp.zeros((x.shape[0], 1), dtype=dtype or x.dtype, device=device(x))
        return pad if dtype else xp.concat([x, pad], axis=-1)  # keeps the autograd graph

    mask = slot(logps, xp.bool)
    return xp, slot(logps), slot(ref_logps), slot(rewards), mask, slot(lengths), slot(chosen)


def group_arrays(
    fn: str,
    logps: Array,
    ref_logps: Array | None,
    rewards: Array,
    mask: Array | None,
    lengths: Array | None,
    chosen: Array | None = None,
    xp: ModuleType | None = None,
) -> tuple[ModuleType, Array, Array | None, Array, Array | None, Array | None]:
    """Validate the shapes and dtypes of a group batch.

    Returns ``(xp, logps, ref_logps, rewards, mask, lengths)``: log-probs and lengths in the
    compute dtype (see ``_checks.compute_dtype``), rewards as given.
    """
    xp = get_namespace(logps, ref_logps, rewards, mask, chosen, lengths, xp=xp, fn=fn)
    _checks.same_shape(
        fn,
        "B, n",
        {
            "logps": logps,
            "ref_logps": ref_logps,
            "rewards": rewards,
            "mask": mask,
            "lengths": lengths,
            "chosen": chosen,
        },
    )
    _checks.floating(fn, "logps", logps, xp)
    for name, x in (("mask", mask), ("chosen", chosen)):
        if x is not None:
            _checks.boolean(fn, name, x, xp)
    if ref_logps is not None:
        _checks.floating(fn, "ref_logps", ref_logps, xp)
    if lengths is not None:
        _checks.numeric(fn, "lengths", lengths, xp)
    _checks.numeric(fn, "rewards", rewards, xp)
    dtype = _checks.compute_dtype(xp, logps, ref_logps)
    logps, ref_logps, lengths = (_checks.cast(x, dtype, xp) for x in (logps, ref_logps, lengths))
    return xp, logps, ref_logps, rewards, mask, lengths


def valid_of(group: Group) -> Array:
    """The (B, n) boolean mask of real responses (all true when no mask was given)."""
    if group.valid is not None:
        return group.valid
    return group.xp.ones(group.scores.shape, dtype=group.xp.bool, device=device(group.scores))


def reward_group(
    fn: str, rewards: Array, mask: Array | None, xp: ModuleType, check_values, dtype
) -> Group:
    """A ``Group`` of rewards only (no scores): what the mean split needs."""
    return Group(xp, None, *group_rewards(fn, rewards, mask, xp, check_values, dtype), 1.0)


def group_rewards(
    fn: str,
    rewards: Array,
    mask: Array | None,
    xp: ModuleType,
    check_values: bool | None,
    dtype,
) -> tuple[Array, Array | None, Array, bool, Array | None]:
    """``(rewards, valid, total, checked, ratings)`` of a ``Group`` (see its fields).

    Rewards are data: no gradient reaches them. Integer ratings are kept as given for an
    exact mean split and cast to ``dtype`` for the arithmetic; half-precision rewards are
    computed in float32 (``2**r`` or ``r / tau`` would overflow or round in float16).
    """
    ratings, wide = None, _checks.compute_dtype_of(xp, rewards.dtype)  # None for integers
    if wide is None:
        ratings = rewards if mask is None else xp.where(mask, rewards, xp.zeros_like(rewards))
        rewards = xp.astype(rewards, dtype)
    elif wide != rewards.dtype:
        rewards = xp.astype(rewards, wide)
    rewards = stop_gradient(rewards, xp=xp)
    r = rewards if mask is None else xp.where(mask, rewards, 0.0)
    total = xp.sum(r, axis=-1, keepdims=True)
    if ratings is not None or not _checks.values_checked(rewards, xp, check_values):
        return r, mask, total, ratings is not None, ratings
    finite = _checks.all_finite(total, xp)
    if finite is False:
        bad = _checks.count_false(xp.isfinite(total), xp)
        raise ValueError(
            f"{fn}: rewards must be finite where mask is true; "
            f"got NaN or infinite rewards in {bad} group(s)"
        )
    return r, mask, total, finite is True, ratings


def nan_where_unchecked(loss: Array, group: Group) -> Array:
    """Loss NaN for the groups whose rewards are not all finite, unless they were checked.

    Unchecked rewards (traced, on an accelerator, or ``check_values=False``): a group with a
    non-finite reward gets a visible NaN rather than a silently skipped group.
    """
    if group.checked:
        return loss
    return group.xp.where(group.xp.isfinite(group.total[..., 0]), loss, math.nan)


# ---- unpaired: (B,) responses marked desirable --------------------------------------------


class Unpaired(NamedTuple):
    """A checked unpaired batch (see ``unpaired_inputs``)."""

    xp: ModuleType
    ratios: Array  # (B,) h(y): log-ratio, or log-prob without a reference
    beta: float | Array  # a number, or a 0-d array in the compute dtype
    options: dict[str, Any]  # every numeric option likewise (see checked_options)


def unpaired_inputs(fn, args) -> Unpaired:
    """Check an unpaired loss's arguments (see ``pair_inputs``); return ``Unpaired``."""
    loss, fn = fn, _name(fn)  # the function (its own option ranges), and its name
    logps, ref_logps = args["logps"], args["ref_logps"]
    xp = get_namespace(logps, ref_logps, args.get("desirable"), xp=args.get("xp"), fn=fn)
    h = log_ratios(fn, logps, ref_logps, xp)
    options = checked_options(loss, {"beta": 1.0, **args}, h.dtype, xp)
    return Unpaired(xp, h, options["beta"], options)


def log_ratios(fn: str, logps: Array, ref_logps: Array | None, xp: ModuleType) -> Array:
    """(B,) ``logps - ref_logps`` (or ``logps``) in the compute dtype, shapes checked."""
    _checks.same_shape(fn, "B", {"logps": logps, "ref_logps": ref_logps})
    _checks.floating(fn, "logps", logps, xp)
    if ref_logps is not None:
        _checks.floating(fn, "ref_logps", ref_logps, xp)
    dtype = _checks.compute_dtype(xp, logps, ref_logps)
    h = _checks.cast(logps, dtype, xp)
    return h if ref_logps is None else h - _checks.cast(ref_logps, dtype, xp)
