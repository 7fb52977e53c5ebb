#!/usr/bin/env bash
# The prepared GPU run: one call on a lent GPU machine (torch 2.11+cu130, triton 3.6.0, nvcc 13.0, no network)
# builds the CUDA extension, runs the GPU tests and the benchmarks, and writes everything under $OUT:
#   run --command "bash benchmarks/gpu_check.sh" --timeout_s 580
# or in two calls on the warm machine (it is released after ~30 s idle, so issue the second at once):
#   bash benchmarks/gpu_check.sh tests     (install, build, GPU tests)
#   bash benchmarks/gpu_check.sh bench     (install, build from the cache of the first call, both benchmarks)
# Then copy $OUT/results.md to benchmarks/results/<card>.md and commit it (date, card and versions are inside).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-all}
OUT=${OUT:-/tmp/torch_medloss_gpu}
mkdir -p "$OUT"
# In the repository (ignored): build outputs there survive between calls on the warm machine.
export TORCH_MEDLOSS_CACHE="$PWD/.gpu_cache" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"

{
  echo "# GPU check, $(date -u +%Y-%m-%d)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
} > "$OUT/results.md" 2>&1

# No network there: install without build isolation or dependencies (torch and triton are already installed).
pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || { echo "install failed" >> "$OUT/results.md"; }

echo '## Build' >> "$OUT/results.md"
timeout 240 python -m torch_medloss build --verbose > "$OUT/build.log" 2>&1
tail -5 "$OUT/build.log" >> "$OUT/results.md"

if [ "$STAGE" != bench ]; then
  echo '## GPU tests' >> "$OUT/results.md"
  timeout 200 python -m pytest -q -p no:cacheprovider -k "cuda or triton or gpu" tests > "$OUT/tests.log" 2>&1
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20 >> "$OUT/results.md"
  tail -3 "$OUT/tests.log" >> "$OUT/results.md"
fi

if [ "$STAGE" != tests ]; then
  echo '## Benchmark (python -m torch_medloss bench: forward+backward, do_bench medians)' >> "$OUT/results.md"
  timeout 200 python -m torch_medloss bench --no-progress --json "$OUT/bench.json" >> "$OUT/results.md" \
    2> "$OUT/bench.err"
  echo '## Ops benchmark (python -m torch_medloss bench --ops)' >> "$OUT/results.md"
  timeout 120 python -m torch_medloss bench --ops --no-progress --json "$OUT/ops.json" >> "$OUT/results.md" \
    2> "$OUT/ops.err"
fi
cat "$OUT/results.md"
