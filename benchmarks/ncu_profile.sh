#!/usr/bin/env bash
# Hardware counters of the attention kernels of one call (benchmarks/one_call.py), with
# Nsight Compute, clocks left alone. Writes $OUT/ncu_<label>.csv and a summary to stdout.
#   OUT=/tmp/o bash benchmarks/ncu_profile.sh <label> [one_call.py args...]
# e.g. bash benchmarks/ncu_profile.sh d128_nc --impl mosaic --s 16384 --heads 16x128
set -uo pipefail
label=$1; shift
out=${OUT:-/tmp/ncu}; mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:-.}
# Metric names vary by ncu version: keep the wanted ones this ncu knows.
avail=$(ncu --query-metrics --chip gh100 2>/dev/null | awk '{print $1}')
want="gpu__time_duration sm__throughput sm__pipe_tensor_op_gmma_cycles_active \
sm__inst_executed_pipe_xu sm__inst_executed_pipe_fma sm__inst_executed_pipe_alu \
smsp__issue_active dram__throughput lts__throughput sm__warps_active \
lts__t_sectors_op_red lts__t_sectors_op_atom dram__bytes_read dram__bytes_write \
sm__cycles_active sm__cycles_elapsed"
metrics=()
for m in $want; do
  if grep -qx "$m" <<<"$avail"; then
    case $m in
      gpu__time_duration | lts__t_sectors_op_* | dram__bytes_*) metrics+=("$m.sum") ;;
      # Their ratio: how much of the kernel's time the average SM had a CTA resident.
      sm__cycles_*) metrics+=("$m.avg") ;;
      sm__inst_executed_pipe_*) metrics+=("$m.avg.pct_of_peak_sustained_active") ;;
      *) metrics+=("$m.avg.pct_of_peak_sustained_elapsed") ;;
    esac
  fi
done
IFS=,; mlist="${metrics[*]}"; unset IFS
echo "# metrics: $mlist"
for m in $want; do grep -qx "$m" <<<"$avail" || echo "# not known to this ncu: $m"; done
ncu --clock-control none --csv -k 'regex:jflash|sdpa|fmha|cudnn|flash' \
  --metrics "$mlist" python3 benchmarks/one_call.py "$@" > "$out/ncu_$label.csv" 2> "$out/ncu_$label.err"
grep -v '^==' "$out/ncu_$label.csv" | python3 -c '
import csv, sys, collections
rows = list(csv.DictReader(l for l in sys.stdin if l.startswith("\"")))
by = collections.OrderedDict()
for r in rows:
  by.setdefault((r["ID"], r["Kernel Name"][:160]), {})[r["Metric Name"]] = (r["Metric Value"], r["Metric Unit"])
for (i, name), ms in by.items():
  print(i, name)
  for m, (v, u) in ms.items():
    print(f"    {m:70s} {v} {u}")
'
tail -3 "$out/ncu_$label.err"
