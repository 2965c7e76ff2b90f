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
    for name in ("bias", "noise", "compare", "budget"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert json.loads((tmp_path / f"{name}.json").read_text())["seconds"] >= 0
    assert out.count("compare ") == 8 and "held-out reward" in out


def test_exact_held_out_reward_matches_sampling():
    torch = pytest.importorskip("torch")
    budget = load_example("sample_budget")
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(5, budget.LENGTH, budget.LETTERS, generator=gen), -1)
    for task in ("copy", "letters"):
        batch = torch.tensor(budget.prompts(task, 0)[1][:5])
        exact = budget.expected_reward(task, probs.double(), batch)
        draws = torch.multinomial(probs.reshape(-1, budget.LETTERS), 20000, replacement=True)
        responses = draws.reshape(5, budget.LENGTH, 20000).transpose(1, 2)  # (P, n, LENGTH)
        sampled = budget.reward(task, batch, responses).mean(dim=1)
        torch.testing.assert_close(sampled, exact, atol=0.01, rtol=0)  # 20000 draws: se < 0.004


def test_sample_budget_trains_and_reports_paired_intervals(tmp_path, capsys):
    pytest.importorskip("torch")
    budget = load_example("sample_budget")
    _, start = budget.run(("copy", "MPO", (8, 8), 0, 0.1, 1.0, 0))
    _, after = budget.run(("copy", "MPO", (8, 8), 0, 0.3, 1.0, 60))
    assert abs(start - 1 / 8) < 0.05 and after > start + 0.1  # learns from 1/8
    budget.main(["--quick", "--output", str(tmp_path)])
    assert (tmp_path / "budget.png").read_bytes()[:4] == b"\x89PNG"
    r = json.loads((tmp_path / "budget.json").read_text())
    for task in ("copy", "letters"):
        finals = r["final"][task]
        # with n = 2 the three losses are the same function: the same runs
        np.testing.assert_allclose(finals["MPO"]["2"], finals["DPO all pairs"]["2"], atol=1e-9)
        np.testing.assert_allclose(finals["MPO"]["2"], finals[budget.BASELINE]["2"], atol=1e-9)
        for loss in budget.LOSSES:
            assert set(r["tuned"][task][loss]) == {"2", "4", "8", "16"}
            for mean, low, high in r["vs_baseline"][task][loss].values():
                assert low <= mean <= high
    assert "budget:" in capsys.readouterr().out
