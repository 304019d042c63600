"""Where the Mosaic forward loses time at short sequences: a diagnostic, not a benchmark.

  PYTHONPATH=. python3 benchmarks/fwd_overhead.py [--d 128 64] [--kv 256 512 1024 2048 4096]

1. At b=16, s=1024 (16k tokens): jflash's API (implementation="mosaic") against the bare
   kernel (fwd.forward under jit, no custom_vjp, no custom_partitioning, no padding) and
   cuDNN, and the ops of the API's optimised HLO besides the kernel. A gap between API and
   kernel is wrapper cost; a gap between kernel and cuDNN is the kernel's.
2. The bare kernel (one CTA per ``--q-tiles`` tiles of a head, not the persistent grid
   that d=128 runs by default) at a fixed 1024 queries and key lengths ``--kv``: a least-squares line
   time = a + c * S splits the cost of a query tile into a fixed part (prologue, epilogue,
   launch) and a per-key part, next to cuDNN's line.
Times: median of --loops loops of --reps calls, after a compile and a warm-up.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
# benchmarks/ is on sys.path when this runs as a script.
from mosaic_probe import median_seconds

import jflash
from jflash._src.backends.mosaic import backend as mosaic_backend
from jflash._src.backends.mosaic import fwd as fwd_lib
from jflash._src.backends.mosaic.config import MosaicConfig
from jflash._src.mask import MaskSpec
from jflash._src.problem import Problem


def bare_kernel(b, t, s, d, cfg: MosaicConfig):
  p = Problem(mask=MaskSpec(q_len=t, kv_len=s), scale=1.0 / np.sqrt(d), implementation="mosaic")
  qv, kvv = jnp.full((b,), t, jnp.int32), jnp.full((b,), s, jnp.int32)
  return jax.jit(lambda q, k, v: fwd_lib.forward(p, cfg, q, k, v, qv, kvv)[0])


def hlo_ops(fn, args) -> str:
  """Counts of the ops in the compiled module's entry computation (fusions by kind)."""
  text = fn.lower(*args).compile().as_text()
  entry = text[text.index("ENTRY"):]
  ops = re.findall(r"= \S+ (\w[\w-]*)\(", entry)
  kinds = re.findall(r"kind=(\w+)", entry)
  count = collections.Counter(ops) + collections.Counter(f"fusion:{k}" for k in kinds)
  return ", ".join(f"{k} x{v}" for k, v in sorted(count.items()))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--d", type=int, nargs="+", default=[128, 64])
  ap.add_argument("--kv", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
  ap.add_argument("--q-tiles", type=int, nargs="+", default=[1, 4])
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--loops", type=int, default=5)
  args = ap.parse_args()
  print(f"# {jax.devices()[0].device_kind} jax {jax.__version__}", flush=True)
  b, t = 16, 1024
  for d in args.d:
    n = 2048 // d
    mk = lambda s, seed: jax.random.normal(jax.random.PRNGKey(seed), (b, s, n, d),
                                           jnp.float32).astype(jnp.bfloat16)
    q = mk(t, 0)
    base = MosaicConfig.for_problem(t, t, d, sm_count=mosaic_backend.sm_count(),
                                    batch_heads=b * n)
    print(f"== 1. b={b} s={t} n={n} d={d} (non-causal) default={base}", flush=True)
    k, v = mk(t, 1), mk(t, 2)
    flops = 4 * b * n * t * t * d
    api = jax.jit(lambda q, k, v: jflash.dot_product_attention(q, k, v, implementation="mosaic"))
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
    for name, fn in (("api", api), ("kernel", bare_kernel(b, t, t, d, base)), ("cudnn", cudnn)):
      sec = median_seconds(fn, (q, k, v), warmup=3, reps=args.reps, loops=args.loops)
      print(f"  {name:8s} {sec * 1e3:8.3f} ms {flops / sec / 1e12:7.1f} TFLOP/s", flush=True)
    print(f"  api HLO: {hlo_ops(api, (q, k, v))}", flush=True)

    print(f"== 2. b={b} T={t} n={n} d={d}: time against key length S", flush=True)
    lines = {}
    for name in [f"kernel q_tiles={x}" for x in args.q_tiles] + ["cudnn"]:
      xs, ys = [], []
      for s in args.kv:
        k, v = mk(s, 1), mk(s, 2)
        if name == "cudnn":
          fn = cudnn
        else:
          cfg = dataclasses.replace(MosaicConfig.for_problem(t, s, d),
                                    q_tiles_per_cta=int(name.split("=")[1]))
          fn = bare_kernel(b, t, s, d, cfg)
        try:
          sec = median_seconds(fn, (q, k, v), warmup=3, reps=args.reps, loops=args.loops)
        except Exception as e:  # one failing point leaves the rest of the line
          print(f"  {name:18s} S={s:6d} failed: {type(e).__name__}: {str(e)[:200]}")
          continue
        xs.append(s)
        ys.append(sec * 1e6)
        f = 4 * b * n * t * s * d
        print(f"  {name:18s} S={s:6d} {sec * 1e3:8.3f} ms {f / sec / 1e12:7.1f} TFLOP/s",
              flush=True)
      if len(xs) >= 2:
        slope, icept = np.polyfit(xs, ys, 1)
        lines[name] = (icept, slope)
    for name, (icept, slope) in lines.items():
      print(f"  fit {name:18s} time = {icept:8.1f} us + {slope * 1024:7.1f} us per 1024 keys")


if __name__ == "__main__":
  main()
