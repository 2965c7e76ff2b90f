"""Log-probabilities of label tokens from a model's logits, and of whole sequences.

The losses take sequence log-probabilities; these functions make them from logits without
materialising a full ``log_softmax`` (one ``logsumexp`` per row and one gathered logit) and
compute half-precision logits in float32, a chunk of rows at a time. To avoid the logits
tensor altogether, see ``fused_linear_logps`` in ``prefopt.backends.torch`` and
``prefopt.backends.jax``.
"""

from __future__ import annotations

import math
from types import ModuleType

import array_api_compat
from array_api_compat import device

from prefopt import _checks
from prefopt._ops import Array, get_namespace, logsumexp

__all__ = ["causal_lm_logps", "sequence_logps", "shift_labels", "token_logps"]

# token_logps on half-precision logits: elements of each float32 copy (256 MiB) when
# chunk_size is not given. (The fused output layer of the trainers chunks by its own rule:
# prefopt.integrations.forward, 32 MiB of logits and at least 256 rows per chunk.)
_UPCAST_ELEMENTS = 2**26


def _check_labels(fn: str, labels: Array, lead: tuple, vocab: int, ignore_index, xp) -> None:
    if not _checks.is_kind(labels.dtype, "integral", xp):
        raise TypeError(f"{fn}: labels must be an integer array; got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(lead):
        raise ValueError(
            f"{fn}: labels must have the shape of logits without the vocabulary axis, "
            f"{tuple(lead)}; got {tuple(labels.shape)}"
        )
    if _checks.values_checked(labels, xp, None):
        bad = _checks.count_false((labels == ignore_index) | ((labels >= 0) & (labels < vocab)), xp)
        if bad:
            raise ValueError(
                f"{fn}: labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                f"got {bad} label(s) outside"
            )


def check_fused_inputs(hidden, weight, bias, labels, chunk_size, ignore_index, xp) -> None:
    """Shapes and labels of ``fused_linear_logps`` (both backends)."""
    fn = "fused_linear_logps"
    if hidden.ndim < 1 or weight.ndim != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{fn}: weight must have shape (V, H) with H = hidden.shape[-1] = "
            f"{hidden.shape[-1] if hidden.ndim else None}; got weight {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"{fn}: bias must have shape ({weight.shape[0]},); got {tuple(bias.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be >= 1; got {chunk_size}")
    _check_labels(fn, labels, tuple(hidden.shape[:-1]), weight.shape[0], ignore_index, xp)


def token_logps(
    logits: Array,
    labels: Array,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    xp: ModuleType | None = None,
) -> Array:
    r"""Log-probability of each label token under the logits at the same position.

    $$
    \log p_t = z_{t, y_t} - \log\sum_v e^{z_{t, v}}
    $$

    for logits $z$ of shape (..., T, V) and labels $y$ of shape (..., T): **no shift**,
    position $t$ of the logits scores label $t$. For a causal LM, whose logits at $t$
    predict token $t+1$, pass [`shift_labels`][prefopt.shift_labels]``(labels)`` or use
    [`causal_lm_logps`][prefopt.causal_lm_logps]. Positions whose label is
    ``ignore_index`` (prompt, padding) get exactly 0 and pass no gradient.

    Only a ``logsumexp`` per row and the gathered logit are computed, never the full
    ``log_softmax``. bf16/fp16 logits are converted to float32 one chunk of rows at a time
    (the conversion is exact), so no float32 copy of all logits exists at once in the
    forward pass. Under autograd the chunks stay alive for the backward pass: to avoid the
    logits altogether in training, compute log-probs from the hidden states with
    ``prefopt.backends.torch.fused_linear_logps`` (or the JAX one).

    Args:
        logits: (..., T, V) real floating logits.
        labels: (..., T) integer token ids in [0, V), or ``ignore_index``.
        ignore_index: The label that marks positions that do not count. Default -100
            (Hugging Face's).
        chunk_size: Rows (positions) per chunk. Default ``None``: float32/float64 logits
            in one piece, half-precision logits in chunks of 256 MiB once in float32.
        xp: The array namespace, if known.

    Returns:
        (..., T) log-probabilities in the logits' dtype (float32 for half precision), 0 at
        ignored positions.

    Raises:
        ValueError: On mismatched shapes, or (on concrete host arrays) labels outside
            [0, V) that are not ``ignore_index``.
        TypeError: On non-floating logits or non-integer labels.

    Examples:
        >>> import numpy as np, prefopt
        >>> logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
        >>> np.exp(prefopt.token_logps(logits, np.array([0, -100]))).round(6)
        array([0.5, 1. ])
    """
    fn = "token_logps"
    xp = get_namespace(logits, labels, xp=xp)
    _checks.floating(fn, "logits", logits, xp)
    if logits.ndim < 2:
        raise ValueError(f"{fn}: logits must have shape (..., T, V); got {tuple(logits.shape)}")
    lead, vocab = tuple(logits.shape[:-1]), logits.shape[-1]
    _check_labels(fn, labels, lead, vocab, ignore_index, xp)
    dtype = _checks.compute_dtype(xp, logits)
    rows = math.prod(lead)
    flat = xp.reshape(logits, (rows, vocab))
    flat_labels = xp.reshape(labels, (rows,))
    if chunk_size is None:  # chunks bound the float32 copy of half-precision logits only
        whole = dtype == logits.dtype
        chunk_size = max(rows, 1) if whole else max(_UPCAST_ELEMENTS // max(vocab, 1), 1)
    if chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be >= 1; got {chunk_size}")
    pieces = [
        label_logps(
            _checks.cast(flat[start:stop, ...], dtype, xp),
            flat_labels[start:stop],
            ignore_index,
            xp,
        )[0]
        for start, stop in row_chunks(rows, chunk_size)
    ]
    if not pieces:  # no position at all (T = 0 or B = 0)
        return xp.zeros(lead, dtype=dtype, device=device(logits))
    out = pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=0)
    return xp.reshape(out, lead)


def label_logps(
    logits: Array, labels: Array, ignore_index: int, xp: ModuleType
) -> tuple[Array, Array]:
    r"""The one token log-prob kernel: $z_{y} - \log\sum_v e^{z_v}$ for each row of a chunk.

    Used by ``token_logps`` and by both ``fused_linear_logps`` (which make the chunk's logits
    from hidden states). Rows whose label is ``ignore_index`` get exactly 0 and no gradient.

    Args:
        logits: (rows, V) logits in the compute dtype.
        labels: (rows,) token ids in [0, V), or ``ignore_index``.
        ignore_index: The label of rows that do not count.
        xp: The array namespace.

    Returns:
        ``(logps, lse)``: each (rows,); ``lse`` is the log-sum-exp of every row.
    """
    valid = labels != ignore_index
    index = xp.where(valid, labels, xp.zeros_like(labels))  # any id in range for ignored rows
    if array_api_compat.is_torch_namespace(xp) and index.dtype != xp.int64:
        index = xp.astype(index, xp.int64)  # torch gathers with int64 indices only
    lse = logsumexp(logits, axis=-1, xp=xp)
    picked = xp.take_along_axis(logits, xp.expand_dims(index, axis=-1), axis=-1)[..., 0]
    return xp.where(valid, picked - lse, 0.0), lse


def row_chunks(rows: int, chunk_size: int):
    """``(start, stop)`` of consecutive chunks of at most ``chunk_size`` rows, in bounds."""
    for start in range(0, rows, chunk_size):
        yield start, min(start + chunk_size, rows)


def shift_labels(labels: Array, *, ignore_index: int = -100, xp: ModuleType | None = None) -> Array:
    r"""Labels for a causal LM's logits: ``labels[..., 1:]`` followed by ``ignore_index``.

    A causal LM's logits at position $t$ predict token $t+1$. With labels aligned to the
    input ids (Hugging Face's convention: ``ignore_index`` on prompt and padding tokens),
    ``token_logps(logits, shift_labels(labels))`` puts at position $t$ the log-probability
    of token $t+1$; the last position, which predicts beyond the sequence, is ignored.

    Args:
        labels: (..., T) integer labels aligned with the input ids.
        ignore_index: The label of positions that do not count. Default -100.
        xp: The array namespace, if known.

    Returns:
        (..., T) shifted labels, same dtype.

    Examples:
        >>> import numpy as np, prefopt
        >>> prefopt.shift_labels(np.array([[-100, -100, 5, 7]]))
        array([[-100,    5,    7, -100]])
    """
    xp = get_namespace(labels, xp=xp, fn="shift_labels")
    if _checks.is_kind(labels.dtype, "unsigned integer", xp):
        raise TypeError(
            f"shift_labels: labels must be a signed integer array (ignore_index={ignore_index} "
            f"does not fit); got dtype {labels.dtype}"
        )
    if labels.ndim < 1:
        raise ValueError(
            f"shift_labels: labels must have shape (..., T); got {tuple(labels.shape)}"
        )
    tail = xp.full_like(labels[..., :1], ignore_index)
    return xp.concat([labels[..., 1:], tail], axis=-1)


def sequence_logps(
    token_logps: Array,
    mask: Array,
    *,
    average: bool = False,
    xp: ModuleType | None = None,
) -> tuple[Array, Array]:
    r"""Sequence log-probabilities from token log-probabilities: summed or averaged.

    $$
    \log\pi(y) = \sum_t m_t \log p_t, \qquad |y| = \sum_t m_t
    $$

    and $\log\pi(y)/|y|$ with ``average=True``. Works on any leading layout: (B, T) gives
    (B,), grouped (B, n, T) gives (B, n), ready for the group losses. Masked positions may
    hold anything (NaN included): they reach neither the value nor the gradient. A row with
    no counted token has log-prob 0 and length 0; the losses that divide by length reject
    it (a clear error) rather than dividing by zero.

    Args:
        token_logps: (..., T) per-token log-probabilities.
        mask: (..., T) boolean, ``True`` on the completion tokens that count.
        average: Divide by the number of counted tokens. Default ``False`` (summed, what
            the losses expect unless they say otherwise).
        xp: The array namespace, if known.

    Returns:
        ``(logps, lengths)``, both (...) in the token log-probs' dtype.

    Examples:
        >>> import numpy as np, prefopt
        >>> tl = np.array([[-1.0, -2.0, np.nan]]); mask = np.array([[True, True, False]])
        >>> prefopt.sequence_logps(tl, mask)
        (array([-3.]), array([2.]))
    """
    fn = "sequence_logps"
    xp = get_namespace(token_logps, mask, xp=xp)
    _checks.floating(fn, "token_logps", token_logps, xp)
    _checks.boolean(fn, "mask", mask, xp)
    if token_logps.ndim < 1 or mask.shape != token_logps.shape:
        raise ValueError(
            f"{fn}: mask must have the shape of token_logps, {tuple(token_logps.shape)}; "
            f"got {tuple(mask.shape)}"
        )
    total = xp.sum(xp.where(mask, token_logps, 0.0), axis=-1)
    lengths = xp.sum(xp.astype(mask, token_logps.dtype), axis=-1)
    if average:
        total = total / xp.clip(lengths, min=1.0)
    return total, lengths


def causal_lm_logps(
    logits: Array,
    labels: Array,
    *,
    ignore_index: int = -100,
    average: bool = False,
    chunk_size: int | None = None,
    xp: ModuleType | None = None,
) -> tuple[Array, Array]:
    r"""Sequence log-probabilities of a causal LM's completions, from its logits.

    The composition of [`shift_labels`][prefopt.shift_labels],
    [`token_logps`][prefopt.token_logps] and [`sequence_logps`][prefopt.sequence_logps]:
    with labels aligned to the input ids and ``ignore_index`` on prompt and padding tokens,

    $$
    \log\pi(y) = \sum_{t\,:\,y_{t+1} \ne \text{ignore}} \log p(y_{t+1} \mid y_{\le t})
    $$

    Args:
        logits: (..., T, V) logits of the model on the input ids.
        labels: (..., T) the input ids with ``ignore_index`` where a token does not count.
        ignore_index: Default -100.
        average: Per-token average instead of the sum. Default ``False``.
        chunk_size: Rows per chunk, as in ``token_logps``. Default ``None``.
        xp: The array namespace, if known.

    Returns:
        ``(logps, lengths)``, both (...): one value per sequence, e.g. (B, n) for grouped
        logits of shape (B, n, T, V).

    Examples:
        >>> import numpy as np, prefopt
        >>> logits = np.zeros((1, 4, 8))             # uniform over 8 tokens
        >>> labels = np.array([[3, -100, 5, 6]])     # prompt token 3, completion 5, 6
        >>> logps, lengths = prefopt.causal_lm_logps(logits, labels)
        >>> bool(np.isclose(logps[0], 2 * np.log(1 / 8))), lengths
        (True, array([2.]))
    """
    xp = get_namespace(logits, labels, xp=xp)
    shifted = shift_labels(labels, ignore_index=ignore_index, xp=xp)
    per_token = token_logps(
        logits, shifted, ignore_index=ignore_index, chunk_size=chunk_size, xp=xp
    )
    return sequence_logps(per_token, shifted != ignore_index, average=average, xp=xp)
