"""Times the "mosaic" (Hopper) kernels against cuDNN and jflash's Triton kernels.

  PYTHONPATH=. python3 benchmarks/mosaic_probe.py                      # the default grid
  PYTHONPATH=. python3 benchmarks/mosaic_probe.py --s 4096 --heads 16x128 \
      --sweep-block-kv 64 128 --sweep-stages 2 3 --sweep-pingpong 1 0   # MosaicConfig sweep
  PYTHONPATH=. python3 benchmarks/mosaic_probe.py --modes fwd --impls mosaic cudnn \
      --variants overlap=1 overlap=1,fold_scale=1   # named variants next to the default
  PYTHONPATH=. python3 benchmarks/mosaic_probe.py --s 1024 4096 --modes fwd --impls mosaic cudnn \
      --variants q_tiles_per_cta=2 q_tiles_per_cta=4   # several q tiles per CTA
  PYTHONPATH=. python3 benchmarks/mosaic_probe.py --modes fwdbwd --mosaic-bwd \
      --sweep-bwd dkv_block_q=64,dq_block_kv=64 dkv_block_q=128,dkv_stages=3  # Mosaic backward
  PYTHONPATH=. python3 benchmarks/mosaic_probe.py --s 4096 16384 --modes fwdbwd --mosaic-bwd \
      --impls cudnn --sweep-bwd "" dq_mode=atomic dq_mode=ordered   # fused dQ vs the dQ kernel
  PYTHONPATH=. python3 benchmarks/mosaic_probe.py --s 16384 --heads 16x128 --causal yes \
      --docs 8 --impls mosaic triton --variants q_tiles_per_cta=2 q_tiles_per_cta=4  # packed
  PYTHONPATH=.:benchmarks python3 benchmarks/mosaic_probe.py --s 16384 --heads 16x128 \
      --modes fwd --impls cudnn --variants q_registers=0 --sustain 1.5  # + clock, per GHz
  PYTHONPATH=. python3 benchmarks/mosaic_probe.py --s 16384 --heads 16x128 --causal yes \
      --window 4096 --modes fwdbwd --impls cudnn --mosaic-bwd --sweep-bwd "" dkv_stages=3

Grid: bf16, b*s = 16k tokens, heads x head_dim in {16x128, 32x64}, s in {1k, 4k, 16k},
causal and not. Prints TFLOP/s (fwd: 4*b*h*s^2*d, halved when causal; fwd+bwd: 3.5x
that) per implementation and the ratios mosaic/cudnn and mosaic/triton. Each number is
the median over ``--loops`` loops of ``--reps`` back-to-back calls of a compiled function,
after ``--warmup`` calls, ended by block_until_ready; within a cell and mode the loops
of all implementations and variants take turns (``interleaved_seconds``).

``--sustain SECONDS`` adds, per cell and mode, ``--sustain-rounds`` rounds of one loop of
about SECONDS per implementation in turn, timed with the SM clock and power that
nvidia-smi samples meanwhile (sustained.py). The lent H200s run attention at their power
cap, where each kernel settles at a clock of its own. So a variant's sustained TFLOP/s
and its TFLOP/s per GHz (work per cycle) say more than the short loops do
(benchmarks/README.md, "Sustained load and the power cap").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jflash
from jflash._src import determinism
from jflash._src.backends.mosaic import backend as mosaic_backend
from jflash._src.backends.mosaic.config import MosaicBwdConfig, MosaicConfig

# benchmarks/ is on sys.path when this runs as a script.
from _features import doc_lengths, visible_pairs
import sustained as sustained_lib


def attention(impl: str, segment_ids=None, window=None):
  """``window``: None, or ``local_window_size`` (jax.nn's meaning) for every implementation."""
  if impl.startswith("mosaic_bwd"):  # mosaic, its backward switched on by the caller
    impl = "mosaic"
  if impl == "cudnn":
    return lambda q, k, v, causal: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn", local_window_size=window)
  return lambda q, k, v, causal: jflash.dot_product_attention(
      q, k, v, is_causal=causal, implementation=impl, segment_ids=segment_ids,
      local_window_size=window)


def packed_ids(b: int, s: int, docs: int):
  """int32 ``[b, s]`` segment ids of ``docs`` documents (the lengths bench.py's feature
  cases use), and the (query, key) pairs they leave visible per head, causal or not."""
  lengths = doc_lengths(s, docs)
  ids = np.repeat(np.arange(docs), lengths)
  pairs = {True: sum(n * (n + 1) // 2 for n in lengths), False: sum(n * n for n in lengths)}
  return jnp.asarray(np.broadcast_to(ids, (b, s)), jnp.int32), pairs


def make_fn(impl: str, mode: str, causal: bool, segment_ids=None, window=None):
  attn = attention(impl, segment_ids, window)
  if mode == "fwd":
    return jax.jit(lambda q, k, v, do: attn(q, k, v, causal))

  def fwdbwd(q, k, v, do):
    out, pullback = jax.vjp(lambda q, k, v: attn(q, k, v, causal), q, k, v)
    return out, pullback(do)
  return jax.jit(fwdbwd)


def median_seconds(fn, args, *, warmup: int, reps: int, loops: int) -> float:
  return interleaved_seconds({"fn": fn}, args, warmup=warmup, reps=reps, loops=loops)["fn"]


def interleaved_seconds(fns, args, *, warmup: int, reps: int, loops: int) -> dict:
  """Median seconds per call of each of ``fns`` ``{label: fn}``, after its compile and
  ``warmup`` calls, over ``loops`` rounds in which every fn runs ``reps`` calls in
  turn: a drift of the GPU's clocks reaches them all alike (bench.py does the same)."""
  for fn in fns.values():
    jax.block_until_ready(fn(*args))  # compile
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  times = {label: [] for label in fns}
  for _ in range(loops):
    for label, fn in fns.items():
      t0 = time.perf_counter()
      for _ in range(reps):
        out = fn(*args)
      jax.block_until_ready(out)
      times[label].append((time.perf_counter() - t0) / reps)
  return {label: statistics.median(t) for label, t in times.items()}


def inputs(b, s, n, d, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  xs = [jax.random.normal(x, (b, s, n, d), jnp.float32).astype(jnp.bfloat16) for x in ks]
  return jax.block_until_ready(xs)


def max_rel_diff(a, b) -> float:
  a, b = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (a, b))
  return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def bwd_config(impl: str, s: int, d: int, segments: bool = False,
               causal: bool = False) -> MosaicBwdConfig:
  """'mosaic_bwd[field=value,...]' -> the heuristic MosaicBwdConfig with those fields,
  from the config the product would pick (XLA_FLAGS' determinism included)."""
  cfg = MosaicBwdConfig.for_problem(s, s, d, deterministic=determinism.required(),
                                    segments=segments, causal=causal)
  spec = impl[len("mosaic_bwd["):-1] if impl.endswith("]") else ""
  fields = dict(kv.split("=") for kv in spec.split(",") if kv)
  # Each value parsed as the field's type: ints, bools as 0/1, and strings such as
  # dq_mode=atomic.
  parse = lambda t, v: bool(int(v)) if t is bool else t(v)
  return dataclasses.replace(
      cfg, **{k: parse(type(getattr(cfg, k)), v) for k, v in fields.items()})


def fwd_config(base: MosaicConfig, spec: str) -> MosaicConfig:
  """'field=value,...' (e.g. 'overlap=1,block_kv=192') -> ``base`` with those fields."""
  fields = dict(kv.split("=") for kv in spec.split(",") if kv and kv != "default")
  return dataclasses.replace(
      base, **{k: type(getattr(base, k))(int(v)) for k, v in fields.items()})


def sweep_label(cfg: MosaicConfig) -> str:
  """The sweep's label: block_kv, stages, pingpong, and the variant flags that are on."""
  extra = "".join(f",{short}={int(getattr(cfg, name))}" for name, short in (
      ("overlap", "ov"), ("fold_scale", "fs"), ("q_outer", "qo")) if getattr(cfg, name))
  if cfg.q_tiles_per_cta != 1:
    extra += f",qt={cfg.q_tiles_per_cta}"
  if (cfg.producer_regs, cfg.consumer_regs) != (40, 232):
    extra += f",r={cfg.producer_regs}/{cfg.consumer_regs}"
  return f"mosaic[bkv={cfg.block_kv},st={cfg.stages},pp={int(cfg.pingpong)}{extra}]"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--s", type=int, nargs="+", default=[1024, 4096, 16384])
  ap.add_argument("--heads", nargs="+", default=["16x128", "32x64"], help="N x head_dim")
  ap.add_argument("--tokens", type=int, default=16384, help="b * s")
  ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
  ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"])
  ap.add_argument("--impls", nargs="+", default=["mosaic", "cudnn", "triton"])
  ap.add_argument("--sweep-block-kv", type=int, nargs="*", default=[])
  ap.add_argument("--sweep-stages", type=int, nargs="*", default=[])
  ap.add_argument("--sweep-pingpong", type=int, nargs="*", default=[])
  ap.add_argument("--sweep-overlap", type=int, nargs="*", default=[])
  ap.add_argument("--sweep-fold-scale", type=int, nargs="*", default=[])
  ap.add_argument("--sweep-q-outer", type=int, nargs="*", default=[])
  ap.add_argument("--sweep-q-tiles", type=int, nargs="*", default=[],
                  help="MosaicConfig.q_tiles_per_cta values")
  ap.add_argument("--sweep-regs", nargs="*", default=[],
                  help="setmaxnreg splits 'producer/consumer', e.g. 40/232 24/240")
  ap.add_argument("--variants", nargs="*", default=[],
                  help="forward MosaicConfigs to time next to the default 'mosaic', each "
                       "'field=value,...' over the heuristic default, e.g. overlap=1 "
                       "overlap=1,fold_scale=1,block_kv=192,stages=3")
  ap.add_argument("--docs", type=int, default=0,
                  help="pack this many documents of random lengths into each sequence "
                       "(segment_ids; cudnn skipped; TFLOP/s of visible pairs only)")
  ap.add_argument("--window", type=int, default=0,
                  help="causal with a sliding window: local_window_size=(W, 0) (as bench.py's "
                       "feature case); TFLOP/s of visible pairs only")
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--loops", type=int, default=5)
  ap.add_argument("--json", default=None, help="also write the rows to this file")
  ap.add_argument("--sustain", type=float, default=0.0,
                  help="also time sustained loops of this many seconds per implementation, "
                       "with the SM clock (see the module docstring)")
  ap.add_argument("--sustain-rounds", type=int, default=2)
  ap.add_argument("--mosaic-bwd", action="store_true",
                  help="fwdbwd: also time 'mosaic_bwd', mosaic with the Mosaic backward kernels "
                       "(MosaicConfig.mosaic_backward), and print its grads' difference to cudnn's")
  ap.add_argument("--sweep-bwd", nargs="*", default=[],
                  help="with --mosaic-bwd: MosaicBwdConfig overrides to time, each "
                       "'field=value,...' (default: the heuristic only)")
  args = ap.parse_args()
  if args.window and (args.causal != "yes" or args.docs):
    ap.error("--window W times causal attention with a (W, 0) window: give --causal yes, "
             "and no --docs")
  window = (args.window, 0) if args.window else None
  impls = list(args.impls)
  if args.mosaic_bwd:
    impls += [f"mosaic_bwd[{s}]" for s in args.sweep_bwd] or ["mosaic_bwd"]

  dev = jax.devices()[0]
  print(f"# {dev.device_kind} jax {jax.__version__}", flush=True)
  sampler = None
  if args.sustain:
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    sampler = sustained_lib.ClockSampler(gpu)
  causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
  sweeping = bool(args.sweep_block_kv or args.sweep_stages or args.sweep_pingpong
                  or args.sweep_overlap or args.sweep_fold_scale or args.sweep_q_outer
                  or args.sweep_q_tiles or args.sweep_regs)
  if (sweeping or args.variants) and "mosaic" not in impls:
    impls.append("mosaic")  # the forward sweeps and variants are configs of "mosaic"
  rows = []
  for heads, s, causal in itertools.product(args.heads, args.s, causals):
    n, d = (int(x) for x in heads.split("x"))
    b = max(1, args.tokens // s)
    q, k, v, do = inputs(b, s, n, d)
    flops = 4 * b * n * s * s * d * (0.5 if causal else 1.0)
    ids = None
    if args.docs:
      ids, pairs = packed_ids(b, s, args.docs)
      flops = 4 * b * n * d * pairs[causal]
    if window:
      flops = 4 * b * n * d * visible_pairs("window", s, args.window)
    base = MosaicConfig.for_problem(s, s, d, segments=ids is not None, causal=causal,
                                    sm_count=mosaic_backend.sm_count(), batch_heads=b * n)
    configs = [None]
    if sweeping:
      regs = [tuple(int(x) for x in r.split("/")) for r in args.sweep_regs] or [
          (base.producer_regs, base.consumer_regs)]
      configs = [dataclasses.replace(base, block_kv=bk, stages=st, pingpong=bool(pp),
                                     overlap=bool(ov), fold_scale=bool(fs), q_outer=bool(qo),
                                     producer_regs=r[0], consumer_regs=r[1],
                                     q_tiles_per_cta=qt)
                 for bk, st, pp, ov, fs, qo, r, qt in itertools.product(
                     args.sweep_block_kv or [base.block_kv],
                     args.sweep_stages or [base.stages],
                     args.sweep_pingpong or [int(base.pingpong)],
                     args.sweep_overlap or [int(base.overlap)],
                     args.sweep_fold_scale or [int(base.fold_scale)],
                     args.sweep_q_outer or [int(base.q_outer)], regs,
                     args.sweep_q_tiles or [base.q_tiles_per_cta])]
    labels = {}  # id(config) -> label, for the --variants configs
    for spec in args.variants:
      cfg = fwd_config(base, spec)
      labels[id(cfg)] = f"mosaic[{spec}]"
      configs.append(cfg)
    print(f"== b={b} s={s} n={n} d={d} causal={causal} window={window} default={base}",
          flush=True)
    ref_out = None
    ref_grads = None
    for mode in args.modes:
      mult = 1.0 if mode == "fwd" else 3.5
      tflops = {}
      compiled = {}  # label -> (impl, compiled fn), timed side by side below
      for impl in sorted(impls, key=lambda i: i != "cudnn"):  # cudnn first: the reference
        if impl.startswith("mosaic_bwd") and mode == "fwd":
          continue  # the same forward as mosaic
        if impl == "cudnn" and ids is not None:
          continue  # jax.nn passes cuDNN no segment ids
        for cfg in (configs if impl == "mosaic" else [None]):
          label = impl if cfg is None else labels.get(id(cfg)) or sweep_label(cfg)
          # The jitted dispatch caches traces by Problem, not by config: start clean, and
          # compile ahead of time under the config.
          jax.clear_caches()
          try:
            fn = make_fn(impl, mode, causal, ids, window)
            with contextlib.ExitStack() as stack:
              if impl.startswith("mosaic_bwd"):
                stack.enter_context(mosaic_backend.override_config(
                    dataclasses.replace(base, mosaic_backward=True)))
                bwd_cfg = bwd_config(impl, s, d, segments=ids is not None, causal=causal)
                stack.enter_context(mosaic_backend.override_bwd_config(bwd_cfg))
                print(f"  {mode:6s} {impl} {bwd_cfg}", flush=True)
              if cfg is not None:
                stack.enter_context(mosaic_backend.override_config(cfg))
              fn = fn.lower(q, k, v, do).compile()
            while label in compiled:  # the same variant twice: time both
              label += "'"
            compiled[label] = (impl, fn)
          except Exception as e:  # a config may not fit, or an implementation refuse
            print(f"  {mode:6s} {label:34s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
      secs = interleaved_seconds({label: fn for label, (_, fn) in compiled.items()},
                                 (q, k, v, do), warmup=args.warmup, reps=args.reps,
                                 loops=args.loops)
      long = {}
      if sampler is not None:
        long = sustained_lib.sustained({label: fn for label, (_, fn) in compiled.items()},
                                       [(q, k, v, do)], secs, seconds=args.sustain,
                                       rounds=args.sustain_rounds)
      for label, (impl, fn) in compiled.items():
        sec = secs[label]
        out = fn(q, k, v, do)
        out = out if mode == "fwd" else out[0]
        if ref_out is None and impl == "cudnn":
          ref_out = out
        if mode == "fwdbwd" and impl == "cudnn":
          ref_grads = fn(q, k, v, do)[1]
        if mode == "fwdbwd" and impl.startswith("mosaic_bwd") and ref_grads is not None:
          grads = fn(q, k, v, do)[1]
          print("  " + "  ".join(f"max|{g}-cudnn|/max|cudnn| {max_rel_diff(x, y):.2e}"
                                 for g, x, y in zip(("dq", "dk", "dv"), grads, ref_grads)),
                flush=True)
        diff = "" if ref_out is None else f"  max|out-cudnn|/max|cudnn| {max_rel_diff(out, ref_out):.2e}"
        tf = mult * flops / sec / 1e12
        tflops[label] = tf
        print(f"  {mode:6s} {label:34s} {sec * 1e3:9.3f} ms {tf:7.1f} TFLOP/s{diff}", flush=True)
        row = dict(mode=mode, impl=label, b=b, s=s, n=n, d=d, causal=causal, ms=sec * 1e3,
                   tflops=tf, device=dev.device_kind)
        if label in long:
          mhz, watts = sampler.mean(long[label][1])
          row.update(sustained_tflops=mult * flops / long[label][0] / 1e12, mhz=mhz,
                     watts=watts)
          row["per_ghz"] = row["sustained_tflops"] / mhz * 1e3 if mhz else None
          print(f"  {mode:6s} {label:34s} sustained {row['sustained_tflops']:7.1f} TFLOP/s at "
                f"{mhz or 0:.0f} MHz, {watts or 0:.0f} W: "
                f"{row['per_ghz'] or 0:.1f} TFLOP/s per GHz", flush=True)
        rows.append(row)
      for label, tf in tflops.items():
        if label.startswith("mosaic"):
          ratios = [f"{tf / tflops[o]:.2f}x {o}" for o in ("cudnn", "triton") if o in tflops]
          print(f"  {mode:6s} {label} vs " + ", ".join(ratios), flush=True)
  if sampler is not None:
    sampler.stop()
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
