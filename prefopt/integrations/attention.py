"""The shared group attention, registered with Hugging Face's attention interface.

A group packed into one sequence (see [`prefopt.layout`][prefopt.layout]) runs through the
model's own forward; in each attention layer the prompt's keys and values are computed
once, the prompt attends causally to itself, and each response attends to its prompt and
causally to its own tokens ([`response_attention`][prefopt.layout.response_attention]):
two ``scaled_dot_product_attention`` calls, no (L, L) mask.

The model's attention implementation ``X`` (``sdpa``, ``eager``, ``flash_attention_2``,
``flash_attention_3``) becomes ``prefopt_group_X`` (see [`use_group_attention`]
[prefopt.integrations.attention.use_group_attention]): every call that carries no group
(generation, evaluation, any other code) runs ``X`` itself, unchanged; a call with the
keyword argument ``prefopt_group`` runs the shared attention.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import prefopt.layout

__all__ = ["group_attention", "use_group_attention"]

PREFIX = "prefopt_group_"
BASES = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def group_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    prefopt_group: prefopt.layout.ResponseAttention | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    r"""Attention of packed groups: the prompt once, each response on its prompt and itself.

    With $Q, K, V$ the packed sequence's queries, keys and values (B, heads, L, d):

    - prompt tokens: $\mathrm{softmax}(Q_{:P} K_{:P}^\top s + \text{causal}) V_{:P}$;
    - response $i$: $\mathrm{softmax}(Q_i K_{[x, y_i]}^\top s + \text{causal}_{\searrow})
      V_{[x, y_i]}$ over the keys of the prompt $x$ and of its own tokens $y_i$, with the
      bottom-right aligned causal mask of
      [`response_attention`][prefopt.layout.response_attention];

    so every token sees exactly what it sees in its own unshared sequence. With shared keys
    (long prompts: see ``response_attention``) the responses' queries attend to all $L$
    packed keys at once under the mask that allows the same keys.

    Args:
        module: The attention layer (Hugging Face's signature).
        query: (B, heads, L, d).
        key: (B, kv_heads, L, d).
        value: (B, kv_heads, L, d).
        attention_mask: Unused with a group (the layout says who attends to whom).
        scaling: The score scale $s$. Default ``None``: $1/\sqrt{d}$.
        dropout: Attention dropout probability (training only).
        prefopt_group: The batch's [`ResponseAttention`][prefopt.layout.ResponseAttention]
            (``PackedGroups.attention``), or ``None``: then the model's own implementation
            runs.
        **kwargs: The layer's other keyword arguments.

    Returns:
        ``(output, None)``: output (B, L, heads, d), as Hugging Face's functions return.
    """
    if prefopt_group is None:  # any other call: the model's own attention, unchanged
        base = module.config._attn_implementation.removeprefix(PREFIX)
        fn = ALL_ATTENTION_FUNCTIONS.get(base)
        if fn is None:  # eager lives in the model's own file
            fn = _eager(module)
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                  **kwargs)  # fmt: skip
    idx = prefopt_group
    B, heads, L, d = query.shape
    P, shared = idx.prompt, idx.shared_keys
    n, R = (1, idx.queries.shape[-1]) if shared else idx.queries.shape[1:]
    window = kwargs.get("sliding_window")
    if window is not None and (L if shared else P + R) <= window:
        kwargs.pop("sliding_window")  # no query is that far from a key it may see
    for name in ("softcap", "sliding_window", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f"group_attention: this layer passes {name}={kwargs[name]!r}, which the shared "
                "group attention does not reproduce; run batch_logps(share_prefix=False)"
            )
    drop = dropout if module.training else 0.0
    gqa = key.shape[1] != heads
    prompt = torch.nn.functional.scaled_dot_product_attention(
        query[:, :, :P], key[:, :, :P], value[:, :, :P], is_causal=True, scale=scaling,
        dropout_p=drop, enable_gqa=gqa,
    )  # fmt: skip

    def rows(x, index):  # (B, h, L, d) at (B, n, m) positions -> (B * n, h, m, d)
        index = index.reshape(B, n, -1)
        picked = x[torch.arange(B, device=x.device)[:, None, None], :, index]  # (B, n, m, h, d)
        return picked.permute(0, 1, 3, 2, 4).reshape(B * n, x.shape[1], index.shape[-1], d)

    if shared:
        k, v, mask = key, value, idx.allowed
    else:
        k, v = rows(key, idx.keys), rows(value, idx.keys)
        mask = idx.allowed.expand(B, n, R, P + R).reshape(B * n, 1, R, P + R)
    responses = torch.nn.functional.scaled_dot_product_attention(
        rows(query, idx.queries), k, v, attn_mask=mask, scale=scaling, dropout_p=drop,
        enable_gqa=gqa,
    )  # fmt: skip
    responses = responses.reshape(B, n, heads, R, d).permute(0, 2, 1, 3, 4)
    both = torch.cat([prompt, responses.reshape(B, heads, n * R, d)], dim=2)  # (B, h, P + nR, d)
    out = torch.take_along_dim(both, idx.output[:, None, :, None], dim=2)  # (B, h, L, d)
    return out.transpose(1, 2).contiguous(), None


def _eager(module: torch.nn.Module):
    """The ``eager_attention_forward`` of the module's model file."""
    import sys

    return sys.modules[type(module).__module__].eager_attention_forward


def servable(model: Any, longest: int) -> str | None:
    """Why the shared attention cannot serve ``model``, or ``None`` when it can.

    Args:
        model: The Hugging Face causal LM.
        longest: The most tokens of prompt + response of one response's own sequence.
    """
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl is None or impl.removeprefix(PREFIX) not in BASES:
        return f"its attention implementation is {impl!r}"
    if not hasattr(model, "set_attn_implementation"):
        return "it has no set_attn_implementation"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return f"config.attn_logit_softcapping={config.attn_logit_softcapping!r}"
    window = getattr(config, "sliding_window", None)
    if window is not None and longest > window:  # a window shorter than a sequence
        return f"config.sliding_window={window!r} < {longest} tokens"
    return None


def use_group_attention(model: Any) -> str | None:
    """Set ``model``'s attention implementation ``X`` to ``prefopt_group_X`` (once).

    ``prefopt_group_X`` runs ``X`` unchanged for every call without a group, and the
    shared [`group_attention`][prefopt.integrations.attention.group_attention] for a call
    with one. Its mask function is ``X``'s.

    Args:
        model: A Hugging Face ``PreTrainedModel`` that ``servable`` accepts.

    Returns:
        ``None``, or why Hugging Face refused the implementation for this model (then the
        model is unchanged).
    """
    impl = model.config._attn_implementation
    if impl.startswith(PREFIX):
        return None
    name = PREFIX + impl
    transformers.AttentionInterface.register(name, group_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    try:
        model.set_attn_implementation(name)
    except (ValueError, ImportError) as err:  # e.g. a model that does not support sdpa
        model.set_attn_implementation(impl)
        return str(err).split(". ")[0]
    return None
