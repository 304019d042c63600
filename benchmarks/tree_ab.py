"""A/B of one implementation across source trees: times jflash.dot_product_attention
(fwd, and fwd+bwd through jax.vjp) under jit in the tree this file sits in, so that old
and new trees run side by side on one GPU (used in session 23 to bisect the Triton d=128
s=4096 forward; benchmarks/RESULTS.md, 2026-11-28):

    for r in 4af7b9e HEAD; do mkdir -p ab_$r; git archive $r jflash | tar -x -C ab_$r
      cp benchmarks/tree_ab.py ab_$r/; done
    for r in 4af7b9e HEAD; do (cd ab_$r && python3 tree_ab.py $r triton); done

Arguments: a tag to print, the implementation (default triton). bf16, b*s = 16k tokens,
16 heads of d=128; the cells are in CELLS. Prints the median of 5 loops of 20 calls."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # this tree's jflash first

import jax
import jax.numpy as jnp

import jflash

CELLS = ((4096, False), (16384, False), (4096, True))  # (s, causal)


def main():
  tag = sys.argv[1]
  impl = sys.argv[2] if len(sys.argv) > 2 else "triton"
  for s, causal in CELLS:
    b, n, d = 16384 // s, 16, 128
    q, k, v, do = (jax.random.normal(x, (b, s, n, d), jnp.bfloat16)
                   for x in jax.random.split(jax.random.key(0), 4))
    attn = lambda q, k, v: jflash.dot_product_attention(q, k, v, is_causal=causal,
                                                        implementation=impl)

    def fwd_bwd(q, k, v, do):
      _, pullback = jax.vjp(attn, q, k, v)
      return pullback(do)

    flops = 4 * b * n * s * s * d / (2 if causal else 1)
    for name, fn, args, mult in (("fwd", jax.jit(attn), (q, k, v), 1.0),
                                 ("fwdbwd", jax.jit(fwd_bwd), (q, k, v, do), 3.5)):
      jax.block_until_ready(fn(*args))
      loops = []
      for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(20):
          r = fn(*args)
        jax.block_until_ready(r)
        loops.append((time.perf_counter() - t0) / 20)
      t = sorted(loops)[len(loops) // 2]
      print(f"{tag} s={s} causal={causal} {name}: {t * 1e3:.3f} ms "
            f"{mult * flops / t / 1e12:.1f} TFLOP/s", flush=True)


if __name__ == "__main__":
  main()
