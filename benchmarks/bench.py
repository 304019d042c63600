"""Attention speed (TFLOP/s) and peak memory: jflash vs cuDNN, XLA and PyTorch flash.

  python benchmarks/bench.py                       # full grid, see README.md
  python benchmarks/bench.py --quick --s 4096 --d 128 --causal no
  python benchmarks/bench.py --memory              # also peak memory of fwd+bwd
  python benchmarks/bench.py --features-only       # only the feature cases (window, docs, ...)
  python benchmarks/bench.py --cpu-smoke           # tiny CPU run of every code path

Order matters: the torch worker and the memory workers run in subprocesses
before this process imports JAX, so no two frameworks share the GPU at once
and each memory number comes from a fresh allocator.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))  # the repo root, for `import jflash`

import _report  # noqa: E402  (stdlib-only modules; safe before the workers run)
import _torch_bench  # noqa: E402

DEFAULT_IMPLS = ["jflash-mosaic", "jflash-triton", "cudnn", "xla", "torch-flash"]
ALL_IMPLS = DEFAULT_IMPLS + ["jflash-xla"]
# --mem-impls only: _jax_bench.MEMORY_VARIANTS (the Mosaic backward's "atomic" dQ at
# d=128; the default Mosaic and cuDNN at d=64, 32 heads).
MEMORY_ONLY_IMPLS = ["jflash-mosaic-atomic", "jflash-mosaic-d64", "cudnn-d64"]
RESULT_MARK = "@@RESULT "
# The "xla" impl materialises [b, N, s, s] logits (and softmax temporaries of that
# size); above 2^31 elements (8 GiB in f32, i.e. s=16384 here) it risks an OOM.
XLA_LOGITS_LIMIT = 2**31


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--d", type=int, nargs="+", default=[64, 128], help="head dims")
  p.add_argument("--s", type=int, nargs="+", default=[1024, 4096, 16384], help="sequence lengths")
  p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
  p.add_argument("--impls", nargs="+", default=DEFAULT_IMPLS, choices=ALL_IMPLS)
  p.add_argument("--tokens", type=int, default=16384, help="batch * seq len")
  p.add_argument("--hidden", type=int, default=2048, help="heads * head dim")
  p.add_argument("--quick", action="store_true", help="fewer timed reps")
  p.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
  p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=False,
                 help="also measure peak memory of one fwd+bwd (fresh process each)")
  p.add_argument("--mem-s", type=int, nargs="+", default=[8192, 32768])
  p.add_argument("--mem-impls", nargs="+", default=["jflash-triton", "cudnn"],
                 choices=ALL_IMPLS + MEMORY_ONLY_IMPLS)
  p.add_argument("--features", action="store_true",
                 help="also time the feature cases (sliding window, packed documents, soft-cap, "
                      "dense mask) at s=tokens, b=1, d=128")
  p.add_argument("--features-only", action="store_true",
                 help="only the feature cases: no grid, no torch, no --memory")
  p.add_argument("--cpu-smoke", action="store_true", help="one tiny f32 cell on CPU")
  # Internal: subprocess entry points.
  p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--mem-worker", metavar="IMPL", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.features_only:
    args.features, args.memory = True, False
  if args.cpu_smoke:
    os.environ["JAX_PLATFORMS"] = "cpu"  # before JAX is imported; children inherit it
    args.d, args.s, args.tokens, args.hidden = [64], [256], 256, 128
    args.impls = ["jflash-mosaic", "jflash-xla", "xla", "torch-flash"]
    args.mem_impls, args.mem_s, args.quick = ["jflash-xla"], [256], True
  return args


def timing(args):
  # At least 4 calls a loop: with 2-call loops, interleaved, d=128 s=16k non-causal
  # fwd+bwd read 0.85-0.88x cuDNN on two machines where 10-call loops read 0.95-0.96x.
  if args.quick:
    return {"target_s": 0.05, "loops": 5, "min_reps": 4, "max_reps": 20}
  return {"target_s": 0.1, "loops": 9, "min_reps": 5, "max_reps": 30}


def feature_timing(args):
  # Fewer, shorter loops than the grid: ~20 cells of long calls, most of the time is compile.
  if args.quick:
    return {"target_s": 0.02, "loops": 2, "min_reps": 1, "max_reps": 5}
  return {"target_s": 0.05, "loops": 3, "min_reps": 2, "max_reps": 20}


def grid(args):
  if args.features_only:
    return []
  causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
  cells = []
  for d in args.d:
    for s in args.s:
      for causal in causals:
        cells.append({"d": d, "s": s, "causal": causal, "b": max(1, args.tokens // s),
                      "n": max(1, args.hidden // d)})
  return cells


def fwd_flops(c):
  f = 4 * c["b"] * c["n"] * c["s"] * c["s"] * c["d"]
  return f / 2 if c["causal"] else f


def log(*a):
  print(*a, flush=True)


# ---------------------------------------------------------------------------
# Subprocesses: each prints one RESULT_MARK line of JSON on stdout.


def _worker(argv, env=None, timeout=900):
  t0 = time.perf_counter()
  try:
    p = subprocess.run([sys.executable, os.path.abspath(__file__)] + argv, stdout=subprocess.PIPE,
                       text=True, env={**os.environ, **(env or {})}, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"worker timed out after {timeout} s"}
  result = None
  for line in p.stdout.splitlines():
    if line.startswith(RESULT_MARK):
      result = json.loads(line[len(RESULT_MARK):])
    elif line.strip():
      log(line)  # whatever a library printed
  if result is None:
    return {"error": f"worker exited with status {p.returncode} and no result"}
  result["worker_s"] = round(time.perf_counter() - t0, 1)
  return result


def _emit(obj):
  print(RESULT_MARK + json.dumps(obj), flush=True)


def run_torch(args, cells):
  log(f"== torch-flash: {len(cells)} cells in a subprocess")
  argv = ["--torch-worker", "--d", *map(str, args.d), "--s", *map(str, args.s), "--causal", args.causal,
          "--tokens", str(args.tokens), "--hidden", str(args.hidden)] + (["--quick"] if args.quick else [])
  res = _worker(argv)
  if "error" in res:
    log(f"torch-flash: n/a ({res['error']})")
  return res


def run_memory(args):
  rows = []
  for s in args.mem_s:
    for impl in args.mem_impls:
      argv = ["--mem-worker", impl, "--mem-s", str(s)] + (["--cpu-smoke"] if args.cpu_smoke else [])
      # platform: allocate exactly what is asked for. Where that allocator keeps no
      # statistics, fall back to BFC without preallocation, whose peak is also real.
      res = None
      for allocator in ("platform", "bfc"):
        env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        if allocator == "platform":
          env["XLA_PYTHON_CLIENT_ALLOCATOR"] = "platform"
        res = _worker(argv, env=env, timeout=600)
        res.update(impl=impl, s=s, allocator=allocator)
        for k, v in (("b", 1), ("n", 16), ("d", 128)):
          res.setdefault(k, v)
        if res.get("peak_bytes") is not None or "error" in res:
          break
      if "error" not in res and res.get("peak_bytes") is None:
        res["allocator"] = "no allocator stats"
      peak = res.get("peak_bytes")
      log(f"[memory] {impl} s={s}: " + (f"peak {peak / 2**20:.0f} MiB, ideal "
                                        f"{res['ideal_bytes'] / 2**20:.0f} MiB ({res['allocator']})"
                                        if peak else f"n/a ({res.get('error') or res['allocator']})"))
      rows.append(res)
  return rows


def mem_worker(args):
  import _jax_bench
  import jax.numpy as jnp
  kw = {"b": 1, "n": 2, "d": 64, "dtype": jnp.float32} if args.cpu_smoke else {}
  try:
    _emit(_jax_bench.memory_worker(args.mem_worker, args.mem_s[0], **kw))
  except Exception as e:
    _emit({"error": _torch_bench.short_error(e)})


# ---------------------------------------------------------------------------


def run_jax(args, cells):
  import _jax_bench
  import jax.numpy as jnp
  dtype = jnp.float32 if args.cpu_smoke else jnp.bfloat16
  tm = timing(args)
  jax_impls = [i for i in args.impls if i in _jax_bench.IMPLS]
  inputs_for = None
  for idx, c in enumerate(cells, 1):
    tag = f"[{idx}/{len(cells)}] d={c['d']} s={c['s']} causal={int(c['causal'])} b={c['b']} N={c['n']}"
    if inputs_for != (c["d"], c["s"]):
      inputs = None  # free the previous shapes first
      inputs = _jax_bench.make_inputs(c["b"], c["s"], c["n"], c["d"], dtype)
      inputs_for = (c["d"], c["s"])
    # Per mode, the impls' timed loops interleave (time_interleaved): ratios within a
    # cell compare runs under the same clocks.
    for mode in (_jax_bench.FWD, _jax_bench.FWDBWD):
      fns = {}
      for impl in jax_impls:
        if mode not in _jax_bench.IMPLS[impl][1]:
          continue
        logits = c["b"] * c["n"] * c["s"] ** 2
        if impl == "xla" and logits > XLA_LOGITS_LIMIT:
          c["results"].setdefault(impl, {})[mode] = {"error": "skipped: logits too large"}
          log(f"{tag} {impl} {mode}: skipped ({logits / 2**30:.0f} Gi logits)")
          continue
        fns[impl] = _jax_bench.make_fn(impl, mode, c["causal"])
      for impl, t in _jax_bench.time_interleaved(fns, inputs, **tm).items():
        if isinstance(t, Exception):
          r = {"error": _torch_bench.short_error(t)}
        else:
          r = {"sec": t[0], "reps": t[1], "compile_s": round(t[2], 2)}
        _finish(c, impl, mode, r, tag)


def run_features(args):
  """Times the feature rows of _features.py; returns {"config", "timing", "rows"}."""
  import _features
  import _jax_bench
  import jax.numpy as jnp
  cfg = _features.config(args)
  rows = _features.rows(cfg, args.impls)
  tm = feature_timing(args)
  log(f"== feature cases: {len(rows)} rows, d={cfg['d']} N={cfg['n']} s={cfg['s']} b={cfg['b']}, "
      f"window {cfg['window']}, {cfg['docs']} docs {_features.doc_lengths(cfg['s'], cfg['docs'], cfg['seed'])}")
  dtype = jnp.dtype(cfg["dtype"])
  for shape in dict.fromkeys((r["b"], r["s"]) for r in rows):  # one input set per shape
    inputs = None
    inputs = _jax_bench.make_inputs(shape[0], shape[1], cfg["n"], cfg["d"], dtype)
    for idx, row in enumerate(rows, 1):
      if (row["b"], row["s"]) != shape:
        continue
      note = f" ({row['note']})" if row["note"] else ""
      tag = f"[feature {idx}/{len(rows)}] {row['title']} b={row['b']} s={row['s']} {row['impl']}{note}"
      try:
        extras = _jax_bench.feature_extras(row["call"], row["b"], row["lengths"])
        sets = [tuple(inp) + tuple(extras) for inp in inputs]
      except Exception as e:
        sets, err = None, {"error": _torch_bench.short_error(e)}
      for mode in (_jax_bench.FWD, _jax_bench.FWDBWD):
        if sets is None:
          r = dict(err)
        else:
          try:
            fn = _jax_bench.make_feature_fn(row["call"], mode)
            sec, reps, compile_s = _jax_bench.time_fn(fn, sets, **tm)
            r = {"sec": sec, "reps": reps, "compile_s": round(compile_s, 2)}
            r["tflops"] = _features.useful_flops(row, mode) / sec / 1e12
            log(f"{tag} {mode}: {sec * 1e3:.3f} ms, {r['tflops']:.4g} useful TFLOP/s "
                f"({reps} reps, compile {r['compile_s']} s)")
          except Exception as e:
            r = {"error": _torch_bench.short_error(e)}
        if "error" in r:
          log(f"{tag} {mode}: n/a ({r['error']})")
        row["results"][mode] = r
      sets = extras = None
    inputs = None
  _features.add_ratios(rows)
  return {"config": cfg, "timing": tm, "rows": rows}


def _finish(c, impl, mode, r, tag):
  if "sec" in r:
    flops = fwd_flops(c) * (3.5 if mode == "fwdbwd" else 1.0)
    r["tflops"] = flops / r["sec"] / 1e12
    extra = f", compile {r['compile_s']} s" if "compile_s" in r else ""
    log(f"{tag} {impl} {mode}: {r['sec'] * 1e3:.3f} ms, {r['tflops']:.4g} TFLOP/s "
        f"({r['reps']} reps{extra})")
  elif tag:
    log(f"{tag} {impl} {mode}: n/a ({r['error']})")
  c["results"].setdefault(impl, {})[mode] = r


def main(argv=None):
  args = parse_args(argv)
  if args.torch_worker:
    _emit(_torch_bench.run(grid(args), timing(args)))
    return 0
  if args.mem_worker:
    mem_worker(args)
    return 0

  cells = grid(args)
  for c in cells:
    c["results"] = {}
  os.makedirs(args.out, exist_ok=True)
  t_start = time.perf_counter()
  torch_res = run_torch(args, cells) if "torch-flash" in args.impls and cells else None
  memory = run_memory(args) if args.memory else []

  import _jax_bench  # JAX initialises its backend only from here on
  meta = _jax_bench.device_info()
  meta.update(date=datetime.datetime.now().isoformat(timespec="seconds"),
              dtype="float32" if args.cpu_smoke else "bfloat16", tokens=args.tokens,
              hidden=args.hidden, python=sys.version.split()[0],
              torch=(torch_res or {}).get("torch"), timing=timing(args))
  log(f"== {meta['device']} | jax {meta['jax']} | {meta['date']}")
  run_jax(args, cells)
  features = run_features(args) if args.features else None

  if torch_res is not None:
    for c in cells:
      per = torch_res.get("cells", {}).get(_torch_bench.cell_key(c), {})
      for mode in ("fwd", "fwdbwd"):
        _finish(c, "torch-flash", mode, dict(per.get(mode) or {"error": torch_res.get("error", "n/a")}), "")

  modes = {i: ["fwd"] if i == "xla" else ["fwd", "fwdbwd"] for i in args.impls}
  results = {"meta": meta, "impls": args.impls, "modes": modes, "cells": cells, "memory": memory,
             "torch_error": (torch_res or {}).get("error")}
  if features is not None:
    results["features"] = features
  md = _report.markdown(results)
  log("\n" + md)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(md)
  try:
    _report.plot(results, os.path.join(args.out, "tflops.png"))
  except Exception as e:  # a missing matplotlib must not lose the numbers
    log(f"plot skipped: {_torch_bench.short_error(e)}")
  log(f"wrote results.json, results.md, tflops.png to {args.out} "
      f"({time.perf_counter() - t_start:.0f} s total)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
