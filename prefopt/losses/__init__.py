"""The losses, one module per family."""

from prefopt.losses.group import mpo_loss, mpo_split
from prefopt.losses.pairwise import dpo_loss
from prefopt.losses.registry import available_losses, get_loss

__all__ = ["available_losses", "dpo_loss", "get_loss", "mpo_loss", "mpo_split"]
