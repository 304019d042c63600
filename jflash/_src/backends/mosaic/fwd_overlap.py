"""The forward's variant schedule ``MosaicConfig.overlap``: FA3's intra-warpgroup
overlap of one consumer's key tiles (fwd.py runs it in place of its step loops)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jflash._src.backends.mosaic.common import ROW, per_row


def overlapped(carry, lo, full_lo, full_hi, hi, *, sync, softmax, k_late, pv, slot_of,
               release_k, release_v, my_q, k_smem, v_smem, k_full, v_full, p_smem, dtype):
  """The key tiles ``[lo, hi)`` of one consumer with FA3's intra-warpgroup overlap.

  Step i issues QK^T of tile i, then PV of tile i-1 (P from the step before), and runs
  the softmax of tile i as soon as its scores are in (``wait_n=1``: PV may still be in
  flight). A prologue does tile lo alone, an epilogue the last PV. In the compiled
  kernel the wait for PV comes before the exps (SASS, 2026-11-27), so the softmax does
  not overlap PV; forcing it to (a store of the row sums before that wait) measured
  8-10% slower still (benchmarks/MOSAIC_NOTES.md, session 13).

  Ping-pong points (``sync``): one before the prologue, two per later step (before and
  after issuing), two in the epilogue: ``1 + 2 * (hi - lo)`` in all, and just the one
  where ``lo == hi``, as ``skip`` does two per tile: both warpgroups stay in step. In
  the phase between two points one warpgroup issues its matmuls while the other runs
  its softmax. ``p_smem`` (interpret mode only) stages P for a wgmma from SMEM.
  ``k_late``: release K's slot only after the softmax (which reads the key ids there).
  """
  acc0, m0, l0 = carry
  bq, bk = m0.shape[0], k_smem.shape[1]
  d = acc0.shape[1]

  def first():
    slot = slot_of(lo)
    plgpu.barrier_wait(k_full.at[slot])

    def qk(ref):
      plgpu.wgmma(ref, my_q, k_smem.at[slot].T)
      return ref[...]

    s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
    if not k_late:
      release_k(lo)
    # Tile lo may or may not need the predicate: the masked path is right for both.
    new = softmax(s, lo, m0, l0, masked=True)
    if k_late:
      release_k(lo)
    return new

  def nothing():
    return (plgpu.layout_cast(jnp.zeros((bq, bk), dtype), plgpu.Layout.WGMMA), m0, l0,
            plgpu.layout_cast(jnp.ones((bq,), jnp.float32), ROW))

  sync()
  p16, m, l, alpha = lax.cond(lo < hi, first, nothing)

  def step(i, carry, masked: bool):
    acc, p16, m, l, alpha = carry
    slot, prev = slot_of(i), slot_of(i - 1)
    sync()  # our turn to issue
    plgpu.barrier_wait(k_full.at[slot])

    def issue_and_softmax(s_ref, pv_ref):
      plgpu.wgmma(s_ref, my_q, k_smem.at[slot].T)
      scaled = acc * per_row(alpha, acc.shape)  # runs under QK
      if p_smem is None:
        pv_ref[...] = scaled
        plgpu.barrier_wait(v_full.at[prev])
        plgpu.wgmma(pv_ref, p16, v_smem.at[prev])
      else:
        p_smem[...] = p16
        plgpu.commit_smem()
        plgpu.barrier_wait(v_full.at[prev])
        plgpu.wgmma(pv_ref, p_smem, v_smem.at[prev])
      sync()  # both our matmuls are issued: the other warpgroup's turn
      s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # QK done; PV may still run
      if not k_late:
        release_k(i)
      new = softmax(s, i, m, l, masked)
      if k_late:
        release_k(i)
      out = pv_ref[...]  # waits for PV
      release_v(i - 1)
      return (out if p_smem is None else scaled + out), *new

    return pl.run_scoped(issue_and_softmax, plgpu.ACC((bq, bk), jnp.float32),
                         plgpu.ACC((bq, d), jnp.float32))

  carry = (acc0, p16, m, l, alpha)
  after = lambda x: jnp.maximum(x, lo + 1)
  carry = lax.fori_loop(lo + 1, full_lo, functools.partial(step, masked=True), carry)
  carry = lax.fori_loop(after(full_lo), full_hi, functools.partial(step, masked=False), carry)
  carry = lax.fori_loop(after(full_hi), hi, functools.partial(step, masked=True), carry)
  acc, p16, m, l, alpha = carry

  def last():
    slot = slot_of(hi - 1)
    sync()
    scaled = acc * per_row(alpha, acc.shape)
    plgpu.barrier_wait(v_full.at[slot])
    out = pv(scaled, p16, slot)
    sync()
    release_v(hi - 1)
    return out

  acc = lax.cond(lo < hi, last, lambda: acc)
  return acc, m, l
