"""JAX backend: native ops for the core, and helpers for ``jit``, ``vmap`` and sharding.

The native ops (``log_sigmoid`` to ``stop_gradient``) keep the contract of
``prefopt._ops.NATIVE_OPS``, as ``prefopt.backends.torch.ops`` does for PyTorch. The losses
themselves need nothing from here: they run under ``jax.jit``, ``jax.grad`` and ``jax.vmap``
as they are, their numeric options numbers or (traced) 0-d arrays.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["fused_linear_logps", "shard_batch", "stop_gradient"]


def log_sigmoid(x):
    return jax.nn.log_sigmoid(x)


def softplus(x):
    return jax.nn.softplus(x)


def logsumexp(x, *, axis, keepdims):
    return jax.nn.logsumexp(x, axis=axis, keepdims=keepdims)


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def all_finite(x) -> bool | None:
    ok = jax.numpy.isfinite(x).all()
    return None if isinstance(ok, jax.core.Tracer) else bool(ok)


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


def fused_linear_logps(
    hidden: Any,
    weight: Any,
    labels: Any,
    *,
    bias: Any = None,
    ignore_index: int = -100,
    chunk_size: int = 1024,
) -> Any:
    r"""Token log-probabilities from the last hidden states, without the logits tensor.

    $$
    \log p_t = z_{t, y_t} - \log\sum_v e^{z_{t,v}}, \qquad z_t = W h_t + b
    $$

    computed ``chunk_size`` rows at a time with ``jax.lax.map`` over a ``jax.checkpoint``-ed
    chunk: reverse mode keeps each chunk's inputs only and recomputes its (chunk_size, V)
    logits, so the (rows, V) logits never exist at once, forward or backward. Rows are
    padded to a multiple of ``chunk_size`` with ignored labels. Values and gradients match
    ``prefopt.token_logps(hidden @ weight.T + bias, labels)``; works under ``jit``,
    ``grad`` and ``vmap``.

    Labels are **not** shifted (see [`prefopt.shift_labels`][prefopt.shift_labels]); rows
    with ``ignore_index`` give 0 and no gradient. Row chunks never change a result: the
    sequence sums, and a group's responses, are assembled afterwards from all rows.

    Args:
        hidden: (..., H) final hidden states, e.g. (B, n, T, H).
        weight: (V, H) output-embedding matrix.
        labels: (...) token ids in [0, V), or ``ignore_index``.
        bias: (V,) output bias, or ``None`` (default).
        ignore_index: Default -100.
        chunk_size: Rows per chunk. Default 1024.

    Returns:
        (...) log-probabilities in float32 (float64 for float64 inputs).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from prefopt.backends.jax import fused_linear_logps
        >>> hidden, weight = jnp.ones((2, 5, 16)), jnp.ones((100, 16))
        >>> fused_linear_logps(hidden, weight, jnp.zeros((2, 5), int)).shape
        (2, 5)
    """
    import jax.numpy as jnp

    from prefopt.logps import check_fused_inputs, label_logps

    check_fused_inputs(hidden, weight, bias, labels, chunk_size, ignore_index, jnp)
    lead, width = hidden.shape[:-1], hidden.shape[-1]
    dtype = jnp.promote_types(hidden.dtype, jnp.float32)
    h = hidden.reshape(-1, width)
    y = labels.reshape(-1)
    rows = h.shape[0]
    step = min(chunk_size, max(rows, 1))
    pad = (-rows) % step
    h = jnp.pad(h, ((0, pad), (0, 0)))
    y = jnp.pad(y, (0, pad), constant_values=ignore_index)

    @jax.checkpoint
    def chunk(h_c, y_c):
        logits = h_c @ weight.T
        if bias is not None:
            logits = logits + bias
        return label_logps(logits.astype(dtype), y_c, ignore_index, jnp)[0]

    out = jax.lax.map(lambda c: chunk(*c), (h.reshape(-1, step, width), y.reshape(-1, step)))
    return out.reshape(-1)[:rows].reshape(lead)
