"""The group forward: each prompt once per group (packed, block-causal mask) and log-probs
without the logits tensor, equal to running every response as its own sequence."""

import types

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from prefopt.integrations.data import collate_ids  # noqa: E402
from prefopt.integrations.transformers import batch_logps  # noqa: E402

V = 61


def tiny(arch, dtype, attn="sdpa", **extra):
    torch.manual_seed(0)
    common = dict(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **extra,
    )  # fmt: skip
    config, model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    }[arch]
    if arch.startswith("gemma"):
        common["head_dim"] = 8
    m = model(config(**common)).to(dtype)
    m.config._attn_implementation = attn
    return m


def exact_norms(model):
    """RMSNorm in the model's dtype: Hugging Face's computes in float32 even in a float64
    model, which rounds the gradients of prompt positions that n responses share (about
    1e-7 relative) though the method is exact; with this, float64 agrees to 1e-15."""

    def forward(self, x):
        eps = getattr(self, "variance_epsilon", getattr(self, "eps", None))
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return h * (1.0 + self.weight) if "Gemma" in type(self).__name__ else self.weight * h

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(forward, module)
    return model


def batch(seed=0, n=4):
    """Prompts of different lengths, ragged groups, responses of different lengths."""
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(3, V, (k,), generator=g).tolist()

    groups = [
        (ids(7), [ids(4), ids(1), ids(6), ids(3)][:n], [1.0, 0.0, 0.4, 0.2][:n]),
        (ids(2), [ids(5), ids(2)], [0.3, 0.9]),
        (ids(4), [ids(3), ids(3), ids(1)], [0.5, 0.1, 0.7]),
    ]
    return {k: torch.from_numpy(v) for k, v in collate_ids(groups, pad_id=0).items()}


def one_at_a_time(model, data):
    """Each response as its own unpadded sequence, summed in float64 by a plain loop."""
    out = torch.zeros(data["mask"].shape, dtype=torch.float64)
    for b, i in data["mask"].nonzero().tolist():
        keep = data["attention_mask"][b, i] == 1
        ids, labels = data["input_ids"][b, i][keep], data["labels"][b, i][keep]
        logits = model(input_ids=ids[None]).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        out[b, i] = sum(lp[t - 1, labels[t]] for t in range(1, len(ids)) if labels[t] != -100)
    return out


def grads(model, fn):
    model.zero_grad()
    value = fn()
    weights = torch.linspace(0.5, 1.5, value.numel()).reshape(value.shape)
    (value * weights).sum().backward()
    return value.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


ARCHS = ["llama", "qwen2", "mistral", "gemma"]


@pytest.mark.usefixtures("keys")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_shared_and_fused_equal_the_unshared_path(arch, dtype, rtol):
    model, data = tiny(arch, dtype), batch()
    if dtype == torch.float64:
        exact_norms(model)
    with torch.no_grad():
        expected = one_at_a_time(model, data)
    base, base_grads = grads(
        model, lambda: batch_logps(model, data, share_prefix=False, fused=False)[0]
    )
    torch.testing.assert_close(base.double(), expected, rtol=rtol, atol=rtol)
    for share, fused in ((True, False), (False, True), (True, True)):
        value, value_grads = grads(
            model, lambda: batch_logps(model, data, share_prefix=share, fused=fused)[0]
        )
        assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(value, base, rtol=rtol, atol=rtol)
        assert len(value_grads) == len(base_grads) > 0
        for a, b in zip(value_grads, base_grads):
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))
    assert torch.all(base[~data["mask"]] == 0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tied_embeddings_and_eager_attention(attn):
    model, data = tiny("llama", torch.float32, attn=attn, tie_word_embeddings=True), batch()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    base, base_grads = grads(
        model, lambda: batch_logps(model, data, share_prefix=False, fused=False)[0]
    )
    value, value_grads = grads(model, lambda: batch_logps(model, data)[0])
    torch.testing.assert_close(value, base, rtol=1e-5, atol=1e-5)
    for a, b in zip(value_grads, base_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_a_final_logit_softcap_is_refused_when_fused_and_exact_otherwise():
    model = tiny("gemma2", torch.float64, final_logit_softcapping=5.0, attn_logit_softcapping=None)
    data = batch()
    with pytest.raises(ValueError, match=r"config.final_logit_softcapping=5.0.*pass fused=False"):
        batch_logps(model, data)
    with torch.no_grad():
        shared = batch_logps(model, data, fused=False)[0]
        torch.testing.assert_close(
            shared.double(), one_at_a_time(model, data), rtol=1e-10, atol=1e-10
        )


def test_groups_cut_to_different_prompts_run_unshared():
    # keep_end truncation can leave the responses of one group with different prompt tokens
    model, data = tiny("llama", torch.float64), batch()
    data["input_ids"][0, 1, 0] = (data["input_ids"][0, 1, 0] + 1) % V  # response 1's prompt differs
    with torch.no_grad():
        got = batch_logps(model, data)[0]
        torch.testing.assert_close(got, one_at_a_time(model, data), rtol=1e-10, atol=1e-10)


def test_the_prompt_runs_once_per_group():
    model, data = tiny("llama", torch.float32), batch()
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    with torch.no_grad():
        batch_logps(model, data)
        batch_logps(model, data, share_prefix=False)
    hook.remove()
    # packed: 3 sequences of max(prompt + all responses) tokens; unshared: 3 * 4 rows of T
    assert seen[0] == (3, 7 + 4 + 1 + 6 + 3) and seen[1] == (12, data["input_ids"].shape[-1])


# ---- the shared attention: no (L, L) tensor, the model's own forward, what it cannot serve --


class Shapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every tensor an op creates."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((func.__name__, tuple(t.shape)))
        return out


def long_prompt_batch():
    g = torch.Generator().manual_seed(3)
    groups = [
        (torch.randint(3, V, (80,), generator=g).tolist(),
         [torch.randint(3, V, (k,), generator=g).tolist() for k in (3, 5, 2, 4)],
         [1.0, 0.0, 0.5, 0.2]),
        (torch.randint(3, V, (70,), generator=g).tolist(),
         [torch.randint(3, V, (k,), generator=g).tolist() for k in (4, 1)], [0.3, 0.6]),
    ]  # fmt: skip
    return {k: torch.from_numpy(v) for k, v in collate_ids(groups, pad_id=0).items()}


@pytest.mark.usefixtures("keys")
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_tensor_grows_with_the_packed_length_squared(attn):
    model, data = tiny("llama", torch.float32, attn=attn), long_prompt_batch()
    L = 80 + 3 + 5 + 2 + 4  # the longest packed group, longer than any model dimension
    with Shapes() as mode:
        batch_logps(model, data)[0].sum().backward()
    assert any(L in s for _, s in mode.shapes)  # the packed sequence itself
    square = [(f, s) for f, s in mode.shapes if sum(d >= L for d in s) >= 2]
    assert not square, square[:5]
    # the dense-mask packing this replaced made (B, 1, L, L) masks and scores
    assert model.config._attn_implementation == f"prefopt_group_{attn}"


def test_group_attention_is_transparent_for_every_other_call():
    model, data = tiny("llama", torch.float32), batch()
    ids = data["input_ids"][:, 0]
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=data["attention_mask"][:, 0]).logits
        batch_logps(model, data)  # switches the model to prefopt_group_sdpa
        after = model(input_ids=ids, attention_mask=data["attention_mask"][:, 0]).logits
        assert model.config._attn_implementation == "prefopt_group_sdpa"
        torch.testing.assert_close(after, before, rtol=0, atol=0)
        out = model.generate(ids[:1, :3], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)


@pytest.mark.usefixtures("keys")
def test_gradient_checkpointing_recomputes_the_shared_attention_exactly():
    model, data = exact_norms(tiny("llama", torch.float64)), batch()
    base, base_grads = grads(model, lambda: batch_logps(model, data, share_prefix=False)[0])
    model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    value, value_grads = grads(model, lambda: batch_logps(model, data)[0])
    torch.testing.assert_close(value, base, rtol=1e-10, atol=1e-10)
    for a, b in zip(value_grads, base_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * float(b.abs().max()))


def test_a_sliding_window_shorter_than_a_sequence_runs_unshared_and_exact():
    model, data = tiny("mistral", torch.float64, sliding_window=5), batch()
    with pytest.warns(UserWarning, match=r"config.sliding_window=5 < \d+ tokens"):
        with torch.no_grad():
            got = batch_logps(model, data)[0]
    torch.testing.assert_close(got, one_at_a_time(model, data), rtol=1e-10, atol=1e-10)
    assert model.config._attn_implementation == "sdpa"


# ---- the data's one way through a step: packed once, at collation ---------------------------


def packed_batch(seed=0, bucket=None):
    from prefopt.layout import pack_groups

    data = batch(seed)
    numpy = {k: v.numpy() for k, v in data.items()}
    packed = pack_groups(numpy, pad_to_multiple_of=bucket)
    return {**data, "packed": packed.map(torch.from_numpy)}


class Syncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that read a value back to the host (or need one to size their output)."""

    READ_BACK = {"_local_scalar_dense", "nonzero", "masked_select", "item", "is_nonzero"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.READ_BACK:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_a_collated_batch_trains_a_step_without_reading_a_value_back(monkeypatch):
    import prefopt.backends.torch.ops

    from prefopt.integrations.transformers import loss_and_metrics

    # value checks read only arrays on the host (free there): take the tensors for a GPU's
    monkeypatch.setattr(prefopt.backends.torch.ops, "on_host", lambda x: False)

    model, reference = tiny("llama", torch.float32), tiny("llama", torch.float32)
    data = packed_batch()
    batch_logps(model, data)  # the first call sets the attention implementation
    batch_logps(reference, data)
    with Syncs() as mode:  # the whole step: both forwards, the loss, its metrics, backward
        loss, metrics, _ = loss_and_metrics(model, data, ref_model=reference)
        loss.backward()
    assert mode.seen == [] and set(metrics) >= {"rewards/margins", "groups/degenerate"}
    with Syncs() as mode:  # a batch without its layout is packed now, reading lengths back
        batch_logps(model, batch())
    assert mode.seen


def test_the_collators_layout_equals_the_one_packed_in_the_forward():
    model = exact_norms(tiny("llama", torch.float64))
    a, a_grads = grads(model, lambda: batch_logps(model, packed_batch())[0])
    b, b_grads = grads(model, lambda: batch_logps(model, batch())[0])
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(a_grads, b_grads))
    # sizes padded to buckets (as for a compiled step): the padded tokens belong to no one
    c, c_grads = grads(model, lambda: batch_logps(model, packed_batch(bucket=8))[0])
    assert packed_batch(bucket=8)["packed"].rows.shape[0] % 8 == 0
    torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-10)
    for x, y in zip(c_grads, a_grads):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def tool_batch(flags=True):
    """Multi-turn responses: a tool's result inside them (flag 0) is context, not scored."""
    g = torch.Generator().manual_seed(3)

    def ids(k):
        return torch.randint(3, V, (k,), generator=g).tolist()

    groups = [(ids(5), [ids(9), ids(4), ids(7)], [1.0, 0.0, 0.5]), (ids(3), [ids(6)], [0.2])]
    masks = [
        [[1, 1, 0, 0, 0, 1, 1, 0, 1], [1, 1, 1, 1], [1, 0, 0, 1, 1, 1, 0]],
        [[1, 1, 1, 0, 0, 1]],
    ]
    rows = collate_ids(groups, pad_id=0, label_masks=masks if flags else None)
    return {k: torch.from_numpy(v) for k, v in rows.items()}, masks


@pytest.mark.usefixtures("keys")
def test_tool_result_tokens_are_context_not_scored_on_every_path():
    from prefopt.layout import pack_groups

    model = exact_norms(tiny("llama", torch.float64))
    data, masks = tool_batch()
    assert pack_groups(data) is not None  # the shared path runs, holes and all
    with torch.no_grad():
        expected = one_at_a_time(model, data)  # the full sequence read, flagged tokens summed
        everything = one_at_a_time(model, tool_batch(flags=False)[0])
    assert not torch.allclose(expected[data["mask"]], everything[data["mask"]])
    base, base_grads = grads(model, lambda: batch_logps(model, data, share_prefix=False)[0])
    torch.testing.assert_close(base, expected, rtol=1e-10, atol=1e-10)
    value, value_grads = grads(model, lambda: batch_logps(model, data)[0])
    torch.testing.assert_close(value, base, rtol=1e-10, atol=1e-10)
    for a, b in zip(value_grads, base_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * float(b.abs().max()))
    lengths = batch_logps(model, data)[1]
    assert lengths[data["mask"]].tolist() == [sum(m) for group in masks for m in group]


def test_label_masks_of_the_wrong_length_or_all_zero_are_refused():
    groups = [([5, 6], [[7, 8, 9]], [1.0])]
    with pytest.raises(ValueError, match=r"label_masks\[0\] must hold one flag per token"):
        collate_ids(groups, pad_id=0, label_masks=[[[1, 1]]])
    with pytest.raises(ValueError, match="response 0 has no counted token left"):
        collate_ids(groups, pad_id=0, label_masks=[[[0, 0, 0]]])
