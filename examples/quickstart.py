"""MPO in a few lines: a tabular policy learns to prefer its high-reward responses.

Each of B prompts has n candidate responses with fixed rewards. The "policy" is a table of
logits, one row per prompt; the log-probability of a response is its log-softmax entry and
the frozen reference is the initial table. MPO pushes probability mass from the responses
below each prompt's mean reward to those above it, weighted by the distance from the mean.
The same loss is then evaluated on NumPy and JAX arrays to show that the numbers agree.

    python examples/quickstart.py [--steps 200] [--seed 0]
"""

import argparse

import numpy as np
import torch
from prefopt.backends.torch import MPOLoss

import prefopt


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    B, n = 32, 8
    gen = torch.Generator().manual_seed(args.seed)
    rewards = torch.rand(B, n, generator=gen)
    mask = torch.rand(B, n, generator=gen) < 0.85  # ragged groups
    mask[:, :2] = True
    logits = torch.zeros(B, n, requires_grad=True)
    ref_logps = torch.log_softmax(logits.detach().masked_fill(~mask, -torch.inf), dim=-1)
    options = dict(beta=0.5, alpha=2.0)
    loss_fn = MPOLoss(**options)
    optimizer = torch.optim.Adam([logits], lr=0.1)

    def expected_reward():
        probs = torch.softmax(logits.detach().masked_fill(~mask, -torch.inf), dim=-1)
        return float((probs * rewards).sum(-1).mean())

    start = expected_reward()
    best = float(torch.where(mask, rewards, -torch.inf).max(-1).values.mean())
    for step in range(args.steps + 1):
        logps = torch.log_softmax(logits.masked_fill(~mask, -torch.inf), dim=-1)
        loss = loss_fn(logps, ref_logps, rewards, mask=mask)
        if step % 50 == 0:
            reward = expected_reward()
            print(f"step {step:4d}  MPO loss {loss.item():.4f}  expected reward {reward:.3f}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = expected_reward()
    print(f"expected reward: {start:.3f} at the start, {end:.3f} now (best possible {best:.3f})")

    # The same function on other array libraries gives the same numbers.
    logps = torch.log_softmax(logits.detach().masked_fill(~mask, -torch.inf), dim=-1)
    arrays = [logps.double().numpy(), ref_logps.double().numpy(), rewards.double().numpy()]
    m = mask.numpy()
    print(
        "per-group loss, torch:",
        prefopt.mpo_loss(*map(torch.from_numpy, arrays), mask=mask, **options)[:3].numpy(),
    )
    print("per-group loss, numpy:", prefopt.mpo_loss(*arrays, mask=m, **options)[:3])
    try:
        import jax

        jax.config.update("jax_enable_x64", True)
        loss = jax.jit(lambda *a, mask: prefopt.mpo_loss(*a, mask=mask, **options))
        out = loss(*map(jax.numpy.asarray, arrays), mask=jax.numpy.asarray(m))
        print("per-group loss, jax:  ", np.asarray(out[:3]))
    except ImportError:
        print("(jax not installed)")


if __name__ == "__main__":
    main()
