"""One-token decode latency (us) and K/V read bandwidth (GB/s) against a long KV cache.

  python benchmarks/decode_bench.py                     # S in 4k 32k 128k, B in 1 8
  python benchmarks/decode_bench.py --s 32768 --b 8 --fill 0.5
  python benchmarks/decode_bench.py --sweep --s 32768   # DecodeConfig sweep (tuning)
  python benchmarks/decode_bench.py --cpu-smoke         # tiny f32 shapes, every code path

q ``[B, 1, N, H]`` against k, v ``[B, S, K, H]`` (bf16, N=32, K=8, H=128 by default),
``key_value_seq_lengths = fill * S`` (the cache index). Implementations:

* ``jflash-decode``: ``jflash.dot_product_attention(implementation="triton")``, which
  takes the split-K decode path (backends/triton/decode.py) for such short queries;
* ``jflash-nodecode``: the same call with the decode path switched off (the regular
  forward kernel: a 16-row query tile per query head walking all keys);
* ``cudnn``, ``xla``: ``jax.nn.dot_product_attention(implementation=...)``; a shape or
  feature an implementation refuses shows as n/a.

Timing: each jitted call runs ``sets`` decode steps back to back on distinct caches (so
caches smaller than L2 are not read from it; their total is >= 256 MiB when memory
allows), returning every output; latency = median call time / sets, including kernel
launch gaps as in a jitted decode loop. Bandwidth counts the valid K and V bytes read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))  # the repo root, for `import jflash`

IMPLS = ["jflash-decode", "jflash-nodecode", "cudnn", "xla"]
L2_FLUSH_BYTES = 256 * 2**20
MAX_SET_BYTES = 24 * 2**30  # all cache copies together


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--s", type=int, nargs="+", default=[4096, 32768, 131072], help="cache lengths")
  p.add_argument("--b", type=int, nargs="+", default=[1, 8], help="batch sizes")
  p.add_argument("--n", type=int, default=32, help="query heads")
  p.add_argument("--k", type=int, default=8, help="key/value heads")
  p.add_argument("--h", type=int, default=128, help="head dim")
  p.add_argument("--t", type=int, default=1, help="query tokens per step")
  p.add_argument("--fill", type=float, default=1.0, help="valid fraction of the cache")
  p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
  p.add_argument("--sweep", action="store_true", help="time DecodeConfig variants instead")
  p.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
  p.add_argument("--cpu-smoke", action="store_true", help="tiny f32 shapes on CPU")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.cpu_smoke:
    os.environ["JAX_PLATFORMS"] = "cpu"  # before JAX is imported
    args.s, args.b, args.n, args.k, args.h = [64, 200], [1, 2], 4, 2, 16
  run(args)


def run(args):
  import dataclasses

  import jax
  import jax.numpy as jnp
  import numpy as np

  import _jax_bench
  import jflash
  from jflash._src.backends.triton import decode
  from jflash._src.backends.triton.config import DecodeConfig
  from jflash._src.layout import next_pow2

  dtype = jnp.float32 if args.cpu_smoke else jnp.bfloat16
  itemsize = jnp.dtype(dtype).itemsize
  timing = (dict(target_s=0.01, loops=1, min_reps=1, max_reps=2) if args.cpu_smoke
            else dict(target_s=0.2, loops=5, min_reps=5, max_reps=200))

  def attention(impl):
    if impl.startswith("jflash"):
      return lambda q, k, v, kv_len: jflash.dot_product_attention(
          q, k, v, key_value_seq_lengths=kv_len, implementation="triton")
    return lambda q, k, v, kv_len: jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=kv_len, implementation=impl)

  def compiled(impl, inputs, settings):
    """The jitted multi-step call, compiled inside ``settings`` (the decode toggles act
    at trace time)."""
    attn = attention(impl)
    fn = jax.jit(lambda q, kv_len, ks, vs: [attn(q, k, v, kv_len) for k, v in zip(ks, vs)])
    with settings:
      return fn.lower(*inputs).compile()

  def make_inputs(b, s):
    set_bytes = 2 * b * s * args.k * args.h * itemsize
    sets = int(max(1, min(-(-L2_FLUSH_BYTES // set_bytes), MAX_SET_BYTES // set_bytes, 64)))
    sets = 2 if args.cpu_smoke else sets
    keys = jax.random.split(jax.random.key(0), 2 * sets + 1)
    rnd = lambda kk, shape: jax.random.normal(kk, shape, jnp.float32).astype(dtype)
    q = rnd(keys[0], (b, args.t, args.n, args.h))
    ks = [rnd(kk, (b, s, args.k, args.h)) for kk in keys[1:sets + 1]]
    vs = [rnd(kk, (b, s, args.k, args.h)) for kk in keys[sets + 1:]]
    kv_len = jnp.full((b,), max(1, int(round(args.fill * s))), jnp.int32)
    jax.block_until_ready((q, ks, vs))
    return (q, kv_len, ks, vs), sets

  def timed(row, exe, inputs, sets, **kw):
    sec, reps, _ = _jax_bench.time_fn(exe, [inputs], **(kw or timing))
    nbytes = 2 * row["b"] * row["kv_len"] * args.k * args.h * itemsize
    row.update(us=1e6 * sec / sets, gbps=nbytes / (sec / sets) / 1e9, reps=reps)

  def error(e):
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"

  def compare(b, s, inputs, sets):
    rows, outs = [], {}
    for impl in args.impls:
      row = {"impl": impl, "b": b, "s": s, "kv_len": int(inputs[1][0]), "sets": sets}
      settings = decode.settings(enabled=impl != "jflash-nodecode")
      try:
        exe = compiled(impl, inputs, settings)
        outs[impl] = np.asarray(exe(*inputs)[0], np.float32)
        timed(row, exe, inputs, sets)
      except Exception as e:  # an implementation refusing the shape is a result, not a crash
        row["error"] = error(e)
      rows.append(row)
    ref = next((outs[i] for i in ("xla", "jflash-nodecode", "cudnn") if i in outs), None)
    for row in rows:
      if row["impl"] in outs and ref is not None:
        row["max_abs_diff_vs_ref"] = float(np.abs(outs[row["impl"]] - ref).max())
      print(_fmt(row), flush=True)
    return rows

  def sweep(b, s, inputs, sets):
    """DecodeConfig variants around the heuristic default, for one shape."""
    g = args.n // args.k
    base = DecodeConfig.for_problem(b, args.k, s, max(16, next_pow2(g * args.t)),
                                    max(16, next_pow2(args.h)), decode._num_sms())
    grid = (((16, 32), (4,), (3,)) if args.cpu_smoke  # code path only
            else ((32, 64, 128), (2, 4, 8), (2, 3, 4)))
    rows = []
    for block_k in grid[0]:
      for splits in sorted({max(1, base.num_splits // 2), base.num_splits, 2 * base.num_splits}):
        for warps in grid[1]:
          for stages in grid[2]:
            cfg = dataclasses.replace(base, block_k=block_k, num_splits=splits,
                                      num_warps=warps, num_stages=stages)
            row = {"impl": "jflash-decode", "b": b, "s": s, "kv_len": int(inputs[1][0]),
                   "sets": sets, "config": dataclasses.asdict(cfg), "default": cfg == base}
            try:
              exe = compiled("jflash-decode", inputs, decode.settings(config=cfg))
              timed(row, exe, inputs, sets, target_s=0.1, loops=3, min_reps=3, max_reps=100)
            except Exception as e:
              row["error"] = error(e)
            rows.append(row)
            print(_fmt(row), flush=True)
    ok = [r for r in rows if "us" in r]
    if ok:
      best = min(ok, key=lambda r: r["us"])
      default = next((r["us"] for r in ok if r["default"]), float("nan"))
      print(f"  best b={b} s={s}: {best['config']} {best['us']:.1f} us (default {default:.1f} us)")
    return rows

  info = _jax_bench.device_info()
  print(f"# {info}  N={args.n} K={args.k} H={args.h} T={args.t} fill={args.fill} "
        f"{jnp.dtype(dtype).name}", flush=True)
  rows = []
  for b in args.b:
    for s in args.s:
      inputs, sets = make_inputs(b, s)
      rows += (sweep if args.sweep else compare)(b, s, inputs, sets)
      del inputs
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "decode_sweep.json" if args.sweep else "decode_results.json")
  with open(path, "w") as f:
    json.dump({"device": info, "args": vars(args), "rows": rows}, f, indent=1)
  print(f"wrote {path}")


def _fmt(row):
  head = f"{row['impl']:>16} b={row['b']:<2} s={row['s']:<7} kv={row['kv_len']:<7}"
  if "config" in row:
    c = row["config"]
    head += f" bk={c['block_k']:<3} P={c['num_splits']:<3} w={c['num_warps']} st={c['num_stages']}"
  if "error" in row:
    return f"{head}  n/a  ({row['error']})"
  tail = f"  {row['us']:9.1f} us  {row['gbps']:8.1f} GB/s"
  if "max_abs_diff_vs_ref" in row:
    tail += f"  |diff|={row['max_abs_diff_vs_ref']:.2g}"
  return head + tail


if __name__ == "__main__":
  main()
