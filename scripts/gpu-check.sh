#!/usr/bin/env bash
# GPU check: the parity suite with torch on CUDA and JAX on the GPU, the group forward and
# bf16 training on CUDA, then the loss, log-prob and step benchmarks on the GPU (bf16,
# vocabulary 128k). Meant to finish within 10 minutes on one H100/H200.
#
# The lent GPU machine has torch and jax but not array-api-compat / array-api-strict; carry
# them as wheels (pure Python). Here, once, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl \
#       array-api-compat==1.16.0 array-api-strict==2.6.1
# Optional, compared where they install: liger-kernel (Triton; pure Python) and flash-attn
# (a wheel for the machine's torch and CUDA); each step says when one is missing.
# Then run `bash scripts/gpu-check.sh` there with .whl carried. Output also goes to $OUT.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$(mktemp -d)}

if ls "$repo"/.whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$repo"/.whl/*.whl
  export PYTHONPATH=/tmp/site
fi

# Lay out the package as the wheel does (backends/ -> prefopt/backends), without a build.
stage=$(mktemp -d)
cp -r "$repo/prefopt" "$stage/prefopt"
cp -r "$repo/backends" "$stage/prefopt/backends"
cp -r "$repo/tests" "$repo/benchmarks" "$repo/pyproject.toml" "$stage/"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
cd "$stage"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch, jax; print('torch', torch.__version__, torch.cuda.get_device_name()); print('jax', jax.__version__, jax.devices())"

  echo "== parity suite: torch-cuda and jax-gpu"
  PREFOPT_BACKENDS=torch-cuda,jax-gpu timeout 300 python3 -m pytest -q -p no:cacheprovider \
    tests/test_dpo.py tests/test_mpo.py tests/test_ops.py tests/test_catalogue.py tests/test_torch.py \
    || echo '!! parity suite failed'

  echo "== fused log-probs on CUDA: values and gradients against the naive path"
  timeout 120 python3 - <<'PY' || echo '!! fused check failed'
import torch, prefopt
from prefopt.backends.torch import fused_linear_logps
torch.manual_seed(0)
h = torch.randn(4, 256, 512, device="cuda", dtype=torch.float64, requires_grad=True)
w = torch.randn(1000, 512, device="cuda", dtype=torch.float64, requires_grad=True)
y = torch.randint(0, 1000, (4, 256), device="cuda")
a = fused_linear_logps(h, w, y, chunk_size=300); a.sum().backward(); ga = (h.grad, w.grad)
h.grad = w.grad = None
b = prefopt.token_logps(h @ w.T, y); b.sum().backward()
for x, z in zip((a, *ga), (b, h.grad, w.grad)):
    torch.testing.assert_close(x, z, rtol=1e-10, atol=1e-10)
print("fused == naive on CUDA (float64)")
PY

  echo "== the group forward on CUDA: exact in float64, sdpa (and flash_attention_2 if it installs)"
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_group_forward.py \
    tests/test_mixed_precision.py || echo '!! group forward / mixed precision tests (CPU tensors) failed'
  timeout 120 python3 - <<'PY' || echo '!! group forward on CUDA failed'
import torch, transformers
from prefopt.integrations.data import collate_ids, pack_groups
from prefopt.integrations.transformers import batch_logps
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
g = torch.Generator().manual_seed(0)
ids = lambda k: torch.randint(3, 101, (k,), generator=g).tolist()
groups = [(ids(40), [ids(5), ids(1), ids(7)], [1.0, 0.0, 0.5]), (ids(9), [ids(3), ids(4)], [0.2, 0.9])]
b = collate_ids(groups, pad_id=0); b.update(pack_groups(b))
batch = {k: torch.from_numpy(v).cuda() for k, v in b.items()}
impls = ["sdpa"]
try:
    import flash_attn  # noqa: F401
    impls.append("flash_attention_2")
except ImportError:
    print("flash_attn not installed: flash_attention_2 skipped")
for impl, dtype, tol in [("sdpa", torch.float64, 1e-10)] + [(i, torch.bfloat16, 2e-2) for i in impls]:
    model = transformers.LlamaForCausalLM(cfg).to("cuda", dtype)
    model.config._attn_implementation = impl if dtype != torch.float64 else "sdpa"
    shared = batch_logps(model, batch)[0]
    base = batch_logps(model, batch, share_prefix=False, fused=False)[0]
    torch.testing.assert_close(shared.double(), base.double(), rtol=tol, atol=tol)
    print(impl, dtype, "shared == unshared on CUDA", model.config._attn_implementation)
PY

  echo "== PreferenceTrainer(bf16=True) on CUDA: 2 steps, the compute dtype of a decoder layer"
  timeout 120 python3 - <<'PY' || echo '!! bf16 trainer on CUDA failed'
import torch, transformers
from prefopt.cli.task import builtin_model, builtin_tokenizer
from prefopt.integrations.transformers import PreferenceConfig, PreferenceTrainer
transformers.logging.set_verbosity_error()
tok = builtin_tokenizer(); model = builtin_model(tok, 0).cuda()
seen = []
model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
rows = [{"prompt": "copy: a b", "responses": [" b b", " a", " c"], "rewards": [1.0, 0.0, 0.5]}] * 4
args = PreferenceConfig(output_dir="/tmp/prefopt-bf16", per_device_train_batch_size=2,
    max_steps=2, bf16=True, report_to=[], save_strategy="no", disable_tqdm=True)
PreferenceTrainer(model, args=args, train_dataset=rows, processing_class=tok).train()
print("compute dtypes of decoder layer 0 (policy and reference):", seen)
assert set(seen) == {torch.bfloat16}, seen
PY

  echo "== MPO on TRL's GRPO engine with vLLM (colocate), 3 steps, if vllm is installed"
  timeout 240 python3 - <<'PY' || echo '!! GRPO engine with vLLM failed'
import importlib.util
if importlib.util.find_spec("vllm") is None:
    print("vllm is not installed: the vLLM colocate run is skipped")
    raise SystemExit(0)
import datasets, trl
from prefopt.cli.task import builtin_model, builtin_tokenizer, copy_task_prompts, copy_task_reward
from prefopt.integrations.trl import GroupPreferenceGRPOTrainer
tok = builtin_tokenizer(); builtin_model(tok, 0).save_pretrained("/tmp/prefopt-tiny")
tok.save_pretrained("/tmp/prefopt-tiny")
reward = lambda prompts, completions, **kw: [copy_task_reward(p, c) for p, c in zip(prompts, completions)]
args = trl.GRPOConfig(output_dir="/tmp/prefopt-grpo-vllm", num_generations=8,
    per_device_train_batch_size=16, max_completion_length=6, max_steps=3, use_vllm=True,
    vllm_mode="colocate", vllm_gpu_memory_utilization=0.2, report_to=[], save_strategy="no",
    logging_steps=1, disable_tqdm=True)
prompts = datasets.Dataset.from_list([{"prompt": p} for p in copy_task_prompts(0)[0]])
t = GroupPreferenceGRPOTrainer("/tmp/prefopt-tiny", reward_funcs=reward, args=args,
    train_dataset=prompts, processing_class=tok)
t.train()
print("vLLM colocate: 3 steps, losses", [h["loss"] for h in t.state.log_history if "loss" in h])
PY

  echo "== one on-policy step on TRL's GRPO engine: stock GRPO against MPO, bf16, on CUDA"
  timeout 120 python3 benchmarks/bench_grpo.py --device cuda --dtype bfloat16 --vocab 128256 \
    --repeats 3 || echo '!! bench_grpo failed'

  echo "== benchmark: torch on CUDA (eager, compile), jax.jit on the GPU"
  timeout 200 python3 benchmarks/bench_losses.py --device cuda || echo '!! bench_losses failed'

  echo "== log-probs: naive, token_logps, fused (recomputed, kept), Liger if installed; bf16, V 128k"
  timeout 150 python3 benchmarks/bench_logps.py --device cuda --dtype bfloat16 --vocab 128256 \
    --rows 16 --seq 512 --hidden 2048 --chunk 256 --repeats 3 --rounds 1 || echo '!! bench_logps failed'

  echo "== one MPO step: unshared vs the group forward, bf16, V 128k: bench size and prompt 2048"
  for attn in sdpa flash_attention_2; do
    for size in "--prompt 256 --response 64" "--prompt 2048 --response 128"; do
      # shellcheck disable=SC2086
      timeout 100 python3 benchmarks/bench_step.py --device cuda --dtype bfloat16 --vocab 128256 \
        --attn "$attn" $size --repeats 3 --rounds 1 || echo "!! bench_step $attn $size failed"
    done
  done
} 2>&1 | tee "$out/gpu-check.log"
