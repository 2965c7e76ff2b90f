"""The fused output layer for PyTorch: ``fused_linear_logps``.

Token log-probs of ``hidden @ weight.T + bias`` in chunks, without the logits tensor.
"""

from __future__ import annotations

import array_api_compat.torch as torch_xp
import torch

from prefopt.logps import label_logps, row_chunks


class _FusedLinearLogps(torch.autograd.Function):
    """Token log-probs of ``hidden @ weight.T + bias``, chunk by chunk (see ``fused_linear_logps``).

    Every matmul runs in the inputs' dtype; the log-sum-exp, the log-probs, the logits'
    gradient and the weight gradient summed over chunks are float32 (float64 inputs: float64).
    Forward keeps one log-sum-exp per row and, within ``saved_bytes``, the logits of the
    first chunks; backward recomputes the logits of the others.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, valid, chunk_size, saved_bytes):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        lse = torch.empty_like(out)
        kept = []
        for start, stop in row_chunks(hidden.shape[0], chunk_size):
            logits = _chunk_logits(hidden[start:stop], weight, bias)
            out[start:stop], lse[start:stop] = label_logps(
                logits.to(acc), labels[start:stop], _IGNORED, torch_xp
            )
            size = logits.numel() * logits.element_size()
            kept.append(logits if size <= saved_bytes else None)
            saved_bytes -= size if size <= saved_bytes else 0
        ctx.save_for_backward(hidden, weight, bias, labels, valid, lse)
        ctx.chunk_size, ctx.kept = chunk_size, kept
        return torch.where(valid, out, 0.0)

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):  # as in forward
            return _fused_backward(ctx, grad_out)


def _fused_backward(ctx, grad_out):
    """The gradients of ``hidden``, ``weight`` and ``bias``, one chunk at a time."""
    hidden, weight, bias, labels, valid, lse = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_out = torch.where(valid, grad_out, 0.0)
    chunks = list(row_chunks(hidden.shape[0], ctx.chunk_size))
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = None  # one chunk: its product; several: summed in float32
    if need_weight and len(chunks) > 1:
        grad_weight = torch.zeros_like(weight, dtype=lse.dtype)
    grad_bias = torch.zeros_like(bias, dtype=lse.dtype) if need_bias else None
    for c, (start, stop) in enumerate(chunks):
        h, g = hidden[start:stop], grad_out[start:stop]
        kept, ctx.kept[c] = ctx.kept[c], None  # a second backward recomputes
        logits = _chunk_logits(h, weight, bias) if kept is None else kept
        # d log p_y / d logits = onehot(y) - softmax(logits): built in place on the chunk
        # (on a copy of kept logits; recomputed ones are the chunk's own)
        grad_logits = logits.to(lse.dtype, copy=kept is not None)
        grad_logits.sub_(lse[start:stop, None]).exp_().mul_(-g[:, None])
        grad_logits.scatter_add_(-1, labels[start:stop, None], g[:, None])
        if need_bias:
            grad_bias += grad_logits.sum(dim=0)
        grad_logits = grad_logits.to(hidden.dtype)  # the matmuls in the inputs' dtype
        if need_weight and grad_weight is None:
            grad_weight = grad_logits.T @ h
        elif need_weight and grad_weight.dtype == h.dtype:
            grad_weight.addmm_(grad_logits.T, h)
        elif need_weight:
            grad_weight += grad_logits.T @ h
        if need_hidden:
            grad_hidden[start:stop] = grad_logits @ weight
    if need_weight:
        grad_weight = grad_weight.to(weight.dtype)
    if need_bias:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias, None, None, None, None


_IGNORED = -1  # labels inside the Function are all >= 0: ``valid`` masks the ignored rows


def _chunk_logits(hidden, weight, bias):
    """One chunk's logits in the inputs' dtype."""
    return hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)


def fused_linear_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    keep_logits_bytes: int = 0,
) -> torch.Tensor:
    r"""Token log-probabilities from the last hidden states, without the logits tensor.

    $$
    \log p_t = z_{t, y_t} - \log\sum_v e^{z_{t,v}}, \qquad z_t = W h_t + b
    $$

    computed ``chunk_size`` rows (token positions) at a time (an ``autograd.Function``).
    Forward keeps one log-sum-exp per row and the logits of the first chunks up to
    ``keep_logits_bytes``; backward reuses those, recomputes the logits of the other
    chunks, and accumulates the gradients of ``hidden``, ``weight`` and ``bias``. Peak
    memory is the kept logits plus one (chunk_size, V) float32 block, instead of the
    (rows, V) logits and their gradient; the price is a second logits matmul in backward
    for the chunks not kept. Keeping or recomputing gives bit-identical results.

    **Precision.** Every matmul runs in the compute dtype: the inputs' dtype, or under
    ``torch.autocast`` the autocast dtype (float32 inputs are then cast to it, as an
    ``nn.Linear`` would be; float64 inputs are not). The log-sum-exp, the log-probs, the
    logits' gradient and the weight gradient summed over chunks are float32 (float64 for
    float64 inputs). Values and gradients match
    ``token_logps(hidden @ weight.T + bias, labels)`` computed in the same dtype.

    Labels are **not** shifted (see [`prefopt.shift_labels`][prefopt.shift_labels]); rows
    with ``ignore_index`` give 0 and no gradient. Row chunks never change a result: the
    sequence sums, and a group's responses, are assembled afterwards from all rows, so a
    group never straddles anything the loss sees.

    Args:
        hidden: (..., H) final hidden states (before the output projection), e.g.
            (B, n, T, H) for n responses per prompt.
        weight: (V, H) output-embedding matrix (``model.lm_head.weight``), of the dtype of
            ``hidden`` (under autocast: any float dtype autocast casts).
        labels: (...) token ids in [0, V), or ``ignore_index``.
        bias: (V,) output bias, or ``None`` (the default; most LMs have none).
        ignore_index: Default -100.
        chunk_size: Rows per chunk. Default 1024.
        keep_logits_bytes: Most bytes of logits (in the compute dtype) kept from forward
            for backward instead of recomputed: less time, more memory from forward to
            backward. Default 0: every chunk is recomputed, the least memory.

    Returns:
        (...) log-probabilities in float32 (float64 for float64 inputs).

    Examples:
        >>> import torch
        >>> from prefopt.backends.torch import fused_linear_logps
        >>> hidden = torch.randn(2, 5, 16, requires_grad=True)
        >>> weight = torch.randn(100, 16, requires_grad=True)
        >>> labels = torch.randint(0, 100, (2, 5))
        >>> fused_linear_logps(hidden, weight, labels).sum().backward()
    """
    from prefopt.logps import check_fused_inputs

    check_fused_inputs(hidden, weight, bias, labels, chunk_size, ignore_index, torch_xp)
    if keep_logits_bytes < 0:
        raise ValueError(
            f"fused_linear_logps: keep_logits_bytes must be >= 0; got {keep_logits_bytes}"
        )
    where = hidden.device.type
    if torch.is_autocast_enabled(where):  # the output layer in the autocast dtype
        low = torch.get_autocast_dtype(where)
        cast = lambda x: x if x is None or x.dtype == torch.float64 else x.to(low)  # noqa: E731
        hidden, weight, bias = cast(hidden), cast(weight), cast(bias)
    for name, x in (("weight", weight), ("bias", bias)):
        if x is not None and x.dtype != hidden.dtype:  # a torch matmul does not promote
            raise TypeError(
                f"fused_linear_logps: {name} must have the dtype of hidden, {hidden.dtype}; "
                f"got {x.dtype} (cast hidden or {name}: the output layer runs in one dtype)"
            )
    lead = hidden.shape[:-1]
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    with torch.autocast(where, enabled=False):  # the dtypes are set: nothing recasts them
        out = _FusedLinearLogps.apply(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            bias,
            torch.where(valid, flat_labels, 0),  # in range for backward's scatter; masked after
            valid,
            int(chunk_size),
            int(keep_logits_bytes),
        )
    return out.reshape(lead)
