#!/usr/bin/env bash
# GPU check (issues 2-4): the parity suite with torch on CUDA and JAX on the GPU, then the
# loss and log-prob benchmarks on the GPU. Meant to finish in under 5 minutes on one H100/H200.
#
# The lent GPU machine has torch and jax but not array-api-compat / array-api-strict; carry
# them as wheels (pure Python). Here, once, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl \
#       array-api-compat==1.16.0 array-api-strict==2.6.1
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

  echo "== benchmark: torch on CUDA (eager, compile), jax.jit on the GPU"
  timeout 200 python3 benchmarks/bench_losses.py --device cuda || echo '!! bench_losses failed'

  echo "== log-probs: naive vs fused, bf16, vocabulary 128k, on CUDA"
  timeout 200 python3 benchmarks/bench_logps.py --device cuda --dtype bfloat16 --vocab 128256 \
    --rows 16 --seq 512 --hidden 2048 --chunk 2048 --repeats 3 --rounds 1 || echo '!! bench_logps failed'

  echo "== one MPO step: unshared vs the group forward, bf16, vocabulary 128k, on CUDA"
  timeout 200 python3 benchmarks/bench_step.py --device cuda --dtype bfloat16 --vocab 128256 \
    --repeats 3 --rounds 1 || echo '!! bench_step failed'
} 2>&1 | tee "$out/gpu-check.log"
