"""The transformers integration and `prefopt train`, on the tiny built-in model."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import prefopt  # noqa: E402
from prefopt.cli import main  # noqa: E402
from prefopt.cli.task import builtin_model, builtin_tokenizer  # noqa: E402
from prefopt.cli.train import Config, run  # noqa: E402
from prefopt.integrations.transformers import (  # noqa: E402
    PreferenceCollator,
    PreferenceConfig,
    PreferenceTrainer,
    batch_logps,
    precompute_ref_logps,
)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# Standard rows, as in TRL: each response is the text that follows its prompt.
ROWS = [
    {
        "prompt": "copy: a b",
        "responses": [" b b", " a", " c d e", " b"],
        "rewards": [1.0, 0.0, 0.2, 0.7],
    },
    {"prompt": "copy: c", "chosen": " c c", "rejected": " d"},
    {"prompt": "copy: d e f", "responses": [" e", " f f f"], "rewards": [0.1, 0.9]},
    {"prompt": "copy: h", "responses": [" h", " g", " h h"], "rewards": [0.5, 0.0, 1.0]},
]


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def tiny(tok, seed=0):
    return builtin_model(tok, seed)


def test_collator_masks_prompt_and_padding(tok):
    batch = PreferenceCollator(tok)(ROWS[:2])
    B, n, T = batch["input_ids"].shape
    assert (B, n) == (2, 4)
    assert batch["mask"].tolist() == [[True] * 4, [True, True, False, False]]
    assert batch["rewards"][1].tolist() == [1.0, 0.0, 0.0, 0.0]  # a pair: chosen 1, rejected 0
    # group 0, response 0: "<bos> copy: a b" then " b b<eos>"; only the response is labelled
    ids = tok("copy: a b b b", add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0, 0, :6].tolist() == [tok.bos_token_id, *ids]
    labels = batch["labels"][0, 0].tolist()
    assert labels[:4] == [-100] * 4 and labels[4:7] == [*ids[3:], tok.eos_token_id]
    assert all(v == -100 for v in labels[7:])
    assert torch.all(batch["labels"][1, 2:] == -100)  # padding responses count for nothing
    assert torch.all(batch["attention_mask"][1, 2:].sum(-1) == 1)  # but attend to one token


def test_batch_logps_match_one_sequence_at_a_time(tok):
    model = tiny(tok)
    batch = PreferenceCollator(tok)(ROWS)
    logps, lengths = batch_logps(model, batch)
    for b, row in enumerate(ROWS):
        responses = row.get("responses") or [row["chosen"], row["rejected"]]
        prompt = [tok.bos_token_id, *tok(row["prompt"], add_special_tokens=False)["input_ids"]]
        for i, text in enumerate(responses):
            response = [*tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
            ids = torch.tensor([prompt + response])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0].double()
            expected = sum(
                float(torch.log_softmax(logits[len(prompt) + k - 1], -1)[tok_id])
                for k, tok_id in enumerate(response)
            )
            assert lengths[b, i] == len(response)
            assert math.isclose(float(logps[b, i].detach()), expected, rel_tol=1e-5, abs_tol=1e-5)
    assert torch.all(logps[~batch["mask"]] == 0.0)


def test_batch_loss_dispatches_by_kind(tok):
    batch = PreferenceCollator(tok)(ROWS)
    logps, lengths = batch_logps(tiny(tok), batch)
    ref = logps.detach() + 0.5
    args = (logps, ref, batch["rewards"])
    kw = {"mask": batch["mask"]}
    mpo = prefopt.batch_loss("mpo", *args, **kw, beta=0.2)
    expected = (
        prefopt.mpo_loss(logps, ref, batch["rewards"], mask=batch["mask"], beta=0.2).sum() / 4
    )
    torch.testing.assert_close(mpo, expected)
    pair = prefopt.batch_loss("sigmoid", *args, **kw)  # group 1 is a pair: its loss is DPO's
    # reference-free, uses lengths
    simpo = prefopt.batch_loss("simpo", logps, None, batch["rewards"], **kw, lengths=lengths)
    assert torch.isfinite(pair) and torch.isfinite(simpo)
    with pytest.raises(ValueError, match="'kto' needs unpaired data"):
        prefopt.batch_loss("kto", *args, **kw)
    with pytest.raises(ValueError, match="'mpo' uses lengths only without ref_logps"):
        prefopt.batch_loss("mpo", *args, **kw, lengths=lengths)  # would not be used


def trainer(tok, tmp_path, batch_size, accumulation, ref_model=None, **options):
    args = PreferenceConfig(
        output_dir=str(tmp_path / f"t{batch_size}{accumulation}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        report_to=[],
        logging_steps=1,
        use_cpu=True,
        seed=0,
        data_seed=0,
        save_strategy="no",
        **options,
    )
    return PreferenceTrainer(
        tiny(tok), ref_model=ref_model, args=args, train_dataset=ROWS, processing_class=tok
    )


@pytest.mark.parametrize("loss", ["mpo", "sigmoid"])
def test_gradient_accumulation_equals_one_large_batch(tok, tmp_path, loss):
    params = []
    for batch_size, accumulation in ((4, 1), (2, 2), (1, 4)):
        t = trainer(tok, tmp_path, batch_size, accumulation, ref_model=tiny(tok), loss_type=loss)
        t.train()
        params.append(torch.cat([p.detach().ravel() for p in t.model.parameters()]))
    assert not torch.equal(params[0], torch.cat([p.ravel() for p in tiny(tok).parameters()]))
    torch.testing.assert_close(params[1], params[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(params[2], params[0], rtol=1e-5, atol=1e-6)


def test_trainer_logs_metrics_and_precomputed_reference_equals_the_model(tok, tmp_path):
    collator = PreferenceCollator(tok)
    with_model = trainer(tok, tmp_path, 4, 1, ref_model=tiny(tok, seed=1))
    with_model.train()
    logged = with_model.state.log_history[0]
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/margins",
        "rewards/accuracies",
        "groups/degenerate",
    ):
        assert key in logged, key
    rows = precompute_ref_logps(tiny(tok, seed=1), ROWS, collator, batch_size=3)
    assert [len(r["ref_logps"]) for r in rows] == [4, 2, 2, 3]
    with_column = PreferenceTrainer(
        tiny(tok), args=with_model.args, train_dataset=rows, processing_class=tok
    )
    assert with_column.ref_model is None  # the column is the reference: no copy is made
    with_column.train()
    assert math.isclose(with_column.state.log_history[0]["loss"], logged["loss"], rel_tol=1e-5)


def test_unknown_loss_fails_at_construction(tok, tmp_path):
    with pytest.raises(ValueError, match="unknown loss 'mpoo'.*Did you mean 'mpo'"):
        trainer(tok, tmp_path, 4, 1, loss_type="mpoo")


def test_trainer_runs_cpo_which_takes_chosen_lengths_only(tok, tmp_path):
    # Before: TypeError from cpo_loss (rejected_lengths) at the first step.
    t = trainer(tok, tmp_path, 4, 1, loss_type="cpo")
    t.train()
    assert math.isfinite(t.state.log_history[0]["loss"])


def test_trainer_rejects_an_option_the_loss_does_not_take(tok, tmp_path):
    with pytest.raises(
        TypeError, match=r"PreferenceTrainer: \['sigmoid'\] take no option\(s\) \['alpha'\]"
    ):
        trainer(tok, tmp_path, 4, 1, loss_type="sigmoid", loss_options={"alpha": 1.0})


@pytest.mark.parametrize("loss,options,beta", [("ipo", {"beta": 0.5}, 0.5), ("simpo", {}, 2.0)])
def test_metrics_use_the_beta_the_loss_used(tok, loss, options, beta):
    # Before: the implicit rewards were logged with beta 0.1 whatever the loss used.
    from prefopt.integrations.transformers import loss_and_metrics

    batch = PreferenceCollator(tok)(ROWS)
    ref = tiny(tok, seed=1)
    _, metrics, logps = loss_and_metrics(tiny(tok), batch, ref_model=ref, loss=loss, **options)
    if prefopt.losses.registry.spec(loss).reference != "none":
        ref_logps, lengths = batch_logps(ref, batch)[0], None
    else:  # reference-free SimPO: implicit rewards per token
        ref_logps, lengths = None, batch_logps(tiny(tok), batch)[1]
    expected = prefopt.metrics.group_metrics(
        logps.detach(), ref_logps, batch["rewards"], mask=batch["mask"], lengths=lengths, beta=beta
    )
    torch.testing.assert_close(metrics["rewards/chosen"], expected["rewards/chosen"])


# ---- prefopt train ----------------------------------------------------------------------


def small(tmp_path, name="run", **kw):
    options = dict(output=str(tmp_path / name), steps=4, save_every=2, eval_every=2, progress=False)
    return Config(**{**options, **kw})


def test_train_writes_metrics_plot_and_checkpoint(tmp_path):
    records = run(small(tmp_path))
    out = tmp_path / "run"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == records and [r["step"] for r in lines] == [1, 2, 3, 4]
    assert "heldout_reward_start" in lines[0] and "heldout_reward" in lines[-1]
    assert {"loss", "reward", "rewards/margins"} <= set(lines[-1])
    assert (out / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "checkpoint" / "state.pt").is_file() and (out / "model" / "config.json").is_file()


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_weights_that_learn(tmp_path):
    # Pure bf16 weights lost lr-1e-5 Adam steps to rounding (a Xeon with AMX: held-out
    # reward 0.42 -> 0.40 in 30 steps); --dtype bfloat16 autocasts instead.
    from torch.utils._python_dispatch import TorchDispatchMode

    matmuls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm,
                                       torch.ops.aten.bmm, torch.ops.aten.linear):  # fmt: skip
                matmuls.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    start = builtin_model(builtin_tokenizer(), 0).state_dict()
    with Record():
        run(small(tmp_path, steps=1, dtype="bfloat16", lr=1e-5, eval_every=100))
    assert matmuls and set(matmuls) == {torch.bfloat16}, set(matmuls)
    run(small(tmp_path, "still", steps=1, dtype="bfloat16", lr=1e-30, eval_every=100))
    still = torch.load(tmp_path / "still" / "checkpoint" / "state.pt", weights_only=True)
    for k, w in still["model"].items():  # the run started from these weights
        torch.testing.assert_close(w, start[k], rtol=0.0, atol=1e-20)
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=True)
    weights = state["model"]
    assert {w.dtype for w in weights.values()} == {torch.float32}
    moved = sum(not torch.equal(w, start[k]) for k, w in weights.items())
    assert moved > len(weights) // 2  # a 1e-5 step reached the weights
    moments = [v for s in state["optimizer"]["state"].values() for v in s.values() if v.ndim]
    assert moments and {m.dtype for m in moments} == {torch.float32}


def test_loss_options_default_to_the_loss_and_reject_what_it_does_not_take(tmp_path):
    from prefopt.cli.train import UserError, check

    # Before: --beta 0.1 was always sent, so SimPO ran with beta 0.1 instead of its 2.0.
    assert check(small(tmp_path, loss="simpo")) == {}
    assert check(small(tmp_path, loss="simpo", beta=1.5)) == {"beta": 1.5}
    # Before: --alpha was silently ignored by every loss but MPO.
    with pytest.raises(UserError, match="--alpha: --loss simpo takes no option 'alpha'"):
        check(small(tmp_path, loss="simpo", alpha=2.0))
    with pytest.raises(UserError, match="loss options: .*label_smoothing must lie in"):
        check(small(tmp_path, loss="sigmoid", extra={"label_smoothing": 0.9}))


@pytest.mark.parametrize("loss,extra", [("cpo", {}), ("mpo", {"no_reference": True})])
def test_train_runs_cpo_and_reference_free_mpo(tmp_path, loss, extra):
    records = run(small(tmp_path, loss=loss, steps=2, **extra))
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)


def test_resume_continues_with_identical_results(tmp_path):
    straight = run(small(tmp_path, "straight", steps=6, eval_every=3))
    run(small(tmp_path, "halves", steps=3, save_every=3, eval_every=3))
    resumed = run(small(tmp_path, "halves", steps=6, save_every=3, eval_every=3, resume=True))
    assert resumed == straight
    a = torch.load(tmp_path / "straight" / "checkpoint" / "state.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "halves" / "checkpoint" / "state.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_offline_training_on_jsonl_and_a_local_model(tmp_path, tok):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    records = run(small(tmp_path, "offline", data=str(data), loss="sigmoid", steps=2))
    assert len(records) == 2 and "reward" not in records[0]
    records = run(small(tmp_path, "simpo", data=str(data), loss="simpo", steps=2))
    assert records[0]["rewards/chosen"] != 0.0  # no reference: the log-probs themselves
    model_dir = tmp_path / "model"
    tiny(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    records = run(small(tmp_path, "local", model=str(model_dir), steps=2, responses=3))
    assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)


@pytest.mark.parametrize(
    "make,args,message",
    [
        (
            None,
            ["--model", "{tmp}/nowhere"],
            "--model {tmp}/nowhere: no such checkpoint folder or .gguf file",
        ),
        (
            "empty_dir",
            ["--model", "{tmp}/empty"],
            "--model {tmp}/empty: not a causal LM checkpoint",
        ),
        ("bad_json", ["--data", "{tmp}/d.jsonl"], "{tmp}/d.jsonl:2: not valid JSON"),
        (
            "mismatch",
            ["--data", "{tmp}/d.jsonl"],
            "{tmp}/d.jsonl:1: 'rewards' must be a list with one number per response; "
            "got 2 responses and 3 rewards",
        ),
        ("nan", ["--data", "{tmp}/d.jsonl"], "{tmp}/d.jsonl:1: rewards must be finite"),
        (None, ["--loss", "mpoo"], "unknown loss 'mpoo'. Known losses:"),
        (None, ["--loss", "kto"], "--loss kto needs unpaired data"),
        (None, ["--steps", "0"], "--steps must be >= 1; got 0"),
        (None, ["--option", "gamma=1"], "--option gamma: --loss mpo takes no option 'gamma'"),
        (None, ["--resume"], "--resume: no checkpoint in {tmp}/out"),
    ],
)
def test_user_errors_are_one_line_with_exit_status_2(tmp_path, capsys, make, args, message):
    tmp = str(tmp_path)
    if make == "empty_dir":
        (tmp_path / "empty").mkdir()
    contents = {
        "bad_json": json.dumps(ROWS[0]) + "\n{not json\n",
        "mismatch": '{"prompt": "p", "responses": ["a", "b"], "rewards": [1, 2, 3]}\n',
        "nan": '{"prompt": "p", "responses": ["a", "b"], "rewards": [1, NaN]}\n',
    }
    if make in contents:
        (tmp_path / "d.jsonl").write_text(contents[make])
    argv = ["train", "--output", f"{tmp}/out", "--no-progress"] + [a.format(tmp=tmp) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("prefopt train: error: ") and message.format(tmp=tmp) in err


def test_console_script_reports_bad_arguments_in_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "prefopt.cli", "train", "--steps", "x"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "argument --steps: invalid int value: 'x'" in out.stderr
