"""Token log-probs of ``hidden @ weight.T + bias`` in chunks, without the logits tensor."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from prefopt.logps import check_fused_inputs, label_logps


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
