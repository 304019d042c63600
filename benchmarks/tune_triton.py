"""Sweeps Triton kernel configs on the GPU (one variable block at a time).

  PYTHONPATH=. python3 benchmarks/tune_triton.py --d 64 128 --s 4096

Prints, for each (d, s, causal), fwd TFLOP/s per forward config and fwd+bwd TFLOP/s per
dK/dV and dQ config, each varied from the current heuristic default.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

import jflash
from jflash._src.backends.triton import backend
from jflash._src.backends.triton.config import TritonConfig

FWD = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 4, 3),
       (64, 64, 4, 3), (128, 64, 4, 4), (64, 128, 4, 3)]
DKV = [(32, 128, 4, 3), (64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 2),
       (128, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3)]
DQ = [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 8, 2),
      (128, 64, 4, 3), (128, 32, 8, 3)]


def timeit(fn, *args, reps=10):
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / reps)
  return best


def measure(cfg, q, k, v, do, causal, flops):
  f = lambda q, k, v: jflash.dot_product_attention(q, k, v, is_causal=causal, implementation="triton")
  with backend.override_config(cfg):
    fwd = jax.jit(f).lower(q, k, v).compile()
    fb = jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do)).lower(q, k, v, do).compile()
  return flops / timeit(fwd, q, k, v) / 1e12, 3.5 * flops / timeit(fb, q, k, v, do) / 1e12


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
  ap.add_argument("--s", type=int, nargs="+", default=[4096])
  ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
  ap.add_argument("--parts", nargs="+", default=["fwd", "dkv", "dq"])
  args = ap.parse_args()
  causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
  for d in args.d:
    for s in args.s:
      for causal in causals:
        b, n = 16384 // s, 2048 // d
        ks = jax.random.split(jax.random.PRNGKey(0), 4)
        q, k, v, do = (jax.random.normal(x, (b, s, n, d), jnp.bfloat16) for x in ks)
        flops = 4 * b * n * s * s * d * (0.5 if causal else 1.0)
        base = TritonConfig.for_problem(s, s, d)
        print(f"== d={d} s={s} causal={causal} default={base}", flush=True)
        variants = {"fwd": [("block_q", "block_k", "num_warps", "num_stages"), FWD],
                    "dkv": [("dkv_block_q", "dkv_block_k", "dkv_warps", "dkv_stages"), DKV],
                    "dq": [("dq_block_q", "dq_block_k", "dq_warps", "dq_stages"), DQ]}
        for part in args.parts:
          names, grid = variants[part]
          for vals in grid:
            cfg = dataclasses.replace(base, **dict(zip(names, vals)))
            try:
              tf, tfb = measure(cfg, q, k, v, do, causal, flops)
              print(f"  {part:4s} {vals}: fwd {tf:6.1f}  f+b {tfb:6.1f}", flush=True)
            except Exception as e:  # a config may not fit in shared memory
              print(f"  {part:4s} {vals}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
  main()
