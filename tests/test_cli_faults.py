"""`prefopt train` under broken files, bad options, reruns and Ctrl-C: one line, no data lost."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from prefopt.cli import main  # noqa: E402
from tests.helpers import cli_fails  # noqa: E402

ROW = {"prompt": "copy: a", "responses": [" a a", " b"], "rewards": [1.0, 0.0]}


def write(path, *lines, raw=None):
    path.write_bytes(raw if raw is not None else "\n".join(lines).encode() + b"\n")
    return path


@pytest.mark.parametrize(
    "content,message",
    [
        (b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}\n', ":1: not UTF-8 text"),
        (json.dumps({**ROW, "rewards": [1e300, 0.0]}), ":1: rewards must be finite and at most"),
        ('{"prompt": "p", "responses": ["a", "b"], "rewards": [1' + "0" * 400 + ", 0]}",
         ":1: rewards must be finite and at most"),
        (json.dumps({**ROW, "ref_logps": "x"}), ":1: 'ref_logps' must be a list"),
        (json.dumps({**ROW, "ref_logps": [1.0]}), ":1: 'ref_logps' must be a list with one"),
        (json.dumps({**ROW, "ref_logps": [-1.0, float("nan")]}), ":1: ref_logps must be finite"),
        (json.dumps({**ROW, "responses": ["a " * 600, "b"]}), ":1: prompt and response are"),
    ],
)  # fmt: skip
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, capsys, content, message):
    data = tmp_path / "rows.jsonl"
    if isinstance(content, bytes):
        write(data, raw=content)
    else:
        write(data, content)
    err = cli_fails(capsys, "--data", data, "--output", tmp_path / "run")
    assert f"{data}{message}" in err
    assert not (tmp_path / "run").exists()  # nothing was written


@pytest.mark.parametrize(
    "args,message",
    [
        (["--alpha", "-1"], "alpha must be a finite number >= 0"),
        (["--option", "weighting=bad"], "weighting must be one of"),
        (["--loss", "sigmoid", "--option", "label_smoothing=0.9"], "label_smoothing must lie"),
        (["--max-length", "0"], "--max-length must be >= 1"),
    ],
)
def test_option_values_are_checked_before_the_model_loads(tmp_path, capsys, args, message):
    # --model names a directory that does not exist: an error about it would mean it loaded
    err = cli_fails(capsys, *args, "--model", tmp_path / "absent", "--output", tmp_path / "run")
    assert message in err


def test_output_naming_a_file_is_refused(tmp_path, capsys):
    target = write(tmp_path / "notes.txt", "keep me")
    err = cli_fails(capsys, "--output", target)
    assert "--output" in err and "a file, not a directory" in err
    assert target.read_text() == "keep me\n"


def test_an_existing_run_is_never_overwritten_without_asking(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--no-progress", "--steps", "2", "--output", str(out)]) == 0
    before = (out / "metrics.jsonl").read_text()
    err = cli_fails(capsys, "--steps", "1", "--output", out)
    assert "holds a run already: --resume continues it, --overwrite replaces it" in err
    assert (out / "metrics.jsonl").read_text() == before
    capsys.readouterr()
    assert (
        main(["train", "--no-progress", "--steps", "1", "--overwrite", "--output", str(out)]) == 0
    )
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    err = cli_fails(capsys, "--resume", "--loss", "simpo", "--output", out)
    assert "--resume: the run was made with other settings (loss 'mpo' -> 'simpo')" in err
    (out / "checkpoint" / "state.pt").write_bytes(b"not a checkpoint")
    err = cli_fails(capsys, "--resume", "--output", out)
    assert "--resume: " in err and "is not a readable checkpoint" in err


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "prefopt.cli", "train", "--no-progress", "--steps", "40"]
    command += ["--eval-every", "10", "--save-every", "1"]
    straight = tmp_path / "straight"
    subprocess.run([*command, "--output", str(straight)], check=True, env=env, timeout=300)
    out = tmp_path / "interrupted"
    process = subprocess.Popen(
        [*command, "--output", str(out)], env=env, stderr=subprocess.PIPE, text=True
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.count("\n") == 1 and "interrupted after step" in err and "--resume" in err
    stopped = len(metrics.read_text().splitlines())
    assert stopped < 40
    subprocess.run([*command, "--resume", "--output", str(out)], check=True, env=env, timeout=300)
    assert metrics.read_text() == (straight / "metrics.jsonl").read_text()
    a = torch.load(straight / "checkpoint" / "state.pt", weights_only=True)["model"]
    b = torch.load(out / "checkpoint" / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
