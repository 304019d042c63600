"""Summarises benchmarks/ncu_source.sh's per-SASS-instruction stall samples.

  python3 benchmarks/ncu_source_summary.py LABEL.sass.csv.gz [--reason long_sb] [--top 25]
  python3 benchmarks/ncu_source_summary.py LABEL.sass.csv.gz --runs 20

Prints the samples by stall reason over the whole kernel, then the instructions with the
most samples of --reason, each with the instructions just before it (what it waits on).

``--runs N`` prints instead the kernel's runs of consecutive instructions executed equally
often, those with at least N samples: a run is one part of the code (the producer's loop,
a consumer's step, a query tile's prologue or epilogue, once per CTA), told apart by its
count (e.g. CTAs x tiles x consumer warps), with its samples and their top stall reasons.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io


def load(path):
  text = gzip.open(path, "rt").read() if path.endswith(".gz") else open(path).read()
  lines = [l for l in text.splitlines() if l.startswith('"')]
  rows = list(csv.reader(io.StringIO("\n".join(lines[1:]))))  # lines[0]: kernel name
  header, rows = rows[0], rows[1:]
  return header, rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("path")
  ap.add_argument("--reason", default="long_sb")
  ap.add_argument("--top", type=int, default=25)
  ap.add_argument("--before", type=int, default=3, help="instructions shown before each")
  ap.add_argument("--runs", type=float, default=None,
                  help="list the runs of equally executed instructions with this many samples")
  args = ap.parse_args()
  header, rows = load(args.path)
  col = {h: i for i, h in enumerate(header)}
  reasons = [h for h in header if h.startswith("stall_") and "(Not Issued)" not in h]

  def num(r, h):
    try:
      return float(r[col[h]].replace(",", ""))
    except ValueError:
      return 0.0

  if args.runs is not None:
    print_runs(rows, col, reasons, num, args.runs)
    return

  total = sum(num(r, "# Samples") for r in rows)
  print(f"{len(rows)} instructions, {total:.0f} samples")
  for h in sorted(reasons, key=lambda h: -sum(num(r, h) for r in rows)):
    s = sum(num(r, h) for r in rows)
    if s:
      print(f"  {h:28s} {s:9.0f}  {100 * s / total:5.1f}%")
  key = "stall_" + args.reason
  order = sorted(range(len(rows)), key=lambda i: -num(rows[i], key))
  print(f"\ntop {args.top} by {key}:")
  for i in order[:args.top]:
    r = rows[i]
    print(f"--- {num(r, key):7.0f} {key}, {num(r, '# Samples'):7.0f} all, "
          f"executed {num(r, 'Instructions Executed'):.0f}")
    for j in range(max(0, i - args.before), i + 1):
      mark = ">>" if j == i else "  "
      print(f"  {mark} {rows[j][col['Address']][-5:]} {rows[j][col['Source']].strip()}")


def print_runs(rows, col, reasons, num, least):
  """Runs of consecutive instructions with the same execution count, with >= ``least``
  samples: first-last row, count, instructions, samples (share) and top 3 reasons."""
  total = sum(num(r, "# Samples") for r in rows)
  runs = []  # [first, last, executed]
  for i, r in enumerate(rows):
    e = num(r, "Instructions Executed")
    if runs and runs[-1][2] == e:
      runs[-1][1] = i
    else:
      runs.append([i, i, e])
  print(f"{len(rows)} instructions, {total:.0f} samples; runs with >= {least:.0f}:")
  for a, b, e in runs:
    part = rows[a:b + 1]
    samples = sum(num(r, "# Samples") for r in part)
    if samples < least:
      continue
    by = sorted(((sum(num(r, h) for r in part), h[6:]) for h in reasons), reverse=True)[:3]
    top = ", ".join(f"{h} {v:.0f}" for v, h in by if v)
    print(f"  rows {a:5d}-{b:5d}  executed {e:9.0f}  {b - a + 1:4d} instr  {samples:8.0f} "
          f"({100 * samples / total:4.1f}%)  [{top}]  {part[0][col['Source']].strip()[:40]}")


if __name__ == "__main__":
  main()
