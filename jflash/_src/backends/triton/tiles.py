"""Tile-level pieces shared by the Triton forward, dQ and dK/dV kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jflash._src import logits as logits_lib
from jflash._src import mask as mask_lib
from jflash._src.problem import Problem


def dot(a, b, *, trans_b: bool = False):
  """``a @ b`` (or ``a @ b.T``) on the tensor cores, accumulating in f32.

  f32 inputs use full f32 precision (Triton would otherwise pick tf32).
  """
  contract_b = 1 if trans_b else 0
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)


def masked_scores(p: Problem, qk, q0, k0, q_valid, kv_valid, q_seg, kv_seg, *,
                  masked: bool, transpose: bool = False):
  """Base-2 logits of a tile, with invisible entries at -inf when ``masked``.

  ``qk`` is ``[bq, bk]`` (``[bk, bq]`` when ``transpose``). Returns ``(s, tanh, vis)``;
  vis is None for an unmasked tile.
  """
  s, t = logits_lib.scores(qk, p.scale, p.softcap, base2=True)
  if not masked:
    return s, t, None
  bq, bk = (qk.shape[1], qk.shape[0]) if transpose else qk.shape
  vis = mask_lib.visible(p.mask, q0 + jnp.arange(bq), k0 + jnp.arange(bk), q_valid, kv_valid,
                         q_seg, kv_seg, transpose=transpose)
  return jnp.where(vis, s, -jnp.inf), t, vis


def three_phase_loop(ranges, step, carry):
  """Runs ``step(j, carry, masked)`` over ``[lo, full_lo)`` and ``[full_hi, hi)`` with the
  predicate and over ``[full_lo, full_hi)`` without it (the ranges of ``mask``)."""
  lo, full_lo, full_hi, hi = ranges
  carry = lax.fori_loop(lo, full_lo, lambda j, c: step(j, c, True), carry)
  carry = lax.fori_loop(full_lo, full_hi, lambda j, c: step(j, c, False), carry)
  return lax.fori_loop(full_hi, hi, lambda j, c: step(j, c, True), carry)


def reversed_index(n: int):
  """Grid index -> tile index, last tile first. Under a causal mask the last query tiles
  have the most keys; launching them first keeps the tail of the grid short."""
  return lambda i: n - 1 - i
