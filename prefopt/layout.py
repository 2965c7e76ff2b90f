r"""The group layout: a prompt and its n responses packed into one sequence.

A group of n responses to one prompt is usually run as n sequences ``prompt + response``,
so the prompt is computed n times. Packed, the group is **one** sequence

$$
[\,x_1 \dots x_p \;|\; y^{(1)}_1 \dots y^{(1)}_{r_1} \;|\; \dots \;|\;
   y^{(n)}_1 \dots y^{(n)}_{r_n}\,]
$$

of $p + \sum_i r_i$ tokens, where every response token attends to the prompt and to the
earlier tokens of its own response only (a block-causal mask), and its position restarts
after the prompt: token $k$ of any response has position $p + k$, as in its own sequence.
Each response's log-prob is then exactly the one of its own sequence: the first token is
predicted by the prompt's last position, token $k > 0$ by the position before it.

Written once against the Array API: the PyTorch group forward and the JAX one
(``prefopt.integrations.jax.group_attention``) use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, NamedTuple

from array_api_compat import device

from prefopt._ops import get_namespace

Array = Any

__all__ = [
    "GroupLayout",
    "PackedGroups",
    "ResponseAttention",
    "group_attention_mask",
    "group_layout",
    "pack_groups",
    "response_attention",
]


class GroupLayout(NamedTuple):
    """Where each packed token comes from and what it may attend to (see ``group_layout``).

    Attributes:
        response: (B, L) int: which response of the group a packed token is read from
            (0 for prompt tokens and padding: the prompt is read from response 0's row).
        column: (B, L) int: its position in that response's unshared row
            ``prompt + response`` (0 for padding).
        positions: (B, L) int: its position id (prompt $j$: $j$; response token $k$:
            $p + k$; padding 0).
        segments: (B, L) int: 0 for the prompt, $i + 1$ for response $i$, -1 for padding.
        label_positions: (B, n, R) int: the packed position whose output predicts token
            $k$ of response $i$ ($R$ the longest response).
        label_mask: (B, n, R) bool: which of those are real tokens ($k < r_i$).
    """

    response: Array
    column: Array
    positions: Array
    segments: Array
    label_positions: Array
    label_mask: Array


def group_layout(
    prompt_lengths: Array,
    response_lengths: Array,
    *,
    length: int | None = None,
    max_response: int | None = None,
    xp: ModuleType | None = None,
) -> GroupLayout:
    r"""Pack each group's prompt and responses into one sequence (see the module docstring).

    Response $i$ of group $b$ starts at $s_{bi} = p_b + \sum_{i' < i} r_{bi'}$; a packed
    sequence is padded to $L = \max_b (p_b + \sum_i r_{bi})$. Gather the packed tokens from
    an unshared (B, n, T) batch with ``ids[b, response[b, j], column[b, j]]``.

    Args:
        prompt_lengths: (B,) int, $p_b \ge 1$ tokens of each prompt.
        response_lengths: (B, n) int, $r_{bi} \ge 0$ tokens of each response (0 for a
            padding slot of a ragged group).
        length: $L$, when it must be static (under ``jax.jit``). Default ``None``: the
            longest packed group (reads the lengths' values).
        max_response: $R$, likewise. Default ``None``: the longest response.
        xp: The array namespace, if known.

    Returns:
        A [`GroupLayout`][prefopt.layout.GroupLayout].

    Raises:
        ValueError: For lengths of the wrong shape, a prompt shorter than 1 token, a
            negative response length, or a ``length`` shorter than a packed group.

    References:
        Wang et al., "Accelerating Direct Preference Optimization with Prefix Sharing",
        arXiv:2410.20305 (the same packing for pairs).

    Examples:
        >>> import numpy as np
        >>> from prefopt.layout import group_layout
        >>> lay = group_layout(np.array([2]), np.array([[2, 1]]))
        >>> lay.segments.tolist(), lay.positions.tolist()
        ([[0, 0, 1, 1, 2]], [[0, 1, 2, 3, 2]])
        >>> lay.label_positions.tolist()  # a response's first token: the prompt's end
        [[[1, 2], [1, 4]]]
        >>> lay.label_mask.tolist()  # response 1 has one token
        [[[True, True], [True, False]]]
    """
    xp = get_namespace(prompt_lengths, response_lengths, xp=xp)
    p, r = prompt_lengths, response_lengths
    if len(p.shape) != 1 or len(r.shape) != 2 or r.shape[0] != p.shape[0]:
        raise ValueError(
            "group_layout: prompt_lengths must be (B,) and response_lengths (B, n); got "
            f"{tuple(p.shape)} and {tuple(r.shape)}"
        )
    p, r = xp.astype(p, xp.int64), xp.astype(r, xp.int64)
    total = p + xp.sum(r, axis=1)
    if length is None or max_response is None:  # the values are readable: check them
        if bool(xp.any(p < 1)) or bool(xp.any(r < 0)):
            raise ValueError(
                "group_layout: every prompt needs >= 1 token and no response length may be negative"
            )
        length = int(xp.max(total)) if length is None else length
        max_response = int(xp.max(r)) if max_response is None else max_response
    starts = p[:, None] + xp.cumulative_sum(r, axis=1) - r  # (B, n)
    on = device(p)  # the index grids live where the inputs do (a GPU, say)
    j = xp.arange(length, dtype=xp.int64, device=on)[None, :]  # (1, L)
    in_prompt = j < p[:, None]
    in_group = j < total[:, None]
    # response of token j: the last one starting at or before j (empty ones share a start)
    started = xp.sum(xp.astype(starts[:, None, :] <= j[:, :, None], xp.int64), axis=-1)
    response = xp.where(in_prompt | ~in_group, 0, started - 1)
    start = xp.take_along_axis(starts, response, axis=1)
    offset = j - start  # token index within its response
    column = xp.where(in_prompt, j, xp.where(in_group, p[:, None] + offset, 0))
    positions = column
    segments = xp.where(in_prompt, 0, xp.where(in_group, response + 1, -1))
    k = xp.arange(max(max_response, 1), dtype=xp.int64, device=on)[None, None, :]  # (1, 1, R)
    label_positions = xp.where(k == 0, p[:, None, None] - 1, starts[:, :, None] + k - 1)
    label_mask = k < r[:, :, None]
    return GroupLayout(
        response=response,
        column=column,
        positions=positions,
        segments=segments,
        label_positions=label_positions,
        label_mask=label_mask,
    )


def group_attention_mask(segments: Array, *, xp: ModuleType | None = None) -> Array:
    r"""The block-causal mask of packed groups: (B, L, L) bool, ``True`` where query attends.

    A token at position $q$ attends to key $k \le q$ when the key is a prompt token or in
    the query's own response. A padding position attends to itself only, so that no row
    of the attention is empty.

    Args:
        segments: (B, L) from [`group_layout`][prefopt.layout.group_layout].
        xp: The array namespace, if known.

    Returns:
        (B, L, L) bool.

    Examples:
        >>> import numpy as np
        >>> from prefopt.layout import group_attention_mask
        >>> group_attention_mask(np.array([[0, 1, 2]])).astype(int).tolist()
        [[[1, 0, 0], [1, 1, 0], [1, 0, 1]]]
    """
    xp = get_namespace(segments, xp=xp)
    L = segments.shape[-1]
    i = xp.arange(L, device=device(segments))
    causal = i[:, None] >= i[None, :]
    q, k = segments[:, :, None], segments[:, None, :]
    allowed = causal[None, ...] & (q >= 0) & ((k == 0) | (k == q))
    return allowed | (i[:, None] == i[None, :])[None, ...]


@dataclasses.dataclass(frozen=True)
class ResponseAttention:
    r"""Index grids of the shared group attention (see ``response_attention``).

    Attributes:
        prompt: $P$, the longest prompt.
        shared_keys: Which form: ``False``, each response over its own $P + R$ keys;
            ``True``, every response over the $L$ packed keys.
        queries: (B, n, R) int: the packed position of token $j$ of response $i$ (0 past
            the response's end); with shared keys (B, n R).
        keys: (B, n, K) int, $K = P + R$: the packed positions response $i$ attends to,
            its group's prompt then its own tokens (0 where there is none); with shared
            keys (B, P), the prompt's positions $0 \dots P-1$.
        allowed: (B, 1, R, K) bool: whether query $j$ of a response attends to key $k$
            (the same for every response of a group); with shared keys (B, 1, n R, L).
        output: (B, L) int: where packed position $t$'s attention output is read from, in
            the prompt's outputs ($P$ of them) followed by the responses' ($n R$).
    """

    prompt: int
    shared_keys: bool
    queries: Array
    keys: Array
    allowed: Array
    output: Array

    def map(self, fn: Callable[[Array], Array]) -> ResponseAttention:
        """The same grids with ``fn`` applied to each array (a conversion, a move)."""
        return ResponseAttention(
            self.prompt, self.shared_keys, fn(self.queries), fn(self.keys), fn(self.allowed),
            fn(self.output),
        )  # fmt: skip


# Shared keys when the packed length is at most this many times a response's own sequence
# P + R: the attention then computes at most this many times the scores it needs. At the
# step benchmark's size (L / (P + R) = 2.4) shared keys saved 33 of the 236 MiB that the
# policy's forward keeps for backward, at the same step time (docs: Producing log-probs).
SHARED_KEYS_MAX_WASTE = 3.0


def response_attention(
    layout: GroupLayout,
    prompt_lengths: Array,
    response_lengths: Array,
    *,
    shared_keys: bool | None = None,
    prompt: int | None = None,
    xp: ModuleType | None = None,
) -> ResponseAttention:
    r"""The attention of packed groups as a prompt part and a response part, with no (L, L) mask.

    The prompt of group $b$ attends causally to itself: in the packed sequence its $p_b$
    tokens come first, so a causal attention over the first $P = \max_b p_b$ positions
    gives them exactly (positions past $p_b$ are discarded). Response $i$ attends to its
    prompt and causally to its own earlier tokens, in one of two exact forms:

    - **own keys**: its $r_i$ queries against the $K = P + R$ keys ``keys[b, i]`` (the
      prompt's $p_b$, then its own $r_i$), a bottom-right aligned causal mask: the
      attention computes only the scores it needs, and each layer gathers the prompt's
      keys and values once per response;
    - **shared keys**: all $n R$ response queries against the $L$ packed keys, the mask
      allowing the prompt and the query's own earlier tokens: nothing is gathered, and
      $L / (P + R)$ times the needed scores are computed.

    ``shared_keys=None`` takes shared keys when $L \le 3 (P + R)$
    (``SHARED_KEYS_MAX_WASTE``): long prompts, short responses. No tensor has two
    dimensions of size $L$ or more: the masks are (R, P + R) and (n R, L), $n R < L$.

    Args:
        layout: The [`GroupLayout`][prefopt.layout.GroupLayout] of the batch.
        prompt_lengths: (B,) int, as given to ``group_layout``.
        response_lengths: (B, n) int, likewise.
        shared_keys: The form (see above). Default ``None``: by the rule above.
        prompt: $P$, at least the longest prompt, when it must be static (under
            ``jax.jit``, or padded to a bucket). Default ``None``: the longest prompt.
        xp: The array namespace, if known.

    Returns:
        A [`ResponseAttention`][prefopt.layout.ResponseAttention].

    Examples:
        >>> import numpy as np
        >>> from prefopt.layout import group_layout, response_attention
        >>> p, r = np.array([2]), np.array([[2, 1]])
        >>> att = response_attention(group_layout(p, r), p, r, shared_keys=False)
        >>> att.keys.tolist()  # response 0: the prompt, then packed 2, 3; response 1: 4
        [[[0, 1, 2, 3], [0, 1, 4, 0]]]
        >>> att.allowed[0, 0].astype(int).tolist()  # bottom-right causal, for each response
        [[1, 1, 1, 0], [1, 1, 1, 1]]
        >>> att.output.tolist()  # prompt outputs 0, 1; then responses' rows of R = 2
        [[0, 1, 2, 3, 4]]
        >>> shared = response_attention(group_layout(p, r), p, r, shared_keys=True)
        >>> shared.allowed[0, 0].astype(int).tolist()  # queries 2, 3, 4 (and a pad) over all 5
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 1], [1, 1, 0, 0, 0]]
    """
    xp = get_namespace(prompt_lengths, response_lengths, xp=xp)
    p = xp.astype(prompt_lengths, xp.int64)[:, None, None]  # (B, 1, 1)
    r = xp.astype(response_lengths, xp.int64)
    B, n = r.shape
    R = layout.label_mask.shape[-1]
    L = layout.segments.shape[1]
    P = int(xp.max(p)) if prompt is None else prompt
    on = device(r)
    starts = (p[:, :, 0] + xp.cumulative_sum(r, axis=1) - r)[:, :, None]  # (B, n, 1)
    j = xp.arange(R, dtype=xp.int64, device=on)[None, None, :]
    queries = xp.where(j < r[:, :, None], starts + j, 0)  # (B, n, R)
    seg = layout.segments
    offset = layout.column - p[:, :, 0]  # a response token's index in its response
    t = xp.arange(L, dtype=xp.int64, device=on)[None, :]
    output = xp.where(seg == 0, t, xp.where(seg > 0, P + (seg - 1) * R + offset, 0))
    if shared_keys is None:
        shared_keys = L <= SHARED_KEYS_MAX_WASTE * (P + R)
    if shared_keys:
        i = xp.arange(n, dtype=xp.int64, device=on)[None, :, None, None]  # (1, n, 1, 1)
        key = t[:, None, None, :]  # (1, 1, 1, L)
        mine = (seg[:, None, None, :] == i + 1) & (key <= queries[..., None])
        allowed = (key < p[..., None]) | mine  # (B, n, R, L); padded queries see key 0
        return ResponseAttention(
            P,
            True,
            xp.reshape(queries, (B, n * R)),
            xp.zeros((B, P), dtype=xp.int64, device=on) + t[:, :P],  # an array, not a view
            xp.reshape(allowed, (B, 1, n * R, L)),
            output,
        )
    k = xp.arange(P + R, dtype=xp.int64, device=on)[None, None, :]
    own = k - p  # index of a key within the response, for k >= p
    keys = xp.where(k < p, k, xp.where(own < r[:, :, None], starts + own, 0))
    allowed = (k[:, :, None, :] < p[..., None]) | (own[:, :, None, :] <= j[:, :, :, None])
    return ResponseAttention(P, False, queries, keys, allowed, output)


@dataclasses.dataclass(frozen=True)
class PackedGroups:
    """A collated batch's groups packed, each prompt once then its responses.

    Built once per batch by [`pack_groups`][prefopt.layout.pack_groups] (the collator
    calls it, on the host) and passed whole to the forward, which gives ``attention`` to
    every attention layer.

    Attributes:
        ids: (B, L) int: the packed sequences (see
            [`group_layout`][prefopt.layout.group_layout]).
        positions: (B, L) int: their position ids.
        rows: (N,) int: for each counted response token, the packed row whose output
            predicts it.
        cols: (N,) int: the packed column of that output.
        owner: (N,) int: its response, ``b * n + i``.
        targets: (N,) int: its token id.
        attention: The [`ResponseAttention`][prefopt.layout.ResponseAttention] grids.
    """

    ids: Array
    positions: Array
    rows: Array
    cols: Array
    owner: Array
    targets: Array
    attention: ResponseAttention

    def map(self, fn: Callable[[Array], Array]) -> PackedGroups:
        """The same groups with ``fn`` applied to each array (``torch.from_numpy``...)."""
        return PackedGroups(
            fn(self.ids), fn(self.positions), fn(self.rows), fn(self.cols), fn(self.owner),
            fn(self.targets), self.attention.map(fn),
        )  # fmt: skip

    def to(self, *args: Any, **kwargs: Any) -> PackedGroups:
        """The same groups with each tensor's ``.to(*args, **kwargs)``, as a batch moves."""
        return self.map(lambda a: a.to(*args, **kwargs))


def pack_groups(
    batch: Mapping[str, Any], *, ignore_index: int = -100, pad_to_multiple_of: int | None = None
) -> PackedGroups | None:
    """The group layout of a collated batch: each prompt once, then its responses.

    Computed once per batch, at collation (on the host, where reading the lengths costs
    nothing), and used by the policy's and the reference's forward alike. Written against
    the Array API: it takes NumPy arrays from [`collate_ids`][prefopt.integrations.data.collate_ids]
    or the tensors of a collated batch.

    Args:
        batch: ``input_ids``, ``labels`` and ``attention_mask``, each (B, n, T).
        ignore_index: The label of prompt and padding tokens. Default -100.
        pad_to_multiple_of: Round the packed length $L$, the longest prompt $P$ and
            response $R$, and the number $N$ of counted tokens up to multiples of this, so
            that a compiled step (``jax.jit``) meets a bounded number of shapes. A padded
            token's ``owner`` is $B n$, one past the last response: a segment sum over
            $B n$ segments drops it. Default ``None``: the batch's own sizes.

    Returns:
        ``None`` when some group cannot share its prompt (its responses were cut to
        different prompt tokens, an empty prompt, a response with no token, a padded
        prompt); else the [`PackedGroups`][prefopt.layout.PackedGroups], in the batch's
        namespace.
    """
    ids, labels, attention = batch["input_ids"], batch["labels"], batch["attention_mask"]
    xp = get_namespace(ids)
    B, n, T = ids.shape
    is_label = labels != ignore_index
    real = xp.any(is_label, axis=-1)  # (B, n)
    starts = xp.argmax(xp.astype(is_label, xp.int8), axis=-1)  # prompt length of each row
    # a response runs to the end of its attended tokens: uncounted tokens (a tool's result)
    # inside it are context for the tokens after them
    ends = xp.sum(xp.astype(attention == 1, xp.int64), axis=-1)
    prompt = starts[:, 0]  # response 0 of a group is always real (the collator fills first)
    columns = xp.arange(T)
    in_prompt = columns < prompt[:, None, None]
    in_sequence = columns < ends[..., None]
    same = (ids == ids[:, :1]) | ~in_prompt
    if not (
        bool(xp.all(real[:, 0]))
        and bool(xp.all(prompt >= 1))
        and bool(xp.all((starts == prompt[:, None]) | ~real))
        and bool(xp.all(same | ~real[..., None]))
        and bool(xp.all((attention == 1) | ~in_sequence | ~real[..., None]))
    ):
        return None
    lengths = xp.where(real, ends - starts, 0)
    m = pad_to_multiple_of or 1
    if not (isinstance(m, int) and m >= 1):
        raise ValueError(f"pack_groups: pad_to_multiple_of must be an int >= 1; got {m!r}")
    up = lambda size: -(-int(size) // m) * m  # noqa: E731
    lay = group_layout(
        prompt, lengths, length=up(xp.max(prompt + xp.sum(lengths, axis=1))),
        max_response=up(xp.max(lengths)), xp=xp,
    )  # fmt: skip
    R = lay.label_mask.shape[-1]
    # the response tokens whose log-prob counts (a tool's result is read, not counted):
    # only these go through the output layer
    column = xp.clip(prompt[:, None, None] + xp.arange(R), max=T - 1)
    counted = xp.take_along_axis(is_label, xp.broadcast_to(column, (B, n, R)), axis=-1)
    flat = xp.nonzero(xp.reshape(lay.label_mask & counted, (-1,)))[0]
    g, i, k = flat // (n * R), (flat // R) % n, flat % R
    owner = g * n + i
    targets = xp.take(xp.reshape(ids, (-1,)), owner * T + xp.take(prompt, g) + k)
    cols = xp.take(xp.reshape(lay.label_positions, (-1,)), flat)
    extra = up(flat.shape[0]) - flat.shape[0]  # padded tokens: row 0, column 0, owner B n
    if extra:

        def pad(a, value=0):
            return xp.concat([a, xp.full(extra, value, dtype=a.dtype, device=device(a))])

        g, cols, targets, owner = pad(g), pad(cols), pad(targets), pad(owner, B * n)
    rows_of_ids = xp.reshape(ids, (B, n * T))
    return PackedGroups(
        ids=xp.take_along_axis(rows_of_ids, lay.response * T + lay.column, axis=1),
        positions=lay.positions,
        rows=g,
        cols=cols,
        owner=owner,
        targets=targets,
        attention=response_attention(lay, prompt, lengths, prompt=up(xp.max(prompt)), xp=xp),
    )
