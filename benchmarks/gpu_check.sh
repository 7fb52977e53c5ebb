#!/usr/bin/env bash
# The prepared GPU run: one call on a lent GPU machine (torch 2.11+cu130, triton 3.6.0, nvcc 13.0, no network)
# builds the CUDA extension, runs the GPU tests and the benchmarks, and writes everything under $OUT:
#   run --command "bash benchmarks/gpu_check.sh" --timeout_s 540
# Then copy $OUT/results.md to benchmarks/results/<card>.md and commit it (date, card and versions are inside).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/torch_medloss_gpu}
mkdir -p "$OUT"
export TORCH_MEDLOSS_CACHE="$OUT/../cache" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"

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

echo '## GPU tests' >> "$OUT/results.md"
timeout 240 python -m pytest -q -x -p no:cacheprovider -k "cuda or triton or gpu" tests > "$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log" >> "$OUT/results.md"

echo '## Benchmark (python -m torch_medloss bench: forward+backward, do_bench medians)' >> "$OUT/results.md"
timeout 330 python -m torch_medloss bench --no-progress --json "$OUT/bench.json" >> "$OUT/results.md" 2> "$OUT/bench.err"
cat "$OUT/results.md"
