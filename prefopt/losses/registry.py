"""Losses by name: TRL's ``loss_type`` strings where TRL has the loss."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import NamedTuple

from prefopt.losses.group import mpo_loss
from prefopt.losses.pairwise import dpo_loss

KINDS = ("pairwise", "reference-free", "unpaired", "group")


class LossEntry(NamedTuple):
    """One registered loss: its function and the kind of data it takes."""

    fn: Callable
    kind: str


_LOSSES: dict[str, LossEntry] = {
    "sigmoid": LossEntry(dpo_loss, "pairwise"),
    "dpo": LossEntry(dpo_loss, "pairwise"),
    "mpo": LossEntry(mpo_loss, "group"),
}


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
    entry = _LOSSES.get(name)
    if entry is None:
        close = difflib.get_close_matches(str(name), list(_LOSSES), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"get_loss: unknown loss {name!r}. Known losses: {', '.join(sorted(_LOSSES))}.{hint}"
        )
    return entry.fn


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
