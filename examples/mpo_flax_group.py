"""MPO with the group forward in JAX: a tiny Flax transformer runs each prompt once per group.

Each group (a prompt and its n responses) is packed into one sequence by
``prefopt.layout.group_layout``: the prompt once, then every response, with a block-causal
attention mask (``group_attention_mask``) and positions that restart after the prompt. The
example checks that the packed forward gives the log-probs and gradients of the unshared
one (every response run after its own copy of the prompt), then trains with MPO, its beta
on a schedule inside the one jitted step (beta is traced, not a constant: no recompile).

    python examples/mpo_flax_group.py              # 100 steps
    python examples/mpo_flax_group.py --steps 2    # a smoke run
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import prefopt
from prefopt.integrations.data import collate_ids
from prefopt.layout import group_attention_mask, group_layout

V, D, HEADS, MAX_POS = 16, 32, 4, 64
TARGET = 7  # the reward: how often a response says token 7


class TinyLM(nnx.Module):
    """Token and position embeddings, one pre-norm attention block, an output layer."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.position = nnx.Embed(MAX_POS, D, rngs=rngs)
        self.norm1, self.norm2 = nnx.LayerNorm(D, rngs=rngs), nnx.LayerNorm(D, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=rngs)
        self.mlp = nnx.Linear(D, D, rngs=rngs)
        self.out = nnx.Linear(D, V, rngs=rngs)

    def __call__(self, ids, positions, mask):
        """Logits (B, L, V); ``mask`` (B, L, L) says which keys each query attends to."""
        x = self.embed(ids) + self.position(positions)
        x = x + self.attention(self.norm1(x), mask=mask[:, None])
        x = x + jax.nn.gelu(self.mlp(self.norm2(x)))
        return self.out(x)


def unshared_logps(model, batch):
    """Every response after its own copy of the prompt: (B, n) summed log-probs."""
    B, n, T = batch["input_ids"].shape
    ids = batch["input_ids"].reshape(B * n, T)
    attend = batch["attention_mask"].reshape(B * n, T).astype(bool)
    causal = jnp.tril(jnp.ones((T, T), bool))[None] & attend[:, None, :]
    causal = causal | jnp.eye(T, dtype=bool)[None]  # padding rows attend to themselves
    positions = jnp.broadcast_to(jnp.arange(T), (B * n, T))
    logits = model(ids, positions, causal)
    logps, _ = prefopt.causal_lm_logps(logits, batch["labels"].reshape(B * n, T))
    return logps.reshape(B, n)


def pack(batch):
    """The packed form of a collated batch, made on the host with NumPy (as data loading
    is): each group's prompt once, then its responses; the arrays the jitted step needs."""
    ids, labels = np.asarray(batch["input_ids"]), np.asarray(batch["labels"])
    is_label = labels != -100
    prompt = is_label[:, 0].argmax(-1)  # where response 0's tokens start: the prompt length
    # fixed sizes (prompts < 6 tokens, 4 responses < 6): one shape, so jit compiles once
    lay = group_layout(prompt, is_label.sum(-1), length=32, max_response=5)
    b = np.arange(ids.shape[0])[:, None, None]
    i = np.arange(ids.shape[1])[None, :, None]
    k = np.arange(lay.label_mask.shape[-1])
    column = np.minimum(prompt[:, None, None] + k, ids.shape[-1] - 1)
    return {
        "ids": ids[b[..., 0], lay.response, lay.column],
        "positions": lay.positions,
        "attend": group_attention_mask(lay.segments),
        "label_positions": lay.label_positions,
        "targets": np.where(lay.label_mask, ids[b, i, column], -100),  # token k of response i
    }


def shared_logps(model, packed):
    """Each group as one packed sequence, its prompt once: (B, n) summed log-probs."""
    logits = model(packed["ids"], packed["positions"], packed["attend"])
    b = jnp.arange(logits.shape[0])[:, None, None]
    picked = logits[b, packed["label_positions"]]  # (B, n, R, V)
    return prefopt.token_logps(picked, packed["targets"]).sum(-1)


def make_groups(rng, prompts=8, n=4):
    groups = []
    for _ in range(prompts):
        responses = [rng.integers(1, V, rng.integers(1, 6)).tolist() for _ in range(n)]
        rewards = [float(np.mean(np.equal(x, TARGET))) + 0.01 * i for i, x in enumerate(responses)]
        groups.append((rng.integers(1, V, rng.integers(2, 6)).tolist(), responses, rewards))
    batch = {k: jnp.asarray(v) for k, v in collate_ids(groups, pad_id=0).items()}
    return batch, {k: jnp.asarray(v) for k, v in pack(batch).items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    model = TinyLM(nnx.Rngs(0))
    reference = nnx.clone(model)

    # the group forward equals the unshared one: values and gradients
    batch, packed = make_groups(rng)

    @nnx.jit
    def value_and_grads(model, batch, packed):
        unshared = nnx.value_and_grad(lambda m: (unshared_logps(m, batch) * batch["mask"]).sum())
        shared = nnx.value_and_grad(lambda m: (shared_logps(m, packed) * batch["mask"]).sum())
        return unshared(model), shared(model)

    (v0, g0), (v1, g1) = value_and_grads(model, batch, packed)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(g1)), jax.tree.leaves(nnx.state(g0))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    print(f"shared == unshared: sum of log-probs {float(v1):.4f}, gradients equal")

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    beta = optax.linear_schedule(0.5, 0.2, transition_steps=args.steps)  # a plain function

    @nnx.jit
    def train_step(model, optimizer, reference, rewards, mask, packed, beta):
        ref = jax.lax.stop_gradient(shared_logps(reference, packed))

        def loss_fn(model):
            logps = shared_logps(model, packed)
            return prefopt.batch_loss("mpo", logps, ref, rewards, mask=mask, beta=beta)

        loss, grad = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grad)
        return loss

    @nnx.jit
    def probe(model):  # p(TARGET) after the prompt [1, 2, 3]
        logits = model(
            jnp.asarray([[1, 2, 3]]), jnp.arange(3)[None], jnp.tril(jnp.ones((1, 3, 3), bool))
        )
        return jax.nn.softmax(logits[0, -1])[TARGET]

    for i in range(args.steps):
        batch, packed = make_groups(rng)
        rewards, mask = batch["rewards"], batch["mask"]
        loss = train_step(model, optimizer, reference, rewards, mask, packed, beta(i))
        if i % 25 == 0 or i == args.steps - 1:
            p_target = float(probe(model))
            print(f"step {i:4d}  beta {float(beta(i)):.3f}  loss {float(loss):.4f}  "
                  f"p(target) {p_target:.3f}")  # fmt: skip
    print(
        f"train_step compiled {train_step.jitted_fn._cache_size()} time(s) for {args.steps} betas"
    )


if __name__ == "__main__":
    main()
