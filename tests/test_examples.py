"""The examples run (at a tiny size) and do what they say."""

import json
import pathlib
import subprocess
import sys

import pytest

from tests.cases import skip_unless_installed

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run(*args):
    if str(args[0]).endswith(".py"):
        skip_unless_installed(pathlib.Path(args[0]).read_text())
    else:  # prefopt's command
        pytest.importorskip("transformers")
    out = subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_quickstart():
    out = run(EXAMPLES / "quickstart.py", "--steps", "20")
    words = out.split("expected reward: ")[1].split()  # "0.488 at the start, 0.723 now"
    start, now = float(words[0]), float(words[4])
    assert now > start  # the policy moved towards its high-reward responses


@pytest.mark.parametrize("script", ["mpo_torch_loop.py", "mpo_jax_optax.py"])
def test_training_loops(script):
    out = run(EXAMPLES / script, "--steps", "2")
    assert out.count("step") == 2 and "loss" in out


def test_flax_group_forward_equals_unshared_and_trains():
    # the script asserts shared == unshared (values and gradients) before training
    out = run(EXAMPLES / "mpo_flax_group.py", "--steps", "30")
    assert "shared == unshared" in out
    probes = [
        float(line.split("p(target) ")[1]) for line in out.splitlines() if "p(target)" in line
    ]
    assert len(probes) == 3 and probes[-1] > probes[0]


def test_ultrafeedback_to_groups_then_train(tmp_path):
    groups = tmp_path / "groups.jsonl"
    assert "wrote 2 group rows (0 skipped)" in run(
        EXAMPLES / "ultrafeedback_to_groups.py", "--output", groups
    )
    rows = [json.loads(line) for line in groups.read_text().splitlines()]
    assert [len(r["responses"]) for r in rows] == [4, 4]
    assert rows[0]["rewards"] == pytest.approx([0.9, 0.2, 0.85, 0.1])
    out = run("-m", "prefopt.cli", "train", "--data", groups, "--steps", "2", "--no-progress",
              "--output", tmp_path / "run")  # fmt: skip
    assert "done: 2 steps" in out
