"""A Llama in Flax NNX that loads Hugging Face Llama checkpoints: a real model for JAX users.

The architecture of ``transformers``' ``LlamaForCausalLM`` (RMSNorm, rotary embeddings with
the checkpoint's ``rope_theta``, grouped-query attention, SwiGLU MLP, optionally tied
embeddings), written plainly for training on groups: no KV cache, no sampling.
[`llama_forward`][prefopt.integrations.flax_llama.llama_forward] returns the last hidden
states and the output matrix, so the log-probs come from the fused output layer of
[`make_nnx_train_step`][prefopt.integrations.jax.make_nnx_train_step] and no (B·n, T, V)
logits exist. SmolLM2-135M-Instruct (``prefopt.cli.models.smollm2_path()``) loaded with
[`load_llama`][prefopt.integrations.flax_llama.load_llama] gives transformers' logits to
about 1e-4 in float32 (a test checks it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from prefopt.integrations.jax import group_attention, masked_attention
from prefopt.layout import PackedGroups, ResponseAttention

__all__ = ["Llama", "llama_forward", "llama_group_forward", "load_llama"]


class _RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype: Any):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        # as transformers: the statistics in float32 (float64 stays float64)
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def _linear(n_in: int, n_out: int, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)


def _rotate(x, cos, sin):
    """Rotary embedding, halves layout (transformers' ``rotate_half``)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class _Layer(nnx.Module):
    def __init__(self, c: dict[str, Any], dtype: Any, rngs: nnx.Rngs):
        h, d = c["hidden_size"], c["head_dim"]
        self.heads, self.kv_heads, self.head_dim = (
            c["num_attention_heads"],
            c["num_key_value_heads"],
            d,
        )
        self.q_proj = _linear(h, self.heads * d, dtype, rngs)
        self.k_proj = _linear(h, self.kv_heads * d, dtype, rngs)
        self.v_proj = _linear(h, self.kv_heads * d, dtype, rngs)
        self.o_proj = _linear(self.heads * d, h, dtype, rngs)
        self.gate_proj = _linear(h, c["intermediate_size"], dtype, rngs)
        self.up_proj = _linear(h, c["intermediate_size"], dtype, rngs)
        self.down_proj = _linear(c["intermediate_size"], h, dtype, rngs)
        self.input_layernorm = _RMSNorm(h, c["rms_norm_eps"], dtype)
        self.post_attention_layernorm = _RMSNorm(h, c["rms_norm_eps"], dtype)

    def __call__(self, x, cos, sin, attend):
        B, T, _ = x.shape
        y = self.input_layernorm(x)
        q = self.q_proj(y).reshape(B, T, self.heads, self.head_dim)
        k = self.k_proj(y).reshape(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(y).reshape(B, T, self.kv_heads, self.head_dim)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        repeat = self.heads // self.kv_heads  # grouped-query attention
        k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
        x = x + self.o_proj(attend(q, k, v).reshape(B, T, -1))
        y = self.post_attention_layernorm(x)
        return x + self.down_proj(jax.nn.silu(self.gate_proj(y)) * self.up_proj(y))


class Llama(nnx.Module):
    """A Llama causal LM from a Hugging Face ``config.json`` dict (random weights).

    Args:
        config: The checkpoint's config (``hidden_size``, ``num_hidden_layers``, heads,
            ``rope_theta`` or ``rope_parameters["rope_theta"]``, ``tie_word_embeddings``...).
        dtype: The parameters' and the computation's dtype. Default float32; with bfloat16
            the norms' statistics and the attention softmax stay float32, and the fused
            output layer computes its log-sum-exp in float32.
        rngs: ``nnx.Rngs`` for the random initial weights. Default ``nnx.Rngs(0)``.
    """

    def __init__(
        self, config: dict[str, Any], dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None
    ):
        rngs = rngs or nnx.Rngs(0)
        c = dict(config)
        c.setdefault("head_dim", c["hidden_size"] // c["num_attention_heads"])
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        unsupported = {
            "rope_type": kind if kind != "default" else None,
            "attention_bias": c.get("attention_bias") or None,
            "mlp_bias": c.get("mlp_bias") or None,
        }
        for name, value in unsupported.items():
            if value is not None:  # a silently different model otherwise
                raise ValueError(
                    f"Llama: {name}={value!r} is not supported (default rotary, no biases)"
                )
        self.rope_theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
        self.head_dim = c["head_dim"]
        self.embed_tokens = nnx.Embed(
            c["vocab_size"], c["hidden_size"], dtype=dtype, param_dtype=dtype, rngs=rngs
        )
        self.layers = nnx.List([_Layer(c, dtype, rngs) for _ in range(c["num_hidden_layers"])])
        self.norm = _RMSNorm(c["hidden_size"], c["rms_norm_eps"], dtype)
        self.lm_head = (
            None
            if c.get("tie_word_embeddings", False)
            else _linear(c["hidden_size"], c["vocab_size"], dtype, rngs)
        )

    def hidden(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        *,
        positions: Any = None,
        group: ResponseAttention | None = None,
    ) -> Any:
        """Last hidden states (B, T, H) after the final norm.

        Args:
            input_ids: (B, T) int.
            attention_mask: (B, T), 0 on padding keys. Default ``None``: none.
            positions: (B, T) int position ids. Default ``None``: 0 .. T-1 on every row.
            group: A packed batch's [`ResponseAttention`][prefopt.layout.ResponseAttention]
                (``PackedGroups.attention``): the shared group attention instead of the
                causal one. Default ``None``.
        """
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        inv = 1.0 / self.rope_theta ** (
            jnp.arange(0, self.head_dim, 2, dtype=jnp.float32) / self.head_dim
        )
        angles = positions.astype(jnp.float32)[:, :, None] * inv
        angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
        cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
        if group is None:
            allowed = jnp.tril(jnp.ones((T, T), bool))[None, None]
            if attention_mask is not None:
                allowed = allowed & attention_mask.astype(bool)[:, None, None, :]

            def attend(q, k, v):
                return masked_attention(q, k, v, allowed)
        else:

            def attend(q, k, v):
                return group_attention(q, k, v, group)

        for layer in self.layers:
            x = layer(x, cos, sin, attend)
        return self.norm(x)

    def output_weight(self):
        """The (V, H) output matrix: the embedding when tied."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...]
        return self.lm_head.kernel[...].T

    def __call__(self, input_ids, attention_mask):
        """Logits (B, T, V) in float32."""
        h = self.hidden(input_ids, attention_mask)
        return (h @ self.output_weight().T).astype(jnp.float32)


def llama_forward(model: Llama, input_ids, attention_mask):
    """``(hidden, weight)``: the forward of a train step through the fused output layer.

    For [`make_nnx_train_step`][prefopt.integrations.jax.make_nnx_train_step]: no logits
    tensor exists.
    """
    return model.hidden(input_ids, attention_mask), model.output_weight()


def llama_group_forward(model: Llama, packed: PackedGroups):
    """``(hidden, weight)`` of packed groups: each prompt once, then its responses.

    For the ``group_forward`` of
    [`make_nnx_train_step`][prefopt.integrations.jax.make_nnx_train_step]: ``hidden`` is
    (B, L, H) over the packed sequences of [`pack_groups`][prefopt.layout.pack_groups]
    (positions restarting after the prompt, the shared group attention), and each
    response's log-prob equals that of its own sequence.
    """
    hidden = model.hidden(packed.ids, positions=packed.positions, group=packed.attention)
    return hidden, model.output_weight()


def load_llama(path: str | Path, dtype: Any = jnp.float32) -> Llama:
    """A [`Llama`][prefopt.integrations.flax_llama.Llama] with a checkpoint folder's weights.

    Args:
        path: A Hugging Face Llama checkpoint folder (``config.json`` and
            ``model.safetensors``), e.g. ``prefopt.cli.models.smollm2_path()``.
        dtype: The parameters' dtype. Default float32.
    """
    from safetensors.numpy import load_file

    folder = Path(path)
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ValueError(
            f"load_llama: {folder} holds a {config.get('model_type')!r} model, not a llama"
        )
    weights = load_file(folder / "model.safetensors")
    model = nnx.eval_shape(lambda: Llama(config, dtype))  # shapes only: no random weights

    def put(module, name, value, transpose=False):
        array = jnp.asarray(value.T if transpose else value, dtype)
        target = getattr(module, name)  # abstract: its value a ShapeDtypeStruct
        if target.get_value().shape != array.shape:
            raise ValueError(
                f"load_llama: {name} has shape {array.shape}; expected {target.get_value().shape}"
            )
        target.set_value(array)

    put(model.embed_tokens, "embedding", weights["model.embed_tokens.weight"])
    put(model.norm, "weight", weights["model.norm.weight"])
    if model.lm_head is not None:
        put(model.lm_head, "kernel", weights["lm_head.weight"], transpose=True)
    for i, layer in enumerate(model.layers):
        at = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            put(
                getattr(layer, name),
                "kernel",
                weights[f"{at}self_attn.{name}.weight"],
                transpose=True,
            )
        for name in ("gate_proj", "up_proj", "down_proj"):
            put(getattr(layer, name), "kernel", weights[f"{at}mlp.{name}.weight"], transpose=True)
        put(layer.input_layernorm, "weight", weights[f"{at}input_layernorm.weight"])
        put(
            layer.post_attention_layernorm,
            "weight",
            weights[f"{at}post_attention_layernorm.weight"],
        )
    return model
