"""PreferenceTrainer against TRL's DPOTrainer (1.16) on the same tiny Llama, rows and config.

Both trainers get the same ``DPOConfig``: the first batch's loss must agree to 1e-6 for every
loss type both have, and a 20-step loss curve to 1e-5 (see the "Coming from TRL" docs page).
TRL is a test-only dependency (the ``test-trl`` extra).
"""

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from prefopt.cli.task import builtin_model, builtin_tokenizer  # noqa: E402
from prefopt.integrations.transformers import PreferenceTrainer  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
datasets.disable_progress_bars()

# pairs with responses of different lengths, some longer than others in the same batch
ROWS = [
    {
        "prompt": f"copy: {a} {b}",
        "chosen": f" {b} {b}" + f" {b}" * (i % 3),
        "rejected": f" {a}" + " c" * (i % 2),
    }
    for i, (a, b) in enumerate(zip("abcdefgh" * 3, "hgfedcbaabcdefghhgfedcba"))
]
# TRL 1.16's DPOTrainer loss types, less 'sft' (not in prefopt)
LOSS_TYPES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm",
]  # fmt: skip
SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.05, "aot_unpaired": 0.05}


def losses(trainer_class, tmp_path, steps, **fields):
    """The loss of each step's batch, as compute_loss returned it (logs are averaged)."""
    seen = []

    class Recording(trainer_class):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            seen.append(float(loss.detach()))
            return loss

    tok = builtin_tokenizer()
    args = trl.DPOConfig(
        output_dir=str(tmp_path / trainer_class.__name__),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=1e-3,
        bf16=False,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **fields,
    )
    trainer = Recording(
        model=builtin_model(tok, 0),
        ref_model=builtin_model(tok, 1),  # not the policy: the first losses are not trivial
        args=args,
        train_dataset=datasets.Dataset.from_list(ROWS),
        processing_class=tok,
    )
    trainer.train()
    return seen


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_first_batch_loss_equals_trl(tmp_path, loss_type):
    fields = {"loss_type": [loss_type], "gradient_checkpointing": False, "beta": 0.2}
    if loss_type in SMOOTHING:
        fields["label_smoothing"] = SMOOTHING[loss_type]
    theirs = losses(trl.DPOTrainer, tmp_path, 1, **fields)
    ours = losses(PreferenceTrainer, tmp_path, 1, **fields)
    assert len(theirs) == len(ours) == 1 and math.isfinite(ours[0])
    assert ours[0] == pytest.approx(theirs[0], rel=1e-6, abs=1e-6)


@pytest.mark.parametrize(
    "fields",
    [
        {"loss_type": ["sigmoid"]},  # DPOConfig's defaults, gradient checkpointing included
        {"loss_type": ["ipo"], "beta": 0.5, "max_length": 6},  # truncated responses
        {"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [0.8, 0.2]},
        {"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence"},
        {"loss_type": ["sigmoid"], "label_smoothing": 0.2},  # ignored by TRL: here too
    ],
    ids=["sigmoid", "ipo-truncated", "weighted-list", "alpha-divergence", "sigmoid-smoothing"],
)
@pytest.mark.filterwarnings("ignore:PreferenceTrainer. DPOConfig.label_smoothing")
def test_twenty_step_loss_curve_equals_trl(tmp_path, fields):
    theirs = losses(trl.DPOTrainer, tmp_path, 20, **fields)
    ours = losses(PreferenceTrainer, tmp_path, 20, **fields)
    assert len(theirs) == len(ours) == 20
    assert ours[-1] != pytest.approx(ours[0], abs=1e-3)  # it trained
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5), step
