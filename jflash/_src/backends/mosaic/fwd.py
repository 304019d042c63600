"""Mosaic GPU (Hopper) forward kernel, FlashAttention-3 style.

One CTA owns ``2 * block_q`` query rows of one (batch, head) and runs three warpgroups:

* a producer that only issues TMA loads: K and V tiles stream into a ring of ``stages``
  SMEM slots, each guarded by a "full" barrier (TMA arrival) and a "consumed" barrier
  (both consumers done with the slot);
* two consumers, ``block_q`` rows each: ``wgmma`` for QK^T (Q and K from SMEM) and PV
  (P from registers), the online softmax in registers with ``exp2`` (the base-2 scale
  folded into the scores by logits.scores). A schedule barrier makes them take turns on
  the tensor cores (ping-pong), so one's softmax runs under the other's matmuls.

Which key tiles a consumer visits, and which need the element predicate, is asked of
mask.kv_block_range; masked tiles call mask.visible. The producer loads the union of
both consumers' ranges; a consumer steps through that union too and *skips* (waits,
releases, computes nothing) the tiles outside its own range, so that both stay in step
on the shared ring and barriers. Fully masked tiles (causal upper triangle, windows,
padding) are never loaded.

``interpret=True`` runs the same kernel in Pallas's GPU interpreter on CPU. That
interpreter lacks wgmma with a register operand and pre-initialised accumulators, so
there, and only there, P goes through SMEM and PV accumulates into a fresh accumulator.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jflash._src import logits as logits_lib
from jflash._src import mask as mask_lib
from jflash._src.backends.mosaic.config import CONSUMER_WGS, MosaicConfig
from jflash._src.problem import Problem

_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per query row of a wgmma tile
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per key column
_PRODUCER = CONSUMER_WGS  # warpgroup index of the TMA producer


def _smem_tile(shape, dtype):
  # 128-byte swizzle over (8, 64) tiles: the layout wgmma reads without bank conflicts.
  swizzle = 128
  tiling = plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize))
  return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(swizzle)))


def _rows(x, shape):
  """A per-row vector broadcast over the columns of a ``shape`` tile."""
  return lax.broadcast_in_dim(x, shape, [0])


def _kernel(q_ref, k_ref, v_ref, qv_ref, kvv_ref, o_ref, lse_ref,
            q_smem, k_smem, v_smem, lse_smem, p_smem, q_full, k_full, v_full, consumed, sched,
            *, p: Problem, cfg: MosaicConfig, nq: int, nk: int, groups: int, interpret: bool):
  bq, bk, stages = cfg.block_q, cfg.block_kv, cfg.stages
  d = q_smem.shape[-1]
  dtype = q_smem.dtype
  # The last query tiles first: under a causal mask they have the most keys.
  qt = nq - 1 - lax.axis_index("q")
  h, b, wg = lax.axis_index("h"), lax.axis_index("b"), lax.axis_index("wg")
  q_valid, kv_valid = qv_ref[b], kvv_ref[b]
  cta_q0 = qt * (CONSUMER_WGS * bq)
  # Key tiles either consumer may need: what the producer loads, what both step through.
  u_lo, _, _, u_hi = mask_lib.kv_block_range(p.mask, cta_q0, CONSUMER_WGS * bq, bk, nk,
                                             q_valid, kv_valid)
  slot_of = lambda i: lax.rem(i - u_lo, stages)

  def sync():
    # Ping-pong: each arrive+wait pairs one warpgroup's point with the other's.
    if cfg.pingpong:
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(sched)

  @pl.when(wg == _PRODUCER)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")
    kh = lax.div(h, jnp.asarray(groups, h.dtype))

    def load(i):
      slot = slot_of(i)
      src = (b, pl.ds(i * bk, bk), kh)
      plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_full.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_full.at[slot])

    first = jnp.minimum(u_lo + stages, u_hi)
    pl.loop(u_lo, first)(load)

    @pl.loop(first, u_hi)
    def _steady(i):
      plgpu.barrier_wait(consumed.at[slot_of(i)])
      load(i)

  @pl.when(wg < _PRODUCER)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    q0 = cta_q0 + wg * bq
    lo, full_lo, full_hi, hi = (
        jnp.clip(x, u_lo, u_hi)
        for x in mask_lib.kv_block_range(p.mask, q0, bq, bk, nk, q_valid, kv_valid))
    my_q = q_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), h], my_q, q_full.at[wg])
    plgpu.barrier_wait(q_full.at[wg])
    q_pos = plgpu.broadcasted_iota(jnp.int32, (bq,), 0, layout=_ROW) + q0

    def release(i, slot):
      # Arrive only where the producer will wait for this slot again: a barrier phase
      # nobody waits for would be left dangling (the interpreter checks this).
      @pl.when(i + stages < u_hi)
      def _():
        plgpu.barrier_arrive(consumed.at[slot])

    def skip(i, carry):
      slot = slot_of(i)
      plgpu.barrier_wait(k_full.at[slot])  # keeps this warpgroup's barrier phases in step
      plgpu.barrier_wait(v_full.at[slot])
      sync()
      sync()
      release(i, slot)
      return carry

    def step(i, carry, masked: bool):
      acc, m, l = carry
      slot = slot_of(i)
      plgpu.barrier_wait(k_full.at[slot])

      def qk(ref):
        plgpu.wgmma(ref, my_q, k_smem.at[slot].T)
        sync()  # our QK is issued: the other warpgroup may issue its PV
        return ref[...]

      s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
      s, _ = logits_lib.scores(s, p.scale, p.softcap, base2=True)
      if masked:
        k_pos = plgpu.broadcasted_iota(jnp.int32, (bk,), 0, layout=_COL) + i * bk
        s = jnp.where(mask_lib.visible(p.mask, q_pos, k_pos, q_valid, kv_valid), s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=1))
      # A row that has seen only masked keys keeps m = -inf; shift it by 0 so that
      # exp2 gives 0 rather than NaN. Unmasked tiles always raise m above -inf.
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
      pr = jnp.exp2(s - _rows(m_use, s.shape))
      alpha = jnp.exp2(m - m_use)
      l = l * alpha + pr.sum(axis=1)
      p16 = pr.astype(dtype)
      acc = acc * _rows(alpha, acc.shape)
      if cfg.pingpong:
        plgpu.barrier_arrive(sched)  # softmax done
      plgpu.barrier_wait(v_full.at[slot])
      if cfg.pingpong:
        plgpu.barrier_wait(sched)  # the other warpgroup has issued its QK
      if interpret:
        my_p = p_smem.at[wg]
        my_p[...] = p16
        plgpu.commit_smem()

        def pv(ref):
          plgpu.wgmma(ref, my_p, v_smem.at[slot])
          return ref[...]

        acc = acc + pl.run_scoped(pv, plgpu.ACC((bq, d), jnp.float32))
      else:
        def pv(ref):
          plgpu.wgmma(ref, p16, v_smem.at[slot])

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      release(i, slot)
      return acc, m_new, l

    init = (plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA),
            plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), _ROW),
            plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), _ROW))
    pl.when(wg == 1)(sync)  # warpgroup 0 goes first
    carry = lax.fori_loop(u_lo, lo, skip, init)
    carry = lax.fori_loop(lo, full_lo, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), carry)
    acc, m, l = lax.fori_loop(hi, u_hi, skip, carry)
    pl.when(wg == 0)(sync)

    # Rows with no visible key (or padding rows): output 0, lse +inf (see mask.py).
    live = (q_pos < q_valid) & (l > 0.0)
    l_safe = jnp.where(live, l, 1.0)
    inv = jnp.where(live, 1.0 / l_safe, 0.0)
    my_q[...] = (acc * _rows(inv, acc.shape)).astype(dtype)  # Q's slot now stages O
    my_lse = lse_smem.at[wg]
    my_lse[...] = jnp.where(live, (m + jnp.log2(l_safe)) * logits_lib.LN2, jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(my_q, o_ref.at[b, pl.ds(q0, bq), h])
    plgpu.copy_smem_to_gmem(my_lse, lse_ref.at[b, h, pl.ds(q0, bq)])
    plgpu.wait_smem_to_gmem(0)


def forward(p: Problem, cfg: MosaicConfig, q, k, v, q_valid, kv_valid):
  """Padded ``q [B, Tp, N, D]``, ``k, v [B, Sp, K, D]`` (Tp a multiple of
  ``cfg.q_multiple``, Sp of ``cfg.block_kv``, D in {64, 128, 256}), ``q_valid,
  kv_valid [B]`` -> ``out [B, Tp, N, D]``, ``lse [B, N, Tp]`` (f32, natural log)."""
  b, tp, n, d = q.shape
  sp, kh = k.shape[1], k.shape[2]
  bq, bk, stages = cfg.block_q, cfg.block_kv, cfg.stages
  nq = tp // cfg.q_multiple
  interpret = p.interpret
  scratch = [
      _smem_tile((CONSUMER_WGS, bq, d), q.dtype),  # Q, then O
      _smem_tile((stages, bk, d), k.dtype),
      _smem_tile((stages, bk, d), v.dtype),
      plgpu.SMEM((CONSUMER_WGS, bq), jnp.float32),  # lse staging for its TMA store
      _smem_tile((CONSUMER_WGS, bq, bk), q.dtype) if interpret else None,  # P (see above)
      plgpu.Barrier(num_barriers=CONSUMER_WGS),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=CONSUMER_WGS, num_barriers=stages),
      plgpu.Barrier(num_arrivals=CONSUMER_WGS),
  ]
  kernel = functools.partial(_kernel, p=p, cfg=cfg, nq=nq, nk=sp // bk, groups=n // kh,
                             interpret=interpret)
  return plgpu.kernel(
      kernel,
      out_type=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
      scratch_types=scratch,
      grid=(nq, n, b),
      grid_names=("q", "h", "b"),
      num_threads=CONSUMER_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      kernel_name="jflash_mosaic_fwd",
  )(q, k, v, q_valid, kv_valid)
