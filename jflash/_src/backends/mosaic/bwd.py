"""Mosaic GPU (Hopper) backward kernels: dK/dV (a key tile per CTA), dQ (a query tile per CTA).

Both recompute ``p = exp2(s * log2e - lse * log2e)`` tile by tile from the natural-log
lse of the forward (+inf on empty rows, so p = 0 there with no mask); ``delta =
rowsum(dO * O) - dlse`` comes precomputed. With ``cfg.dq_mode="separate"`` no atomics:
every output tile is owned by one CTA, so results are bitwise reproducible
(MosaicBwdConfig.for_problem picks it where that is asked for; elsewhere, where faster,
"atomic").
Each CTA runs ``cfg.consumers`` consumer warpgroups of 64 rows (the M of one wgmma) and
one TMA producer warpgroup that streams the other operand through a ring of ``stages``
SMEM slots ("full" barriers: TMA arrival; "consumed" barriers: every consumer is done
with the slot). With ``cfg.split_head_dim`` (d=256) the two consumers share one 64-row
tile instead, and each accumulates half of the head dim of dK and dV (or dQ): the whole
would not fit one warpgroup's registers. They divide the score tiles by role: consumer 0
computes S (S^T) and P, consumer 1 dP and dS, each over the whole streamed tile, and they
pass them to each other through SMEM (``role_step``, ``bwd_parts.Exchange``), so no
matmul is done twice. At the end they write their halves of the result into the tile's
SMEM, meet, and the first stores it (``bwd_parts.store_tile``).

* dK/dV: consumers own 64 keys each (K, V in SMEM); the ring streams Q, dO, lse, delta
  tiles of every query head of the GQA group over mask.q_block_range.
  ``S^T = K Q^T``, ``dP^T = V dO^T``, ``P^T = exp2(S^T - lse)``, ``dV += P^T dO``,
  ``dS^T = P^T (dP^T - delta)``, ``dK += dS^T Q``.
* dQ: consumers own 64 query rows each (Q, dO in SMEM, lse, delta in registers); the
  ring streams K, V tiles over mask.kv_block_range. ``dQ += dS K``.
* Fused dQ (``dq_mode`` "atomic" or "ordered", no dQ kernel): the dK/dV consumers also
  compute ``dS K`` for each query tile they visit and add it into an f32 dQ in HBM with
  a TMA reduce-add (fused_dq.py): 5 matmuls per pair of tiles instead of 7. "atomic"
  adds in whatever order the CTAs reach a tile (not reproducible); "ordered" makes the
  64-key tiles take turns in key order on a semaphore per (b, head, query tile).
  "atomic" with two consumers (``cfg.split_dq``, FA3's layout) adds one partial per
  CTA instead of one per consumer: both put their dS^T in SMEM, meet on a barrier, and
  each multiplies all 128 keys into its half of the partial (``fused_dq.dq_half``); TMA
  reduce-adds run at ~3.2 TB/s on an H100 (benchmarks/tma_reduce_probe.py), so the bytes
  added bound the kernel.
  Deadlock freedom of "ordered": a key tile only waits for lower key tiles of the same
  (b, key head): the other consumer of its own CTA, or CTAs of a lower "k" of that same
  (b, key head), which have lower block indices ("k" is the innermost grid axis, CUDA's x).
  CTAs are dispatched in block order (as FA3's deterministic mode also assumes), so
  every CTA waited for has started; the lowest unfinished key tile never waits, and by
  induction every wait ends. A consumer waiting for its turn at ring step c blocks
  nothing the lower consumer of its CTA needs: that one reaches step c, since the
  producer only waits for slots that both consumers have released.

As in fwd.py, the producer loads the union of the consumers' ranges and a consumer
*skips* (waits, releases, computes nothing) the tiles outside its own; masked tiles call
mask.visible, fully visible ones skip it. Segment ids narrow the ranges per consumer
(common.cta_segment_ranges); the ids of the streamed tiles ride in the ring with them, a
consumer's own once with its K/V or Q. ``interpret=True`` runs in Pallas's GPU
interpreter, which lacks wgmma with a register operand and pre-initialised
accumulators: there, and only there, P^T, dS^T and dS go through SMEM.
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
from jflash._src.backends.mosaic import bwd_parts as parts
from jflash._src.backends.mosaic import fused_dq
from jflash._src.backends.mosaic.config import WG_ROWS, MosaicBwdConfig
from jflash._src.backends.mosaic.common import COL, ROW, consumers, cta_segment_ranges
from jflash._src.backends.mosaic.common import smem_tile, tile_work
from jflash._src.backends.mosaic.schedule import sorted_order
from jflash._src.layout import round_up
from jflash._src.problem import Problem

# d=256 splits the head dim between the consumers (MosaicBwdConfig.split_head_dim): its
# f32 dK and dV would not fit one warpgroup's registers.
HEAD_DIMS = (64, 128, 256)


def _grad_scores(p: Problem, qk, dp, lse, delta, axis: int, vis):
  """From a tile of q.k products and of dO.v products to ``(P, dS)`` (dS with respect to
  ``x = scale * qk``). ``lse``, ``delta``: per query, along ``axis`` of the tile (1 for
  [q, k] tiles, 0 for the transposed [k, q] tiles); ``vis``: the predicate or None."""
  pr, t = _probs(p, qk, lse, axis, vis)
  return pr, _dscores(pr, t, dp, delta, axis)


def _per_q(x, shape, axis: int):
  return lax.broadcast_in_dim(x, shape, [1 - axis])


def _probs(p: Problem, qk, lse, axis: int, vis):
  """The first half of ``_grad_scores``: ``(P, t)`` (t: the soft-cap's tanh or None)."""
  s, t = logits_lib.scores(qk, p.scale, p.softcap, base2=True)
  if vis is not None:
    s = jnp.where(vis, s, -jnp.inf)
  # 0 where masked or on empty rows (lse = +inf).
  return jnp.exp2(s - _per_q(lse * logits_lib.LOG2E, s.shape, axis)), t


def _dscores(pr, t, dp, delta, axis: int):
  """The second half of ``_grad_scores``: dS from P and the dO.v products."""
  return logits_lib.dscores(pr * (dp - _per_q(delta, pr.shape, axis)), t)


def _with_segments(kernel, has_segments: bool, has_order: bool = False):
  """plgpu.kernel's body for ``kernel``: 8 inputs, then (with segment ids) the q ids, kv
  ids and cta_segment_ranges, passed on as ``segs`` (None without them), then (with
  ``has_order``, MosaicBwdConfig.sorted_grid) the launch order, as ``order``; the refs
  after them (a fused dQ's offsets and accumulator, the outputs, the scratch) follow the
  8 inputs."""
  n_in = 8 + 3 * has_segments + has_order

  def body(*refs, **kw):
    segs = refs[8:11] if has_segments else None
    order = refs[n_in - 1] if has_order else None
    return kernel(*refs[:8], *refs[n_in:], segs=segs, order=order, **kw)

  return body


def _launched(order, ids, sizes):
  """sorted_grid: the grid indices ``ids`` (over ``sizes``, the last CUDA's fastest) of
  the CTA launched ``i``-th (flat) run the flat index ``order[i]`` instead."""
  flat = 0
  for i, size in zip(ids, sizes):
    flat = flat * size + i
  flat = order[flat]
  out = []
  for size in reversed(sizes):
    out.append(lax.rem(flat, jnp.int32(size)))
    flat = lax.div(flat, jnp.int32(size))
  return out[::-1]


def _launch_order(work, copies: int):
  """The flat (batch, copy, tile) to launch ``i``-th, longest first: ``work [B, n]``,
  the same for each of ``copies`` heads."""
  return sorted_order(work, copies)[::-1]


def _range_row(segs, b, tile, wg):
  """Row ``wg`` of this CTA's cta_segment_ranges (``wg`` = consumers: the union)."""
  return None if segs is None else tuple(segs[2][b, tile, wg, j] for j in range(4))




def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qv_ref, kvv_ref, *refs,
                segs, order, p: Problem, cfg: MosaicBwdConfig, nq: int, nk: int,
                groups: int, interpret: bool):
  """``refs``: [offsets, dq_acc (fused dQ only)], dk, dv, then the scratch of
  ``backward``; ``kseg_smem`` (a consumer's key ids), ``qseg_smem`` (the ring's query
  ids) are None without segment ids. With a fused dQ the grid covers batches
  ``offsets[0] ...`` and key heads ``offsets[1] ...`` (see fused_dq.fused_backward), and
  ``dq_acc`` holds only those (their query heads), from its own index 0."""
  offsets, dq_acc = refs[:2] if cfg.fused_dq else (None, None)
  (dk_ref, dv_ref, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, stage_smem, ds_smem,
   dq_smem, kv_full, full, consumed, met, done, ready, kseg_smem,
   qseg_smem) = refs[2 * cfg.fused_dq:]
  sems = None
  if cfg.dq_mode == "ordered" and not interpret:
    # One get_global for the whole kernel: each call is a distinct zeroed buffer, and the
    # step is traced once per loop (masked, unmasked), which must share the turns.
    batch, _, n, _ = dq_acc.shape
    sems = pl.get_global(plgpu.SemaphoreType.REGULAR((batch * n * nq,)))
  bk, bq, wgs, tiles = WG_ROWS, cfg.dkv_block_q, cfg.consumers, cfg.tiles_per_cta
  d, dtype = q_smem.shape[-1], q_smem.dtype
  kh_c, b_c, wg = lax.axis_index("k_head"), lax.axis_index("b"), lax.axis_index("wg")
  if order is not None:
    b_c, kh_c, kt = _launched(order, (b_c, kh_c, lax.axis_index("k")),
                              (k_ref.shape[0], k_ref.shape[2], nk))
  kh, b = (kh_c + offsets[1], b_c + offsets[0]) if cfg.fused_dq else (kh_c, b_c)
  q_valid, kv_valid = qv_ref[b], kvv_ref[b]
  if order is None:
    kt = lax.axis_index("k")
  cta_k0 = kt * (tiles * bk)
  # Query tiles any consumer may need: what the producer loads, for every query head.
  u_lo, _, _, u_hi = mask_lib.q_block_range(p.mask, cta_k0, tiles * bk, bq, nq, q_valid,
                                            kv_valid, _range_row(segs, b, kt, tiles))
  per_head = u_hi - u_lo
  ring = parts.Ring(cfg.dkv_stages, groups * per_head, full, consumed)

  @pl.when(wg == wgs)
  def _producer():
    plgpu.set_max_registers(cfg.producer_regs, action="decrease")

    def load(c, slot):
      g = lax.div(c, per_head)
      h = kh * groups + g
      rows = pl.ds((u_lo + c - g * per_head) * bq, bq)
      plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[slot], full.at[slot])
      plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[slot], full.at[slot])
      plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[slot], full.at[slot])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[slot], full.at[slot])
      if segs is not None:
        plgpu.copy_gmem_to_smem(segs[0].at[b, rows], qseg_smem.at[slot], full.at[slot])

    ring.produce(load)

  @functools.partial(consumers, cfg.static_wg, wg, wgs)
  def _consumer(wg):
    plgpu.set_max_registers(cfg.consumer_regs, action="increase")
    # This consumer's key tile and its columns of dK and dV (parts.own_tile).
    own, cols = parts.own_tile(cfg, wg, d)
    # split_head_dim: P^T and dS^T of the step's query rows, one from each consumer.
    xchg = parts.Exchange(ring, done) if cfg.split_head_dim else None
    k0 = cta_k0 + own * bk
    my_k, my_v = k_smem.at[pl.ds(own * bk, bk)], v_smem.at[own]

    @parts.by_first(cfg, wg, own)
    def _():
      plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(k0, bk), kh], my_k, kv_full.at[own])
      plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(k0, bk), kh], my_v, kv_full.at[own])
      if segs is not None:
        plgpu.copy_gmem_to_smem(segs[1].at[b, pl.ds(k0, bk)], kseg_smem.at[own],
                                kv_full.at[own])

    ranges = tuple(
        jnp.clip(x, u_lo, u_hi)
        for x in mask_lib.q_block_range(p.mask, k0, bk, bq, nq, q_valid, kv_valid,
                                        _range_row(segs, b, kt, own)))
    k_pos = plgpu.broadcasted_iota(jnp.int32, (bk,), 0, layout=ROW) + k0
    plgpu.barrier_wait(kv_full.at[own])
    kv_seg = None if segs is None else plgpu.load(kseg_smem.at[own], layout=ROW)

    def vis_of(masked: bool, i, ids):
      """The predicate of this consumer's keys against the query rows of streamed tile
      ``i`` (``ids``: their ids' SMEM ref, or None), or None for a tile needing none."""
      if not masked:
        return None
      q_pos = plgpu.broadcasted_iota(jnp.int32, (bq,), 0, layout=COL) + i * bq
      q_seg = None if segs is None else plgpu.load(ids, layout=COL)
      return mask_lib.visible(p.mask, q_pos, k_pos, q_valid, kv_valid, q_seg, kv_seg,
                              transpose=True)

    q_ids = lambda *at: None if segs is None else qseg_smem.at[at]

    def step(c, slot, i, carry, masked: bool, g):
      if cfg.split_head_dim:
        return role_step(c, slot, i, carry, masked)
      dk, dv = carry
      q_s, do_s = q_smem.at[slot], do_smem.at[slot]
      st, dpt = parts.matmuls((bk, bq), (my_k, q_s.T), (my_v, do_s.T))
      lse = plgpu.load(lse_smem.at[slot], layout=COL)
      delta = plgpu.load(delta_smem.at[slot], layout=COL)
      vis = vis_of(masked, i, q_ids(slot))
      stage = stage_smem.at[wg] if interpret else None
      if cfg.dv_early and not interpret:
        return early_step(c, i, g, (dk, dv), st, dpt, lse, delta, vis, q_s, do_s)
      pt, dst = _grad_scores(p, st, dpt, lse, delta, 0, vis)
      dst = dst.astype(dtype)
      mmas = ((dst, parts.cols_of(q_s, cols)), (pt.astype(dtype), parts.cols_of(do_s, cols)))
      if cfg.split_dq:
        # dK and dV run while we wait for the other consumer's dS^T; then our half of the
        # CTA's dQ partial.
        share_ds(c, dst)
        return dq_half_step(c, i, g, (dk, dv), mmas, stage)
      if cfg.fused_dq:
        ds_smem.at[wg][...] = dst  # the dQ matmul reads dS = (dS^T)^T from SMEM
        plgpu.commit_smem()
      dk, dv = parts.mmas((dk, dv), mmas, stage)
      if cfg.fused_dq:
        add_dq(i, g)
      return dk, dv

    def role_step(c, slot, i, accs, masked):
      """``split_head_dim``: consumer 0 computes S^T and P^T of the whole streamed tile,
      consumer 1 dP^T and, once P^T is in, dS^T; through SMEM each passes its tiles to
      the other (``ready``: P^T in, dS^T in), and both multiply them into their halves
      of dK's and dV's head dim. dS^T = G (dP^T - delta) takes G = P^T, times 1 - t^2
      under a soft-cap, from consumer 0 in float16 (``g_x``; P^T's own tile where that
      is f16 and there is no soft-cap). The rounding of G is one the other paths do not
      have (they multiply P^T in f32): in f16 (11 bits, G in [0, 1]) it adds about a
      quarter of what bfloat16 would (8 bits) to dS^T's own rounding (simulated on
      512 x 256 problems: dK's max error 1.5-2.4e-3 with f32 G, 1.6-2.9e-3 with f16,
      2.7-5.7e-3 with bf16)."""
      q_s, do_s = q_smem.at[slot], do_smem.at[slot]
      pt_x, g_x, ds_x = ds_smem

      @pl.when(wg == 0)
      def _probs_role():
        (st,) = parts.matmuls((bk, bq), (my_k, q_s.T))
        lse = plgpu.load(lse_smem.at[slot], layout=COL)
        pt, t = _probs(p, st, lse, 0, vis_of(masked, i, q_ids(slot)))
        pl.when(c > 0)(lambda: plgpu.barrier_wait(done))  # the last step's readers are done
        pt_x[...] = pt.astype(dtype)
        if g_x is not None:
          g_x[...] = logits_lib.dscores(pt, t).astype(g_x.dtype)
        plgpu.commit_smem()
        plgpu.barrier_arrive(ready.at[0])
        plgpu.barrier_wait(ready.at[1])

      @pl.when(wg == 1)
      def _dscores_role():
        (dpt,) = parts.matmuls((bk, bq), (my_v, do_s.T))
        delta = plgpu.load(delta_smem.at[slot], layout=COL)
        plgpu.barrier_wait(ready.at[0])  # (after the last step's readers: see above)
        g = plgpu.load(pt_x if g_x is None else g_x, (), layout=plgpu.Layout.WGMMA)
        ds_x[...] = (g.astype(jnp.float32) * (dpt - _per_q(delta, dpt.shape, 0))).astype(dtype)
        plgpu.commit_smem()
        plgpu.barrier_arrive(ready.at[1])

      accs = parts.acc_smem(accs, ([(ds_x, parts.cols_of(q_s, cols))],
                                   [(pt_x, parts.cols_of(do_s, cols))]), interpret)
      xchg.finish(c)
      return accs

    def early_step(c, i, g, accs, st, dpt, lse, delta, vis, q_s, do_s):
      """``cfg.dv_early``: dV's wgmma is issued from P^T before dS^T is computed, and dK's
      after it, one wait for both; P^T's f32 tile is dead before dS^T's is made."""
      pt, t = _probs(p, st, lse, 0, vis)
      pt16 = pt.astype(dtype)

      def f(refs):
        dk_ref, dv_ref = refs
        plgpu.wgmma(dv_ref, pt16, parts.cols_of(do_s, cols))
        dst = _dscores(pt, t, dpt, delta, 0).astype(dtype)
        if cfg.split_dq:
          share_ds(c, dst)
        elif cfg.fused_dq:
          ds_smem.at[wg][...] = dst
          plgpu.commit_smem()
        plgpu.wgmma(dk_ref, dst, parts.cols_of(q_s, cols))

      dk, dv = pl.run_state(f)(tuple(plgpu.ACC.init(x) for x in accs))
      if cfg.split_dq:
        return dq_half_step(c, i, g, (dk, dv), (), None)
      if cfg.fused_dq:
        add_dq(i, g)
      return dk, dv

    def add_dq(i, g):
      """The fused dQ without ``split_dq``: this consumer's dS (in ds_smem) times its K,
      added into query tile ``i``'s rows of head ``g``'s dQ."""
      fused_dq.add_dq(p, cfg, ds_smem.at[wg], my_k, dq_smem.at[wg], dq_acc, sems, b=b_c,
                      h=kh_c * groups + g, i=i, k_tile=kt * wgs + wg,
                      nq=nq, nk=nk * tiles, q_valid=q_valid, kv_valid=kv_valid,
                      interpret=interpret)

    def share_ds(c, dst):
      """``cfg.split_dq``: this consumer's dS^T into its rows of the step's buffer (two,
      alternating: a buffer is rewritten two steps on, after the other consumer's dQ
      matmul that read it, which it waited for before meeting us at the step between)."""
      ds_smem.at[lax.rem(c, 2), pl.ds(wg * bk, bk)][...] = dst
      plgpu.commit_smem()
      plgpu.barrier_arrive(met)

    def dq_half_step(c, i, g, accs, mmas, stage):
      mm, where = fused_dq.dq_half(ds_smem.at[lax.rem(c, 2)], k_smem, i=i, wg=wg)
      # dK and dV complete first: issuing the dQ half in their wgmma group (one wait a
      # step, not two) kept P^T and dS^T live beside three accumulators and measured no
      # faster (H100, benchmarks/MOSAIC_NOTES.md, session 6).
      accs = parts.mmas(accs, mmas, stage) if mmas else accs
      plgpu.barrier_wait(met)  # the other consumer's dS^T is in too
      (dq,) = parts.matmuls(mm[0], mm[1:])
      fused_dq.add_dq_half(dq, dq_smem.at[wg], dq_acc, where, b=b_c, h=kh_c * groups + g,
                           kt=kt * wgs, interpret=interpret)
      return tuple(accs)

    def skipped(c, i, g):
      # Outside our range, inside the other consumer's: our dS^T is zero, our half of
      # the CTA's dQ partial is still ours to add. (A step in neither range, a gap in
      # the union that segment ids can leave, adds zeros: rare, and both stay in step.)
      share_ds(c, plgpu.layout_cast(jnp.zeros((bk, bq), dtype), plgpu.Layout.WGMMA))
      dq_half_step(c, i, g, (), (), stage_smem.at[wg] if interpret else None)

    def head(g, carry):
      return parts.visit(ring, g * per_head - u_lo, u_lo, u_hi, ranges,
                    functools.partial(step, g=g), carry,
                    functools.partial(skipped, g=g) if cfg.split_dq else None)

    zeros = plgpu.layout_cast(jnp.zeros((bk, cfg.head_cols(d)), jnp.float32),
                              plgpu.Layout.WGMMA)
    dk, dv = lax.fori_loop(0, groups, head, (zeros, zeros))
    if cfg.split_dq or cfg.split_head_dim:
      # The other consumer's last matmuls read our K (split_dq: its dQ half) or the
      # shared K and V (split_head_dim): meet once more before dK and dV overwrite them.
      plgpu.barrier_arrive(met)
      plgpu.barrier_wait(met)
    # K's and V's slots now stage dK and dV (every wgmma reading them has completed).
    parts.cols_of(my_k, cols)[...] = (dk * p.scale).astype(dtype)
    parts.cols_of(my_v, cols)[...] = dv.astype(dtype)
    plgpu.commit_smem()
    rows = (b, pl.ds(k0, bk), kh)
    parts.store_tile(cfg, met, wg == own, ((my_k, dk_ref.at[rows]), (my_v, dv_ref.at[rows])))


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qv_ref, kvv_ref, dq_ref,
               q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, stage_smem, ds_smem,
               q_full, full, consumed, met, done, ready, qseg_smem, kseg_smem, *, segs,
               order, p: Problem,
               cfg: MosaicBwdConfig, nq: int, nk: int, groups: int, interpret: bool):
  """``qseg_smem`` (a tile's query ids), ``kseg_smem`` (the ring's key ids): None
  without segment ids; ``ds_smem``, ``met``, ``done``, ``ready``: split_head_dim only
  (else None): the step's dS and its factor (role_step), the consumers' meeting before
  dQ overwrites the Q they share, and the barriers of role_step and its parts.Exchange."""
  bq, bk, wgs, tiles = WG_ROWS, cfg.dq_block_kv, cfg.consumers, cfg.tiles_per_cta
  d, dtype = q_smem.shape[-1], q_smem.dtype
  # The last query tiles first: under a causal mask they have the most keys.
  qt = nq - 1 - lax.axis_index("q")
  h, b, wg = lax.axis_index("h"), lax.axis_index("b"), lax.axis_index("wg")
  if order is not None:  # sorted_grid: longest first by the work counted in XLA
    b, h, qt = _launched(order, (b, h, lax.axis_index("q")),
                         (q_ref.shape[0], q_ref.shape[2], nq))
  q_valid, kv_valid = qv_ref[b], kvv_ref[b]
  cta_q0 = qt * (tiles * bq)
  u_lo, _, _, u_hi = mask_lib.kv_block_range(p.mask, cta_q0, tiles * bq, bk, nk, q_valid,
                                             kv_valid, _range_row(segs, b, qt, tiles))
  ring = parts.Ring(cfg.dq_stages, u_hi - u_lo, full, consumed)

  @pl.when(wg == wgs)
  def _producer():
    plgpu.set_max_registers(cfg.producer_regs, action="decrease")
    kh = lax.div(h, jnp.asarray(groups, h.dtype))

    def load(c, slot):
      keys = pl.ds((u_lo + c) * bk, bk)
      plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kh], k_smem.at[slot], full.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kh], v_smem.at[slot], full.at[slot])
      if segs is not None:
        plgpu.copy_gmem_to_smem(segs[1].at[b, keys], kseg_smem.at[slot], full.at[slot])

    ring.produce(load)

  @functools.partial(consumers, cfg.static_wg, wg, wgs)
  def _consumer(wg):
    plgpu.set_max_registers(cfg.consumer_regs, action="increase")
    own, cols = parts.own_tile(cfg, wg, d)  # this consumer's query tile and columns of dQ
    # split_head_dim: dS of the step's keys and its factor, one from each consumer.
    xchg = parts.Exchange(ring, done) if cfg.split_head_dim else None
    q0 = cta_q0 + own * bq
    my_q, my_do = q_smem.at[own], do_smem.at[own]
    rows = pl.ds(q0, bq)

    @parts.by_first(cfg, wg, own)
    def _():
      plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], my_q, q_full.at[own])
      plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], my_do, q_full.at[own])
      plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[own], q_full.at[own])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[own], q_full.at[own])
      if segs is not None:
        plgpu.copy_gmem_to_smem(segs[0].at[b, rows], qseg_smem.at[own], q_full.at[own])

    ranges = tuple(
        jnp.clip(x, u_lo, u_hi)
        for x in mask_lib.kv_block_range(p.mask, q0, bq, bk, nk, q_valid, kv_valid,
                                         _range_row(segs, b, qt, own)))
    q_pos = plgpu.broadcasted_iota(jnp.int32, (bq,), 0, layout=ROW) + q0
    plgpu.barrier_wait(q_full.at[own])
    q_seg = None if segs is None else plgpu.load(qseg_smem.at[own], layout=ROW)
    lse = plgpu.load(lse_smem.at[own], layout=ROW)
    delta = plgpu.load(delta_smem.at[own], layout=ROW)

    def vis_of(masked: bool, j, ids):
      """The predicate of this consumer's query rows against the keys of streamed tile
      ``j`` (``ids``: their ids' SMEM ref, or None), or None for a tile needing none."""
      if not masked:
        return None
      k_pos = plgpu.broadcasted_iota(jnp.int32, (bk,), 0, layout=COL) + j * bk
      kv_seg = None if segs is None else plgpu.load(ids, layout=COL)
      return mask_lib.visible(p.mask, q_pos, k_pos, q_valid, kv_valid, q_seg, kv_seg)

    k_ids = lambda *at: None if segs is None else kseg_smem.at[at]

    def role_step(c, slot, j, dq, masked: bool):
      """``split_head_dim``: consumer 0 computes S and P of the whole streamed tile, and
      passes dS's factor G (P, times 1 - t^2 under a soft-cap; f16, as in _dkv_kernel's
      role_step) through SMEM; consumer 1 computes dP and, once G is in, dS, and passes
      it back (``ready``: G in, dS in); both multiply dS into their halves of dQ."""
      g_x, ds_x = ds_smem

      @pl.when(wg == 0)
      def _probs_role():
        (s,) = parts.matmuls((bq, bk), (my_q, k_smem.at[slot].T))
        pr, t = _probs(p, s, lse, 1, vis_of(masked, j, k_ids(slot)))
        pl.when(c > 0)(lambda: plgpu.barrier_wait(done))  # the last step's readers are done
        g_x[...] = logits_lib.dscores(pr, t).astype(g_x.dtype)
        plgpu.commit_smem()
        plgpu.barrier_arrive(ready.at[0])
        plgpu.barrier_wait(ready.at[1])

      @pl.when(wg == 1)
      def _dscores_role():
        (dp,) = parts.matmuls((bq, bk), (my_do, v_smem.at[slot].T))
        plgpu.barrier_wait(ready.at[0])  # (after the last step's readers: see above)
        g = plgpu.load(g_x, (), layout=plgpu.Layout.WGMMA)
        ds_x[...] = (g.astype(jnp.float32) * (dp - _per_q(delta, dp.shape, 1))).astype(dtype)
        plgpu.commit_smem()
        plgpu.barrier_arrive(ready.at[1])

      (dq,) = parts.acc_smem((dq,), ([(ds_x, parts.cols_of(k_smem.at[slot], cols))],),
                             interpret)
      xchg.finish(c)
      return dq

    def step(c, slot, j, dq, masked: bool):
      if cfg.split_head_dim:
        return role_step(c, slot, j, dq, masked)
      s, dp = parts.matmuls((bq, bk), (my_q, k_smem.at[slot].T), (my_do, v_smem.at[slot].T))
      vis = vis_of(masked, j, k_ids(slot))
      _, ds = _grad_scores(p, s, dp, lse, delta, 1, vis)
      stage = stage_smem.at[wg] if interpret else None
      k_s = parts.cols_of(k_smem.at[slot], cols)
      return parts.mmas((dq,), ((ds.astype(dtype), k_s),), stage)[0]

    zeros = plgpu.layout_cast(jnp.zeros((bq, cfg.head_cols(d)), jnp.float32),
                              plgpu.Layout.WGMMA)
    dq = parts.visit(ring, -u_lo, u_lo, u_hi, ranges, step, zeros)
    if cfg.split_head_dim:  # the other consumer's last S and dP read the shared Q, dO
      plgpu.barrier_arrive(met)
      plgpu.barrier_wait(met)
    parts.cols_of(my_q, cols)[...] = (dq * p.scale).astype(dtype)  # Q's slot now stages dQ
    plgpu.commit_smem()
    parts.store_tile(cfg, met, wg == own, ((my_q, dq_ref.at[b, rows, h]),))


def backward(p: Problem, cfg: MosaicBwdConfig, q, k, v, dout, lse, delta, q_valid, kv_valid,
             q_seg=None, kv_seg=None):
  """``q, dout [B, T, N, D]``, ``k, v [B, S, K, D]`` (D in HEAD_DIMS; T and S at most 8
  or multiples of 8, as in fwd.forward), ``lse, delta [B, N, Tp]`` (f32; lse natural-log,
  +inf on empty and padded rows), ``q_valid, kv_valid [B]``, segment ids ``q_seg [B,
  Tp]``, ``kv_seg [B, Sp]`` (iff ``p.mask.has_segment_ids``; padding ids never equal),
  where Tp is T rounded up to ``cfg.q_multiple`` and Sp is S rounded up to
  ``cfg.k_multiple``. Returns ``dq, dk, dv`` of the shapes of q, k, v: as in
  fwd.forward, the kernels run the padded tiles, their TMA loads fill the rows past T or
  S with zeros and their stores drop them."""
  b, t, n, d = q.shape
  kh = k.shape[2]
  tp, sp = round_up(t, cfg.q_multiple), round_up(k.shape[1], cfg.k_multiple)
  groups, wgs, tiles, interpret = n // kh, cfg.consumers, cfg.tiles_per_cta, p.interpret
  params = dict(
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      num_threads=wgs + 1,
      thread_name="wg",
  )
  args = (q, k, v, dout, lse, delta, q_valid, kv_valid)
  seg = p.mask.has_segment_ids
  if seg and cfg.dq_mode == "ordered":
    # fused_dq.dq_turn assumes the key tiles visiting a query tile are consecutive from the
    # band's first; segment ranges (not monotone for unordered ids) break that.
    raise NotImplementedError("MosaicBwdConfig.dq_mode='ordered' does not support "
                              "segment_ids yet; use dq_mode='atomic' or 'separate'")
  ids = lambda n: plgpu.SMEM(n, jnp.int32) if seg else None
  # The interpreter's SMEM copies of register operands (split_head_dim has none: its
  # exchanged tiles are in SMEM already).
  staged = interpret and not cfg.split_head_dim
  if why := cfg.split_dq_unsupported(d) or cfg.split_head_dim_unsupported(d):
    raise NotImplementedError(why)

  bq, stages, fused, split = cfg.dkv_block_q, cfg.dkv_stages, cfg.fused_dq, cfg.split_dq
  # Per 64-key tile, over query tiles of bq rows.
  extra = (q_seg, kv_seg, cta_segment_ranges(q_seg, kv_seg, bq, WG_ROWS, tiles, by_rows=False)
           ) if seg else ()
  roles = cfg.split_head_dim
  dkv = functools.partial(
      plgpu.kernel,
      scratch_types=[
          smem_tile((tiles * WG_ROWS, d), k.dtype),  # one block: split_dq reads all keys
          smem_tile((tiles, WG_ROWS, d), v.dtype),
          smem_tile((stages, bq, d), q.dtype),
          smem_tile((stages, bq, d), dout.dtype),
          plgpu.SMEM((stages, bq), jnp.float32),
          plgpu.SMEM((stages, bq), jnp.float32),
          smem_tile((wgs, 2, WG_ROWS, bq), q.dtype) if staged else None,  # dS^T, P^T
          # dS^T for dQ: per consumer, or (split) both consumers' in two buffers; or
          # (split_head_dim) P^T, its factor of dS^T in f16 (see _dkv_kernel's role_step;
          # None where P^T's own tile is that) and dS^T.
          (smem_tile((2, wgs * WG_ROWS, bq), q.dtype) if split else
           smem_tile((wgs, WG_ROWS, bq), q.dtype) if fused else
           (smem_tile((WG_ROWS, bq), q.dtype),
            None if p.softcap is None and q.dtype == jnp.float16 else
            smem_tile((WG_ROWS, bq), jnp.float16),
            smem_tile((WG_ROWS, bq), q.dtype)) if roles else None),
          # The dQ partial staged for its TMA add: per consumer, or (split) its half.
          (smem_tile((wgs, *cfg.dq_half_shape(d)), jnp.float32) if split else
           smem_tile((wgs, bq, d), jnp.float32) if fused else None),
          # Each TMA copy arrives once: K, V (+ their ids); Q, dO, lse, delta (+ ids).
          plgpu.Barrier(num_arrivals=2 + seg, num_barriers=tiles),
          plgpu.Barrier(num_arrivals=4 + seg, num_barriers=stages),
          plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
          # The consumers meet: split_dq, both dS^T in; both, before dK/dV overwrite K/V.
          plgpu.Barrier(num_arrivals=wgs) if split or roles else None,
          # split_head_dim: done with the last step's P^T and dS^T (parts.Exchange); P^T
          # in (from consumer 0), dS^T in (from consumer 1).
          plgpu.Barrier(num_arrivals=wgs) if roles else None,
          plgpu.Barrier(num_barriers=2) if roles else None,
          ids((tiles, WG_ROWS)),  # the key tiles' ids
          ids((stages, bq)),  # the ring's query ids
      ],
      # Mosaic reverses the grid: the key tiles, last, are CUDA's fastest axis, so the
      # CTAs of a wave share a (batch, head)'s Q/dO stream in L2 (see fwd.forward).
      grid_names=("b", "k_head", "k"),
      kernel_name="jflash_mosaic_bwd_dkv",
      **params,
  )
  nk = sp // (tiles * WG_ROWS)
  order = cfg.sorted_grid and not fused  # (the fused dQ's launches keep their grid)
  if order:
    work = tile_work(p.mask, tiles * WG_ROWS, bq, nk, tp // bq, q_valid, kv_valid,
                     extra[2][:, :, tiles] if seg else None, by_rows=False)
    extra += (_launch_order(work, kh),)
  body = functools.partial(_with_segments(_dkv_kernel, seg, order), p=p, cfg=cfg,
                           nq=tp // bq, nk=nk, groups=groups, interpret=interpret)
  if fused:
    return fused_dq.fused_backward(p, cfg, dkv, body, args, extra, q, k, v, nk)
  dk, dv = dkv(body, out_type=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                               jax.ShapeDtypeStruct(v.shape, v.dtype)],
               grid=(b, kh, nk))(*args, *extra)

  bk, stages = cfg.dq_block_kv, cfg.dq_stages
  nq = tp // (tiles * WG_ROWS)
  extra = (q_seg, kv_seg, cta_segment_ranges(q_seg, kv_seg, WG_ROWS, bk, tiles, by_rows=True)
           ) if seg else ()
  if cfg.sorted_grid:
    work = tile_work(p.mask, tiles * WG_ROWS, bk, nq, sp // bk, q_valid, kv_valid,
                     extra[2][:, :, tiles] if seg else None, by_rows=True)
    extra += (_launch_order(work, n),)
  dq = plgpu.kernel(
      functools.partial(_with_segments(_dq_kernel, seg, cfg.sorted_grid), p=p, cfg=cfg, nq=nq,
                        nk=sp // bk, groups=groups, interpret=interpret),
      out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_types=[
          smem_tile((tiles, WG_ROWS, d), q.dtype),
          smem_tile((tiles, WG_ROWS, d), dout.dtype),
          plgpu.SMEM((tiles, WG_ROWS), jnp.float32),
          plgpu.SMEM((tiles, WG_ROWS), jnp.float32),
          smem_tile((stages, bk, d), k.dtype),
          smem_tile((stages, bk, d), v.dtype),
          smem_tile((wgs, 1, WG_ROWS, bk), q.dtype) if staged else None,  # dS
          # split_head_dim: dS's factor, in f16, and dS (role_step).
          (smem_tile((WG_ROWS, bk), jnp.float16), smem_tile((WG_ROWS, bk), q.dtype))
          if cfg.split_head_dim else None,
          # Each TMA copy arrives once: Q, dO, lse, delta (+ ids); K, V (+ their ids).
          plgpu.Barrier(num_arrivals=4 + seg, num_barriers=tiles),
          plgpu.Barrier(num_arrivals=2 + seg, num_barriers=stages),
          plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
          # split_head_dim: the consumers' last meeting; done with the last step's dS
          # (parts.Exchange); G in (from consumer 0), dS in (from consumer 1).
          plgpu.Barrier(num_arrivals=wgs) if cfg.split_head_dim else None,
          plgpu.Barrier(num_arrivals=wgs) if cfg.split_head_dim else None,
          plgpu.Barrier(num_barriers=2) if cfg.split_head_dim else None,
          ids((tiles, WG_ROWS)),  # the query tiles' ids
          ids((stages, bk)),  # the ring's key ids
      ],
      grid=(b, n, nq),  # the query tiles fastest (see above)
      grid_names=("b", "h", "q"),
      kernel_name="jflash_mosaic_bwd_dq",
      **params,
  )(*args, *extra)
  return dq, dk, dv
