#!/usr/bin/env bash
# SASS of the Mosaic kernels of one call, for reading offline (the GPU machine has ptxas
# and cuobjdump; this machine has neither):
#   OUT=dir bash benchmarks/sass_dump.sh NAME one_call.py-args...
# writes $OUT/NAME.ptxas.txt (ptxas -v: registers, spills, warnings), $OUT/NAME.ptx and
# $OUT/NAME.sass (each kernel's PTX and SASS), e.g. NAME=fwd_overlap --mode fwd --variant overlap=1.
set -uo pipefail
cd "$(dirname "$0")/.."
name="$1"; shift
dump="$(mktemp -d)"
MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_TO="$dump" PYTHONPATH=. \
  python3 benchmarks/one_call.py "$@" > "$dump/run.log" 2>&1 || tail -5 "$dump/run.log"
ptxas="$(command -v ptxas || find / -name ptxas -type f 2>/dev/null | head -1)"
cuobjdump="$(dirname "$ptxas")/cuobjdump"
[ -x "$cuobjdump" ] || cuobjdump="$(command -v cuobjdump || find / -name cuobjdump -type f 2>/dev/null | head -1)"
: > "$OUT/$name.ptxas.txt"; : > "$OUT/$name.ptx"; : > "$OUT/$name.sass"
for ptx in "$dump"/*.ptx; do
  [ -e "$ptx" ] || { echo "no PTX dumped in $dump: $(ls "$dump")"; break; }
  echo "== $(basename "$ptx")" | tee -a "$OUT/$name.ptxas.txt" "$OUT/$name.ptx" >> "$OUT/$name.sass"
  cat "$ptx" >> "$OUT/$name.ptx"
  "$ptxas" -arch=sm_90a -v -o "$dump/k.cubin" "$ptx" >> "$OUT/$name.ptxas.txt" 2>&1
  "$cuobjdump" -sass "$dump/k.cubin" >> "$OUT/$name.sass" 2>&1
done
grep -i -E "warn|spill|Used" "$OUT/$name.ptxas.txt"
