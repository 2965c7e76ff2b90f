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


def test_on_policy_with_your_own_model_prompts_and_reward():
    pytest.importorskip("transformers")  # prefopt.cli's training stack, imported inside
    pytest.importorskip("torch")
    out = run(EXAMPLES / "on_policy_own_reward.py", "--steps", "2")
    assert "2 steps; held-out reward" in out


def test_ultrafeedback_to_groups_then_train(tmp_path):
    groups = tmp_path / "groups.jsonl"
    assert "wrote 2 group rows (0 skipped)" in run(
        EXAMPLES / "ultrafeedback_to_groups.py", "--output", groups
    )
    rows = [json.loads(line) for line in groups.read_text().splitlines()]
    assert [len(r["responses"]) for r in rows] == [4, 4]
    assert rows[0]["rewards"] == pytest.approx([0.9, 0.2, 0.85, 0.1])
    # the built-in tokenizer does not know these words: refused, not trained on <unk>
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    bad = subprocess.run(
        [sys.executable, "-m", "prefopt.cli", "train", "--data", str(groups), "--steps", "2",
         "--no-progress", "--output", str(tmp_path / "unk")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "Pass --model DIR" in bad.stderr, bad.stderr
    # with a model whose tokenizer knows them (built here from the rows' words), it trains
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {w for r in rows for t in [r["prompt"], *r["responses"]] for w in t.split()}
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                  unk_token="<unk>")  # fmt: skip
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = run("-m", "prefopt.cli", "train", "--data", groups, "--model", tmp_path / "model",
              "--steps", "2", "--no-progress", "--output", tmp_path / "run")  # fmt: skip
    assert "done: 2 steps" in out


def test_grpo_compare_graded_reward_and_intervals():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from examples.grpo_compare import interval, near_reward

    question = "What is 3 + 4? Reply with the number only."
    assert near_reward(question, "7") == 1.0
    assert near_reward(question, "3 + 4 = 8") == 0.5  # the question restated is no answer
    assert near_reward(question, "3 + 4") == 0.0
    assert near_reward(question, "seven") == 0.0
    assert near_reward(question, "It is 17.") == pytest.approx(1 / 11)
    # mean and 95 % t half-width (t = 4.303 at 2 degrees of freedom), written out
    mean, half = interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / 3**0.5)
    assert interval([0.5])[1] != interval([0.5])[1]  # one value: no interval (nan)
