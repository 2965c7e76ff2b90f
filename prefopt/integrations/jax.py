"""JAX integration: the loss and metrics of a group batch, and an optax train step.

Batches are dicts of arrays as :func:`prefopt.integrations.data.collate_ids` makes them:
``input_ids``, ``attention_mask`` and ``labels`` (B, n, T), ``rewards`` and ``mask``
(B, n), and optionally ``ref_logps`` (B, n). Under data parallelism shard them over the
batch axis only (``prefopt.backends.jax.shard_batch``): a group must stay on one device.

The model is a function ``apply_fn(params, input_ids, attention_mask)`` of the B·n
flattened sequences, returning either their logits (B·n, T, V) or the pair ``(hidden,
weight)``: the last hidden states (B·n, T, H) and the output matrix (V, H), or ``(hidden,
weight, bias)`` with the output bias (V,). With the pair the log-probs come from the fused
output layer
([`fused_linear_logps`][prefopt.backends.jax.fused_linear_logps]) and no (B·n, T, V)
logits tensor exists, forward or backward (a Flax ``nnx.Linear`` head holds its kernel as
(H, V): return ``kernel.T``).

**The shared prompt.** A batch may also hold ``packed``, the
[`PackedGroups`][prefopt.layout.PackedGroups] of
[`pack_groups`][prefopt.layout.pack_groups] (NumPy, on the host, then ``.map(jnp.asarray)``;
a JAX pytree once this module is imported). Given a ``group_fn(params, packed)`` that runs
each group as one packed sequence (each prompt once, then its responses:
[`llama_group_forward`][prefopt.integrations.flax_llama.llama_group_forward] for the Flax
Llama), the policy's and the reference's log-probs come from it; a batch without
``packed`` runs ``apply_fn``. Pack with ``pad_to_multiple_of`` to bound the compiles.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import prefopt
from prefopt import _checks
from prefopt.backends.jax import fused_linear_logps
from prefopt.integrations.loss import group_loss_and_metrics
from prefopt.layout import PackedGroups, ResponseAttention
from prefopt.losses.registry import spec

__all__ = [
    "group_attention",
    "loss_and_metrics",
    "make_nnx_train_step",
    "make_train_step",
    "masked_attention",
    "sequence_logps",
]

# The packed groups travel through jit as a pytree: the arrays traced, P and the form static.
jax.tree_util.register_dataclass(
    ResponseAttention, data_fields=["queries", "keys", "allowed", "output"],
    meta_fields=["prompt", "shared_keys"],
)  # fmt: skip
jax.tree_util.register_dataclass(
    PackedGroups, data_fields=["ids", "positions", "rows", "cols", "owner", "targets",
                               "attention"], meta_fields=[],
)  # fmt: skip

# The keys of a group batch and their shapes' names (collate_ids); ref_logps is optional.
_BATCH = {"input_ids": "B, n, T", "attention_mask": "B, n, T", "labels": "B, n, T",
         "rewards": "B, n", "mask": "B, n", "ref_logps": "B, n"}  # fmt: skip


def _check_batch(fn: str, batch: Any, with_ref_params: bool = False) -> None:
    """Raise one line naming ``fn`` and the key for a batch key missing or of a wrong shape.

    Shapes are static, so this runs inside ``jit`` too (at trace time). A batch with
    ``ref_logps`` and ``ref_params`` given too is refused: two references.
    """
    if not hasattr(batch, "keys"):
        raise TypeError(f"{fn}: batch must be a dict of arrays (collate_ids); got {type(batch)}")
    if with_ref_params and "ref_logps" in batch:
        raise ValueError(
            f"{fn}: two references: batch['ref_logps'] and ref_params; drop one (ref_params "
            "computes the reference log-probs in the step)"
        )
    missing = [k for k in _BATCH if k not in batch and k != "ref_logps"]
    if missing:
        raise ValueError(
            f"{fn}: the batch has no {missing[0]!r}; a group batch holds "
            f"{', '.join(k for k in _BATCH if k != 'ref_logps')} (and optionally ref_logps), "
            "as collate_ids makes them"
        )
    if "packed" in batch and not isinstance(batch["packed"], PackedGroups):
        raise TypeError(
            f"{fn}: batch['packed'] must be the PackedGroups of prefopt.layout.pack_groups; "
            f"got {type(batch['packed']).__name__}"
        )
    ids = tuple(batch["input_ids"].shape)  # (B, n, T): every other key is its first axes
    for key, names in _BATCH.items():
        rank = names.count(",") + 1
        if key in batch and (len(ids) != 3 or tuple(batch[key].shape) != ids[:rank]):
            raise ValueError(
                f"{fn}: batch[{key!r}] must have shape ({names}); got {tuple(batch[key].shape)}"
            )


def masked_attention(query: Any, key: Any, value: Any, allowed: Any) -> Any:
    r"""Softmax attention over the keys ``allowed`` says, its scores in float32 at least.

    $\mathrm{softmax}(Q K^\top / \sqrt{d} + M)\, V$ with $M = 0$ where allowed, $-\infty$
    elsewhere (every query must be allowed some key); bfloat16 inputs give bfloat16
    outputs, float64 stays float64.

    Args:
        query: (..., Q, heads, d).
        key: (..., K, heads, d) (grouped-query heads repeated to ``heads``).
        value: (..., K, heads, d).
        allowed: bool, broadcasting to (..., heads, Q, K).

    Returns:
        (..., Q, heads, d).
    """
    scores = jnp.einsum("...qhd,...khd->...hqk", query, key)
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    scores = jnp.where(allowed, scores / math.sqrt(query.shape[-1]), -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", weights, value)


def group_attention(query: Any, key: Any, value: Any, group: ResponseAttention) -> Any:
    r"""The shared group attention of packed sequences: the prompt once, each response on it.

    For a Flax (or any JAX) attention layer run on [`PackedGroups`][prefopt.layout.PackedGroups]
    ``ids`` at ``positions``: the prompt attends causally over the first $P$ positions;
    each response attends to its prompt and causally to its own tokens, over its own
    $P + R$ gathered keys or over the $L$ packed keys (``group.shared_keys``); the outputs
    are put back in packed order (``group.output``; see
    [`response_attention`][prefopt.layout.response_attention]). Every token sees what it
    sees in its own unshared sequence, and no array has two dimensions of size $L$.
    [`llama_group_forward`][prefopt.integrations.flax_llama.llama_group_forward] runs it in
    every layer.

    Args:
        query: (B, L, heads, d) after the rotary embedding.
        key: (B, L, heads, d) (grouped-query heads repeated to ``heads``).
        value: (B, L, heads, d).
        group: The batch's [`ResponseAttention`][prefopt.layout.ResponseAttention]
            (``PackedGroups.attention``).

    Returns:
        (B, L, heads, d).
    """
    B, L, h, d = query.shape
    P = group.prompt
    causal = jnp.tril(jnp.ones((P, P), bool))
    prompt = masked_attention(query[:, :P], key[:, :P], value[:, :P], causal)

    def take(x, index):  # (B, L, h, d) at the (B, ...) packed positions -> (B, m, h, d)
        return jnp.take_along_axis(x, index.reshape(B, -1)[:, :, None, None], axis=1)

    if group.shared_keys:
        responses = masked_attention(take(query, group.queries), key, value, group.allowed)
    else:
        n, R = group.queries.shape[1:]
        K = group.keys.shape[-1]
        own = [take(x, group.keys).reshape(B, n, K, h, d) for x in (key, value)]
        queries = take(query, group.queries).reshape(B, n, R, h, d)
        responses = masked_attention(queries, *own, group.allowed[:, :, None])
        responses = responses.reshape(B, n * R, h, d)
    both = jnp.concatenate([prompt, responses], axis=1)  # (B, P + n R, h, d)
    return jnp.take_along_axis(both, group.output[:, :, None, None], axis=1)


def sequence_logps(
    apply_fn: Callable[[Any, Any, Any], Any],
    params: Any,
    batch: dict[str, Any],
    *,
    group_fn: Callable[[Any, PackedGroups], Any] | None = None,
    checks: bool = False,
) -> tuple[Any, Any]:
    """Summed response log-probs (B, n) and response lengths (B, n) of a group batch.

    Prompt and padding tokens carry label -100 and count for nothing. ``apply_fn`` returns
    logits or ``(hidden, weight)`` (the fused output layer; see the module docstring).
    With ``group_fn`` and a batch holding ``packed`` (see the module docstring), the model
    runs each group as one packed sequence, ``group_fn(params, packed)``, returning (B, L,
    V) logits or ``(hidden, weight)`` with hidden (B, L, H); only the positions that
    predict a counted token are read. ``checks=True`` places a ``checkify`` check that
    every label is -100 or in [0, V) (see
    [`make_train_step`][prefopt.integrations.jax.make_train_step]); only inside a function
    that ``jax.experimental.checkify.checkify`` transforms.
    """
    B, n, T = batch["input_ids"].shape
    labels = batch["labels"].reshape(B * n, T)
    packed = batch.get("packed") if group_fn is not None else None
    if packed is not None:
        out = group_fn(params, packed)
    else:
        out = apply_fn(
            params,
            batch["input_ids"].reshape(B * n, T),
            batch["attention_mask"].reshape(B * n, T),
        )
    if checks:
        from jax.experimental import checkify

        vocab = out[1].shape[0] if isinstance(out, tuple) else out.shape[-1]
        bad = jnp.sum((labels != -100) & ((labels < 0) | (labels >= vocab)))
        checkify.check(
            bad == 0,
            f"loss_and_metrics: labels must lie in [0, {vocab}) or equal ignore_index=-100; "
            "got {} label(s) outside",
            bad,
        )
    if packed is not None:
        at = (packed.rows, packed.cols)  # the positions that predict a counted token
        if isinstance(out, tuple):
            hidden, weight, *bias = out
            bias = bias[0] if bias else None
            tokens = fused_linear_logps(hidden[at], weight, packed.targets, bias=bias)
        else:
            tokens = prefopt.token_logps(out[at], packed.targets)
        # padded tokens (pack_groups(pad_to_multiple_of=...)) belong to response B n: dropped
        logps = jax.ops.segment_sum(tokens, packed.owner, num_segments=B * n)
        lengths = jnp.sum(labels != -100, axis=-1).astype(logps.dtype)
    elif isinstance(out, tuple):
        hidden, weight, *bias = out
        shifted = prefopt.shift_labels(labels)
        tokens = fused_linear_logps(hidden, weight, shifted, bias=bias[0] if bias else None)
        logps, lengths = prefopt.sequence_logps(tokens, shifted != -100)
    else:
        logps, lengths = prefopt.causal_lm_logps(out, labels)
    return logps.reshape(B, n), lengths.reshape(B, n)


def loss_and_metrics(
    params: Any,
    batch: dict[str, Any],
    *,
    apply_fn: Callable[[Any, Any, Any], Any],
    group_fn: Callable[[Any, PackedGroups], Any] | None = None,
    ref_params: Any = None,
    loss: str = "mpo",
    pairs: str = "all",
    checks: bool = False,
    **options: Any,
) -> tuple[Any, dict[str, Any]]:
    r"""The training loss of a group batch and its metrics, for ``jax.value_and_grad``.

    ``apply_fn(params, input_ids, attention_mask)`` runs the model on the B·n flattened
    sequences and returns their logits, or ``(hidden, weight)`` for the fused output layer
    (see the module docstring). Their response log-probs (prompt and padding tokens carry
    label -100 and count for nothing) go to [`prefopt.batch_loss`][prefopt.batch_loss]: the
    mean over groups $\frac{1}{B}\sum_b \ell_b$, whose gradient is the same however the
    batch is split over devices. The reference log-probs are the same model's under
    ``ref_params`` (under ``jax.lax.stop_gradient``: no gradient reaches them), or come
    from ``batch["ref_logps"]`` (precomputed), or are left out (reference-free).

    Args:
        params: The model parameters (a pytree).
        batch: The group batch (see the module docstring).
        apply_fn: ``(params, input_ids, attention_mask) -> logits`` or ``-> (hidden,
            weight)``.
        group_fn: ``(params, packed) -> logits`` or ``-> (hidden, weight)`` over packed
            groups, used for a batch holding ``packed`` (see the module docstring).
            Default ``None``: ``apply_fn`` always.
        ref_params: The reference parameters (a pytree for ``apply_fn``, e.g. the
            starting ones), or ``None`` (default): ``batch["ref_logps"]`` if there, else
            none.
        loss: A registered loss name. Default ``"mpo"``.
        pairs: ``"all"`` (default) or ``"best_worst"``, for pairwise losses.
        checks: Place ``checkify`` checks of the values a trace cannot read (see
            [`make_train_step`][prefopt.integrations.jax.make_train_step]); only inside a
            function that ``jax.experimental.checkify.checkify`` transforms. Default
            ``False``.
        **options: Options of the loss (``beta``, ``alpha``...).

    Returns:
        ``(loss, metrics)``: a 0-d array and the dict of
        [`prefopt.metrics.group_metrics`][prefopt.metrics.group_metrics].

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> from prefopt.integrations.jax import loss_and_metrics
        >>> def apply_fn(params, ids, attention):
        ...     return jnp.take(params["embed"], ids, axis=0) @ params["out"]
        >>> params = {"embed": jnp.ones((16, 8)), "out": jnp.ones((8, 16))}
        >>> ids = jnp.zeros((2, 3, 5), int)
        >>> batch = {"input_ids": ids, "attention_mask": ids + 1, "labels": ids + 1,
        ...          "rewards": jnp.ones((2, 3)), "mask": jnp.ones((2, 3), bool)}
        >>> (value, metrics), grads = jax.value_and_grad(loss_and_metrics, has_aux=True)(
        ...     params, batch, apply_fn=apply_fn)
    """
    _check_batch("loss_and_metrics", batch, ref_params is not None)
    if checks:
        _value_checks(loss, batch, options)
    logps, lengths = sequence_logps(apply_fn, params, batch, group_fn=group_fn, checks=checks)
    ref = batch.get("ref_logps")
    if ref_params is not None:
        ref_logps = sequence_logps(apply_fn, ref_params, batch, group_fn=group_fn)[0]
        ref = jax.lax.stop_gradient(ref_logps)
    return group_loss_and_metrics(loss, logps, ref, batch, lengths, pairs=pairs, options=options)


def _value_checks(loss: str, batch: dict[str, Any], options: dict[str, Any]) -> None:
    """``checkify`` checks of what only values tell, with the eager messages.

    Finite rewards, and the traced numeric options (a number was checked before the trace).
    """
    from jax.experimental import checkify

    found = spec(loss, "loss_and_metrics")
    fn = found.fn
    bad = jnp.sum(jnp.any(batch["mask"] & ~jnp.isfinite(batch["rewards"]), axis=-1))
    checkify.check(
        bad == 0,
        f"{fn.__name__}: rewards must be finite where mask is true; "
        "got NaN or infinite rewards in {} group(s)",
        bad,
    )
    for name, value in options.items():
        if name in found.ranges and not isinstance(value, (int, float)):
            holds, needs = _traced_rule(found.ranges[name], jnp.asarray(value))
            checkify.check(holds, f"{fn.__name__}: {name} must {needs}; got {{}}", value)


def _traced_rule(rule: Any, v: Any) -> tuple[Any, str]:
    """A numeric option's rule (``LossSpec.ranges``) on a traced value: (holds, wording)."""
    if rule is _checks.positive:
        return (v > 0) & (v < math.inf), "be a finite number > 0"
    if rule is _checks.non_negative:
        return (v >= 0) & (v < math.inf), "be a finite number >= 0"
    if rule is _checks.finite:
        return jnp.isfinite(v), "be a finite number"
    assert isinstance(rule, functools.partial) and rule.func is _checks.in_range, rule
    low, high, ends = rule.keywords["low"], rule.keywords["high"], rule.keywords
    above = v > low if ends.get("open_low") else v >= low
    below = v < high if ends.get("open_high") else v <= high
    left, right = "(" if ends.get("open_low") else "[", ")" if ends.get("open_high") else "]"
    interval = f"{left}{low}, {high}{right}"
    return above & below, f"lie in {interval}"


def make_train_step(
    apply_fn: Callable[[Any, Any, Any], Any],
    optimizer: Any,
    *,
    group_fn: Callable[[Any, PackedGroups], Any] | None = None,
    loss: str = "mpo",
    pairs: str = "all",
    checks: bool = False,
    **options: Any,
) -> Callable:
    """A jitted optax train step on group batches.

    Args:
        apply_fn: ``(params, input_ids, attention_mask) -> logits``, or ``-> (hidden,
            weight)`` for the fused output layer (see the module docstring).
        optimizer: An ``optax.GradientTransformation``.
        group_fn: ``(params, packed) -> logits`` or ``-> (hidden, weight)``: the shared
            prompt for batches holding ``packed`` (see the module docstring). Default
            ``None``.
        loss: A registered loss name. Default ``"mpo"``.
        pairs: ``"all"`` (default) or ``"best_worst"``, for pairwise losses.
        checks: Check inside the compiled step what only values tell, with the eager
            messages: NaN or infinite rewards, labels outside [0, V), a traced option out
            of its range (``jax.experimental.checkify``); the step raises after it runs.
            Default ``False``: unchecked inside the trace (a NaN reward gives a NaN loss).
            The checks cost a little compute and one host read per step: a mode for
            debugging or for data you do not trust.
        **options: Options of the loss (checked here, with the loss's own messages).

    Returns:
        ``step(params, opt_state, batch, ref_params=None, **schedule) -> (params,
        opt_state, loss, metrics)``, jitted. ``ref_params``: the reference's parameters
        (e.g. the starting ones), whose log-probs the step computes itself, with no
        gradient; ``None``: ``batch["ref_logps"]`` or reference-free, as in
        [`loss_and_metrics`][prefopt.integrations.jax.loss_and_metrics]. ``schedule``:
        numeric options for this step (``beta=schedule(i)``, a
        number or a 0-d array), traced: a schedule compiles the step once. Each call checks
        them first, where their values can be read (a number, a concrete array: not inside
        an outer trace), with the loss's own messages, and checks the batch's keys and
        shapes. Given a batch sharded over devices (``shard_batch``) and replicated
        parameters it runs data-parallel; the result equals the single-device one.
        ``step.jitted`` is the compiled function itself (``lower``, ``_cache_size``).

    Examples:
        A beta schedule inside one jitted step (``optax`` schedules are plain functions
        of the step count):

        >>> import jax.numpy as jnp, optax
        >>> from prefopt.integrations.jax import make_train_step
        >>> def apply_fn(params, ids, attention):
        ...     return jnp.take(params["embed"], ids, axis=0) @ params["out"]
        >>> params = {"embed": jnp.ones((16, 8)) / 8, "out": jnp.eye(8, 16)}
        >>> ids = jnp.arange(30).reshape(2, 3, 5) % 16
        >>> batch = {"input_ids": ids, "attention_mask": ids * 0 + 1, "labels": ids,
        ...          "rewards": jnp.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.2]]),
        ...          "mask": jnp.ones((2, 3), bool)}
        >>> optimizer, beta = optax.sgd(0.1), optax.linear_schedule(0.5, 0.1, 100)
        >>> step = make_train_step(apply_fn, optimizer, loss="mpo", alpha=1.0)
        >>> state = optimizer.init(params)
        >>> for i in range(3):
        ...     params, state, loss, metrics = step(params, state, batch, beta=beta(i))
        >>> step._cache_size()  # compiled once for the three betas
        1
    """
    import optax

    # an unknown loss or an option it does not take fails here, not inside the trace
    found = spec(loss, "make_train_step")
    found.config(options, fn="make_train_step")

    def step(params, opt_state, batch, ref_params=None, **schedule):
        (value, metrics), grads = jax.value_and_grad(loss_and_metrics, has_aux=True)(
            params, batch, apply_fn=apply_fn, group_fn=group_fn, ref_params=ref_params,
            loss=loss, pairs=pairs, checks=checks, **{**options, **schedule},
        )  # fmt: skip
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value, metrics

    if checks:
        from jax.experimental import checkify

        jitted = jax.jit(checkify.checkify(step, errors=checkify.user_checks))
        run = _throwing(jitted)
    else:
        jitted = run = jax.jit(step)

    def checked(params, opt_state, batch, ref_params=None, **schedule):
        # a Python number or a concrete array is checked here, before the trace turns it
        # into a tracer whose value no check can read
        found.config({**options, **schedule}, fn="make_train_step: step")
        _check_batch("make_train_step: step", batch, ref_params is not None)
        return run(params, opt_state, batch, ref_params, **schedule)

    checked.jitted = jitted
    checked._cache_size = jitted._cache_size
    return checked


def make_nnx_train_step(
    forward: Callable[[Any, Any, Any], Any],
    *,
    group_forward: Callable[[Any, PackedGroups], Any] | None = None,
    loss: str = "mpo",
    pairs: str = "all",
    checks: bool = False,
    **options: Any,
) -> Callable:
    """A train step for a Flax NNX model and ``nnx.Optimizer``: no split or merge to write.

    Args:
        forward: ``(model, input_ids, attention_mask) -> logits`` (B·n, T, V), or ``->
            (hidden, weight)`` for the fused output layer (see the module docstring; an
            ``nnx.Linear`` head: ``model.out.kernel[...].T``).
        group_forward: ``(model, packed) -> logits`` or ``-> (hidden, weight)``: the
            shared prompt for batches holding ``packed`` (see the module docstring;
            [`llama_group_forward`][prefopt.integrations.flax_llama.llama_group_forward]).
            Default ``None``.
        loss: A registered loss name. Default ``"mpo"``.
        pairs: ``"all"`` (default) or ``"best_worst"``, for pairwise losses.
        checks: The value checks inside the compiled step, as for
            [`make_train_step`][prefopt.integrations.jax.make_train_step]. Default
            ``False``.
        **options: Options of the loss (checked here, with the loss's own messages).

    Returns:
        ``step(model, optimizer, batch, ref_model=None, **schedule) -> (loss, metrics)``,
        compiled with ``nnx.jit``; it updates ``model`` and ``optimizer`` in place (an
        ``nnx.Optimizer(model, tx, wrt=nnx.Param)``). ``ref_model``: the reference, a
        model of the same kind (``nnx.clone(model)`` before training), whose log-probs the
        step computes with no gradient; ``None``: ``batch["ref_logps"]`` or
        reference-free. ``schedule`` and the checks of each call are those of
        [`make_train_step`][prefopt.integrations.jax.make_train_step]; ``step.jitted`` is
        the ``nnx.jit`` function, ``step._cache_size()`` its number of compiles.

    Examples:
        The "Flax NNX" part of the JAX and optax docs page runs one step on a small NNX
        model; ``tests/test_real_model.py`` trains SmolLM2 with it
        (``prefopt.integrations.flax_llama``). Needs Flax 0.12 or later (the ``flax``
        extra).
    """
    from flax import nnx

    found = spec(loss, "make_nnx_train_step")
    found.config(options, fn="make_nnx_train_step")

    def update(model, optimizer, batch, ref_model, schedule):
        def objective(model):
            return loss_and_metrics(
                model, batch, apply_fn=forward, group_fn=group_forward, ref_params=ref_model,
                loss=loss, pairs=pairs, checks=checks, **{**options, **schedule},
            )  # fmt: skip

        (value, metrics), grads = nnx.value_and_grad(objective, has_aux=True)(model)
        optimizer.update(model, grads)
        return value, metrics

    step = run = nnx.jit(update)
    if checks:
        from jax.experimental import checkify

        run = _throwing(nnx.checkify(step, errors=checkify.user_checks))

    def checked(model, optimizer, batch, ref_model=None, **schedule):
        found.config({**options, **schedule}, fn="make_nnx_train_step: step")
        _check_batch("make_nnx_train_step: step", batch, ref_model is not None)
        return run(model, optimizer, batch, ref_model, schedule)

    checked.jitted = step
    checked._cache_size = step.jitted_fn._cache_size
    return checked


def _throwing(checked: Callable) -> Callable:
    """Call a checkified function; raise its first failed check, else return its result."""

    def run(*args, **kwargs):
        error, out = checked(*args, **kwargs)
        error.throw()
        return out

    return run
