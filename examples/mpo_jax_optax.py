"""MPO in a JAX/optax loop: a tiny hand-written causal LM learns to prefer high-reward
responses from scored groups, with prefopt's jitted train step.

    python examples/mpo_jax_optax.py              # 200 steps
    python examples/mpo_jax_optax.py --steps 2    # a smoke run
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prefopt.integrations.data import collate_ids
from prefopt.integrations.jax import make_train_step

V, H = 16, 32
TARGET = 7  # the reward: how often a response says token 7


def apply_fn(params, ids, attention):
    """Each position sees the mean embedding of its prefix (a causal bag of words)."""
    e = params["embed"][ids] * attention[..., None]
    prefix = jnp.cumsum(e, axis=1) / jnp.cumsum(attention, axis=1)[..., None].clip(1)
    return jnp.tanh(prefix @ params["hidden"]) @ params["out"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    r = np.random.default_rng(0)
    params = {
        "embed": jnp.asarray(r.normal(size=(V, H)), jnp.float32),
        "hidden": jnp.asarray(r.normal(size=(H, H)) / np.sqrt(H), jnp.float32),
        "out": jnp.asarray(r.normal(size=(H, V)) / np.sqrt(H), jnp.float32),
    }
    optimizer = optax.adam(1e-2)
    step = make_train_step(apply_fn, optimizer, loss="mpo", beta=0.5)
    opt_state = optimizer.init(params)
    for i in range(args.steps):
        # offline groups: 8 prompts, 4 random responses each, scored by the reward
        groups = []
        for _ in range(8):
            responses = [r.integers(1, V, 4).tolist() for _ in range(4)]
            rewards = [float(np.mean(np.equal(x, TARGET))) for x in responses]
            groups.append((r.integers(1, V, 3).tolist(), responses, rewards))
        batch = {k: jnp.asarray(v) for k, v in collate_ids(groups, pad_id=0).items()}
        params, opt_state, loss, metrics = step(params, opt_state, batch)
        if i % 50 == 0 or i == args.steps - 1:
            probe = apply_fn(params, jnp.asarray([[1, 2, 3]]), jnp.ones((1, 3), int))[0, -1]
            p_target = float(jax.nn.softmax(probe)[TARGET])
            print(
                f"step {i:4d}  loss {float(loss):.3f}  "
                f"accuracy {float(metrics['rewards/accuracies']):.2f}  p(target) {p_target:.3f}"
            )


if __name__ == "__main__":
    main()
