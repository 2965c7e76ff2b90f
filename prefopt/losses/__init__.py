"""The losses, one module per family, and the registry that names them."""

from prefopt.losses.compose import (
    batch_loss,
    combine_losses,
    group_pairwise_loss,
    pairs_as_groups,
)
from prefopt.losses.group import (
    infonca_loss,
    lipo_loss,
    mpo_loss,
    mpo_split,
    nca_loss,
    plackett_luce_loss,
)
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
from prefopt.losses.registry import available_losses, get_loss
from prefopt.losses.unpaired import kto_kl, kto_loss

__all__ = [
    "aot_loss",
    "aot_unpaired_loss",
    "apo_down_loss",
    "apo_zero_loss",
    "available_losses",
    "batch_loss",
    "bco_pair_loss",
    "combine_losses",
    "cpo_loss",
    "discopop_loss",
    "dpo_loss",
    "exo_pair_loss",
    "get_loss",
    "group_pairwise_loss",
    "hinge_loss",
    "infonca_loss",
    "ipo_loss",
    "kto_kl",
    "kto_loss",
    "lipo_loss",
    "mpo_loss",
    "mpo_split",
    "nca_loss",
    "nca_pair_loss",
    "orpo_loss",
    "pairs_as_groups",
    "plackett_luce_loss",
    "robust_dpo_loss",
    "sigmoid_norm_loss",
    "simpo_loss",
    "sppo_hard_loss",
]
