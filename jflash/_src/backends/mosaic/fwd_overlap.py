"""The forward's variant schedules of one consumer's key tiles, which fwd.py runs in
place of its step loops: ``MosaicConfig.overlap`` (FA3's intra-warpgroup overlap,
``overlapped``) and ``MosaicConfig.paired`` (matmuls issued in pairs, ``paired``)."""

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


def paired(carry, lo, full_lo, full_hi, hi, *, sync, softmax, k_late, pv, slot_of,
           release_k, release_v, my_q, k_smem, v_smem, k_full, v_full, p_smem, dtype):
  """The key tiles ``[lo, hi)`` of one consumer, issued in pairs (``MosaicConfig.paired``).

  Step j issues PV of tile j-1 and QK^T of tile j back to back, waits for both, then runs
  the softmax of tile j. A prologue issues QK^T of tile lo alone, an epilogue the last PV.
  In the default schedule a consumer waits for its PV before it issues its next QK^T, so
  the tensor cores drain between the two (the wait's latency and the issue, once per step
  and warpgroup). Here the other warpgroup's pair is already queued when ours completes,
  and one wait covers both matmuls. What crosses the loop is P (bf16) and not the scores,
  which the softmax reads in the step that computed them.

  Ping-pong points (``sync``): one before and one after each issue, none around the
  epilogue's PV: ``2 * (hi - lo)`` in all, as ``step`` makes. So the warpgroups take
  turns issuing whole pairs. K's slot goes back after its QK^T (or, with ``k_late``,
  after the softmax that read the key ids there), V's after its PV, so the producer may
  refill K a step earlier than V. ``p_smem`` (interpret mode only) stages P in SMEM.
  """
  acc0, m0, l0 = carry
  bq, bk = m0.shape[0], k_smem.shape[1]
  d = acc0.shape[1]

  def scores_of(j, s, m, l, masked):
    if not k_late:
      release_k(j)
    new = softmax(s, j, m, l, masked)
    if k_late:
      release_k(j)
    return new

  def first():
    slot = slot_of(lo)
    sync()  # our turn to issue
    plgpu.barrier_wait(k_full.at[slot])

    def qk(ref):
      plgpu.wgmma(ref, my_q, k_smem.at[slot].T)
      sync()  # issued: the other warpgroup's turn
      return ref[...]

    s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
    # Tile lo may or may not need the predicate: the masked path is right for both. The
    # accumulator is still zero, so alpha need not be applied.
    p16, m, l, _ = scores_of(lo, s, m0, l0, masked=True)
    return p16, m, l

  def nothing():
    return plgpu.layout_cast(jnp.zeros((bq, bk), dtype), plgpu.Layout.WGMMA), m0, l0

  p16, m, l = lax.cond(lo < hi, first, nothing)

  def step(j, carry, masked: bool):
    acc, p16, m, l = carry
    slot, prev = slot_of(j), slot_of(j - 1)
    sync()  # our turn to issue

    def issue(pv_ref, s_ref, p_operand):
      plgpu.barrier_wait(v_full.at[prev])
      plgpu.wgmma(pv_ref, p_operand, v_smem.at[prev])
      plgpu.barrier_wait(k_full.at[slot])
      plgpu.wgmma(s_ref, my_q, k_smem.at[slot].T)
      sync()  # both issued: the other warpgroup's turn

    if p_smem is None:
      # Both accumulators in one run_state, which waits for both when it returns; the
      # running sums go in without a copy.
      zeros = plgpu.layout_cast(jnp.zeros((bq, bk), jnp.float32), plgpu.Layout.WGMMA)
      acc, s = pl.run_state(lambda refs: issue(*refs, p16))(
          (plgpu.ACC.init(acc), plgpu.ACC.init(zeros)))
    else:
      def body(pv_ref, s_ref):
        p_smem[...] = p16
        plgpu.commit_smem()
        issue(pv_ref, s_ref, p_smem)
        s = plgpu.wgmma_accumulator_load(s_ref)  # both done
        return acc + pv_ref[...], s

      acc, s = pl.run_scoped(body, plgpu.ACC((bq, d), jnp.float32),
                             plgpu.ACC((bq, bk), jnp.float32))
    release_v(j - 1)
    p16, m, l, alpha = scores_of(j, s, m, l, masked)
    return acc * per_row(alpha, acc.shape), p16, m, l

  carry = (acc0, p16, m, l)
  after = lambda x: jnp.maximum(x, lo + 1)
  carry = lax.fori_loop(lo + 1, full_lo, functools.partial(step, masked=True), carry)
  carry = lax.fori_loop(after(full_lo), full_hi, functools.partial(step, masked=False), carry)
  carry = lax.fori_loop(after(full_hi), hi, functools.partial(step, masked=True), carry)
  acc, p16, m, l = carry

  def last():
    slot = slot_of(hi - 1)
    plgpu.barrier_wait(v_full.at[slot])
    out = pv(acc, p16, slot)
    release_v(hi - 1)
    return out

  acc = lax.cond(lo < hi, last, lambda: acc)
  return acc, m, l
