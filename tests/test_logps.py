"""Token and sequence log-probabilities, and the fused chunked paths of torch and JAX."""

import math

import numpy as np
import pytest

import prefopt
from tests import reference
from tests.helpers import GRAD_TOL, assert_close

IGNORE = -100


def naive_token_logps(logits, labels):
    """Plain loops in float64: log_softmax of every row, then the label's entry."""
    logits = np.asarray(logits, dtype=np.float64)
    out = np.zeros(labels.shape)
    for idx in np.ndindex(labels.shape):
        if labels[idx] == IGNORE:
            continue
        row = [float(v) for v in logits[idx]]
        top = max(row)
        norm = top + math.log(sum(math.exp(v - top) for v in row))
        out[idx] = row[int(labels[idx])] - norm
    return out


def batch(rng, shape=(3, 5), vocab=37):
    logits = rng.normal(0.0, 3.0, size=(*shape, vocab))
    labels = rng.integers(0, vocab, size=shape)
    labels[0, :] = IGNORE  # a row with nothing to count
    labels[1, :-1] = IGNORE  # a one-token completion
    labels[2, 0] = IGNORE  # a prompt token
    return logits, labels


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("chunk_size", [None, 1, 4])  # 4 does not divide 15 rows
def test_token_logps(backend, rng, dtype, chunk_size):
    logits, labels = batch(rng)
    out = prefopt.token_logps(
        backend.asarray(logits, dtype), backend.asarray(labels, "int64"), chunk_size=chunk_size
    )
    assert tuple(out.shape) == labels.shape and out.dtype == backend.dtype(dtype)
    rounded = backend.to_numpy(backend.asarray(logits, dtype))
    expected = naive_token_logps(rounded, labels)
    assert_close(backend.to_numpy(out), expected, dtype, scale=10.0)
    assert np.all(backend.to_numpy(out)[labels == IGNORE] == 0.0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_logits_are_computed_in_float32(diff_backend, rng, dtype):
    backend = diff_backend
    logits, labels = batch(rng)
    x = backend.asarray(logits, dtype)
    out = prefopt.token_logps(x, backend.asarray(labels, "int64"), chunk_size=4)
    assert out.dtype == backend.dtype("float32")
    # exact float32 arithmetic on the (exactly converted) half-precision values
    assert_close(backend.to_numpy(out), naive_token_logps(backend.to_numpy(x), labels), "float32")


def test_token_logps_gradient(diff_backend, rng):
    backend = diff_backend
    logits, labels = batch(rng, shape=(3, 3), vocab=7)
    lab = backend.asarray(labels, "int64")
    _, (grad,) = backend.value_and_grad(
        lambda x: prefopt.token_logps(x, lab, chunk_size=2), [backend.asarray(logits)], [0]
    )
    (numeric,) = reference.numeric_grad(
        lambda x: naive_token_logps(x, labels).ravel(), [logits], [0]
    )
    assert_close(backend.to_numpy(grad), numeric, tol=GRAD_TOL)
    assert np.all(backend.to_numpy(grad)[labels == IGNORE] == 0.0)


def test_shift_and_sequence_logps(backend, rng):
    labels = np.array([[5, IGNORE, 2, 3], [IGNORE, IGNORE, IGNORE, 1]])
    shifted = backend.to_numpy(prefopt.shift_labels(backend.asarray(labels, "int64")))
    np.testing.assert_array_equal(shifted, [[IGNORE, 2, 3, IGNORE], [IGNORE, IGNORE, 1, IGNORE]])
    per_token = np.array([[np.nan, -1.0, -2.0, np.inf], [-4.0, -8.0, -0.5, np.nan]])
    mask = shifted != IGNORE
    total, lengths = prefopt.sequence_logps(
        backend.asarray(per_token), backend.asarray(mask, "bool")
    )
    np.testing.assert_array_equal(backend.to_numpy(total), [-3.0, -0.5])
    np.testing.assert_array_equal(backend.to_numpy(lengths), [2.0, 1.0])
    mean, _ = prefopt.sequence_logps(
        backend.asarray(per_token), backend.asarray(mask, "bool"), average=True
    )
    np.testing.assert_array_equal(backend.to_numpy(mean), [-1.5, -0.5])
    nothing, n = prefopt.sequence_logps(
        backend.asarray(per_token), backend.asarray(np.zeros_like(mask), "bool"), average=True
    )
    assert np.all(backend.to_numpy(nothing) == 0.0) and np.all(backend.to_numpy(n) == 0.0)


def test_causal_lm_logps_on_grouped_layout(backend, rng):
    B, n, T, V = 2, 3, 6, 11
    logits = rng.normal(size=(B, n, T, V))
    labels = rng.integers(0, V, size=(B, n, T))
    labels[..., :2] = IGNORE  # prompt
    labels[1, 2, 4:] = IGNORE  # padding of a shorter response
    logps, lengths = prefopt.causal_lm_logps(
        backend.asarray(logits), backend.asarray(labels, "int64")
    )
    expected, counts = np.zeros((B, n)), np.zeros((B, n))
    for b, i in np.ndindex(B, n):
        for t in range(T - 1):  # logits at t predict token t + 1
            if labels[b, i, t + 1] != IGNORE:
                row = logits[b, i, t]
                expected[b, i] += row[labels[b, i, t + 1]] - math.log(np.exp(row).sum())
                counts[b, i] += 1
    assert_close(backend.to_numpy(logps), expected)
    np.testing.assert_array_equal(backend.to_numpy(lengths), counts)


def test_label_errors():
    logits = np.zeros((2, 3, 5))
    with pytest.raises(
        ValueError, match=r"labels must lie in \[0, 5\) or equal ignore_index=-100; got 2"
    ):
        prefopt.token_logps(logits, np.array([[0, 5, 1], [-1, 2, IGNORE]]))
    with pytest.raises(TypeError, match="labels must be an integer array; got dtype float64"):
        prefopt.token_logps(logits, np.zeros((2, 3)))
    with pytest.raises(
        ValueError, match=r"shape of logits without the vocabulary axis, \(2, 3\); got \(2, 4\)"
    ):
        prefopt.token_logps(logits, np.zeros((2, 4), dtype=int))
    with pytest.raises(
        ValueError, match=r"mask must have the shape of token_logps, \(2, 3\); got \(2, 2\)"
    ):
        prefopt.sequence_logps(np.zeros((2, 3)), np.ones((2, 2), dtype=bool))


# --- the fused paths --------------------------------------------------------------------


def fused_inputs(rng, lead=(2, 3, 5), hidden=8, vocab=37, bias=True):
    h = rng.normal(size=(*lead, hidden))
    w = rng.normal(size=(vocab, hidden)) / math.sqrt(hidden)
    b = rng.normal(size=vocab) if bias else None
    labels = rng.integers(0, vocab, size=lead)
    labels[0, 0, :] = IGNORE
    labels[1, 2, :-1] = IGNORE  # a one-token completion
    return h, w, b, labels


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 7, 1024])  # 7 does not divide 30 rows
def test_torch_fused_matches_naive_values_and_gradients(rng, chunk_size, bias):
    torch = pytest.importorskip("torch")
    from prefopt.backends.torch import fused_linear_logps

    h, w, b, labels = fused_inputs(rng, bias=bias)
    upstream = torch.asarray(rng.normal(size=labels.shape))
    results = []
    for fused in (True, False):
        args = [torch.asarray(a, requires_grad=True) if a is not None else None for a in (h, w, b)]
        lab = torch.asarray(labels)
        if fused:
            out = fused_linear_logps(args[0], args[1], lab, bias=args[2], chunk_size=chunk_size)
        else:
            logits = args[0] @ args[1].T + (args[2] if bias else 0.0)
            out = prefopt.token_logps(logits, lab)
        (out * upstream).sum().backward()
        results.append([out.detach()] + [a.grad for a in args if a is not None])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.all(results[0][0][torch.asarray(labels) == IGNORE] == 0.0)


def test_torch_fused_never_saves_the_logits(rng):
    torch = pytest.importorskip("torch")
    from prefopt.backends.torch import fused_linear_logps

    h, w, _, labels = fused_inputs(rng, lead=(2, 4, 32), hidden=8, vocab=500)
    sizes = []
    hidden = torch.asarray(h, requires_grad=True)
    weight = torch.asarray(w, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: sizes.append(t.numel()) or t, lambda t: t
    ):
        fused_linear_logps(hidden, weight, torch.asarray(labels), chunk_size=16).sum().backward()
    assert max(sizes) < 256 * 500 / 4  # nothing near the (256, 500) logits is kept
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: sizes.append(t.numel()) or t, lambda t: t
    ):
        prefopt.token_logps(hidden @ weight.T, torch.asarray(labels)).sum().backward()
    assert max(sizes) >= 256 * 500  # the naive path keeps them


def test_torch_fused_bfloat16(rng):
    torch = pytest.importorskip("torch")
    from prefopt.backends.torch import fused_linear_logps

    h, w, _, labels = fused_inputs(rng, bias=False)
    hb, wb = (torch.asarray(a).to(torch.bfloat16).requires_grad_(True) for a in (h, w))
    out = fused_linear_logps(hb, wb, torch.asarray(labels), chunk_size=7)
    assert out.dtype == torch.float32
    naive = prefopt.token_logps(hb.detach() @ wb.detach().T, torch.asarray(labels))
    torch.testing.assert_close(out.detach(), naive, rtol=0, atol=1e-5)
    out.sum().backward()
    assert hb.grad.dtype == torch.bfloat16 and torch.all(torch.isfinite(wb.grad.float()))


def test_torch_fused_errors():
    torch = pytest.importorskip("torch")
    from prefopt.backends.torch import fused_linear_logps

    h, w = torch.zeros(2, 4, 8), torch.zeros(10, 8)
    with pytest.raises(
        ValueError,
        match=r"weight must have shape \(V, H\) with H = hidden.shape\[-1\] = 8; "
        r"got weight \(10, 7\)",
    ):
        fused_linear_logps(h, torch.zeros(10, 7), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        fused_linear_logps(h, w, torch.full((2, 4), 10))
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\); got \(9,\)"):
        fused_linear_logps(h, w, torch.zeros(2, 4, dtype=torch.long), bias=torch.zeros(9))


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_jax_fused_matches_naive_values_and_gradients(rng, chunk_size):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from prefopt.backends.jax import fused_linear_logps

    h, w, b, labels = (jnp.asarray(a) for a in fused_inputs(rng))
    upstream = jnp.asarray(rng.normal(size=labels.shape))

    def fused(h, w, b):
        return (fused_linear_logps(h, w, labels, bias=b, chunk_size=chunk_size) * upstream).sum()

    def naive(h, w, b):
        return (prefopt.token_logps(h @ w.T + b, labels) * upstream).sum()

    got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(h, w, b)
    expected = jax.value_and_grad(naive, argnums=(0, 1, 2))(h, w, b)
    for g, e in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-12, atol=1e-12)
    out = fused_linear_logps(h, w, labels, bias=b, chunk_size=chunk_size)
    assert np.all(np.asarray(out)[np.asarray(labels) == IGNORE] == 0.0)


def test_fused_logps_feed_a_group_loss(rng):
    torch = pytest.importorskip("torch")
    from prefopt.backends.torch import fused_linear_logps

    h, w, _, labels = fused_inputs(rng, lead=(2, 4, 6), bias=False)
    labels[..., :2] = IGNORE
    hidden = torch.asarray(h, requires_grad=True)
    per_token = fused_linear_logps(hidden, torch.asarray(w), torch.asarray(labels), chunk_size=5)
    logps, _ = prefopt.sequence_logps(per_token, torch.asarray(labels != IGNORE))
    loss = prefopt.mpo_loss(logps, None, torch.asarray(rng.normal(size=(2, 4)))).mean()
    loss.backward()
    assert logps.shape == (2, 4) and torch.all(torch.isfinite(hidden.grad))
