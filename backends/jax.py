"""JAX backend: native ops for the core, and helpers for ``jit``, ``vmap`` and sharding.

The losses themselves need nothing from here: they run under ``jax.jit``, ``jax.grad`` and
``jax.vmap`` as they are (hyperparameters are Python numbers, static under tracing).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["shard_batch", "stop_gradient"]


def log_sigmoid(x):
    return jax.nn.log_sigmoid(x)


def logsumexp(x, *, axis, keepdims):
    return jax.nn.logsumexp(x, axis=axis, keepdims=keepdims)


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def on_host(x) -> bool:
    return all(d.platform == "cpu" for d in x.devices())


def stop_gradient(x: Any) -> Any:
    """Block gradients through ``x`` (``jax.lax.stop_gradient``): for reference log-probs.

    Args:
        x: Any array or pytree of arrays.

    Returns:
        ``x`` with a zero gradient under ``jax.grad``.
    """
    return jax.lax.stop_gradient(x)


def shard_batch(arrays: Any, mesh: Mesh | None = None, *, axis_name: str = "batch") -> Any:
    """Place a pytree of (B, ...) arrays on ``mesh``, split along the batch axis only.

    Groups stay whole: the response axis ``n`` of a (B, n) group batch is never split,
    because MPO's mean split and log-sum-exps need every response of a prompt on one device.
    ``B`` must be a multiple of the number of devices on ``axis_name``.

    Args:
        arrays: A pytree of arrays whose leading axis is the batch.
        mesh: The device mesh; default: all devices on one axis named ``axis_name``.
        axis_name: The mesh axis the batch is split over. Default ``"batch"``.

    Returns:
        The same pytree, each leaf a ``jax.Array`` sharded as ``PartitionSpec(axis_name)``.

    Example:
        >>> import jax, jax.numpy as jnp, prefopt
        >>> from prefopt.backends.jax import shard_batch
        >>> logps, rewards = shard_batch((jnp.zeros((8, 4)), jnp.arange(32.0).reshape(8, 4)))
        >>> jax.jit(prefopt.mpo_loss)(logps, None, rewards).shape
        (8,)
    """
    if mesh is None:
        mesh = Mesh(jax.devices(), (axis_name,))
    size = mesh.shape[axis_name]

    def place(x):
        if x.shape[0] % size:
            raise ValueError(
                f"shard_batch: the batch axis ({x.shape[0]}) must be a multiple of the "
                f"{size} devices on mesh axis {axis_name!r}"
            )
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(axis_name)))

    return jax.tree_util.tree_map(place, arrays)
