"""On-policy `prefopt train` on your own model, prompts and reward (a function or a model)."""

import json
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from prefopt.cli import main  # noqa: E402
from prefopt.cli.task import builtin_model, builtin_tokenizer  # noqa: E402
from prefopt.cli.train import Config, run  # noqa: E402
from tests.helpers import cli_fails  # noqa: E402

transformers.logging.set_verbosity_error()

REWARDS = '''
def score(prompts, responses):
    """Share of response words equal to the prompt's last word."""
    out = []
    for p, r in zip(prompts, responses):
        text = p if isinstance(p, str) else p[-1]["content"]
        words = r.split()
        out.append(sum(w == text.split()[-1] for w in words) / max(len(words), 1))
    return out

def raises(prompts, responses):
    raise KeyError("no score for this")

def short(prompts, responses):
    return [0.0]

def nan(prompts, responses):
    return [float("nan")] * len(responses)
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama and tokenizer built in code and saved, prompts, a rewards module."""
    root = tmp_path_factory.mktemp("own")
    tok = builtin_tokenizer()
    builtin_model(tok, 0).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    chat = builtin_tokenizer()
    chat.chat_template = "<bos>{% for m in messages %} {{ m['content'] }}{% endfor %}"
    builtin_model(chat, 0).save_pretrained(root / "chat-model")
    chat.save_pretrained(root / "chat-model")
    (root / "prompts.jsonl").write_text(
        "\n".join(json.dumps({"prompt": f"copy: {a} {b}"}) for a, b in zip("abcd", "efgh"))
    )
    (root / "eval.jsonl").write_text(json.dumps({"prompt": "copy: h a"}) + "\n")
    (root / "chat.jsonl").write_text(
        json.dumps({"prompt": [{"role": "user", "content": "copy: b c"}]}) + "\n"
    )
    (root / "rewards.py").write_text(REWARDS)
    (root / "english.jsonl").write_text(json.dumps({"prompt": "Explain how DNS works."}) + "\n")
    (root / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    return root


def own(files, tmp_path, name="run", **kw):
    options = dict(
        model=str(files / "model"),
        prompts=str(files / "prompts.jsonl"),
        reward=f"{files / 'rewards.py'}:score",
        output=str(tmp_path / name),
        steps=3,
        responses=3,
        prompts_per_step=2,
        save_every=2,
        eval_every=2,
        progress=False,
    )
    return Config(**{**options, **kw})


def test_trains_with_a_reward_function_and_held_out_prompts(files, tmp_path):
    records = run(own(files, tmp_path, eval_prompts=str(files / "eval.jsonl")))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(0.0 <= r["reward"] <= 1.0 and math.isfinite(r["loss"]) for r in records)
    assert "heldout_reward_start" in records[0] and "heldout_reward" in records[1]
    for name in ("metrics.jsonl", "training.png", "checkpoint/state.pt"):
        assert (tmp_path / "run" / name).exists(), name


def test_resume_equals_an_uninterrupted_run(files, tmp_path):
    straight = run(own(files, tmp_path, "straight", steps=4))
    run(own(files, tmp_path, "halves", steps=2))
    resumed = run(own(files, tmp_path, "halves", steps=4, resume=True))
    assert resumed == straight
    a = torch.load(tmp_path / "straight" / "checkpoint" / "state.pt", weights_only=False)
    b = torch.load(tmp_path / "halves" / "checkpoint" / "state.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_reward_module_on_the_path_and_sampling_options(files, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(files))
    status = main([
        "train", "--no-progress", "--model", str(files / "model"), "--prompts",
        str(files / "prompts.jsonl"), "--reward", "rewards:score", "--steps", "2",
        "--responses", "2", "--temperature", "0.7", "--top-p", "0.9", "--max-new-tokens", "3",
        "--output", str(tmp_path / "cli"),
    ])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    lines = (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "reward" in json.loads(lines[-1])


def test_conversational_prompts_go_through_the_chat_template(files, tmp_path):
    records = run(own(files, tmp_path, model=str(files / "chat-model"),
                      prompts=str(files / "chat.jsonl"), steps=2))  # fmt: skip
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)


def test_trains_with_a_reward_model(files, tmp_path):
    tok = builtin_tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_labels=1, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    transformers.LlamaForSequenceClassification(config).save_pretrained(files / "rm")
    tok.save_pretrained(files / "rm")
    records = run(own(files, tmp_path, reward=None, reward_model=str(files / "rm"), steps=2))
    assert len(records) == 2 and all(math.isfinite(r["reward"]) for r in records)
    from prefopt.cli.reward import RewardModel

    scorer, model = RewardModel(str(files / "rm")), scorer_model(files / "rm")
    got = scorer(["copy: a b", "copy: c"], [" b b", " c c c"])  # batched, padded
    with torch.no_grad():
        alone = [float(model(**tok(t, return_tensors="pt")).logits[0, 0])
                 for t in ("copy: a b b b", "copy: c c c c")]  # fmt: skip
    assert got == pytest.approx(alone, rel=1e-5)


def scorer_model(path):
    return transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()


@pytest.mark.parametrize(
    "reward,message",
    [
        ("rewards", "--reward: expected MODULE:FUNCTION or FILE.py:FUNCTION; got 'rewards'"),
        ("missing.py:score", "--reward: no such file: missing.py"),
        ("no_such_module_xyz:score", "--reward: cannot import no_such_module_xyz"),
        ("{files}/rewards.py:absent", "has no function 'absent'"),
        ("{files}/rewards.py:raises", "raised KeyError: 'no score for this' (no step was taken"),
        ("{files}/rewards.py:short", "returned 1 values for 6 responses (no step was taken"),
        ("{files}/rewards.py:nan", "returned nan for response 0; rewards must be finite"),
    ],
)
def test_reward_errors_are_one_line_and_take_no_step(files, tmp_path, capsys, reward, message):
    out = tmp_path / "bad"
    err = cli_fails(capsys, "--model", files / "model", "--prompts", files / "prompts.jsonl",
                "--reward", reward.format(files=files), "--responses", "3",
                "--prompts-per-step", "2", "--output", out)  # fmt: skip
    assert message in err
    assert not (out / "checkpoint").exists()  # no step, nothing saved


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompts", "{files}/prompts.jsonl"], "--prompts needs a reward"),
        (["--reward", "{files}/rewards.py:score"], "--reward scores your prompts"),
        (["--prompts", "{files}/prompts.jsonl", "--reward", "r.py:f", "--reward-model", "d"],
         "--reward and --reward-model both give the reward"),
        (["--prompts", "{files}/english.jsonl", "--reward", "{files}/rewards.py:score"],
         "unknown to the built-in tokenizer"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--prompts", "{files}/latin1.jsonl", "--reward", "{files}/rewards.py:score"],
         "latin1.jsonl:1: not UTF-8 text"),
    ],
)  # fmt: skip
def test_bad_combinations_are_one_line_errors(files, tmp_path, capsys, args, message):
    err = cli_fails(capsys, *[a.format(files=files) for a in args], "--output", tmp_path / "x")
    assert message in err
