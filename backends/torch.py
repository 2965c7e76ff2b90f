"""PyTorch backend: native ops for the core, ``nn.Module`` wrappers and ``stop_gradient``.

The wrappers hold the hyperparameters and a ``reduction`` like ``torch.nn`` losses, pass the
namespace explicitly (no lookup per call) and trace under
``torch.compile(fullgraph=True)`` without graph breaks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_compat.torch as torch_xp
import torch

import prefopt
from prefopt.losses.registry import entries, entry, parameters

REDUCTIONS = ("mean", "sum", "none")


def log_sigmoid(x):
    return torch.nn.functional.logsigmoid(x)


def logsumexp(x, *, axis, keepdims):
    return torch.logsumexp(x, dim=axis, keepdim=keepdims)


def is_concrete(x) -> bool:
    return not torch.compiler.is_compiling()


def on_host(x) -> bool:
    return x.device.type == "cpu"


def stop_gradient(x: torch.Tensor) -> torch.Tensor:
    """Block gradients through ``x`` (``Tensor.detach``): for reference log-probs.

    Args:
        x: Any tensor.

    Returns:
        ``x`` detached from the autograd graph (same storage, no copy).
    """
    return x.detach()


class PreferenceLoss(torch.nn.Module):
    """Base of the loss modules: a prefopt loss with fixed options and a reduction.

    Subclasses set ``loss_fn``. Keyword options of the loss (``beta``, ``weighting``...)
    go to the constructor; arrays go to ``forward``, positionally as the function takes
    them or by keyword.

    Args:
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per example).
        **options: Keyword-only options of ``loss_fn``; unknown names raise ``TypeError``.
    """

    loss_fn: Callable | None = None

    def __init__(self, *, reduction: str = "mean", **options: Any) -> None:
        super().__init__()
        name = type(self).__name__
        if self.loss_fn is None:
            raise TypeError(
                f"{name} has no loss_fn: use a loss module such as MPOLoss, or set loss_fn"
            )
        if reduction not in REDUCTIONS:
            raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}; got {reduction!r}")
        _, allowed = parameters(self.loss_fn)
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(
                f"{name}: unknown option(s) {unknown}; expected some of {sorted(allowed)}"
            )
        self.reduction = reduction
        self.options = options

    def counted(self, *arrays, **inputs) -> torch.Tensor | None:
        """Boolean (B,) of the examples a ``"mean"`` averages over; ``None``: all of them."""
        return None

    def forward(self, *arrays, **inputs) -> torch.Tensor:
        """The loss of a batch, reduced as ``reduction`` says."""
        loss = self.loss_fn(*arrays, **inputs, **self.options, xp=torch_xp)
        if self.reduction == "none":
            return loss
        if self.reduction == "sum":
            return loss.sum()
        counted = self.counted(*arrays, **inputs)
        if counted is None:
            return loss.mean()
        return loss.sum() / counted.sum().clamp(min=1).to(loss.dtype)

    def extra_repr(self) -> str:
        """The options, as ``print(module)`` shows them."""
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"reduction={self.reduction!r}" + (f", {options}" if options else "")


class GroupLoss(PreferenceLoss):
    """Base of the group-loss modules: ``"mean"`` averages over the groups that count.

    A group counts when it has at least ``min_valid`` real responses (2 by default: one
    response alone has nothing to be compared with; 1 for NCA, whose loss is defined on
    a single response). MPO counts the groups with a non-empty chosen and rejected set.
    """

    min_valid = 2

    def counted(self, logps, ref_logps=None, rewards=None, *, mask=None, **_):
        """The groups with at least ``min_valid`` real responses."""
        if mask is None:
            return torch.full(
                logps.shape[:1], logps.shape[-1] >= self.min_valid, device=logps.device
            )
        return mask.sum(dim=-1) >= self.min_valid


class MPOLoss(GroupLoss):
    """[`prefopt.mpo_loss`][prefopt.mpo_loss] as a module.

    ``reduction="mean"`` averages over the groups that count (both sets non-empty, see
    [`prefopt.mpo_split`][prefopt.mpo_split]), so degenerate groups do not dilute the mean;
    a batch with none gives 0 with a zero gradient.

    Example:
        >>> import torch
        >>> from prefopt.backends.torch import MPOLoss
        >>> loss_fn = MPOLoss(beta=0.1, alpha=1.0, weighting="abs")
        >>> logps = torch.randn(4, 8, requires_grad=True)
        >>> loss = loss_fn(logps, None, torch.rand(4, 8))
        >>> loss.backward()
    """

    loss_fn = staticmethod(prefopt.mpo_loss)

    def counted(self, logps, ref_logps=None, rewards=None, *, mask=None, chosen=None, **_):
        """The groups with a non-empty chosen and rejected set."""
        _, _, counted = prefopt.mpo_split(
            rewards, mask=mask, chosen=chosen, check_values=False, xp=torch_xp
        )
        return counted


def _module_classes() -> dict[str, type]:
    """One module class per registered loss function, named after its title."""
    classes = {}
    for name, found in entries().items():
        cls_name = found.title + "Loss"
        if cls_name in classes:  # an alias ("dpo" for "sigmoid")
            continue
        if cls_name == "MPOLoss":
            classes[cls_name] = MPOLoss
            continue
        base = GroupLoss if found.kind == "group" else PreferenceLoss
        attrs = {
            "loss_fn": staticmethod(found.fn),
            "__module__": __name__,
            "__doc__": f"[`prefopt.{found.fn.__name__}`][prefopt.{found.fn.__name__}] as a "
            f'module (``get_loss("{name}")``).\n\n    Options go to the constructor, arrays '
            "to ``forward``; see [`PreferenceLoss`][backends.torch.PreferenceLoss].",
        }
        if found.fn is prefopt.nca_loss:
            attrs["min_valid"] = 1
        classes[cls_name] = type(cls_name, (base,), attrs)
    return classes


LOSS_MODULES: dict[str, type] = _module_classes()
globals().update(LOSS_MODULES)
__all__ = sorted(
    [
        "GroupLoss",
        "PreferenceLoss",
        "fused_linear_logps",
        "loss_module",
        "stop_gradient",
        *LOSS_MODULES,
    ]
)


def loss_module(name: str, **options: Any) -> PreferenceLoss:
    """The module of a registered loss, by name (TRL's ``loss_type`` strings).

    Args:
        name: A name from [`prefopt.available_losses`][prefopt.available_losses].
        **options: ``reduction`` and the keyword options of the loss.

    Returns:
        An instance of the loss's module class, e.g. ``IPOLoss(beta=0.5)`` for
        ``loss_module("ipo", beta=0.5)``.

    Example:
        >>> from prefopt.backends.torch import loss_module
        >>> loss_module("sigmoid", beta=0.2)
        DPOLoss(reduction='mean', beta=0.2)
    """
    return LOSS_MODULES[entry(name, "loss_module").title + "Loss"](**options)


class _FusedLinearLogps(torch.autograd.Function):
    """Token log-probs of ``hidden @ weight.T + bias``, chunk by chunk, recomputed in backward.

    Saves the inputs and one log-sum-exp per row, never the (rows, V) logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, valid, chunk_size):
        rows = hidden.shape[0]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(rows, dtype=dtype, device=hidden.device)
        lse = torch.empty(rows, dtype=dtype, device=hidden.device)
        for start in range(0, rows, chunk_size):
            stop = min(start + chunk_size, rows)
            logits = _chunk_logits(hidden[start:stop], weight, bias, dtype)
            lse[start:stop] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(-1, labels[start:stop, None])[:, 0]
            out[start:stop] = picked - lse[start:stop]
        ctx.save_for_backward(hidden, weight, bias, labels, valid, lse)
        ctx.chunk_size = chunk_size
        return torch.where(valid, out, 0.0)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, valid, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_out = torch.where(valid, grad_out, 0.0)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=lse.dtype) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=lse.dtype) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = min(start + ctx.chunk_size, hidden.shape[0])
            h, g = hidden[start:stop], grad_out[start:stop]
            # d log p_y / d logits = onehot(y) - softmax(logits): built in place on the chunk
            grad_logits = _chunk_logits(h, weight, bias, lse.dtype)
            grad_logits.sub_(lse[start:stop, None]).exp_().mul_(-g[:, None])
            grad_logits.scatter_add_(-1, labels[start:stop, None], g[:, None])
            if need_bias:
                grad_bias += grad_logits.sum(dim=0)
            if need_weight:
                grad_weight.addmm_(grad_logits.T, h.to(lse.dtype))
            if need_hidden:
                grad_hidden[start:stop] = grad_logits.to(hidden.dtype) @ weight
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _chunk_logits(hidden, weight, bias, dtype):
    logits = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)
    return logits.to(dtype)


def fused_linear_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int = 1024,
) -> torch.Tensor:
    r"""Token log-probabilities from the last hidden states, without the logits tensor.

    $$
    \log p_t = z_{t, y_t} - \log\sum_v e^{z_{t,v}}, \qquad z_t = W h_t + b
    $$

    computed ``chunk_size`` rows (token positions) at a time: forward keeps one
    log-sum-exp per row, backward recomputes each chunk's logits and accumulates the
    gradients of ``hidden``, ``weight`` and ``bias`` (an ``autograd.Function``). Peak memory
    is one (chunk_size, V) float32 block instead of the (rows, V) logits and their
    gradient; the price is a second logits matmul in backward. Values and gradients match
    ``token_logps(hidden @ weight.T + bias, labels)``.

    Labels are **not** shifted (see [`prefopt.shift_labels`][prefopt.shift_labels]); rows
    with ``ignore_index`` give 0 and no gradient. Row chunks never change a result: the
    sequence sums, and a group's responses, are assembled afterwards from all rows, so a
    group never straddles anything the loss sees.

    Args:
        hidden: (..., H) final hidden states (before the output projection), e.g.
            (B, n, T, H) for n responses per prompt.
        weight: (V, H) output-embedding matrix (``model.lm_head.weight``).
        labels: (...) token ids in [0, V), or ``ignore_index``.
        bias: (V,) output bias, or ``None`` (the default; most LMs have none).
        ignore_index: Default -100.
        chunk_size: Rows per chunk. Default 1024.

    Returns:
        (...) log-probabilities in float32 (float64 for float64 inputs).

    Example:
        >>> import torch
        >>> from prefopt.backends.torch import fused_linear_logps
        >>> hidden = torch.randn(2, 5, 16, requires_grad=True)
        >>> weight = torch.randn(100, 16, requires_grad=True)
        >>> labels = torch.randint(0, 100, (2, 5))
        >>> fused_linear_logps(hidden, weight, labels).sum().backward()
    """
    from prefopt.logps import check_fused_inputs

    check_fused_inputs(hidden, weight, bias, labels, chunk_size, ignore_index, torch_xp)
    lead = hidden.shape[:-1]
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    out = _FusedLinearLogps.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        torch.where(valid, flat_labels, 0),
        valid,
        int(chunk_size),
    )
    return out.reshape(lead)
