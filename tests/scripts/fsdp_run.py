"""A few training steps with PyTorch FSDP2 (``fully_shard``) and prefopt's loss, saved.

Run directly for one process, or under ``torchrun --nproc_per_node 2`` (gloo on CPU): each
decoder layer and the whole model are sharded, each process takes its share of every
global batch of 4 rows, and FSDP averages the gradients. Accelerate enables FSDP on GPUs
only, so this drives FSDP2 directly; the loss and the data layer are the trainer's. Rank 0
writes ``result.pt`` (full parameters, the losses averaged over processes) to ``--out``.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from trainer_run import ROWS

from prefopt.cli.task import builtin_model, builtin_tokenizer
from prefopt.integrations.transformers import PreferenceCollator, loss_and_metrics


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    tok = builtin_tokenizer()
    model, ref = builtin_model(tok, 0), builtin_model(tok, 1).eval()
    if world > 1:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    collate = PreferenceCollator(tok)
    losses = []
    for step in range(args.steps):
        rows = ROWS[4 * step : 4 * step + 4]
        mine = rows[rank * len(rows) // world : (rank + 1) * len(rows) // world]
        loss, _, _ = loss_and_metrics(model, collate(mine), ref_model=ref, loss="mpo")
        loss.backward()  # FSDP averages the gradients of the processes' equal shares
        optimizer.step()
        optimizer.zero_grad()
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
        losses.append(float(value) / world)
    full = {k: (v.full_tensor() if world > 1 else v) for k, v in model.state_dict().items()}
    if rank == 0:
        params = torch.cat([full[k].detach().ravel() for k in sorted(full)])
        sharded = type(next(model.parameters())).__name__ == "DTensor"
        out = {"params": params, "losses": losses, "world": world, "sharded": sharded}
        os.makedirs(args.out, exist_ok=True)
        torch.save(out, os.path.join(args.out, "result.pt"))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
