#!/usr/bin/env bash
# Every GPU check in one command, for a machine with one CUDA GPU and no internet:
#   1. installs the packages it lacks from .whl/ (made by benchmarks/fetch_gpu_wheels.sh);
#   2. `pytest -m gpu -v`: the tests marked gpu (tests/test_gpu.py), run for real;
#   3. the GPU benchmark: DiT-XL/2, 256 px, bf16, with and without gradient checkpointing, at the
#      largest batch that fits: training img/s, MFU, peak memory, DDPM-250 CFG sampling img/s and
#      FID-50K hours, a torch.profiler table of one training step, and train.py end to end from
#      pre-extracted features.
# Results (logs, benchmark.json/.md, profiles) go to $OUT, else ./gpu-results. Each stage has its
# own time limit, so the whole run ends within about 9 minutes; the exit code is pytest's.
#
#   bash benchmarks/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}
PYTHON=${PYTHON:-python3}
TEST_LIMIT_S=${TEST_LIMIT_S:-270}
BENCHMARK_LIMIT_S=${BENCHMARK_LIMIT_S:-250}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT"

# 1. Missing packages, from local wheels (pure Python, installed without their dependencies).
missing=$("$PYTHON" -c "import importlib.util
print(' '.join(m for m in ('diffusers', 'importlib_metadata', 'torch_fidelity', 'pytest') if importlib.util.find_spec(m) is None))")
if [ -n "$missing" ]; then
  if ! compgen -G ".whl/*.whl" > /dev/null; then
    echo "this machine lacks: $missing; run benchmarks/fetch_gpu_wheels.sh where pip reaches PyPI and bring .whl/ along" >&2
    exit 2
  fi
  echo "installing from .whl/ for: $missing"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PYTHON" -c "import sys, torch, diffusers
print('python', sys.version.split()[0], '| torch', torch.__version__, 'CUDA', torch.version.cuda, '| diffusers', diffusers.__version__)
print('GPU', torch.cuda.get_device_name(), 'compute capability', torch.cuda.get_device_capability(), '| CPU capability', torch.backends.cpu.get_cpu_capability())"
} 2>&1 | tee "$OUT/environment.txt"

# 2. The GPU tests (collection errors elsewhere must not stop them).
timeout "$TEST_LIMIT_S" "$PYTHON" -m pytest -m gpu -v -p no:cacheprovider --continue-on-collection-errors 2>&1 | tee "$OUT/pytest-gpu.txt"
test_status=${PIPESTATUS[0]}

# 3. The benchmark; it writes benchmark.json/.md after every variant, so a cut-short run keeps what it measured.
timeout "$BENCHMARK_LIMIT_S" "$PYTHON" -m benchmarks.benchmark --model DiT-XL/2 --image-size 256 \
  --variants bf16 bf16+ckpt --find-max-batch --batch-size 32 --max-batch-limit 1024 --warmup 2 --repeats 5 \
  --sample-batch-size 128 --sample-steps 5 --profile "$OUT" \
  --e2e features:bf16 --e2e-batch-size 64 --e2e-images 128 --e2e-steps 20 --e2e-log-every 10 --num-workers 4 \
  --out-dir "$OUT" 2>&1 | tee "$OUT/benchmark-log.txt"
benchmark_status=${PIPESTATUS[0]}

echo "gpu_checks: pytest exit code $test_status, benchmark exit code $benchmark_status (124: stopped at its time limit); results in $OUT"
exit "$test_status"
