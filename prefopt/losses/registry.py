"""Losses by name, and every fact about each loss that a caller needs, in one place.

A [`LossSpec`][prefopt.losses.registry.LossSpec] states a loss's data layout, whether it
takes a reference and token counts, whether it couples the batch, and which examples a mean
counts; its option defaults are read once from the function's signature. Composition,
``batch_loss``, the torch modules, the trainers and ``prefopt train`` read the spec: none of
them inspects a loss function or tests its identity.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from prefopt.losses.group import (
    infonca_loss,
    lipo_loss,
    mpo_loss,
    mpo_terms,
    nca_loss,
    plackett_luce_loss,
)
from prefopt.losses.inputs import NUMERIC, checked_options, lengths_kind, option_rule
from prefopt.losses.pairwise import (
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    discopop_loss,
    dpo_loss,
    exo_pair_loss,
    hinge_loss,
    ipo_loss,
    nca_pair_loss,
    robust_dpo_loss,
    sigmoid_norm_loss,
    sppo_hard_loss,
)
from prefopt.losses.reference_free import cpo_loss, orpo_loss, simpo_loss
from prefopt.losses.unpaired import kto_loss

__all__ = ["LossConfig", "LossSpec", "available_losses", "get_loss", "spec", "specs"]

# The arrays of each layout, in the order the loss functions take them positionally first.
INPUTS = {
    "pair": (
        "chosen_logps",
        "rejected_logps",
        "ref_chosen_logps",
        "ref_rejected_logps",
        "chosen_lengths",
        "rejected_lengths",
    ),
    "group": ("logps", "ref_logps", "rewards", "mask", "chosen", "lengths"),
    "unpaired": ("logps", "ref_logps", "desirable", "kl"),
}
POSITIONAL = {
    "pair": INPUTS["pair"][:4],
    "group": INPUTS["group"][:3],
    "unpaired": INPUTS["unpaired"][:3],
}
# Which examples a mean counts (see LossSpec.counts).
COUNTS = ("all", "split", "two valid", "one valid")


@dataclass(frozen=True)
class LossSpec:
    """The facts about one registered loss.

    Attributes:
        name: The registered name (TRL's ``loss_type`` string where TRL has the loss).
        fn: The loss function.
        title: The name papers use (the torch module's class is named ``title + "Loss"``).
        layout: ``"pair"`` ((B,) chosen and rejected), ``"group"`` ((B, n) with rewards)
            or ``"unpaired"`` ((B,) responses marked desirable).
        reference: ``"optional"`` (a reference model's log-probs, or none) or ``"none"``
            (reference-free: the loss takes no reference), read from its signature.
        lengths: Token counts the loss takes, read from its signature: ``"none"`` (no
            lengths parameter), ``"optional"`` (default ``None``), ``"required"`` (no
            default) or ``"chosen"`` (the chosen response's only, required unless its term
            is off). See ``uses_lengths`` for when they are used.
        counts: Which examples a ``"mean"`` reduction averages over: ``"all"``,
            ``"split"`` (groups whose mean split has a chosen and a rejected response),
            ``"two valid"`` or ``"one valid"`` (groups with at least that many responses).
            The other groups have loss exactly 0.
        couples_batch: The loss of one example depends on the others (it sorts across the
            batch): never chunk such a batch or apply the loss to pairs built from groups.
        terms: For a loss whose counting rule needs its own split (MPO), the function of
            the loss's arguments (a dict) that returns the per-group loss and the groups
            that count in one pass, so that a ``"mean"`` splits once; else ``None``.
        trl_options: The options TRL 1.16's ``DPOConfig`` sets for this loss besides
            ``beta``, by prefopt's names (``label_smoothing``, ``f_divergence`` with its
            ``f_alpha``, ``tau``): a ``DPOConfig`` passes the loss these and no other.
        inputs: The arrays of the layout that the loss function takes (``xp`` too).
        defaults: The loss's options (keyword-only settings that are not arrays) and
            their defaults.
        ranges: The check of each numeric option, ``rule(fn_name, name, value)``: the
            loss's narrower range where it states one, else the common rule (see
            ``prefopt.losses.inputs.option_rule``).
    """

    name: str
    fn: Callable
    title: str
    layout: str
    counts: str = "all"
    couples_batch: bool = False
    terms: Callable | None = None
    trl_options: tuple[str, ...] = ()
    # read from the function's signature when the spec is built (never under a trace)
    reference: str = field(init=False, compare=False)
    lengths: str = field(init=False, compare=False)
    inputs: tuple[str, ...] = field(init=False, repr=False, compare=False)
    defaults: dict[str, Any] = field(init=False, repr=False, compare=False)
    ranges: dict[str, Callable] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        params = inspect.signature(self.fn).parameters
        reference = "optional" if {"ref_logps", "ref_chosen_logps"} & set(params) else "none"
        inputs = (*(name for name in INPUTS[self.layout] if name in params), "xp")
        defaults = {
            p.name: p.default
            for p in params.values()
            if p.kind is p.KEYWORD_ONLY and p.name != "xp" and p.name not in INPUTS[self.layout]
        }
        derived = {
            "reference": reference,
            "lengths": lengths_kind(self.fn),
            "inputs": inputs,
            "defaults": defaults,
            "ranges": {k: option_rule(self.fn, k) for k in defaults if k in NUMERIC},
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)  # a frozen dataclass
        if not set(self.trl_options) <= set(defaults):
            raise TypeError(f"{self.name}: trl_options {self.trl_options} are not all options")

    @property
    def kind(self) -> str:
        """``"pairwise"``, ``"reference-free"``, ``"unpaired"`` or ``"group"``."""
        if self.layout == "pair":
            return "reference-free" if self.reference == "none" else "pairwise"
        return self.layout

    def refuses_groups(self, n: int | None) -> str | None:
        """Why the loss cannot train on groups of ``n`` responses, or ``None`` when it can.

        ``n`` ``None``: groups of any size, sampled (a pair may tie). The one place that
        decides it, for ``batch_loss``, the trainers and ``prefopt train``.
        """
        if self.layout == "unpaired":
            return "needs unpaired data (single responses marked desirable), not groups or pairs"
        if self.couples_batch and (n is None or n > 2):
            return "sorts across the batch and runs on pairs only"
        return None

    def uses_lengths(self, reference: bool) -> bool:
        """Whether the loss uses token counts, with (``reference``) or without a reference.

        A loss that takes lengths uses them, except a group loss with a reference: group
        losses normalise by length only their reference-free variant, and refuse lengths
        with a reference (``prefopt.losses.inputs.group_inputs``).
        """
        return self.lengths != "none" and not (reference and self.layout == "group")

    def takes(self, arrays: Mapping[str, Any]) -> dict[str, Any]:
        """The entries of ``arrays`` that the loss takes; a missing reference is ``None``."""
        taken = {k: v for k, v in arrays.items() if k in self.inputs}
        if "ref_logps" in self.inputs:
            taken.setdefault("ref_logps", None)
        return taken

    def options(self, given: Mapping[str, Any] | None = None, *, fn: str = "") -> dict[str, Any]:
        """``given`` checked against the loss's options and completed with the defaults.

        Raises:
            TypeError: For an option the loss does not take, naming the ones it takes.
        """
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            where = f"{fn}: " if fn else ""
            raise TypeError(
                f"{where}{self.name} takes no option(s) {unknown}; it takes {sorted(self.defaults)}"
            )
        return {**self.defaults, **given}

    def config(self, given: Mapping[str, Any] | None = None, *, fn: str = "") -> LossConfig:
        """The loss with ``given`` options, completed with the defaults and validated once.

        The message of a bad value is the function's own (``"dpo_loss: beta must be a
        finite number > 0; got -1.0"``), so a module, a trainer, the CLI or the JAX train
        step that builds a loss from options fails when built, with the words a call would
        give.

        Args:
            given: Options of the loss; the others keep its defaults.
            fn: The caller to name in the error for an option the loss does not take.

        Returns:
            A frozen [`LossConfig`][prefopt.losses.registry.LossConfig].

        Raises:
            TypeError: For an option the loss does not take (naming ``fn``).
            ValueError: For a value out of its range.
        """
        options = self.options(given, fn=fn)
        checked_options(self.fn, options)
        return LossConfig(self, MappingProxyType(options))


@dataclass(frozen=True)
class LossConfig:
    """A registered loss with its options, validated when built (``LossSpec.config``).

    The torch modules, both trainers, ``prefopt train`` and the JAX train step hold one:
    the options are checked once, by the loss's own rules, and cannot change after.

    Attributes:
        spec: The loss's [`LossSpec`][prefopt.losses.registry.LossSpec].
        options: Every option of the loss (the defaults filled in), read-only.
    """

    spec: LossSpec
    options: Mapping[str, Any]

    @property
    def name(self) -> str:
        """The registered name."""
        return self.spec.name


def _spec(name, fn, title, layout, **facts) -> tuple[str, LossSpec]:
    return name, LossSpec(name, fn, title, layout, **facts)


# what TRL's DPOConfig passes (LossSpec.trl_options): its f_divergence_type with its
# f_alpha_divergence_coef, and its label_smoothing
_F, _LS = ("f_divergence", "f_alpha"), ("label_smoothing",)

_LOSSES: dict[str, LossSpec] = dict(
    [
        _spec("sigmoid", dpo_loss, "DPO", "pair", trl_options=_F),
        _spec("dpo", dpo_loss, "DPO", "pair", trl_options=_F),
        _spec("robust", robust_dpo_loss, "RobustDPO", "pair", trl_options=_LS + _F),
        _spec("ipo", ipo_loss, "IPO", "pair", trl_options=_F),
        _spec("hinge", hinge_loss, "Hinge", "pair", trl_options=_F),
        _spec("exo_pair", exo_pair_loss, "EXOPair", "pair", trl_options=_LS + _F),
        _spec("nca_pair", nca_pair_loss, "NCAPair", "pair"),
        _spec("bco_pair", bco_pair_loss, "BCOPair", "pair"),
        _spec("sppo_hard", sppo_hard_loss, "SPPOHard", "pair"),
        _spec("apo_zero", apo_zero_loss, "APOZero", "pair"),
        _spec("apo_down", apo_down_loss, "APODown", "pair"),
        _spec("discopop", discopop_loss, "DiscoPOP", "pair", trl_options=(*_F, "tau")),
        _spec("aot", aot_loss, "AOT", "pair", couples_batch=True, trl_options=_LS),
        _spec(
            "aot_unpaired",
            aot_unpaired_loss,
            "AOTUnpaired",
            "pair",
            couples_batch=True,
            trl_options=_LS,
        ),
        _spec("sigmoid_norm", sigmoid_norm_loss, "SigmoidNorm", "pair", trl_options=_F),
        _spec("simpo", simpo_loss, "SimPO", "pair"),
        _spec("cpo", cpo_loss, "CPO", "pair"),
        _spec("orpo", orpo_loss, "ORPO", "pair"),
        _spec("kto", kto_loss, "KTO", "unpaired"),
        _spec("mpo", mpo_loss, "MPO", "group", counts="split", terms=mpo_terms),
        _spec("infonca", infonca_loss, "InfoNCA", "group", counts="two valid"),
        _spec("nca", nca_loss, "NCA", "group", counts="one valid"),
        _spec("plackett_luce", plackett_luce_loss, "PlackettLuce", "group", counts="two valid"),
        _spec("lipo", lipo_loss, "LiPO", "group", counts="split"),
    ]
)


def spec(name: str, fn: str = "get_loss") -> LossSpec:
    """The spec of loss ``name``; an unknown name raises with the closest ones.

    Args:
        name: A registered name.
        fn: The function or option to name in the error (e.g. ``"--loss"``).

    Returns:
        Its [`LossSpec`][prefopt.losses.registry.LossSpec].

    Raises:
        ValueError: For an unknown name; the message lists the valid names and suggests
            the closest ones.
    """
    found = _LOSSES.get(name) if isinstance(name, str) else None
    if found is None:
        close = difflib.get_close_matches(str(name), list(_LOSSES), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"{fn}: unknown loss {name!r}. Known losses: {', '.join(sorted(_LOSSES))}.{hint}"
        )
    return found


def specs() -> dict[str, LossSpec]:
    """All registered specs by name.

    Returns:
        A new dict from every registered name, aliases included (``"dpo"`` and
        ``"sigmoid"`` share DPO's spec), to its [`LossSpec`][prefopt.losses.registry.LossSpec].
    """
    return dict(_LOSSES)


def get_loss(name: str) -> Callable:
    """Return the loss function registered under ``name``.

    Names follow TRL's ``loss_type`` strings where TRL has the loss (``"sigmoid"`` is DPO,
    with the alias ``"dpo"``), so that a TRL configuration switches by name. ``"mpo"`` is
    *Multi*-Preference Optimization ([`mpo_loss`][prefopt.mpo_loss]), not TRL's Mixed
    Preference Optimization.

    Args:
        name: A name from [`available_losses`][prefopt.available_losses].

    Returns:
        The loss function, e.g. ``prefopt.dpo_loss`` for ``"sigmoid"``.

    Raises:
        ValueError: For an unknown name; the message lists the valid names and suggests
            the closest ones.

    Examples:
        >>> import prefopt
        >>> prefopt.get_loss("sigmoid") is prefopt.dpo_loss
        True
    """
    return spec(name).fn


def available_losses() -> dict[str, str]:
    """The registered loss names and the kind of data each takes.

    Kinds: ``"pairwise"`` ((B,) chosen and rejected log-probs with a reference),
    ``"reference-free"`` (pairs, no reference model), ``"unpaired"`` (single responses
    marked desirable or not) and ``"group"`` ((B, n) responses with rewards). The other
    facts about a loss (lengths, options, how a mean counts) are in
    ``prefopt.losses.registry.spec(name)``.

    Returns:
        A dict from name to kind, sorted by name.

    Examples:
        >>> import prefopt
        >>> prefopt.available_losses()["mpo"]
        'group'
    """
    return {name: _LOSSES[name].kind for name in sorted(_LOSSES)}
