"""PreferenceTrainer as a TRL user meets it: constructor, reference, data, checks, dropout,
metrics, PEFT. Each surprise found when switching from TRL's DPOTrainer has a test here."""

import math

import pytest

import prefopt.metrics

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from prefopt.cli.task import builtin_model, builtin_tokenizer  # noqa: E402
from prefopt.integrations.data import Truncation, preference_row, tokenize_row  # noqa: E402
from prefopt.integrations.transformers import (  # noqa: E402
    PreferenceCollator,
    PreferenceConfig,
    PreferenceTrainer,
    trainer_settings,
)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

PAIRS = [
    {"prompt": f"copy: {a} {b}", "chosen": f" {b} {b}", "rejected": f" {a}"}
    for a, b in zip("abcdefgh", "hgfedcba")
]
GROUPS = [
    {"prompt": "copy: a b", "responses": [" b b", " a", " c d e"], "rewards": [1.0, 0.0, 0.4]},
    {"prompt": "copy: c", "responses": [" c", " d"], "rewards": [0.9, 0.1]},
]
LOG2 = math.log(2.0)


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def config(tmp_path, **kw):
    options = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=1e-2,
        report_to=[],
        logging_steps=1,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return PreferenceConfig(**{**options, **kw})


class Recording(PreferenceTrainer):
    """Keeps the value of every compute_loss call (logged losses are averaged)."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        self.__dict__.setdefault("losses", []).append(float(loss.detach()))
        return loss


# ---- the reference ------------------------------------------------------------------------


def test_no_ref_model_gives_a_frozen_copy_not_reference_free(tok, tmp_path):
    # Before: ref_model=None silently trained reference-free DPO.
    model = builtin_model(tok, 0)
    t = Recording(model, args=config(tmp_path, loss_type="sigmoid"), train_dataset=PAIRS,
                  processing_class=tok)  # fmt: skip
    assert t.ref_model is not None and t.ref_model is not model
    assert not any(p.requires_grad for p in t.ref_model.parameters())
    before = [p.detach().clone() for p in t.ref_model.parameters()]
    t.train()
    assert t.losses[0] == pytest.approx(LOG2, abs=1e-6)  # identical policy and reference
    assert all(torch.equal(a, b) for a, b in zip(before, t.ref_model.parameters()))


def test_the_policy_as_its_own_reference_is_an_error(tok, tmp_path):
    # Before: accepted, froze the policy, and failed at the first step.
    model = builtin_model(tok, 0)
    with pytest.raises(ValueError, match="ref_model is the policy itself"):
        PreferenceTrainer(model, ref_model=model, args=config(tmp_path), train_dataset=PAIRS,
                          processing_class=tok)  # fmt: skip


def test_reference_free_losses_and_the_explicit_switch_use_no_reference(tok, tmp_path):
    t = PreferenceTrainer(builtin_model(tok, 0), args=config(tmp_path, loss_type="simpo"),
                          train_dataset=PAIRS, processing_class=tok)  # fmt: skip
    assert t.ref_model is None
    t = PreferenceTrainer(builtin_model(tok, 0), args=config(tmp_path, reference_free=True),
                          train_dataset=PAIRS, processing_class=tok)  # fmt: skip
    assert t.ref_model is None


def test_trl_precomputed_columns_are_the_reference(tok, tmp_path):
    # Before: ref_chosen_logps/ref_rejected_logps were ignored.
    rows = [{**r, "ref_chosen_logps": -1.0, "ref_rejected_logps": -50.0} for r in PAIRS[:4]]
    t = Recording(builtin_model(tok, 0), args=config(tmp_path, loss_type="sigmoid"),
                  train_dataset=rows, processing_class=tok)  # fmt: skip
    assert t.ref_model is None  # no copy: the columns are the reference
    batch = t.collator(t.train_dataset)
    assert batch["ref_logps"].tolist() == [[-1.0, -50.0]] * 4
    t.train()
    assert t.losses[0] > 1.0  # the columns, not a copy (log 2), made this loss


def test_precompute_ref_log_probs_equals_the_live_reference(tok, tmp_path):
    live = Recording(builtin_model(tok, 0), ref_model=builtin_model(tok, 1),
                     args=config(tmp_path), train_dataset=GROUPS, processing_class=tok)  # fmt: skip
    live.train()
    pre = Recording(builtin_model(tok, 0), ref_model=builtin_model(tok, 1),
                    args=config(tmp_path, precompute_ref_log_probs=True), train_dataset=GROUPS,
                    processing_class=tok)  # fmt: skip
    assert pre.ref_model is None and all(r["ref_logps"] for r in pre.train_dataset)
    pre.train()
    assert pre.losses[0] == pytest.approx(live.losses[0], rel=1e-6)


# ---- configuration -------------------------------------------------------------------------


def dpo_config(tmp_path, **fields):
    trl = pytest.importorskip("trl")
    return trl.DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **fields)


def test_a_trl_dpo_config_is_read_not_ignored(tok, tmp_path):
    # Before: DPOConfig(beta=0.5, loss_type=["ipo"]) was accepted and the trainer ran MPO.
    args = dpo_config(tmp_path, beta=0.5, loss_type=["ipo"])
    (name, weight, options), = trainer_settings(args).losses  # fmt: skip
    assert (name, weight, options["beta"]) == ("ipo", 1.0, 0.5)
    args = dpo_config(tmp_path, loss_type=["sigmoid", "bco_pair"],
                         loss_weights=[0.8, 0.2], discopop_tau=0.3)  # fmt: skip
    assert [(n, w) for n, w, _ in trainer_settings(args).losses] == [
        ("sigmoid", 0.8),
        ("bco_pair", 0.2),
    ]
    args = dpo_config(tmp_path, loss_type=["discopop"], discopop_tau=0.3)  # fmt: skip
    assert trainer_settings(args).losses[0][2]["tau"] == 0.3


def test_a_dpo_config_passes_each_loss_the_options_its_spec_names(tmp_path):
    from prefopt.losses.registry import specs

    # TRL 1.16's dpo_trainer.py: the loss types that read each DPOConfig field
    f_takers = {"sigmoid", "dpo", "robust", "ipo", "hinge", "exo_pair", "discopop", "sigmoid_norm"}
    takers = {
        ("label_smoothing", 0.2): {"robust", "exo_pair", "aot", "aot_unpaired"},
        ("f_divergence", "js_divergence"): f_takers,
        ("f_alpha", 0.7): f_takers,  # not 0.5, the losses' default
        ("tau", 0.3): {"discopop"},
    }
    fields = dict(
        label_smoothing=0.2,
        f_divergence_type="js_divergence",
        f_alpha_divergence_coef=0.7,
        discopop_tau=0.3,
    )
    for name, found in specs().items():
        if found.refuses_groups(2) or name in ("sigmoid", "dpo"):
            continue  # not trainable on pairs; sigmoid's smoothing warns (test below)
        if "f_divergence" in found.defaults and name not in f_takers:
            continue  # refused, as in TRL (test_an_unsupported_dpo_config_field_raises)
        args = dpo_config(tmp_path, loss_type=[name], **fields)
        (_, _, options), = trainer_settings(args).losses  # fmt: skip
        for (option, value), names in takers.items():
            if option in found.defaults:
                expected = value if name in names else found.defaults[option]
                assert options[option] == expected, (name, option)
    assert {n for n, s in specs().items() if "tau" in s.trl_options} == {"discopop"}


def test_trl_sigmoid_label_smoothing_keeps_trls_meaning_with_a_warning(tmp_path):
    args = dpo_config(tmp_path, label_smoothing=0.1)
    with pytest.warns(UserWarning, match="ignored by TRL 1.16's 'sigmoid'"):
        (_, _, options), = trainer_settings(args).losses  # fmt: skip
    assert options["label_smoothing"] == 0.0
    args = dpo_config(tmp_path, loss_type=["robust"], label_smoothing=0.1)  # fmt: skip
    assert trainer_settings(args).losses[0][2]["label_smoothing"] == 0.1


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"ld_alpha": 0.5}, r"DPOConfig.ld_alpha=0.5 is not supported"),
        ({"use_weighting": True}, r"DPOConfig.use_weighting=True is not supported"),
        ({"sync_ref_model": True}, r"DPOConfig.sync_ref_model=True is not supported"),
        ({"loss_type": ["sigmoid", "sft"]}, r"loss_type 'sft' is not supported"),
        ({"loss_type": ["bco_pair"], "f_divergence_type": "js_divergence"},
         r"f_divergence_type='js_divergence' is not supported for loss 'bco_pair'"),
    ],
)  # fmt: skip
def test_an_unsupported_dpo_config_field_raises_naming_it(tmp_path, fields, match):
    args = dpo_config(tmp_path, **fields)
    with pytest.raises(ValueError, match=match):
        trainer_settings(args)


@pytest.mark.parametrize(
    "options,data,error,match",
    [
        ({"loss_type": "kto"}, PAIRS, ValueError, "'kto' needs unpaired data"),
        ({"loss_type": "mpoo"}, PAIRS, ValueError, "unknown loss 'mpoo'.*Did you mean 'mpo'"),
        ({"loss_type": ["sigmoid", "aot"]}, GROUPS, ValueError,
         "'aot' sorts across the batch and runs on pairs only"),
        ({"loss_type": "sigmoid", "loss_options": {"alpha": 1.0}}, PAIRS, TypeError,
         r"take no option\(s\) \['alpha'\]"),
        ({"beta": -1.0}, PAIRS, ValueError, "beta must be a finite number > 0"),
        ({"loss_type": ["ipo", "hinge"], "loss_weights": [1.0]}, PAIRS, ValueError,
         "loss_weights needs one weight per loss"),
        ({"pairs": "best"}, PAIRS, ValueError, "pairs must be one of 'all', 'best_worst'"),
        ({"truncation_mode": "keep_middle"}, PAIRS, ValueError, "truncation_mode must be"),
    ],
)  # fmt: skip
def test_bad_settings_raise_when_the_trainer_is_built(tok, tmp_path, options, data, error, match):
    # Before: kto, aot on groups, a TRL-style list... passed the constructor, failed at step 1.
    with pytest.raises(error, match=match):
        PreferenceTrainer(builtin_model(tok, 0), args=config(tmp_path, **options),
                          train_dataset=data, processing_class=tok)  # fmt: skip


def test_a_list_of_losses_is_their_weighted_sum(tok, tmp_path):
    from prefopt.integrations.transformers import loss_and_metrics

    args = config(tmp_path, loss_type=["sigmoid", "hinge"], loss_weights=[0.7, 0.3], beta=0.5)
    policy, ref = builtin_model(tok, 0), builtin_model(tok, 1)
    t = PreferenceTrainer(policy, ref_model=ref, args=args, train_dataset=PAIRS,
                          processing_class=tok)  # fmt: skip
    batch = t.collator(PAIRS[:4])
    parts = [loss_and_metrics(policy, batch, ref_model=ref, loss=n, beta=0.5)[0]
             for n in ("sigmoid", "hinge")]  # fmt: skip
    t.model.train()
    expected = 0.7 * parts[0] + 0.3 * parts[1]
    torch.testing.assert_close(t.compute_loss(t.model, batch), expected)
    # the metrics are the first loss's, computed once (not once per loss and thrown away)
    calls = []
    metrics_fn = prefopt.metrics.group_metrics
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prefopt.metrics, "group_metrics",
                      lambda *a, **k: calls.append(1) or metrics_fn(*a, **k))  # fmt: skip
        both = [("sigmoid", 0.7, {"beta": 0.5}), ("hinge", 0.3, {"beta": 0.5})]
        total, metrics, _ = loss_and_metrics(policy, batch, ref_model=ref, loss=both)
    assert len(calls) == 1
    first = loss_and_metrics(policy, batch, ref_model=ref, loss="sigmoid", beta=0.5)[1]
    assert metrics.keys() == first.keys()
    for key in first:
        torch.testing.assert_close(metrics[key], first[key])
    torch.testing.assert_close(total, expected)


# ---- data --------------------------------------------------------------------------------


def test_rows_in_every_trl_format_become_the_same_tokens(tok):
    tok = builtin_tokenizer()
    tok.chat_template = "<bos>{% for m in messages %} {{ m['content'] }} <eos>{% endfor %}"
    chat = {
        "prompt": [{"role": "user", "content": "copy: a b"}],
        "chosen": [{"role": "assistant", "content": "b b"}],
        "rejected": [{"role": "assistant", "content": "a"}],
    }
    implicit_chat = {
        "chosen": chat["prompt"] + chat["chosen"],
        "rejected": chat["prompt"] + chat["rejected"],
    }
    standard = {"prompt": "copy: a b", "chosen": " b b", "rejected": " a"}
    implicit = {"chosen": "copy: a b b b", "rejected": "copy: a b a"}
    rows = [tokenize_row(r, tok) for r in (chat, implicit_chat, standard, implicit)]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    ids = tok("copy: a b b b", add_special_tokens=False)["input_ids"]
    for row in rows:
        assert row["prompt_ids"][0] == bos and row["prompt_ids"][1:4] == ids[:3]
        assert row["response_ids"][0][-1] == eos and row["rewards"] == [1.0, 0.0]
    assert rows[0] == rows[1] and rows[2] == rows[3]
    group = preference_row(
        {"prompt": chat["prompt"], "responses": [chat["chosen"], chat["rejected"]],
         "rewards": [1.0, 0.0]}
    )  # fmt: skip
    assert tokenize_row(group, tok) == rows[0]
    scored = preference_row({**standard, "score_chosen": 8.5, "score_rejected": 2.0})
    assert scored["rewards"] == [8.5, 2.0]


def test_conversational_rows_need_a_chat_template(tok):
    row = {"prompt": [{"role": "user", "content": "copy: a"}],
           "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}  # fmt: skip
    with pytest.raises(ValueError, match="row 3: a conversational row needs a tokenizer with"):
        tokenize_row(row, tok, "row 3")
    with pytest.raises(ValueError, match="all be strings or all be conversations"):
        preference_row({**row, "prompt": "copy: a"})


def test_a_datasets_dataset_of_mixed_rows_trains_without_extra_settings(tok, tmp_path):
    # Before: remove_unused_columns=False and an explicit collator were required.
    datasets = pytest.importorskip("datasets")
    # from_list takes its columns from the first row: every row names them all
    rows = [{**r, "responses": None, "rewards": None} for r in PAIRS[:2]]
    data = datasets.Dataset.from_list(
        rows + [{**g, "chosen": None, "rejected": None} for g in GROUPS]
    )
    args = transformers.TrainingArguments(  # plain TrainingArguments: MPO, TRL's defaults
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
        use_cpu=True, save_strategy="no", logging_steps=1,
    )  # fmt: skip
    assert args.remove_unused_columns  # the Trainer's default, kept
    t = PreferenceTrainer(builtin_model(tok, 0), args=args, train_dataset=data,
                          processing_class=tok)  # fmt: skip
    t.train()
    assert math.isfinite(t.state.log_history[0]["loss"])


def test_a_model_path_loads_model_and_tokenizer(tok, tmp_path):
    # Before: a model given as a path string failed.
    builtin_model(tok, 0).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    t = PreferenceTrainer(str(tmp_path / "m"), args=config(tmp_path, loss_type="sigmoid"),
                          train_dataset=PAIRS)  # fmt: skip
    assert t.processing_class.bos_token_id == tok.bos_token_id
    t.train()
    assert t.state.log_history[0]["loss"] == pytest.approx(LOG2, abs=1e-6)


def test_truncation_keeps_the_prompt_end_and_the_response_start():
    # Before: max_length kept the end of the sequence, dropping <bos> and the prompt start.
    prompt, response = [1, 10, 11, 12, 13], [20, 21, 22, 2]
    assert Truncation(max_length=7)(prompt, response) == (prompt, [20, 21])  # TRL: keep_start
    assert Truncation(max_length=6, mode="keep_end")(prompt, response) == ([12, 13], response)
    assert Truncation(max_prompt_length=3, bos_id=1)(prompt, response) == ([1, 12, 13], response)
    assert Truncation(max_completion_length=2)(prompt, response) == (prompt, [20, 21])
    both = Truncation(max_length=5, max_prompt_length=3, max_completion_length=3, bos_id=1)
    assert both(prompt, response) == ([1, 12, 13], [20, 21])
    assert Truncation(max_length=5).fills(prompt) and not Truncation(max_length=6).fills(prompt)


def test_collated_batch_keeps_bos_and_the_prompt_start(tok):
    batch = PreferenceCollator(tok, max_length=5)([PAIRS[0]])
    ids = batch["input_ids"][0, 0].tolist()
    assert ids[:4] == tok("copy: a h")["input_ids"]  # <bos> copy: a h
    assert batch["labels"][0, 0].tolist()[4:] == [tok.convert_tokens_to_ids("h")]


def test_rows_whose_prompt_fills_max_length_are_dropped_with_a_warning(tok, tmp_path):
    rows = [*PAIRS[:3], {"prompt": "copy: " + "a " * 20, "chosen": " a", "rejected": " b"}]
    with pytest.warns(UserWarning, match="dropped 1 of 4 rows of train_dataset"):
        t = PreferenceTrainer(builtin_model(tok, 0), args=config(tmp_path, max_length=10),
                              train_dataset=rows, processing_class=tok)  # fmt: skip
    assert len(t.train_dataset) == 3


# ---- dropout, metrics, PEFT ----------------------------------------------------------------


def test_dropout_is_off_by_default_as_in_trl(tok, tmp_path):
    # Before: dropout stayed on, and the step-0 loss of identical models was not log 2.
    def dropout_model():
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)  # fmt: skip
        return transformers.GPT2LMHeadModel(cfg)

    on = Recording(dropout_model(), args=config(tmp_path, loss_type="sigmoid",
                   disable_dropout=False), train_dataset=PAIRS, processing_class=tok)  # fmt: skip
    on.train()
    off = Recording(dropout_model(), args=config(tmp_path, loss_type="sigmoid"),
                    train_dataset=PAIRS, processing_class=tok)  # fmt: skip
    off.train()
    assert off.losses[0] == pytest.approx(LOG2, abs=1e-6)
    assert abs(on.losses[0] - LOG2) > 1e-3


def test_metrics_carry_trls_names(tok, tmp_path):
    t = PreferenceTrainer(builtin_model(tok, 0), args=config(tmp_path, loss_type="sigmoid"),
                          train_dataset=PAIRS, eval_dataset=PAIRS[:4],
                          processing_class=tok)  # fmt: skip
    t.train()
    logged = t.state.log_history[0]
    names = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected", "num_tokens", "groups/degenerate"]  # fmt: skip
    assert set(names) <= set(logged)
    batch = t.collator(PAIRS[:4])
    assert logged["num_tokens"] == float(batch["attention_mask"].sum())
    evaluated = t.evaluate()
    assert {"eval_loss", "eval_rewards/margins", "eval_logps/chosen"} <= set(evaluated)


def test_lora_trains_the_adapter_against_the_adapter_free_base(tok, tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           lora_dropout=0.5, init_lora_weights=False)  # fmt: skip
    base = builtin_model(tok, 0)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    t = Recording(base, args=config(tmp_path, loss_type="sigmoid", max_steps=2),
                  train_dataset=PAIRS, processing_class=tok, peft_config=lora)  # fmt: skip
    assert t.ref_model is None  # no copy: the base with the adapter disabled
    batch = t.collator(PAIRS[:4])
    from prefopt.integrations.transformers import batch_logps, reference_logps

    ref = reference_logps(batch, ref_model=t.ref_model, policy=t.model)

    with torch.no_grad():
        plain = builtin_model(tok, 0)
        torch.testing.assert_close(ref, batch_logps(plain.eval(), batch)[0])
    t.train()
    # a random (not zero) adapter: policy and reference differ from step 0, so not log 2
    assert t.losses[0] != pytest.approx(LOG2, abs=1e-4)
    assert math.isfinite(t.losses[1])
    trained = t.model.get_base_model().state_dict()
    for k, v in frozen.items():  # the base weights never move
        key = k.replace("q_proj.weight", "q_proj.base_layer.weight").replace(
            "v_proj.weight", "v_proj.base_layer.weight"
        )
        assert torch.equal(trained[key], v), k
    moved = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert moved and all("lora_" in n for n in moved)


def test_conversational_pairs_and_groups_train(tmp_path):
    tok = builtin_tokenizer()
    tok.chat_template = "<bos>{% for m in messages %} {{ m['content'] }} <eos>{% endfor %}"

    def say(role, text):
        return [{"role": role, "content": text}]

    rows = [
        {"prompt": say("user", "copy: a"), "chosen": say("assistant", "a a"),
         "rejected": say("assistant", "b")},
        {"prompt": say("user", "copy: c"), "responses": [say("assistant", "c"),
         say("assistant", "d"), say("assistant", "c c")], "rewards": [0.5, 0.0, 1.0]},
    ]  # fmt: skip
    t = Recording(builtin_model(tok, 0), args=config(tmp_path), train_dataset=rows,
                  processing_class=tok)  # fmt: skip
    assert [len(r["response_ids"]) for r in t.train_dataset] == [2, 3]
    t.train()
    assert math.isfinite(t.losses[0])


def test_the_group_forward_switches_do_not_change_the_loss(tok, tmp_path):
    losses = []
    for share, fused in ((True, True), (False, False)):
        t = Recording(builtin_model(tok, 0), ref_model=builtin_model(tok, 1),
                      args=config(tmp_path, share_prefix=share, fused=fused, max_steps=2),
                      train_dataset=GROUPS * 2, processing_class=tok)  # fmt: skip
        assert t.settings.logps_options == {"share_prefix": share, "fused": fused}
        t.train()
        losses.append(t.losses)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
