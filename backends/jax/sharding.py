"""Data parallelism: a batch placed on a device mesh with its groups whole."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec


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

    Examples:
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
