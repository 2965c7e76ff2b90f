"""Run prefopt.integrations.jax's train step on one device and data-parallel over 8
simulated CPU devices; print the largest differences of losses and parameters as JSON.

Needs XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported (the test
that runs this script sets it).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from prefopt.backends.jax import shard_batch

from prefopt.integrations.data import collate_ids
from prefopt.integrations.jax import make_train_step

jax.config.update("jax_enable_x64", True)
V, H = 24, 16


def apply_fn(params, ids, attention):
    """A tiny causal LM: each position sees the mean embedding of its prefix."""
    e = params["embed"][ids] * attention[..., None]
    prefix = jnp.cumsum(e, axis=1) / jnp.cumsum(attention, axis=1)[..., None].clip(1)
    return jnp.tanh(prefix @ params["hidden"]) @ params["out"]


def batch(seed):
    r = np.random.default_rng(seed)
    groups = []
    for _ in range(8):
        n = int(r.integers(2, 5))
        prompt = r.integers(1, V, int(r.integers(2, 5))).tolist()
        responses = [r.integers(1, V, int(r.integers(1, 4))).tolist() for _ in range(n)]
        groups.append((prompt, responses, r.normal(size=n).tolist()))
    return {k: jnp.asarray(v) for k, v in collate_ids(groups, pad_id=0).items()}


def main():
    assert jax.device_count() == 8, jax.devices()
    r = np.random.default_rng(0)
    params = {
        "embed": jnp.asarray(r.normal(size=(V, H))),
        "hidden": jnp.asarray(r.normal(size=(H, H)) / 4),
        "out": jnp.asarray(r.normal(size=(H, V)) / 4),
    }
    optimizer = optax.adam(1e-2)
    step = make_train_step(apply_fn, optimizer, loss="mpo", beta=0.5)
    mesh = Mesh(jax.devices(), ("batch",))
    results = {}
    for mode in ("single", "sharded"):
        p = params
        if mode == "sharded":
            p = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        state, losses = optimizer.init(p), []
        for i in range(3):
            b = batch(i)
            if mode == "sharded":
                b = shard_batch(b, mesh)
                assert len(b["logps" if "logps" in b else "input_ids"].sharding.device_set) == 8
            p, state, value, metrics = step(p, state, b)
            losses.append(float(value))
        results[mode] = (losses, p)
    (l1, p1), (l2, p2) = results["single"], results["sharded"]
    print(
        json.dumps(
            {
                "losses": l1,
                "loss_diff": max(abs(a - b) for a, b in zip(l1, l2)),
                "param_diff": max(float(jnp.abs(p1[k] - p2[k]).max()) for k in p1),
                "moved": max(float(jnp.abs(p1[k] - params[k]).max()) for k in p1),
            }
        )
    )


if __name__ == "__main__":
    main()
