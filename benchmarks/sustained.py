"""Attention speed under sustained load, with the GPU's SM clock and power beside it.

On the lent H200s, attention at s=16k runs into the 700 W power cap: the SM clock drops
from 1980 MHz to 1550-1750 MHz, and to a different clock for each kernel. Two ways of
timing side by side then read different ratios:

- short loops (bench.py --quick: ~0.05 s per impl in turn, 5 rounds), where the power
  controller sets the clock from the impls' mix;
- sustained loops (``--seconds`` per impl in turn, ``--rounds`` rounds), where each impl
  runs long enough at its own equilibrium clock, as in a long training run of it alone.

This prints both for the same compiled functions and inputs, with each impl's mean SM
clock and power over its sustained loops (from ``nvidia-smi -lms``, the first 0.3 s of
each loop left out) and its TFLOP/s per GHz of that clock: work per cycle, which the cap
does not move.

    PYTHONPATH=.:benchmarks python3 benchmarks/sustained.py --d 128 --s 4096 16384
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import threading
import time

import jax
import jax.numpy as jnp

from _jax_bench import FWD, FWDBWD, make_fn, make_inputs, time_interleaved

SETTLE_S = 0.3  # the start of each sustained loop, left out of its clock and power


class ClockSampler:
  """``nvidia-smi`` samples of (host time, SM MHz, watts) every ``period_ms``, stamped as
  they arrive; none where there is no nvidia-smi (CPU)."""

  def __init__(self, gpu: str, period_ms: int = 100):
    self.samples: list[tuple[float, float, float]] = []
    try:
      self._proc = subprocess.Popen(
          ["nvidia-smi", "-i", gpu, "--query-gpu=clocks.sm,power.draw",
           "--format=csv,noheader,nounits", f"-lms={period_ms}"],
          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except OSError:
      self._proc = None
      return
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self._proc.stdout:
      try:
        mhz, watts = (float(x) for x in line.split(","))
      except ValueError:
        continue
      self.samples.append((time.time(), mhz, watts))

  def mean(self, spans):
    """Mean (MHz, W) over the samples inside ``spans`` [(t0, t1)], or (None, None)."""
    sel = [(m, w) for t, m, w in self.samples if any(a + SETTLE_S <= t <= b for a, b in spans)]
    if not sel:
      return None, None
    return statistics.fmean(m for m, _ in sel), statistics.fmean(w for _, w in sel)

  def stop(self):
    if self._proc:
      self._proc.terminate()


def sustained(fns, inputs, per_call, *, seconds, rounds):
  """{name: (median s per call, [(t0, t1)] spans)}: ``rounds`` rounds of one loop of about
  ``seconds`` per fn in turn, and a pause of 1 s after each round."""
  spans = {name: [] for name in fns}
  secs = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      n = max(4, int(seconds / per_call[name]))
      t0 = time.time()
      for i in range(n):
        res = fn(*inputs[i % len(inputs)])
      jax.block_until_ready(res)
      t1 = time.time()
      spans[name].append((t0, t1))
      secs[name].append((t1 - t0) / n)
      del res
    time.sleep(1.0)
  return {name: (statistics.median(secs[name]), spans[name]) for name in fns}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--d", type=int, nargs="+", default=[128])
  ap.add_argument("--s", type=int, nargs="+", default=[1024, 4096, 16384])
  ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
  ap.add_argument("--modes", nargs="+", default=[FWD, FWDBWD], choices=[FWD, FWDBWD])
  ap.add_argument("--impls", nargs="+", default=["jflash-mosaic", "cudnn"])
  ap.add_argument("--tokens", type=int, default=16384)
  ap.add_argument("--hidden", type=int, default=2048)
  ap.add_argument("--seconds", type=float, default=1.5, help="one sustained loop")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--json", help="also write the rows here")
  args = ap.parse_args()
  gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
  sampler = ClockSampler(gpu)
  dev = jax.devices()[0]
  print(f"# {dev.device_kind} (nvidia-smi -i {gpu}), jax {jax.__version__}", flush=True)
  causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
  rows = []
  try:
    for d in args.d:
      for s in args.s:
        for causal in causals:
          b, n = max(1, args.tokens // s), args.hidden // d
          inputs = make_inputs(b, s, n, d, jnp.bfloat16)
          flops = 4 * b * n * s * s * d * (0.5 if causal else 1.0)
          for mode in args.modes:
            fns = {impl: make_fn(impl, mode, causal) for impl in args.impls}
            short = time_interleaved(fns, inputs, target_s=0.05, loops=5, min_reps=4,
                                     max_reps=20)
            ok = {k: fns[k] for k, v in short.items() if not isinstance(v, Exception)}
            long = sustained(ok, inputs, {k: short[k][0] for k in ok},
                             seconds=args.seconds, rounds=args.rounds)
            mult = 3.5 if mode == FWDBWD else 1.0
            for impl in args.impls:
              if impl not in ok:
                print(f"  {impl} failed: {short[impl]}", flush=True)
                continue
              sec, spans = long[impl]
              mhz, watts = sampler.mean(spans)
              row = dict(d=d, s=s, causal=causal, mode=mode, impl=impl, b=b, n=n,
                         short_tflops=mult * flops / short[impl][0] / 1e12,
                         long_tflops=mult * flops / sec / 1e12, mhz=mhz, watts=watts,
                         device=dev.device_kind)
              row["per_ghz"] = row["long_tflops"] / mhz * 1e3 if mhz else None
              rows.append(row)
              print(f"  d={d} s={s} causal={causal} {mode} {impl}: short "
                    f"{row['short_tflops']:.1f}, sustained {row['long_tflops']:.1f} TFLOP/s"
                    f" at {mhz or 0:.0f} MHz, {watts or 0:.0f} W", flush=True)
  finally:
    sampler.stop()
  print_table(rows, args.impls)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


def print_table(rows, impls):
  """One line per cell and mode: each impl's short and sustained TFLOP/s, clock and
  TFLOP/s per GHz, then the first impl over the second in each."""
  fmt = lambda x, p=1: "n/a" if x is None else f"{x:.{p}f}"
  head = ["d", "s", "causal", "mode"]
  for impl in impls:
    head += [f"{impl} short", f"{impl} sustained", f"{impl} MHz", f"{impl} /GHz"]
  if len(impls) >= 2:
    head += ["short ratio", "sustained ratio", "per-GHz ratio"]
  print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
  cells = {}
  for r in rows:
    cells.setdefault((r["d"], r["s"], r["causal"], r["mode"]), {})[r["impl"]] = r
  for (d, s, causal, mode), by in cells.items():
    line = [str(d), str(s), "yes" if causal else "no", mode]
    for impl in impls:
      r = by.get(impl, {})
      line += [fmt(r.get("short_tflops")), fmt(r.get("long_tflops")), fmt(r.get("mhz"), 0),
               fmt(r.get("per_ghz"))]
    if len(impls) >= 2:
      a, z = by.get(impls[0], {}), by.get(impls[1], {})
      for key in ("short_tflops", "long_tflops", "per_ghz"):
        x, y = a.get(key), z.get(key)
        line.append(fmt(x / y, 2) if x and y else "n/a")
    print("| " + " | ".join(line) + " |")


if __name__ == "__main__":
  main()
