"""The group layout (prefopt.layout) on every backend, against a packing written as a loop."""

import numpy as np
import pytest

from prefopt.layout import group_attention_mask, group_layout


def packed_by_hand(p, r):
    """Per group: (response, column, position, segment) of each packed token, and for each
    response token the packed position that predicts it."""
    groups, predictors = [], []
    for b in range(len(p)):
        tokens = [(0, j, j, 0) for j in range(p[b])]
        pred = []
        for i, length in enumerate(r[b]):
            start = len(tokens)
            tokens += [(i, p[b] + k, p[b] + k, i + 1) for k in range(length)]
            pred.append([p[b] - 1 if k == 0 else start + k - 1 for k in range(length)])
        groups.append(tokens)
        predictors.append(pred)
    return groups, predictors


@pytest.mark.parametrize("seed", range(3))
def test_layout_matches_a_packing_loop(backend, seed):
    rng = np.random.default_rng(seed)
    p = rng.integers(1, 6, 4)
    r = rng.integers(0, 5, (4, 3))
    r[0, 1] = 0  # an empty response between two others
    lay = group_layout(backend.asarray(p, "int64"), backend.asarray(r, "int64"))
    got = {k: backend.to_numpy(v) for k, v in lay._asdict().items()}
    groups, predictors = packed_by_hand(p.tolist(), r.tolist())
    L = max(len(g) for g in groups)
    assert got["segments"].shape == (4, L) and got["label_positions"].shape == (4, 3, r.max())
    for b, tokens in enumerate(groups):
        pad = [(0, 0, 0, -1)] * (L - len(tokens))
        for name, column in zip(("response", "column", "positions", "segments"), range(4)):
            assert got[name][b].tolist() == [t[column] for t in tokens + pad], (name, b)
        for i, pred in enumerate(predictors[b]):
            k = len(pred)
            assert got["label_positions"][b, i, :k].tolist() == pred
            assert got["label_mask"][b, i].tolist() == [True] * k + [False] * (r.max() - k)


def test_attention_mask_is_block_causal(backend):
    segments = backend.asarray(np.array([[0, 0, 1, 1, 2, -1]]), "int64")
    mask = backend.to_numpy(group_attention_mask(segments))[0].astype(int)
    assert mask.tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # response 2 sees the prompt, not response 1
        [0, 0, 0, 0, 0, 1],  # padding: itself only
    ]


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="prompt_lengths must be \\(B,\\) and response_lengths"):
        group_layout(np.array([2, 3]), np.array([1, 2]))
    with pytest.raises(ValueError, match="every prompt needs >= 1 token"):
        group_layout(np.array([0]), np.array([[1, 2]]))


def test_layout_stays_on_the_inputs_device():
    # array_api_strict refuses to mix devices, as torch does with cuda and cpu: a grid made
    # on the default device would raise here (it did on a GPU before the fix).
    xp = pytest.importorskip("array_api_strict")
    other = xp.Device("device1")
    p = xp.asarray([2, 3], dtype=xp.int64, device=other)
    r = xp.asarray([[2, 1], [0, 4]], dtype=xp.int64, device=other)
    lay = group_layout(p, r)
    assert all(v.device == other for v in lay)
    assert group_attention_mask(lay.segments).device == other


@pytest.mark.parametrize("shared", [False, True])
def test_packed_groups_say_their_form_and_move_whole(shared):
    torch = pytest.importorskip("torch")
    from prefopt.layout import pack_groups, response_attention

    p, r = np.array([2, 3]), np.array([[2, 1], [1, 3]])
    att = response_attention(group_layout(p, r), p, r, shared_keys=shared)
    assert (att.prompt, att.shared_keys) == (3, shared)  # stated, not read from a rank
    ids = np.arange(2 * 2 * 6).reshape(2, 2, 6) % 7 + 1
    ids[1, 1, :3] = ids[1, 0, :3]  # each group's responses follow the same prompt
    ids[0, 1, :2] = ids[0, 0, :2]
    labels = np.where(np.arange(6) >= np.array([2, 3])[:, None, None], ids, -100)
    attention = (np.arange(6) < (np.array([2, 3])[:, None] + r)[..., None]).astype(np.int64)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": attention}
    on_host = pack_groups(batch)
    moved = on_host.map(torch.from_numpy).to(torch.float64)  # every array, in one call
    tensors = pack_groups({k: torch.from_numpy(v) for k, v in batch.items()})
    for a, b, c in zip(_arrays(on_host), _arrays(moved), _arrays(tensors)):
        assert b.dtype == torch.float64 and np.array_equal(a, b.numpy())
        assert np.array_equal(a, c.numpy())
    assert (moved.attention.prompt, tensors.attention.prompt) == (3, 3)


def _arrays(packed):
    att = packed.attention
    grids = (att.queries, att.keys, att.allowed, att.output)
    return (packed.ids, packed.positions, packed.rows, packed.cols, packed.owner,
            packed.targets, *grids)  # fmt: skip
