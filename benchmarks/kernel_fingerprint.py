"""Fingerprints of the Mosaic kernels as traced: a hash of the jaxpr of the forward and
the backward (kernel bodies included; no source locations) for a set of configs. Two
trees that print the same fingerprints run the same kernels, so a refactor (code moved
between files, helpers renamed) can be shown to leave them alone without a GPU. The
lowered Mosaic modules themselves differ with any moved line: they carry source
locations.

    JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/kernel_fingerprint.py > new.txt
    git archive <commit> jflash | tar -x -C /tmp/old
    JAX_PLATFORMS=cpu PYTHONPATH=/tmp/old:. python benchmarks/kernel_fingerprint.py > old.txt
    diff old.txt new.txt
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import jax.numpy as jnp

from jflash._src.backends.mosaic import bwd as mosaic_bwd
from jflash._src.backends.mosaic import fwd as mosaic_fwd
from jflash._src.backends.mosaic.config import MosaicBwdConfig, MosaicConfig
from jflash._src.mask import MaskSpec
from jflash._src.problem import Problem

# (head dim, causal, segment ids, soft-cap, extra MosaicBwdConfig fields)
CASES = [
    (64, True, False, None, dict(dq_mode="atomic")),
    (64, True, False, None, dict(dq_mode="ordered")),
    (64, False, True, 30.0, {}),
    (128, False, False, None, dict(dq_mode="atomic", producer_regs=24)),
    (128, True, False, None, {}),
    (128, True, True, None, {}),
    (256, True, False, None, {}),
    (256, False, True, 30.0, {}),
    (256, True, True, None, {}),
]
# The forward's config as for_problem picks it on a GPU of this many SMs (the persistent
# grid of d=128, and of d=64 at 512 keys); the cases above use the interpret default (0).
SM_COUNT_CASES = [(128, False, False, None, {}), (128, True, False, None, {}),
                  (64, False, False, None, {})]
GPU_SMS = 132


def fingerprints(t: int = 512, b: int = 2, n: int = 4, kh: int = 2):
  cases = [(*c, 0) for c in CASES] + [(*c, GPU_SMS) for c in SM_COUNT_CASES]
  for d, causal, segments, softcap, fields, sms in cases:
    q = jax.ShapeDtypeStruct((b, t, n, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, kh, d), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((b, n, t), jnp.float32)
    lens = jax.ShapeDtypeStruct((b,), jnp.int32)
    ids = [jax.ShapeDtypeStruct((b, t), jnp.int32)] * 2 if segments else []
    p = Problem(mask=MaskSpec(q_len=t - 5, kv_len=t - 9, causal=causal,
                              has_segment_ids=segments),
                scale=0.1, softcap=softcap, implementation="mosaic")
    # (older trees' for_problem lacks these; batch_heads since the balance check)
    extra = dict(sm_count=sms, batch_heads=b * n) if sms else {}
    fcfg = MosaicConfig.for_problem(t, t, d, segments=segments, causal=causal, **extra)
    bcfg = dataclasses.replace(
        MosaicBwdConfig.for_problem(t, t, d, segments=segments, causal=causal), **fields)
    fwd = jax.make_jaxpr(lambda *a: mosaic_fwd.forward(p, fcfg, *a))(q, kv, kv, lens, lens, *ids)
    bwd = jax.make_jaxpr(lambda *a: mosaic_bwd.backward(p, bcfg, *a))(
        q, kv, kv, q, rows, rows, lens, lens, *ids)
    digest = lambda j: hashlib.sha1(str(j).encode()).hexdigest()[:16]
    label = f"d={d} causal={causal} segments={segments} softcap={softcap} {fields}"
    label += f" sms={sms}" if sms else ""
    yield f"{label:70} fwd {digest(fwd)} bwd {digest(bwd)}"


if __name__ == "__main__":
  for line in fingerprints():
    print(line, flush=True)
