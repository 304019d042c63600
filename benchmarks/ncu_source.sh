#!/usr/bin/env bash
# Stall samples per SASS instruction (ncu's SourceCounters) of the attention kernel of one
# call (benchmarks/one_call.py), clocks left alone:
#   OUT=dir bash benchmarks/ncu_source.sh LABEL one_call.py-args...
# writes $OUT/LABEL.sass.csv.gz (the source page: every SASS instruction with its
# samples by stall reason) and $OUT/LABEL.details.txt (the SourceCounters and
# WarpStateStats sections). Summarise with benchmarks/ncu_source_summary.py.
set -uo pipefail
cd "$(dirname "$0")/.."
label=$1; shift
out=${OUT:-/tmp/ncu}; mkdir -p "$out"
rep="$(mktemp -d)/$label"
PYTHONPATH=. ncu --clock-control none -k 'regex:jflash|sdpa' -c 1 \
  --section SourceCounters --section WarpStateStats --import-source no -f -o "$rep" \
  python3 benchmarks/one_call.py "$@" > "$rep.log" 2>&1
tail -3 "$rep.log"
ncu -i "$rep.ncu-rep" --page details > "$out/$label.details.txt" 2>&1
ncu -i "$rep.ncu-rep" --page source --print-source sass --csv 2>&1 | gzip > "$out/$label.sass.csv.gz"
echo "$label: $(zcat "$out/$label.sass.csv.gz" | wc -l) source lines"
