"""prefopt: preference-optimization losses written once against the Python Array API.

The same call runs on NumPy, PyTorch (CPU, CUDA, ``torch.compile``) and JAX (``jit``,
``grad``, ``vmap``, sharded arrays). ``import prefopt`` imports neither torch nor jax.
"""

from prefopt import losses, metrics
from prefopt._ops import log_sigmoid, logsumexp, masked_mean, softplus
from prefopt.logps import causal_lm_logps, sequence_logps, shift_labels, token_logps
from prefopt.losses import *  # noqa: F403 (its __all__: every loss and composition)

__version__ = "0.1.0"

# The losses are prefopt.losses.__all__, listed once there; the rest live here.
__all__ = [
    "causal_lm_logps",
    "log_sigmoid",
    "logsumexp",
    "masked_mean",
    "metrics",
    "sequence_logps",
    "shift_labels",
    "softplus",
    "token_logps",
    *losses.__all__,
]
