"""Mixed precision as GPU users run it, checked on the CPU: the compute dtype a user asks
for (accelerate's autocast, ``bf16=True``) holds on every call of every path, the model
keeps its wrappers and hooks, and no matmul over the vocabulary runs in float32 (see the
"Producing log-probabilities" docs page)."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from prefopt.backends.torch import fused_linear_logps  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from prefopt.cli.task import builtin_model, builtin_tokenizer  # noqa: E402
from prefopt.integrations.data import collate_ids  # noqa: E402
from prefopt.integrations.transformers import (  # noqa: E402
    PreferenceConfig,
    PreferenceTrainer,
    batch_logps,
    precompute_ref_logps,
)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

V = 61
GROUPS = [
    {"prompt": "copy: a b", "responses": [" b b", " a", " c d e"], "rewards": [1.0, 0.0, 0.4]},
    {"prompt": "copy: c", "responses": [" c", " d"], "rewards": [0.9, 0.1]},
]


class Matmuls(TorchDispatchMode):
    """Records (op, operand dtypes, operand shapes) of every matmul dispatched."""

    OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.OPS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.seen.append((name, [t.dtype for t in tensors], [tuple(t.shape) for t in tensors]))
        return func(*args, **(kwargs or {}))

    def over(self, size):
        """The matmuls with an operand that has a dimension of ``size``."""
        return [s for s in self.seen if any(size in shape for shape in s[2])]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Leave accelerate's process-wide state as unset as it came, for the tests after these."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def bf16(model):
    """``model`` prepared by a fresh ``Accelerator(mixed_precision="bf16", cpu=True)`` (the
    accelerate state is a process-wide singleton that other tests may have set)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return accelerate.Accelerator(mixed_precision="bf16", cpu=True).prepare(model)


def tiny(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).to(dtype)


def batch():
    g = torch.Generator().manual_seed(0)

    def ids(k):
        return torch.randint(3, V, (k,), generator=g).tolist()

    groups = [
        (ids(6), [ids(4), ids(2), ids(5)], [1.0, 0.0, 0.4]),
        (ids(3), [ids(3), ids(1)], [0.3, 0.9]),
    ]
    return {k: torch.from_numpy(v) for k, v in collate_ids(groups, pad_id=0).items()}


def record_dtypes(model):
    """A forward hook on the first decoder layer's MLP output projection: its dtypes."""
    seen = []
    layer = model.get_decoder().layers[0].mlp.down_proj
    return seen, layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))


def hooks_of(model):
    return [
        (name, dict(m._forward_hooks), dict(m._forward_pre_hooks))
        for name, m in model.named_modules()
    ]


# ---- the kernel ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [5, 64])
def test_fused_bf16_runs_every_vocabulary_matmul_in_bf16(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, 16) / 4).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, V, (3, 7))
    labels[:, :2] = -100
    with Matmuls() as mode:
        out = fused_linear_logps(hidden, weight, labels, chunk_size=chunk, keep_logits_bytes=0)
        (out * torch.linspace(0.5, 1.5, 7)).sum().backward()
    vocab = mode.over(V)
    assert len(vocab) >= 3  # forward, backward's recompute, grad of hidden, grad of weight
    assert all(d == torch.bfloat16 for _, dtypes, _ in vocab for d in dtypes), vocab
    assert out.dtype == torch.float32
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    # the same bf16 matmuls written plainly: logits in bf16, log-softmax in float32
    h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    logits = (h @ w.T).float()
    picked = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    expected = torch.where(labels != -100, picked, 0.0)
    (expected * torch.linspace(0.5, 1.5, 7)).sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(hidden.grad, h.grad, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(weight.grad, w.grad, rtol=2e-2, atol=2e-3)


def test_fused_under_autocast_casts_float32_inputs_like_a_linear_layer():
    torch.manual_seed(0)
    hidden = torch.randn(20, 16, requires_grad=True)
    weight = torch.randn(V, 16, requires_grad=True)
    labels = torch.randint(0, V, (20,))
    with Matmuls() as mode, torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear_logps(hidden, weight, labels, chunk_size=6)
    out.sum().backward()
    assert all(d == torch.bfloat16 for _, dtypes, _ in mode.over(V) for d in dtypes)
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32  # the master weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(hidden, weight)
    expected = logits.float().log_softmax(-1).gather(-1, labels[:, None])[:, 0]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_kept_logits_give_the_same_bits_as_recomputed_ones():
    torch.manual_seed(0)
    hidden = torch.randn(40, 16, dtype=torch.bfloat16)
    weight = torch.randn(V, 16, dtype=torch.bfloat16)
    labels = torch.randint(0, V, (40,))
    upstream = torch.rand(40)
    results = []
    for keep in (0, 2 * 7 * V, 2**30):  # none, the first 2 chunks, all
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = fused_linear_logps(h, w, labels, chunk_size=7, keep_logits_bytes=keep)
        (out * upstream).sum().backward()
        results.append((out, h.grad, w.grad))
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            assert torch.equal(a, b)


def test_a_second_backward_recomputes_the_kept_logits():
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(V, 8, requires_grad=True)
    labels = torch.randint(0, V, (10,))
    out = fused_linear_logps(hidden, weight, labels, chunk_size=4, keep_logits_bytes=2**30)
    out.sum().backward(retain_graph=True)
    first = hidden.grad.clone()
    hidden.grad = None
    out.sum().backward()
    assert torch.equal(hidden.grad, first)


# ---- the model's compute dtype, its wrappers and hooks --------------------------------------


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_accelerate_bf16_holds_on_every_call(fused, share_prefix):
    # Before: the fused path replaced and deleted model.forward, removing accelerate's
    # autocast wrapper: every call after the first ran in float32.
    model = bf16(tiny())
    forward, hooks = model.forward, hooks_of(model)
    seen, handle = record_dtypes(model)
    data = batch()
    with Matmuls() as mode:
        for _ in range(2):
            logps, _ = batch_logps(model, data, fused=fused, share_prefix=share_prefix)
            logps.sum().backward()
    handle.remove()
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert model.forward is forward and hooks_of(model) == hooks
    assert mode.over(V) and all(
        d == torch.bfloat16 for _, dtypes, _ in mode.over(V) for d in dtypes
    ), mode.over(V)
    assert logps.dtype == torch.float32 and torch.isfinite(logps).all()


def test_fp16_autocast_holds_too():
    model = tiny()
    seen, handle = record_dtypes(model)
    data = batch()
    with torch.autocast("cpu", dtype=torch.float16):
        for _ in range(2):
            batch_logps(model, data)[0].sum().backward()
    handle.remove()
    assert seen == [torch.float16, torch.float16]


def test_a_bf16_model_keeps_bf16_and_the_fused_path_agrees_with_the_plain_one():
    model, data = tiny(torch.bfloat16), batch()
    with Matmuls() as mode:
        fused, _ = batch_logps(model, data)
    plain, _ = batch_logps(model, data, fused=False, share_prefix=True)
    assert all(d == torch.bfloat16 for _, dtypes, _ in mode.over(V) for d in dtypes)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)


def layer_dtypes_in_training(trainer_class, tmp_path, **fields):
    """The compute dtype of the first decoder layer of the policy and of the reference, at
    every forward of a 2-step bf16 run on the CPU."""
    trl = pytest.importorskip("trl")
    tok = builtin_tokenizer()
    policy, reference = builtin_model(tok, 0), builtin_model(tok, 0)
    policy_seen, h1 = record_dtypes(policy)
    ref_seen, h2 = record_dtypes(reference)
    options = dict(
        output_dir=str(tmp_path / trainer_class.__name__), per_device_train_batch_size=2,
        max_steps=2, bf16=True, use_cpu=True, report_to=[], save_strategy="no",
        disable_tqdm=True, max_length=None, **fields,
    )  # fmt: skip
    args = (trl.DPOConfig if trainer_class is trl.DPOTrainer else PreferenceConfig)(**options)
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    rows = datasets.Dataset.from_list(
        [{"prompt": "copy: a b", "chosen": " b b", "rejected": " a"}] * 4
    )
    trainer = trainer_class(
        model=policy, ref_model=reference, args=args, train_dataset=rows, processing_class=tok
    )
    trainer.train()
    h1.remove()
    h2.remove()
    return policy_seen, ref_seen


def test_preference_trainer_bf16_trains_in_bf16_as_trls_dpo_trainer_does(tmp_path):
    trl = pytest.importorskip("trl")
    ours = layer_dtypes_in_training(PreferenceTrainer, tmp_path, loss_type="sigmoid")
    theirs = layer_dtypes_in_training(trl.DPOTrainer, tmp_path, loss_type=["sigmoid"])
    assert ours[0] == [torch.bfloat16] * 2  # the policy, both steps
    print("policy, reference compute dtypes: ours", ours, "TRL's", theirs)
    assert set(ours[1]) == set(theirs[1]) and set(ours[0]) == set(theirs[0])


def test_precomputed_reference_runs_under_the_models_autocast():
    model = bf16(tiny())
    forward = model.forward
    seen, handle = record_dtypes(model)
    tok = builtin_tokenizer()
    from prefopt.integrations.transformers import PreferenceCollator

    rows = precompute_ref_logps(model, GROUPS, PreferenceCollator(tok), batch_size=1)
    handle.remove()
    assert seen == [torch.bfloat16, torch.bfloat16] and model.forward is forward
    assert [len(r["ref_logps"]) for r in rows] == [3, 2]
