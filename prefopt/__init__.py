"""prefopt: preference-optimization losses written once against the Python Array API.

The same call runs on NumPy, PyTorch (CPU, CUDA, ``torch.compile``) and JAX (``jit``,
``grad``, ``vmap``, sharded arrays). ``import prefopt`` imports neither torch nor jax.
"""

from prefopt._ops import log_sigmoid, logsumexp, masked_mean, softplus
from prefopt.losses import available_losses, dpo_loss, get_loss, mpo_loss, mpo_split

__version__ = "0.1.0"

__all__ = [
    "available_losses",
    "dpo_loss",
    "get_loss",
    "log_sigmoid",
    "logsumexp",
    "masked_mean",
    "mpo_loss",
    "mpo_split",
    "softplus",
]
