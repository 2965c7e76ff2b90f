"""Data parallelism end to end: torchrun with 2 processes (gloo, CPU) through the
Trainer/accelerate, and JAX over 8 simulated devices; each must match one process."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPTS = pathlib.Path(__file__).parent / "scripts"


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(script, port, *args):
    """The command that runs ``script ARGS`` in 2 processes (gloo on CPU)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(port), str(script), *map(str, args),
    ]  # fmt: skip


def one_and_two_processes(torch, tmp_path, script, port, one_args=(), two_args=()):
    """Run ``script`` alone and in 2 processes; both saved results."""
    one = [sys.executable, str(script), *map(str, one_args), "--out", str(tmp_path / "one")]
    two = torchrun(script, port, *two_args, "--out", tmp_path / "two")
    for cmd in (one, two):
        out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    return torch.load(tmp_path / "one" / "result.pt"), torch.load(tmp_path / "two" / "result.pt")


def assert_same_run(torch, a, b):
    """One process and two: the same logged losses and final parameters, up to float32
    reduction order."""
    assert (a["world"], b["world"]) == (1, 2)
    torch.testing.assert_close(
        torch.tensor(b["losses"]), torch.tensor(a["losses"]), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(b["params"], a["params"], rtol=1e-5, atol=1e-7)


def test_torchrun_two_processes_match_one_process(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    script = SCRIPTS / "trainer_run.py"
    a, b = one_and_two_processes(torch, tmp_path, script, 29517, ("--batch", 4), ("--batch", 2))
    assert len(a["losses"]) == 3
    assert_same_run(torch, a, b)  # same global batch of whole groups
    # FSDP asked for through the Trainer on CPU: accelerate would quietly run DDP instead
    fsdp = torchrun(script, 29519, "--batch", 2, "--fsdp", "--out", tmp_path / "fsdp")
    out = subprocess.run(fsdp, capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode != 0
    assert "args.fsdp is set but accelerate did not enable FSDP" in out.stderr


def test_fsdp_two_processes_match_one_process(tmp_path):
    # FSDP2 (fully_shard, gloo, CPU) with the trainer's collator and loss: sharded
    # parameters, each process half of every batch, the same steps as one process.
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    a, b = one_and_two_processes(torch, tmp_path, SCRIPTS / "fsdp_run.py", 29518)
    assert (a["world"], a["sharded"], b["world"], b["sharded"]) == (1, False, 2, True)
    assert_same_run(torch, a, b)


def test_jax_eight_devices_match_one_device():
    pytest.importorskip("optax")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "jax_data_parallel.py")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["moved"] > 1e-3  # the steps did train
    assert result["loss_diff"] < 1e-12 and result["param_diff"] < 1e-12


def test_grpo_engine_two_processes_match_one_process(tmp_path):
    # GroupPreferenceGRPOTrainer: each process keeps its own whole groups (TRL gathers the
    # rewards, prefopt takes back its share); DDP averages the gradients of equal group counts
    torch = pytest.importorskip("torch")
    pytest.importorskip("trl")
    script = SCRIPTS / "grpo_run.py"
    a, b = one_and_two_processes(torch, tmp_path, script, 29521, ("--batch", 8), ("--batch", 4))
    assert len(a["losses"]) == 3 and a["losses"][0] > 0
    assert_same_run(torch, a, b)
