#!/usr/bin/env bash
# The one script run on the GPU machine: GPU tests, then the benchmark.
#   bash benchmarks/gpu_check.sh [bench.py args...]    e.g. --quick --s 4096
#   SKIP_TESTS=1 / SKIP_BENCH=1 skip a part; JOBS=4 test shards, SHARD_TIMEOUT s each;
#   TESTS=<pytest -k expr>, or TEST_IDS_FILE=<file of test ids>; GPUS="1" to test on
#   some GPUs only. Output goes to $OUT (default ./bench_out):
#   gpu_tests.log, failures.log (each failing test's report, written as it fails),
#   bench.log, results.json, results.md, tflops.png.
#   RUN_SUSTAINED=1 adds sustained.py $SUSTAINED_ARGS (ratios in short and sustained
#   loops, with the SM clock): sustained.log, sustained.json.
#   RUN_TRAIN=1 adds the GPT training-step benchmark (train_step.py $TRAIN_ARGS):
#   train_step.log, train_step.md, train_step.json.
# Sizing (2 x H200, 2026-11-28): the whole suite, 268 tests, in JOBS=12 shards took
# 350-440 s a shard, two more than 480 s; a device call ends at 600 s, so on one
# GPU split it over two calls (TESTS), and rerun a cut shard's rest with TEST_IDS_FILE.
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
  # GPU tests spend most of their time compiling (CPU-bound), so they run as JOBS pytest
  # processes side by side on the one GPU, each owning a slice of its memory.
  # TESTS narrows the selection (a pytest -k expression).
  jobs="${JOBS:-4}"
  echo "== pytest -m gpu in $jobs shards${TESTS:+ (-k $TESTS)}"
  shards="$(mktemp -d)"  # per-shard files stay out of $OUT (few files come back)
  if [ -n "${TEST_IDS_FILE:-}" ]; then
    # TEST_IDS_FILE: run exactly these test ids, one per line (e.g. those a cut-short
    # run did not finish), instead of collecting.
    grep '::' "$TEST_IDS_FILE" > "$shards/ids"
  else
    python3 -m pytest -m gpu -q --collect-only ${TESTS:+-k "$TESTS"} tests 2>/dev/null \
      | grep '::' > "$shards/ids"
  fi
  echo "$(wc -l < "$shards/ids") tests"
  # tests/conftest.py appends every failure here at once: a shard cut by its time limit
  # loses pytest's final report, not these.
  export JFLASH_FAILURE_LOG="$OUT/failures.log"
  rm -f "$JFLASH_FAILURE_LOG"
  # On a machine of several GPUs, shard i sees GPU i mod ngpu alone (more cores, more
  # shards). The tests that need several devices (test_ring.py, test_sharding.py) go to
  # one extra shard that sees them all.
  # GPUS="1 2": use only these GPUs (e.g. while a probe times on GPU 0).
  ngpu="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')"
  [ "$ngpu" -ge 1 ] || ngpu=1
  read -ra gpus <<< "${GPUS:-$(seq -s ' ' 0 $((ngpu - 1)))}"
  ngpu="${#gpus[@]}"
  grep -E 'test_(ring|sharding)\.py' "$shards/ids" > "$shards/$jobs.ids"
  grep -vE 'test_(ring|sharding)\.py' "$shards/ids" > "$shards/single.ids"
  per_gpu=$(( (jobs + ngpu - 1) / ngpu + 1 ))  # shards on one GPU, the all-GPU one too
  pids=()
  for ((i = 0; i <= jobs; i++)); do
    if ((i < jobs)); then
      awk -v n="$jobs" -v i="$i" 'NR % n == i' "$shards/single.ids" > "$shards/$i.ids"
      visible="${gpus[$(( i % ngpu ))]}"
    else
      visible="$(IFS=,; echo "${gpus[*]}")"
    fi
    [ -s "$shards/$i.ids" ] || continue
    mapfile -t ids < "$shards/$i.ids"  # one test id per line (ids may hold spaces)
    # Each shard stops by SHARD_TIMEOUT seconds, so a slow one cannot take the logs down.
    # numpy's BLAS (the float64 references) gets its share of the cores, not all of them
    # in every shard: oversubscribed, the references took minutes per test.
    # No XLA autotuning in the tests (they time nothing): with it off, 2 x H200 2026-11-27,
    # 90 gpu tests took 255 s in 10 shards on one GPU (session 18: 83 in 550 s, 22 shards
    # on two; both the flag and the shard count changed between them).
    # The shards' JAX pools take 70% of the GPU's memory, not 90%: the rest is the CUDA
    # driver's, for 13 contexts and their command buffers (with 90%, H100 2026-11-26:
    # RESOURCE_EXHAUSTED "instantiate command buffer" in three tests, test_fuzz_triton_gpu
    # among them: likely session 9's unexplained failure of it too).
    threads=$(( $(nproc) / (jobs + 1) > 0 ? $(nproc) / (jobs + 1) : 1 ))
    OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads MKL_NUM_THREADS=$threads \
    CUDA_VISIBLE_DEVICES="$visible" XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" \
    XLA_PYTHON_CLIENT_MEM_FRACTION="$(python3 -c "print(round(0.7 / $per_gpu, 3))")" \
      timeout "${SHARD_TIMEOUT:-1800}" python3 -m pytest -m gpu -v -p no:cacheprovider \
      --durations=3 "${ids[@]}" > "$shards/$i.log" 2>&1 &
    pids+=("$i:$!")
  done
  for entry in "${pids[@]}"; do
    i="${entry%%:*}"
    wait "${entry#*:}"; rc=$?
    ((rc == 0)) && continue
    # A shard killed by its time limit (124) after pytest printed a clean final summary
    # ran every test it had (2026-11-28: one shard finished its 16 tests in 465 s of a
    # 470 s limit, then was killed on its way out): say so, and let the counts below
    # decide. Anything else fails the run.
    if ((rc == 124)) && tail -3 "$shards/$i.log" | grep -qE "^=+ .*(passed|skipped) in " \
        && ! tail -3 "$shards/$i.log" | grep -qE "[0-9]+ (failed|errors?)"; then
      echo "shard $i: killed by SHARD_TIMEOUT after its pytest summary (no failures)"
    else
      echo "shard $i: exit status $rc"
      test_status=1
    fi
  done
  for ((i = 0; i <= jobs; i++)); do
    [ -f "$shards/$i.log" ] && { echo "-- shard $i: $(tr '\n' ' ' < "$shards/$i.ids")"; cat "$shards/$i.log"; }
  done 2>&1 | tee "$OUT/gpu_tests.log" | grep -E " passed| failed|skipped in|error|FAILED|ERROR" || true
  # A shard cut by its timeout reports nothing: every collected test must have finished.
  done_n="$(grep -cE "::.* (PASSED|SKIPPED)" "$OUT/gpu_tests.log")"
  echo "finished (passed or skipped): $done_n of $(wc -l < "$shards/ids")"
  [ "$done_n" -eq "$(wc -l < "$shards/ids")" ] || test_status=1
  [ -s "$JFLASH_FAILURE_LOG" ] && { echo "== failures (also in failures.log)"; head -c 6000 "$JFLASH_FAILURE_LOG"; }
  echo "== pytest exit status: $test_status"
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  # --memory first so that a later --no-memory in "$@" wins.
  python3 benchmarks/bench.py --out "$OUT" --memory "$@" 2>&1 | tee "$OUT/bench.log"
  echo "== bench exit status: ${PIPESTATUS[0]}"
fi

if [ "${RUN_SUSTAINED:-0}" = 1 ]; then
  # The grid's mosaic/cuDNN ratios in short and sustained loops, with each kernel's SM
  # clock under the power cap (benchmarks/README.md); SUSTAINED_ARGS split into words on
  # purpose, e.g. SUSTAINED_ARGS="--d 128 --seconds 1.2 --rounds 2".
  python3 benchmarks/sustained.py --json "$OUT/sustained.json" ${SUSTAINED_ARGS:-} 2>&1 \
    | tee "$OUT/sustained.log"
  echo "== sustained exit status: ${PIPESTATUS[0]}"
fi

if [ "${RUN_TRAIN:-0}" = 1 ]; then
  # TRAIN_ARGS is split into words on purpose, e.g. TRAIN_ARGS="--s 1024 4096".
  python3 benchmarks/train_step.py --out "$OUT" ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train_step.log"
  echo "== train_step exit status: ${PIPESTATUS[0]}"
fi
exit "$test_status"
