"""Ring attention speed: tokens/s of causal fwd+bwd with the sequence split over all GPUs.

  python benchmarks/ring_bench.py                       # s = 64k, 96k, 128k on all local GPUs
  python benchmarks/ring_bench.py --s 131072 --layouts zigzag
  python benchmarks/ring_bench.py --cpu-smoke           # tiny shapes, 4 fake CPU devices

For each total length s, ``jflash.ring_attention`` inside ``shard_map`` runs over all P
local devices (s / P tokens each), once per layout, against
``jflash.dot_product_attention`` on one device at ``s * --single-frac`` tokens (default
half the length: with P = 2 the same tokens per device) and, with ``--full``, at s.
bf16, d=128, 16 heads (q and kv), b=1, causal; fwd+bwd is a jitted ``jax.vjp``
returning out, dq, dk, dv, timed as in bench.py (median over loops of back-to-back calls).

Columns: ms per step; tokens/s = b * length / time; TFLOP/s per device, counting
3.5 x 2 b N s^2 d (causal fwd+bwd) for the whole sequence, divided by the devices that
share it (perfect scaling keeps it equal to the one-device rows). ``vs 1 dev`` is the
ring's tokens/s over a one-device row. With P = 2 and the default half length, each
device of the ring does twice the causal work of the half-length run on twice the
tokens, so 1.0 is perfect scaling; the gap is communication that compute did not hide,
per-step overheads and, for the contiguous layout, load imbalance. Before timing, a
correctness check compares the ring with one device at a short length (``--check-s``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))  # the repo root, for `import jflash`


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--s", type=int, nargs="+", default=[65536, 98304, 131072], help="total lengths")
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
  p.add_argument("--d", type=int, default=128)
  p.add_argument("--b", type=int, default=1)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--layouts", nargs="+", default=["zigzag", "contiguous"],
                 choices=["zigzag", "contiguous"])
  p.add_argument("--impl", default=None, choices=["mosaic", "triton", "xla"],
                 help="jflash implementation (default: the best one for the device)")
  p.add_argument("--single-frac", type=float, default=0.5,
                 help="one-device baseline length as a fraction of s")
  p.add_argument("--full", action="store_true", help="also one device at the full length s")
  p.add_argument("--check-s", type=int, default=8192, help="length of the correctness check")
  p.add_argument("--quick", action="store_true", help="fewer timed reps")
  p.add_argument("--out", default=None, help="also write the rows as JSON here")
  p.add_argument("--cpu-smoke", action="store_true",
                 help="s=256,512 on 4 fake CPU devices, d=32, 4 heads, f32 (numbers meaningless)")
  a = p.parse_args(argv)
  if a.cpu_smoke:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=4").strip()
    a.s, a.heads, a.kv_heads, a.d, a.dtype = [256, 512], 4, 2, 32, "float32"
    a.check_s, a.quick, a.full = 128, True, True
  return a


def main(argv=None):
  a = parse_args(argv)
  # NVLink multicast stays off (shared machines): set before JAX starts NCCL.
  os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

  import jflash
  from _jax_bench import time_fn

  devices = jax.devices()
  n_dev = len(devices)
  mesh = jax.make_mesh((n_dev,), ("seq",), axis_types=(AxisType.Auto,))
  seq = NamedSharding(mesh, P(None, "seq"))
  one = jax.sharding.SingleDeviceSharding(devices[0])
  dtype = jnp.dtype(a.dtype)
  kv_heads = a.kv_heads or a.heads
  timing = ({"target_s": 0.03, "loops": 3, "min_reps": 2, "max_reps": 10} if a.quick else
            {"target_s": 0.2, "loops": 5, "min_reps": 3, "max_reps": 30})

  def fwdbwd(attn):
    def step(q, k, v, do):
      out, pullback = jax.vjp(attn, q, k, v)
      return out, pullback(do)
    return step

  def ring_step(layout):
    def local(q, k, v):
      return jflash.ring_attention(q, k, v, axis_name="seq", is_causal=True, layout=layout,
                                   implementation=a.impl)
    attn = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "seq"),) * 3,
                         out_specs=P(None, "seq"), check_vma=False)
    return jax.jit(fwdbwd(attn))

  single_step = jax.jit(fwdbwd(lambda q, k, v: jflash.dot_product_attention(
      q, k, v, is_causal=True, implementation=a.impl)))

  def inputs(s, sharding, seed=0):
    """q, k, v, do of total length s, generated in place with ``sharding``."""
    shapes = [(a.b, s, a.heads, a.d), (a.b, s, kv_heads, a.d), (a.b, s, kv_heads, a.d),
              (a.b, s, a.heads, a.d)]
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    make = jax.jit(lambda kk: [jax.random.normal(k_, sh, jnp.float32).astype(dtype)
                               for k_, sh in zip(kk, shapes)], out_shardings=[sharding] * 4)
    return tuple(jax.block_until_ready(make(keys)))

  print(f"jax {jax.__version__}: {n_dev} x {devices[0].device_kind}; b={a.b} heads={a.heads}/"
        f"{kv_heads} d={a.d} {dtype.name} causal, impl={a.impl or 'auto'}", flush=True)

  # Correctness first: the ring against one device at a short length, natural order.
  q, k, v, do = inputs(a.check_s, one)
  try:
    ref = single_step(q, k, v, do)
  except Exception as e:
    print(f"check: one-device reference failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    ref = None
  for layout in a.layouts if ref is not None else []:
    zig = layout == "zigzag"
    order = (lambda x: jflash.to_zigzag(x, n_dev)) if zig else (lambda x: x)
    unorder = (lambda x: jflash.from_zigzag(x, n_dev)) if zig else (lambda x: x)
    try:
      out, grads = ring_step(layout)(*(jax.device_put(order(x), seq) for x in (q, k, v, do)))
    except Exception as e:  # a backend that cannot lower: say so, time the rest
      print(f"check s={a.check_s} {layout}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
      continue
    errs = []
    for x, r in zip((out,) + grads, (ref[0],) + ref[1]):
      x, r = np.asarray(unorder(x), np.float32), np.asarray(r, np.float32)
      errs.append(float(np.abs(x - r).max() / max(1.0, np.abs(r).max())))
    print(f"check s={a.check_s} {layout}: max rel diff to one device out/dq/dk/dv = "
          + " ".join(f"{e:.1e}" for e in errs), flush=True)
  del q, k, v, do, ref

  def flops(s):
    return 3.5 * 2 * a.b * a.heads * s * s * a.d

  rows = []

  def record(what, devices_used, length, fn, args):
    try:
      t, reps, compile_s = time_fn(fn, [args], **timing)
    except Exception as e:  # an OOM or a missing kernel: report, keep going
      print(f"  {what} s={length}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
      return None
    row = {"what": what, "devices": devices_used, "s": length, "ms": t * 1e3,
           "tokens_per_s": a.b * length / t,
           "tflops_per_device": flops(length) / t / devices_used / 1e12,
           "compile_s": compile_s}
    rows.append(row)
    return row

  table = []
  for s in a.s:
    half = int(round(s * a.single_frac))
    base = record(f"1 device, s*{a.single_frac:g}", 1, half, single_step, inputs(half, one))
    full = record("1 device, full s", 1, s, single_step, inputs(s, one)) if a.full else None
    sharded = inputs(s, seq)
    for layout in a.layouts:
      r = record(f"ring {layout}", n_dev, s, ring_step(layout), sharded)
      if r is not None:
        r["vs_1dev"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        r["vs_full"] = r["tokens_per_s"] / full["tokens_per_s"] if full else None
      table.append((s, base, full, layout, r))
    del sharded

  print()
  print(f"| s | run | devices | length | ms | tokens/s | TFLOP/s per device | vs 1 dev (s*{a.single_frac:g}) | vs 1 dev (full s) |")
  print("|---|---|---|---|---|---|---|---|---|")
  shown = set()
  fmt = lambda x, f: "n/a" if x is None else format(x, f)
  for s, base, full, layout, r in table:
    for extra in (base, full):
      if extra is not None and id(extra) not in shown:
        shown.add(id(extra))
        print(f"| {s} | {extra['what']} | 1 | {extra['s']} | {extra['ms']:.2f} | "
              f"{extra['tokens_per_s']:,.0f} | {extra['tflops_per_device']:.1f} | | |")
    if r is None:
      print(f"| {s} | ring {layout} | {n_dev} | {s} | n/a | n/a | n/a | n/a | n/a |")
    else:
      print(f"| {s} | ring {layout} | {n_dev} | {s} | {r['ms']:.2f} | {r['tokens_per_s']:,.0f} | "
            f"{r['tflops_per_device']:.1f} | {fmt(r['vs_1dev'], '.2f')} | {fmt(r['vs_full'], '.2f')} |")
  if a.out:
    with open(a.out, "w") as f:
      json.dump({"device": devices[0].device_kind, "devices": n_dev, "jax": jax.__version__,
                 "args": vars(a), "rows": rows}, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
