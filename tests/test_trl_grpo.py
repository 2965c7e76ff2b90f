"""GroupPreferenceGRPOTrainer: MPO and the other group losses on TRL's GRPO engine (see the
"On-policy at scale with TRL" docs page). Tiny models built in code, transformers
generation on the CPU; vLLM is not on this machine, so its settings are checked to reach TRL
untouched."""

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import prefopt  # noqa: E402
from prefopt.cli.task import builtin_model, builtin_tokenizer  # noqa: E402
from prefopt.integrations.transformers import batch_logps  # noqa: E402
from prefopt.integrations.trl import GroupPreferenceGRPOTrainer  # noqa: E402

transformers.logging.set_verbosity_error()
datasets.disable_progress_bars()

PROMPTS = datasets.Dataset.from_list([{"prompt": f"copy: {a} {b}"} for a, b in zip("abcd", "hgfe")])


def length_reward(prompts, completions, **kwargs):
    """A reward TRL can call: distinct values, so that groups split."""
    return [len(c) / 10 + 0.01 * i for i, c in enumerate(completions)]


def config(tmp_path, **kw):
    options = dict(
        output_dir=str(tmp_path / "out"), num_generations=4, per_device_train_batch_size=8,
        max_completion_length=5, max_steps=1, learning_rate=1e-2, report_to=[], use_cpu=True,
        logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    return trl.GRPOConfig(**{**options, **kw})


class Recording(GroupPreferenceGRPOTrainer):
    """Keeps each compute_loss call's inputs, the batch prefopt built, and the loss."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        seen = self.__dict__.setdefault("seen", [])
        seen.append((inputs, self._group_batch(inputs), float(loss.detach())))
        return loss


def trainer(tmp_path, cls=Recording, reward=length_reward, model=None, **kw):
    tok = builtin_tokenizer()
    keys = ("loss", "loss_options", "pairs", "peft_config", "reward_processing_classes",
            "rollout_func")  # fmt: skip
    options = {k: kw.pop(k) for k in keys if k in kw}
    return cls(
        model if model is not None else builtin_model(tok, 0), reward_funcs=reward,
        args=config(tmp_path, **kw), train_dataset=PROMPTS, processing_class=tok, **options,
    )  # fmt: skip


def test_the_first_loss_is_mpo_of_the_raw_rewards(tmp_path):
    t = trainer(tmp_path)
    t.train()
    inputs, batch, loss = t.seen[0]
    # the rewards TRL computed, combined, not GRPO's standardised advantages
    assert not torch.allclose(inputs["raw_rewards"], inputs["advantages"])
    texts = t.processing_class.batch_decode(inputs["completion_ids"], skip_special_tokens=True)
    assert len(texts) == 8 and batch["rewards"].shape == (2, 4)
    with torch.no_grad():
        logps, lengths = batch_logps(t.ref_model, batch)
    # policy = reference at step 0: MPO is a function of the rewards alone
    expected = prefopt.batch_loss("mpo", logps, logps, batch["rewards"], mask=batch["mask"])
    assert loss == pytest.approx(float(expected), abs=1e-6)
    # and MPO of zero log-ratios, written out: logsumexp(log w) over all - over the chosen
    by_hand = 0.0
    for r in batch["rewards"].double():
        d = r - r.mean()
        w = d.abs()
        above = r > r.mean()
        by_hand += float(torch.logsumexp(w, 0) - torch.logsumexp(w[above], 0)) / 2
    assert loss == pytest.approx(by_hand, abs=1e-6)
    # the completions table's "advantage": the deviation from the group mean, MPO's split
    logged = torch.tensor(list(t._logs["advantages"]))
    r = inputs["raw_rewards"].view(-1, 4)
    deviation = (r - r.mean(1, keepdim=True)).view(-1)  # the groups shuffled as trained
    assert torch.allclose(logged.sort().values, deviation.sort().values, atol=1e-6)


def test_groups_stay_whole_across_micro_batches_and_shuffling(tmp_path):
    # 2 micro-batches of 2 groups per generation: GRPO's own shuffle would mix the groups
    t = trainer(tmp_path, per_device_train_batch_size=8, steps_per_generation=2, max_steps=2)
    t.train()
    assert len(t.seen) == 2
    for inputs, batch, _ in t.seen:
        prompts = inputs["prompt_ids"].reshape(2, 4, -1)
        assert torch.equal(prompts, prompts[:, :1].expand_as(prompts))  # one prompt per group
        assert batch["input_ids"].shape[:2] == (2, 4)


def test_the_reference_is_a_frozen_copy_whatever_grpo_beta_says(tmp_path):
    t = trainer(tmp_path, max_steps=3, learning_rate=5e-2)
    assert t.args.beta == 0.0 and t.ref_model is not None and t.ref_model is not t.model
    before = [p.detach().clone() for p in t.ref_model.parameters()]
    t.train()
    assert all(torch.equal(a, b) for a, b in zip(before, t.ref_model.parameters()))
    _, batch, _ = t.seen[-1]
    with torch.no_grad():  # the policy moved, the reference did not: their log-probs differ
        policy, _ = batch_logps(t.model, batch)
        reference, _ = batch_logps(t.ref_model, batch)
    assert not torch.allclose(policy, reference)


def test_a_reward_model_trains_too(tmp_path):
    tok = builtin_tokenizer()
    config_rm = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_labels=1, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(1)
    reward_model = transformers.LlamaForSequenceClassification(config_rm)
    t = trainer(tmp_path, reward=[reward_model], max_steps=2, reward_processing_classes=[tok])
    t.train()
    assert len(t.seen) == 2 and all(math.isfinite(loss) for _, _, loss in t.seen)
    assert any(float(b["rewards"].std()) > 0 for _, b, _ in t.seen)


def test_the_copy_task_learns_on_the_grpo_engine():
    import examples.mpo_trl_grpo as example

    before, after = example.train(steps=120)
    assert after > before + 0.1, (before, after)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"loss": "nope"}, r"loss: unknown loss 'nope'"),
        ({"loss": "kto"}, r"needs unpaired data"),
        ({"loss": "aot"}, r"sorts across the batch .* num_generations=2"),
        ({"loss_options": {"beta": -1.0}}, r"beta"),
        # a generation batch of 12 (TRL accepts it) in micro-batches of 6: a group would split
        ({"per_device_train_batch_size": 6, "steps_per_generation": 2}, r"size \(6\) must be a"),
    ],
)
def test_refusals_say_which_setting_to_change(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, **kw)


def test_an_option_the_loss_does_not_take_is_refused(tmp_path):
    with pytest.raises(TypeError, match="tau"):
        trainer(tmp_path, loss_options={"tau": 1.0})


def test_other_group_losses_and_a_pairwise_one_train(tmp_path):
    for loss in ("infonca", "plackett_luce", "sigmoid"):
        t = trainer(tmp_path, loss=loss)
        t.train()
        assert math.isfinite(t.seen[0][2]), loss


def test_lora_trains_against_the_adapter_free_base(tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           init_lora_weights=False)  # fmt: skip
    t = trainer(tmp_path, peft_config=lora, max_steps=2)
    assert t.ref_model is None  # the base with the adapter disabled
    t.train()
    _, batch, loss = t.seen[0]
    # a random adapter: policy and reference differ from the first step
    with torch.no_grad():
        ref = prefopt.integrations.transformers.reference_logps(batch, policy=t.model)
        plain = batch_logps(t.model, batch)[0]
    assert ref is not None and not torch.allclose(ref, plain)
    assert all("lora_" in n for n, p in t.model.named_parameters() if p.requires_grad)


def test_vllm_settings_reach_trl_untouched(tmp_path):
    # No code of prefopt's sits between TRL's generation and its outputs...
    for name in ("_generate", "_generate_single_turn", "_tokenize_prompts", "_calculate_rewards"):
        ours = getattr(GroupPreferenceGRPOTrainer, name)
        theirs = getattr(trl.GRPOTrainer, name)
        assert ours is theirs or name == "_calculate_rewards", name
    # ...and vLLM's settings get TRL's own answer (here: vllm is not installed)
    kw = dict(use_vllm=True, vllm_mode="colocate")
    with pytest.raises(Exception) as theirs:
        trl.GRPOTrainer(builtin_model(builtin_tokenizer(), 0), reward_funcs=length_reward,
                        args=config(tmp_path, **kw), train_dataset=PROMPTS,
                        processing_class=builtin_tokenizer())  # fmt: skip
    with pytest.raises(type(theirs.value)) as ours:
        trainer(tmp_path, **kw)
    assert str(ours.value) == str(theirs.value)


def test_a_reward_function_with_the_wrong_count_gets_trls_one_line(tmp_path):
    def short(prompts, completions, **kwargs):
        return [1.0]

    t = trainer(tmp_path, reward=short)
    with pytest.raises(ValueError, match=r"'short' returned 1 rewards, but 8 were expected"):
        t.train()


def test_nan_rewards_leave_their_completions_out_of_the_group(tmp_path):
    def some_nan(prompts, completions, **kwargs):
        return [None if i % 4 == 3 else float(i) for i in range(len(completions))]

    t = trainer(tmp_path, reward=some_nan)
    t.train()
    _, batch, loss = t.seen[0]
    assert batch["mask"].sum(-1).tolist() == [3, 3] and math.isfinite(loss)


def test_a_model_without_a_tokenizer_is_refused(tmp_path):
    model = builtin_model(builtin_tokenizer(), 0)
    with pytest.raises(ValueError, match="pass processing_class"):
        GroupPreferenceGRPOTrainer(model, reward_funcs=length_reward, args=config(tmp_path),
                                   train_dataset=PROMPTS)  # fmt: skip


def tool_rollout(prompts, trainer):
    """Multi-turn completions from TRL's ``rollout_func``: the model's words, a tool's result
    (``env_mask`` 0: read, not written), the model's words again, then eos."""
    tok = trainer.processing_class
    out = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "env_mask": []}
    for k, p in enumerate(prompts):
        said = tok(" ".join("ab"[: 1 + k % 2]), add_special_tokens=False)["input_ids"]
        result = tok("h g f", add_special_tokens=False)["input_ids"]
        after = tok("c", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out["prompt_ids"].append(tok(p)["input_ids"])
        out["completion_ids"].append(said + result + after)
        out["env_mask"].append([1] * len(said) + [0] * len(result) + [1] * len(after))
        out["logprobs"].append([0.0] * len(out["completion_ids"][-1]))
    return out


def test_tool_results_are_read_but_not_scored(tmp_path):
    t = trainer(tmp_path, rollout_func=tool_rollout, max_steps=2)
    before = [p.detach().clone() for p in t.model.parameters()]
    t.train()
    inputs, batch, loss = t.seen[0]
    assert "tool_mask" in inputs and math.isfinite(loss)
    # each completion's labels are its own tokens where TRL's tool_mask is 1, in order
    expected = sorted(
        row[keep & (flag == 1)].tolist()
        for row, keep, flag in zip(
            inputs["completion_ids"], inputs["completion_mask"].bool(), inputs["tool_mask"]
        )
    )
    labels = batch["labels"][batch["mask"]]
    assert sorted(row[row != -100].tolist() for row in labels) == expected
    # and a tool's result is in the sequence (attended, read by what follows), unlabelled
    attended = batch["attention_mask"][batch["mask"]].sum(-1)
    assert torch.all(attended >= (labels != -100).sum(-1) + 3 + 1)  # 3 result tokens, prompt
    from prefopt.layout import pack_groups

    assert pack_groups(batch) is not None  # still the shared group forward
    assert any(not torch.equal(a, p) for a, p in zip(before, t.model.parameters()))


def test_a_group_with_every_completion_masked_counts_for_nothing(tmp_path):
    def no_eos(prompts, trainer):  # every completion truncated: TRL masks them all
        out = tool_rollout(prompts, trainer)
        out["completion_ids"] = [ids[:-1] for ids in out["completion_ids"]]
        out["env_mask"] = [m[:-1] for m in out["env_mask"]]
        out["logprobs"] = [lp[:-1] for lp in out["logprobs"]]
        return out

    t = trainer(tmp_path, rollout_func=no_eos, mask_truncated_completions=True)
    t.train()
    _, batch, loss = t.seen[0]
    assert batch["mask"].sum(-1).tolist() == [1, 1] and loss == 0.0


@pytest.mark.parametrize("pairs", ["best_worst", "all"])
def test_pairs_chooses_the_pairs_of_a_pairwise_loss(tmp_path, pairs):
    # the policy moved off its reference before training (at policy = reference every
    # pairwise loss is log 2, whatever the pairs), and a rate of 0 keeps it there
    t = trainer(tmp_path, loss="sigmoid", pairs=pairs, learning_rate=0.0)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in t.model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    t.train()
    _, batch, loss = t.seen[0]
    with torch.no_grad():
        h = (batch_logps(t.model, batch)[0] - batch_logps(t.ref_model, batch)[0]).double()

    def dpo(g, w, j):  # written out: DPO's -log sigmoid(beta (h_w - h_l)), beta 0.1
        return -math.log(1 / (1 + math.exp(-0.1 * float(h[g, w] - h[g, j]))))

    by_pairs = {"best_worst": 0.0, "all": 0.0}
    for g in range(h.shape[0]):
        r = batch["rewards"][g].tolist()
        by_pairs["best_worst"] += dpo(g, r.index(max(r)), r.index(min(r))) / h.shape[0]
        above = [i for i in range(len(r)) if r[i] > sum(r) / len(r)]
        below = [i for i in range(len(r)) if i not in above]
        pairs_all = [dpo(g, w, j) for w in above for j in below]
        by_pairs["all"] += sum(pairs_all) / len(pairs_all) / h.shape[0]
    assert abs(by_pairs["best_worst"] - by_pairs["all"]) > 1e-4  # the test can tell them apart
    assert loss == pytest.approx(by_pairs[pairs], abs=1e-6)


@pytest.mark.parametrize(
    "kw, message",
    [({"pairs": "best"}, r"pairs must be 'all' or 'best_worst'"),
     ({"pairs": "best_worst"}, r"pairs='best_worst' is for a pairwise loss; 'mpo' takes")],
)  # fmt: skip
def test_pairs_refusals(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, **kw)
