#!/usr/bin/env bash
# The GPU checks, as one short script for a CUDA machine (a lent device, a cluster node):
#   1. the `gpu`-marked tests (training and DMD on CUDA agree with the CPU; snapshots stay on
#      the device);
#   2. the DMD benchmark on CUDA at the default budget, 3 seeds, the three base optimisers.
# It needs only torch (CUDA), numpy, scipy, scikit-learn, rich and pytest: training and the
# benchmark import neither Optuna nor MLflow, so it runs from the source tree on an image
# without them (PYTHONPATH, no install). Logs and the benchmark's JSON rows go to $OUT
# (default ./device-out). Not run by CI, which has no GPU.
#
#   bash benchmarks/device_check.sh            # the full check (not yet timed on a GPU)
#   STEPS=20 SEEDS=1 JOBS=1 bash benchmarks/device_check.sh   # its plumbing, in seconds
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

echo "== device" | tee "$OUT/device.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/device.log"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')" 2>&1 | tee -a "$OUT/device.log"

echo "== gpu tests"
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests/training/test_gpu.py -ra 2>&1 | tee "$OUT/gpu_tests.log"
tests=${PIPESTATUS[0]}

echo "== benchmark on CUDA (default problem, 2,000 steps, 3 seeds)"
"$PY" benchmarks/bench_dmd.py --seeds "${SEEDS:-3}" --jobs "${JOBS:-3}" ${STEPS:+--steps "$STEPS"} \
  --json "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}

echo "== exit: tests $tests, benchmark $bench"
exit $(( tests || bench ))
