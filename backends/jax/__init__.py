"""What only JAX can do: the fused output layer, sharding, the core's native ops.

Three files, one thing each:

- ``fused.py``: [`fused_linear_logps`][prefopt.backends.jax.fused_linear_logps], token
  log-probs of the output layer without the logits tensor.
- ``sharding.py``: [`shard_batch`][prefopt.backends.jax.shard_batch], a batch on a device
  mesh with each group on one device.
- ``ops.py``: the native ops that ``prefopt._ops`` delegates to for JAX arrays (the
  contract: ``prefopt._ops.NATIVE_OPS``), and
  [`stop_gradient`][prefopt.backends.jax.stop_gradient].

The losses themselves need nothing from here: they run under ``jax.jit``, ``jax.grad`` and
``jax.vmap`` as they are, their numeric options numbers or (traced) 0-d arrays. Import from
here (``from prefopt.backends.jax import shard_batch``); the file names are for readers.
"""

from prefopt.backends.jax.fused import fused_linear_logps
from prefopt.backends.jax.ops import stop_gradient
from prefopt.backends.jax.sharding import shard_batch

__all__ = ["fused_linear_logps", "shard_batch", "stop_gradient"]
