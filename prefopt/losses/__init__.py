"""The losses, one module per family."""

from prefopt.losses.group import mpo_loss, mpo_split
from prefopt.losses.pairwise import dpo_loss

__all__ = ["dpo_loss", "mpo_loss", "mpo_split"]
