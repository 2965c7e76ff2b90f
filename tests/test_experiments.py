"""The reproduction experiments, at a tiny size: they run and their numbers make sense."""

import json

import numpy as np
import pytest

from tests.cases import load_example

reproductions = load_example("reproductions")
alignment_bias, main, split_reliability = (
    reproductions.alignment_bias,
    reproductions.main,
    reproductions.split_reliability,
)


def test_alignment_bias_shrinks_for_the_mean_split_only():
    r = alignment_bias(ns=(2, 8, 32, 128), trials=300, boot=20, tail_from=32)
    split, best = np.array(r["mean_tv"]["mean_split"]), np.array(r["mean_tv"]["best_of_n"])
    assert np.all(np.diff(split) < 0)  # more responses, closer to the acceptable set
    assert best[-1] > 3 * split[-1]  # a single chosen response stays far from it
    slope, low, high = r["slopes"]["mean_split"]
    assert low <= slope <= high < 0
    assert set(r["tail_slopes"]) == {"mean_split", "mean_split_weighted", "best_of_n"}


def test_split_is_more_reliable_than_full_order_under_noise():
    r = split_reliability(ns=(4, 16, 64), trials=400)
    assert r["order"][0] > r["order"][-1] and r["order"][-1] < 0.1
    assert r["split"][-1] > 0.5 > r["order"][-1]


def test_every_experiment_runs_from_one_command(tmp_path, capsys):
    pytest.importorskip("transformers")
    main(["all", "--quick", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    for name in ("bias", "noise", "compare"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert json.loads((tmp_path / f"{name}.json").read_text())["seconds"] >= 0
    assert out.count("compare ") == 8 and "held-out reward" in out
