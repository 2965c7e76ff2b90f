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


def close() -> None:
    """Destroy the process group before the interpreter exits (every rank, after training).

    Left to the interpreter's teardown, gloo's worker threads can outlive it and abort the
    process (SIGABRT, "terminate called without an active exception"): torchrun then
    reports the run failed, now and then, after it saved its result.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
