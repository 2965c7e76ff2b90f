"""Losses by name: TRL's ``loss_type`` strings where TRL has the loss."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import NamedTuple

from prefopt.losses.group import infonca_loss, lipo_loss, mpo_loss, nca_loss, plackett_luce_loss
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

KINDS = ("pairwise", "reference-free", "unpaired", "group")


class LossEntry(NamedTuple):
    """One registered loss: its function, the kind of data it takes, a display title."""

    fn: Callable
    kind: str
    title: str  # as papers write it; the torch module is named title + "Loss"
    couples_batch: bool = False  # the loss of one example depends on the others


_LOSSES: dict[str, LossEntry] = {
    "sigmoid": LossEntry(dpo_loss, "pairwise", "DPO"),
    "dpo": LossEntry(dpo_loss, "pairwise", "DPO"),
    "robust": LossEntry(robust_dpo_loss, "pairwise", "RobustDPO"),
    "ipo": LossEntry(ipo_loss, "pairwise", "IPO"),
    "hinge": LossEntry(hinge_loss, "pairwise", "Hinge"),
    "exo_pair": LossEntry(exo_pair_loss, "pairwise", "EXOPair"),
    "nca_pair": LossEntry(nca_pair_loss, "pairwise", "NCAPair"),
    "bco_pair": LossEntry(bco_pair_loss, "pairwise", "BCOPair"),
    "sppo_hard": LossEntry(sppo_hard_loss, "pairwise", "SPPOHard"),
    "apo_zero": LossEntry(apo_zero_loss, "pairwise", "APOZero"),
    "apo_down": LossEntry(apo_down_loss, "pairwise", "APODown"),
    "discopop": LossEntry(discopop_loss, "pairwise", "DiscoPOP"),
    "aot": LossEntry(aot_loss, "pairwise", "AOT", couples_batch=True),
    "aot_unpaired": LossEntry(aot_unpaired_loss, "pairwise", "AOTUnpaired", couples_batch=True),
    "sigmoid_norm": LossEntry(sigmoid_norm_loss, "pairwise", "SigmoidNorm"),
    "simpo": LossEntry(simpo_loss, "reference-free", "SimPO"),
    "cpo": LossEntry(cpo_loss, "reference-free", "CPO"),
    "orpo": LossEntry(orpo_loss, "reference-free", "ORPO"),
    "kto": LossEntry(kto_loss, "unpaired", "KTO"),
    "mpo": LossEntry(mpo_loss, "group", "MPO"),
    "infonca": LossEntry(infonca_loss, "group", "InfoNCA"),
    "nca": LossEntry(nca_loss, "group", "NCA"),
    "plackett_luce": LossEntry(plackett_luce_loss, "group", "PlackettLuce"),
    "lipo": LossEntry(lipo_loss, "group", "LiPO"),
}


def entry(name: str, fn: str = "get_loss") -> LossEntry:
    """The registry entry of ``name``; an unknown name raises with the closest ones."""
    found = _LOSSES.get(name)
    if found is None:
        close = difflib.get_close_matches(str(name), list(_LOSSES), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"{fn}: unknown loss {name!r}. Known losses: {', '.join(sorted(_LOSSES))}.{hint}"
        )
    return found


def parameters(fn: Callable) -> tuple[set[str], set[str]]:
    """(all parameter names, keyword-only option names but ``xp``) of a loss function."""
    params = inspect.signature(fn).parameters.values()
    options = {p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "xp"}
    return {p.name for p in params}, options


def entries() -> dict[str, LossEntry]:
    """All entries by name (a copy)."""
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

    Example:
        >>> import prefopt
        >>> prefopt.get_loss("sigmoid") is prefopt.dpo_loss
        True
    """
    return entry(name).fn


def available_losses() -> dict[str, str]:
    """The registered loss names and the kind of data each takes.

    Kinds: ``"pairwise"`` ((B,) chosen and rejected log-probs with a reference),
    ``"reference-free"`` (pairs, no reference model), ``"unpaired"`` (single responses
    marked desirable or not) and ``"group"`` ((B, n) responses with rewards).

    Returns:
        A dict from name to kind, sorted by name.

    Example:
        >>> import prefopt
        >>> prefopt.available_losses()["mpo"]
        'group'
    """
    return {name: _LOSSES[name].kind for name in sorted(_LOSSES)}
