"""What the trainer scripts save for tests/test_distributed.py to compare."""

import os

import torch


def save_result(trainer, out: str) -> None:
    """On rank 0: the final parameters, the logged losses and the world size, to
    ``out/result.pt``."""
    if trainer.is_world_process_zero():
        params = torch.cat([p.detach().ravel() for p in trainer.model.parameters()])
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        result = {"params": params, "losses": losses, "world": trainer.args.world_size}
        torch.save(result, os.path.join(out, "result.pt"))
