#!/usr/bin/env bash
# The one script run on the GPU machine: GPU tests, then the benchmark.
#   bash benchmarks/gpu_check.sh [bench.py args...]    e.g. --quick --s 4096
#   SKIP_TESTS=1 / SKIP_BENCH=1 skip a part. Output goes to $OUT (default ./bench_out):
#   gpu_tests.log, bench.log, results.json, results.md, tflops.png.
# Exits with the pytest status, so a benchmark hiccup cannot hide a failing kernel.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export OUT="${OUT:-$PWD/bench_out}"
mkdir -p "$OUT"

echo "== $(date -Is)"
nvidia-smi -L || echo "nvidia-smi failed"
python3 - <<'PY'
import sys
print("python", sys.version.split()[0])
import jax, jaxlib
print("jax", jax.__version__, "jaxlib", jaxlib.__version__)
for mod in ("torch", "triton"):
  try:
    print(mod, __import__(mod).__version__)
  except Exception as e:  # optional: the benchmark prints n/a without them
    print(mod, "unavailable:", e)
PY

test_status=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "== pytest -m gpu"
  python3 -m pytest -m gpu -q -x tests 2>&1 | tee "$OUT/gpu_tests.log"
  test_status=${PIPESTATUS[0]}
  echo "== pytest exit status: $test_status"
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  # --memory first so that a later --no-memory in "$@" wins.
  python3 benchmarks/bench.py --out "$OUT" --memory "$@" 2>&1 | tee "$OUT/bench.log"
  echo "== bench exit status: ${PIPESTATUS[0]}"
fi
exit "$test_status"
