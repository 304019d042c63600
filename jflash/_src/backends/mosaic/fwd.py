"""Mosaic GPU (Hopper) forward kernel, FlashAttention-3 style.

One CTA owns ``q_tiles_per_cta`` query tiles of ``2 * block_q`` rows (one by default) of
one (batch, head), run in turn (see ``q_tile``); or, with ``MosaicConfig.persistent``
(d=128's default: one CTA per SM), a grid of that many CTAs deals out the query tiles of
all (batch, head)s, head by head (``work``; the deals are in schedule.py), so that the
CTAs running side by side share a few heads' keys in L2 (or, with ``sorted_deal``, in an
order worked out before the launch: longest tiles first). With ``kv_multicast`` (d=128's
default without a causal mask past 4k keys) that grid runs as clusters of two CTAs on
neighbouring query tiles, which share each K/V tile by TMA multicast (see ``_kernel``).
Each CTA runs three warpgroups:

* a producer that only issues TMA loads: K and V tiles stream into a ring of ``stages``
  SMEM slots, each guarded by a "full" barrier (TMA arrival) and a "consumed" barrier
  (both consumers done with the slot);
* two consumers, ``block_q`` rows each: ``wgmma`` for QK^T (Q and K from SMEM) and PV
  (P from registers), the online softmax in registers with ``exp2`` (the base-2 scale
  folded into the scores by logits.scores). A schedule barrier orders their matmuls
  (ping-pong): one's QK^T is issued before the other's PV. In the compiled kernel the
  two softmaxes run side by side: ptxas moves the "softmax done" arrive up to where the
  scores are in, and forcing it below the softmax (the FA3 ping-pong, whose softmaxes
  take turns) measured 2-12% slower (benchmarks/MOSAIC_NOTES.md, session 13). With
  ``v_wait_first`` a consumer waits for V's tile before its softmax, not after it: a
  barrier wait is a loop, which ends ptxas's basic block, and the softmax's exps then
  share one with the accumulator's rescale and P's packing (session 24).

Which key tiles a consumer visits, and which need the element predicate, is asked of
mask.kv_block_range; masked tiles call mask.visible. With ``narrow_tail`` a consumer's
last masked tile runs only as wide as its rows see of it (mask.tail_keys, in 64-key
steps): under a causal mask the upper consumer computes half of its diagonal tile. The
producer loads the union of both consumers' ranges; a consumer steps through that union
too and *skips* (waits, releases, computes nothing) the tiles outside its own range, so
that both stay in step on the shared ring and barriers. Fully masked tiles (causal upper
triangle, windows, padding) are never loaded.

With several q tiles per CTA the ring runs on from tile to tile: its step counter (hence
slot and barrier phase) counts over all the CTA's tiles, so the producer fills the free
slots with the next tile's keys while the consumers still finish the last tile, and a
consumer releases a slot only where the producer will wait for it again within the CTA.

Segment ids (packed documents) narrow both: ``segment_ranges`` gives, per query tile
of ``2 * block_q`` rows, each consumer's key tiles (the ones its documents can meet,
mask.segment_tile_ranges) and their union for the producer; with several q tiles per CTA
each tile reads its own rows (indexed by ``q_tile``). The key ids ride into SMEM with
each K tile (on its "full" barrier), the query ids with each Q buffer; masked tiles
compare them in mask.visible.

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
from jflash._src.backends.mosaic import fwd_overlap
from jflash._src.backends.mosaic.common import COL, ROW, consumers, cta_segment_ranges, per_row
from jflash._src.backends.mosaic.common import smem_tile, tile_work
from jflash._src.backends.mosaic.config import CONSUMER_WGS, MosaicConfig
from jflash._src.backends.mosaic.schedule import deal_units, paired_tile, paired_tiles
from jflash._src.backends.mosaic.schedule import persistent_tiles, q_tile, sorted_order
from jflash._src.layout import round_up
from jflash._src.problem import Problem

_PRODUCER = CONSUMER_WGS  # warpgroup index of the TMA producer
# ``narrow_tail``'s widths: PV's K (the keys) must be whole 64-element swizzle tiles.
_CHUNK = 64


def _unpack(*refs, p: Problem, cfg: MosaicConfig, grid_ctas: int, **kw):
  """Splits the refs of plgpu.kernel: segment ids come as three more inputs (q ids, kv
  ids, segment_ranges) only when the problem has them; the sorted deal's order as one
  more only under it."""
  seg = p.mask.has_segment_ids
  by_work = bool(grid_ctas) and cfg.sorted_deal
  n_in = 5 + 3 * seg + by_work
  ins, outs, scratch = refs[:n_in], refs[n_in:n_in + 2], refs[n_in + 2:]
  segs = ins[5:8] if seg else None
  order = ins[-1] if by_work else None
  return _kernel(*ins[:5], *outs, *scratch, segs=segs, order_ref=order, p=p, cfg=cfg,
                 grid_ctas=grid_ctas, **kw)


def _kernel(q_ref, k_ref, v_ref, qv_ref, kvv_ref, o_ref, lse_ref,
            q_smem, k_smem, v_smem, lse_smem, p_smem, q_full, k_full, v_full, k_consumed,
            v_consumed, sched, qseg_smem, kseg_smem, *, segs, order_ref, p: Problem,
            cfg: MosaicConfig,
            nq: int, nk: int, groups: int, q_bufs: int, interpret: bool, batch: int,
            heads: int, grid_ctas: int, pair: bool):
  """``v_consumed`` is None unless ``cfg.overlap``: then K and V slots are released
  separately; otherwise ``k_consumed`` guards both halves of a slot. ``q_smem`` and
  ``q_full`` hold ``q_bufs`` buffers per consumer: buffer ``x`` of warpgroup ``wg`` is
  entry ``x * CONSUMER_WGS + wg``. ``segs``: refs of the q ids ``[B, Tp]``, kv ids
  ``[B, Sp]`` and segment_ranges ``[B, nq, 3, 4]``, or None; ``qseg_smem`` (entries as
  ``q_smem``) / ``kseg_smem`` (one per K slot) stage the ids (None without them).
  ``grid_ctas``: the CTAs of a persistent grid (``cfg.persistent``), which deal out the
  query tiles of all ``batch`` x ``heads``; 0: one CTA per ``q_tiles_per_cta`` tiles of
  one (batch, head). ``order_ref``: under ``cfg.sorted_deal``, the flat (batch, head,
  tile) at each of ``q_tile``'s places (schedule.sorted_order), else None. ``pair``
  (``cfg.kv_multicast`` where it runs): the grid's ``grid_ctas`` are clusters of two
  CTAs, which take query tiles ``2u`` and ``2u + 1`` of one (batch, head) for each unit
  ``u`` that q_tile deals the cluster, step through the same key tiles (the union of
  both tiles' ranges) and share each K/V tile: each producer loads half of it, TMA
  multicasts it to both CTAs, and the "consumed" barriers are cluster barriers, so a slot
  is loaded again only once the consumers of both CTAs are done with it."""
  bq, bk, stages, tiles = cfg.block_q, cfg.block_kv, cfg.stages, cfg.q_tiles_per_cta
  rows = CONSUMER_WGS * bq
  persistent = grid_ctas > 0
  multi = persistent or tiles > 1  # a CTA may run several q tiles
  ctas = grid_ctas if persistent else -(-nq // tiles)
  c = lax.axis_index("q")
  if persistent:
    wg = lax.axis_index("wg")
    rank = lax.axis_index("pair") if pair else 0  # which tile of the cluster's two
  else:
    h, b, wg = lax.axis_index("h"), lax.axis_index("b"), lax.axis_index("wg")
    q_valid, kv_valid = qv_ref[b], kvv_ref[b]
  split = v_consumed is not None
  narrow = cfg.narrow_tail and bk > _CHUNK and not cfg.overlap
  qseg_ref, kseg_ref, range_ref = (None,) * 3 if segs is None else segs

  def work(j):
    """``(b, h, tile, q_valid, kv_valid)`` of the CTA's ``j``-th query tile, the tile
    negative past the end. Persistent: the flat index over (batch, head, tile) that
    q_tile deals out, so that a head's tiles (longest first) run side by side; under
    the sorted deal, the flat index ``order_ref`` holds at that place."""
    if not persistent:
      return b, h, q_tile(c, j, ctas, nq), q_valid, kv_valid
    if cfg.paired_deal:
      bh, tile = paired_tile(c, j, ctas, batch * heads, nq)
      live = j < n_tiles
    else:
      f = q_tile(c, j, ctas, units)
      live = f >= 0
      f = jnp.maximum(f, 0)
      if order_ref is not None:
        f = order_ref[f]
      per_bh = nq // 2 if pair else nq
      bh, tile = lax.div(f, jnp.int32(per_bh)), lax.rem(f, jnp.int32(per_bh))
      if pair:
        tile = 2 * tile + rank
    tb, th = lax.div(bh, jnp.int32(heads)), lax.rem(bh, jnp.int32(heads))
    return tb, th, jnp.where(live, tile, -1), qv_ref[tb], kvv_ref[tb]

  def seg_range(tb, tile, who):
    """Row ``who`` of batch ``tb``'s query tile ``tile``'s segment ranges: a consumer's
    own, or (``who`` = CONSUMER_WGS) their union. A tile past the end (negative) reads
    tile 0's rows, which its callers then discard."""
    if segs is None:
      return None
    tile = jnp.maximum(tile, 0)
    return tuple(range_ref[tb, tile, who, x] for x in range(4))

  def union(j):
    """The CTA's ``j``-th query tile: ``work(j)``, its first row, and the key tiles either
    consumer may need: what the producer loads, what both consumers step through."""
    w = work(j)
    tb, _, tile, qv, kvv = w
    # A cluster's two CTAs step through the union of both their tiles' key ranges.
    first, span = ((tile - rank) * rows, 2 * rows) if pair else (tile * rows, rows)
    lo, _, _, hi = mask_lib.kv_block_range(p.mask, first, span, bk, nk, qv, kvv,
                                           seg_range(tb, tile, CONSUMER_WGS))
    return w, tile * rows, lo, hi

  # The ring runs on across the CTA's tiles: a tile whose keys start at ring step g puts
  # its key tile i at step g + i - lo. ``total``: the steps of all the CTA's tiles (not
  # counted when persistent: see ``release``).
  if persistent and cfg.paired_deal:
    n_tiles, total = paired_tiles(c, ctas, batch * heads, nq), None
  elif persistent:
    units = batch * heads * (nq // 2 if pair else nq)  # pairs of tiles, or tiles
    n_tiles, total = persistent_tiles(c, ctas, units), None
  elif tiles == 1:
    n_tiles, total = 1, (lambda _, __, lo, hi: hi - lo)(*union(0))
  else:
    live = [q_tile(c, j, ctas, nq) >= 0 for j in range(tiles)]
    n_tiles = sum(x.astype(jnp.int32) for x in live)
    total = sum(jnp.where(x, hi - lo, 0)
                for x, (_, _, lo, hi) in zip(live, map(union, range(tiles))))

  def over_tiles(body):
    """``body(j, g) -> g + steps of tile j`` over the CTA's tiles, g its first ring step;
    the ring steps of all of them."""
    if not multi:
      return body(0, 0)
    return lax.fori_loop(0, n_tiles, body, jnp.int32(0))

  def ring(g, lo):
    """The ring steps and slot of key tile ``i`` of a tile from ring step ``g``, key ``lo``."""
    step_of = lambda i: g + (i - lo)
    return step_of, lambda i: lax.rem(step_of(i), stages)

  def sync():
    # Ping-pong: each arrive+wait pairs one warpgroup's point with the other's.
    if cfg.pingpong:
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(sched)

  @pl.when(wg == _PRODUCER)
  def _producer():
    plgpu.set_max_registers(cfg.producer_regs, action="decrease")
    kv_head = lambda h: lax.div(h, jnp.asarray(groups, h.dtype))
    # A cluster's producers each load half of every K/V tile into both CTAs. The
    # interpreter has no multicast copies: there each loads the whole tile for itself
    # (the same data in each CTA), and the cluster barriers still pace the pair.
    multicast = "pair" if pair and not interpret else None
    if not persistent:
      kh = kv_head(h)

    def tile(j, g):
      (tb, th, *_), _, u_lo, u_hi = union(j)
      t_kh = kv_head(th) if persistent else kh
      _, slot_of = ring(g, u_lo)

      def load(i, wait):
        slot = slot_of(i)
        src = (tb, pl.ds(i * bk, bk), t_kh)
        if wait:
          plgpu.barrier_wait(k_consumed.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_full.at[slot],
                                collective_axes=multicast)
        if segs is not None:  # the tile's key ids share K's slot and barrier
          plgpu.copy_gmem_to_smem(kseg_ref.at[tb, pl.ds(i * bk, bk)], kseg_smem.at[slot],
                                  k_full.at[slot])
        if wait and split:
          plgpu.barrier_wait(v_consumed.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_full.at[slot],
                                collective_axes=multicast)

      # Only the CTA's first ``stages`` ring steps find their slots never used.
      first = jnp.minimum(u_lo + jnp.maximum(stages - g, 0), u_hi)
      pl.loop(u_lo, first)(functools.partial(load, wait=False))
      pl.loop(first, u_hi)(functools.partial(load, wait=True))
      return g + (u_hi - u_lo)

    steps = over_tiles(tile)
    if persistent:
      # The consumers release every slot (``release``): take the last ``stages`` releases,
      # which no load waited for, so that no barrier phase is left dangling.
      for x in range(stages):
        step = steps - stages + x

        @pl.when(step >= 0)
        def _drain():
          slot = lax.rem(step, stages)
          plgpu.barrier_wait(k_consumed.at[slot])
          if split:
            plgpu.barrier_wait(v_consumed.at[slot])

  @functools.partial(consumers, cfg.static_wg, wg, CONSUMER_WGS)
  def _consumer(wg):
    plgpu.set_max_registers(cfg.consumer_regs, action="increase")
    fold = cfg.fold_scale and p.softcap is None and p.scale > 0
    dtype = q_smem.dtype
    d = q_smem.shape[-1]

    def softmax(qk, i, m, l, masked: bool, *, q_pos, q_seg, slot_of, valid):
      """Online softmax of one score tile: (P in the input dtype, new m, new l, alpha)."""
      if fold:
        s = qk  # raw scores; scale*log2(e) > 0 goes into the exp2 argument below
      else:
        s, _ = logits_lib.scores(qk, p.scale, p.softcap, base2=True)
      if masked:
        keys = qk.shape[1]  # bk, or fewer (``narrow_tail``)
        k_pos = plgpu.broadcasted_iota(jnp.int32, (keys,), 0, layout=COL) + i * bk
        kv_seg = None if segs is None else plgpu.load(
            kseg_smem.at[slot_of(i), pl.ds(0, keys)], layout=COL)
        vis = mask_lib.visible(p.mask, q_pos, k_pos, *valid, q_seg, kv_seg)
        s = jnp.where(vis, s, -jnp.inf)
      c = p.scale * logits_lib.LOG2E if fold else 1.0
      m_new = jnp.maximum(m, s.max(axis=1) * c)
      # A row that has seen only masked keys keeps m = -inf; shift it by 0 so that
      # exp2 gives 0 rather than NaN. Unmasked tiles always raise m above -inf.
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
      pr = jnp.exp2((s * c if fold else s) - per_row(m_use, s.shape))
      alpha = jnp.exp2(m - m_use)
      return pr.astype(dtype), m_new, l * alpha + pr.sum(axis=1), alpha

    def pv(acc, p16, slot):
      """``acc + P @ V[slot]``, waited for: all of V's tile, or its first keys where P
      has fewer columns (``narrow_tail``)."""
      keys = p16.shape[1]
      v_tile = v_smem.at[slot] if keys == bk else v_smem.at[slot, pl.ds(0, keys)]
      if interpret:
        my_p = p_smem.at[wg] if keys == bk else p_smem.at[wg, :, pl.ds(0, keys)]
        my_p[...] = p16
        plgpu.commit_smem()

        def body(ref):
          plgpu.wgmma(ref, my_p, v_tile)
          return ref[...]

        return acc + pl.run_scoped(body, plgpu.ACC((bq, d), jnp.float32))

      def body(ref):
        plgpu.wgmma(ref, p16, v_tile)

      return pl.run_state(body)(plgpu.ACC.init(acc))

    def kv_loop(my_q, entry, w, q0, g, u_lo, u_hi):
      """One tile's pass over the key tiles ``[u_lo, u_hi)`` from ring step ``g``:
      ``(acc, m, l)`` of the rows from ``q0`` (query tile ``w = work(j)``, its Q and ids
      in buffer ``entry``, already waited for; ``my_q``: QK^T's A operand, that
      buffer or Q in registers)."""
      tb, _, tile, qv, kvv = w
      lo, full_lo, full_hi, hi = (
          jnp.clip(x, u_lo, u_hi)
          for x in mask_lib.kv_block_range(p.mask, q0, bq, bk, nk, qv, kvv,
                                           seg_range(tb, tile, wg)))
      q_pos = plgpu.broadcasted_iota(jnp.int32, (bq,), 0, layout=ROW) + q0
      q_seg = None if segs is None else plgpu.load(qseg_smem.at[entry], layout=ROW)
      step_of, slot_of = ring(g, u_lo)
      tile_softmax = functools.partial(softmax, q_pos=q_pos, q_seg=q_seg, slot_of=slot_of,
                                       valid=(qv, kvv))

      def release(i, barrier):
        if persistent:  # the producer takes the last releases after its loads
          plgpu.barrier_arrive(barrier.at[slot_of(i)])
          return

        # Arrive only where the producer will wait for this slot again (ring step + stages,
        # counted over all the CTA's tiles): a barrier phase nobody waits for would be
        # left dangling (the interpreter checks this).
        @pl.when(step_of(i) + stages < total)
        def _():
          plgpu.barrier_arrive(barrier.at[slot_of(i)])

      release_k = functools.partial(release, barrier=k_consumed)
      release_v = functools.partial(release, barrier=v_consumed if split else k_consumed)

      def skip(i, carry):
        slot = slot_of(i)
        plgpu.barrier_wait(k_full.at[slot])  # keeps this warpgroup's barrier phases in step
        plgpu.barrier_wait(v_full.at[slot])
        sync()
        sync()
        release_k(i)
        if split:
          release_v(i)
        return carry

      def step(i, carry, masked: bool, keys: int = bk):
        """One key tile: all ``bk`` keys, or (``narrow_tail``) its first ``keys``."""
        acc, m, l = carry
        slot = slot_of(i)
        plgpu.barrier_wait(k_full.at[slot])
        k_tile = k_smem.at[slot] if keys == bk else k_smem.at[slot, pl.ds(0, keys)]

        def qk(ref):
          plgpu.wgmma(ref, my_q, k_tile.T)
          sync()  # our QK is issued: the other warpgroup may issue its PV
          return ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((bq, keys), jnp.float32))
        if cfg.v_wait_first:  # the softmax, rescale and packing in one basic block
          plgpu.barrier_wait(v_full.at[slot])
        p16, m_new, l, alpha = tile_softmax(s, i, m, l, masked=masked)
        acc = acc * per_row(alpha, acc.shape)
        if cfg.pingpong:
          # "Softmax done" in the source, but ptxas issues it as soon as the scores are
          # in (nothing it orders depends on the exps); that schedule measured fastest.
          plgpu.barrier_arrive(sched)
        if not cfg.v_wait_first:
          plgpu.barrier_wait(v_full.at[slot])
        if cfg.pingpong:
          plgpu.barrier_wait(sched)  # the other warpgroup has issued its QK
        acc = pv(acc, p16, slot)
        release_v(i)
        return acc, m_new, l

      init = (plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA),
              plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), ROW),
              plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), ROW))
      # Warpgroup 0 goes first, in every tile: its last sync below pairs with warpgroup
      # 1's last step, so neither waits for the other's epilogue.
      pl.when(wg == 1)(sync)
      carry = lax.fori_loop(u_lo, lo, skip, init)
      if cfg.overlap:
        carry = fwd_overlap.overlapped(
            carry, lo, full_lo, full_hi, hi, sync=sync, softmax=tile_softmax,
            k_late=segs is not None, pv=pv, slot_of=slot_of, release_k=release_k,
            release_v=release_v, my_q=my_q, k_smem=k_smem, v_smem=v_smem, k_full=k_full,
            v_full=v_full, p_smem=p_smem.at[wg] if interpret else None, dtype=dtype)
      else:
        carry = lax.fori_loop(lo, full_lo, functools.partial(step, masked=True), carry)
        carry = lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
        # ``narrow_tail``: the last masked tile at the width (in 64-key swizzle tiles)
        # that this warpgroup's rows can see of it (the causal diagonal); each narrower
        # width a loop of zero or one step.
        widths = range(_CHUNK, bk, _CHUNK) if narrow else ()
        keys = (mask_lib.tail_keys(p.mask, q0, bq, bk, full_hi, hi, qv, kvv, _CHUNK)
                if narrow else bk)
        narrowed = (keys < bk).astype(jnp.int32) if narrow else 0
        carry = lax.fori_loop(full_hi, hi - narrowed, functools.partial(step, masked=True),
                              carry)
        for w in widths:
          carry = lax.fori_loop(hi - (keys == w).astype(jnp.int32), hi,
                                functools.partial(step, masked=True, keys=w), carry)
      carry = lax.fori_loop(hi, u_hi, skip, carry)
      pl.when(wg == 0)(sync)
      return carry

    def epilogue(my_q, w, q0, acc, m, l):
      """O and lse of the rows from ``q0`` of query tile ``w`` out to HBM (not waited
      for): O through Q's slot, whose last reader, the last QK^T, is done."""
      tb, th, _, qv, _ = w
      q_pos = plgpu.broadcasted_iota(jnp.int32, (bq,), 0, layout=ROW) + q0
      # Rows with no visible key (or padding rows): output 0, lse +inf (see mask.py).
      live = (q_pos < qv) & (l > 0.0)
      l_safe = jnp.where(live, l, 1.0)
      inv = jnp.where(live, 1.0 / l_safe, 0.0)
      if multi:
        # The last tile's stores have had this tile's keys to read lse_smem (and older
        # O buffers) out: this wait should find them done.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      my_q[...] = (acc * per_row(inv, acc.shape)).astype(dtype)
      my_lse = lse_smem.at[wg]
      my_lse[...] = jnp.where(live, (m + jnp.log2(l_safe)) * logits_lib.LN2, jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(my_q, o_ref.at[tb, pl.ds(q0, bq), th])
      plgpu.copy_smem_to_gmem(my_lse, lse_ref.at[tb, th, pl.ds(q0, bq)])

    q_entry = lambda j: (j % q_bufs) * CONSUMER_WGS + wg

    def load_q(j):
      (tb, th, *_), cta_q0, _, _ = union(j)
      q0, at = cta_q0 + wg * bq, q_entry(j)
      plgpu.copy_gmem_to_smem(q_ref.at[tb, pl.ds(q0, bq), th], q_smem.at[at], q_full.at[at])
      if segs is not None:  # the rows' ids share Q's buffer entry and barrier
        plgpu.copy_gmem_to_smem(qseg_ref.at[tb, pl.ds(q0, bq)], qseg_smem.at[at],
                                q_full.at[at])

    def tile(j, g):
      w, cta_q0, u_lo, u_hi = union(j)
      if q_bufs == 1:
        if multi:
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's O left Q's slot
        load_q(j)
      plgpu.barrier_wait(q_full.at[q_entry(j)])
      if q_bufs > 1:
        @pl.when(j + 1 < n_tiles)
        def _prefetch():
          # The next tile's Q loads while this one's keys stream, into the buffer of
          # tile j + 1 - q_bufs. With 2 buffers that is the last tile, whose O store was
          # just issued: wait for it to leave SMEM. Older ones the epilogue waited for.
          if q_bufs == 2:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          load_q(j + 1)
      my_q, q0 = q_smem.at[q_entry(j)], cta_q0 + wg * bq
      # QK^T's A operand: Q's SMEM tile, or (``q_registers``) Q in registers. The
      # interpreter has no wgmma with a register operand (module docstring).
      q_op = (plgpu.load(my_q, layout=plgpu.Layout.WGMMA)
              if cfg.q_registers and not interpret else my_q)
      # (Not persistent: work(j) again, which the traced kernel of one tile per CTA
      # has always had here.)
      acc, m, l = kv_loop(q_op, q_entry(j), w if persistent else work(j), q0, g, u_lo, u_hi)
      epilogue(my_q, w, q0, acc, m, l)
      return g + (u_hi - u_lo)

    if q_bufs > 1:
      load_q(0)  # later tiles' Q is prefetched by the tile before
    over_tiles(tile)
    plgpu.wait_smem_to_gmem(0)


def segment_ranges(q_seg, kv_seg, cfg: MosaicConfig):
  """``cta_segment_ranges`` of this kernel: ``[B, nq, 3, 4]`` per query tile of
  ``2 * block_q`` rows (not per CTA: with ``q_tiles_per_cta > 1`` the kernel indexes it
  by ``q_tile``)."""
  return cta_segment_ranges(q_seg, kv_seg, cfg.block_q, cfg.block_kv, CONSUMER_WGS,
                            by_rows=True)


def forward(p: Problem, cfg: MosaicConfig, q, k, v, q_valid, kv_valid, q_seg=None,
            kv_seg=None):
  """``q [B, T, N, D]``, ``k, v [B, S, K, D]`` (D in {64, 128, 256}), ``q_valid,
  kv_valid [B]`` (<= T, S), segment ids ``q_seg [B, Tp]``, ``kv_seg [B, Sp]`` padded to
  Tp = T rounded up to ``cfg.q_multiple`` and Sp = S rounded up to ``cfg.block_kv`` (iff
  ``p.mask.has_segment_ids``; padding ids never equal) -> ``out [B, T, N, D]``,
  ``lse [B, N, Tp]`` (f32, natural log).

  T and S need not be tile multiples, only at most 8 or multiples of 8 (Mosaic tiles
  the TMA'd arrays in 8-row swizzle tiles; backend.tma_length): the kernel runs the
  padded tiles, its TMA loads fill the rows past T or S with zeros (as padded copies
  would hold, past q_valid / kv_valid so masked) and its stores drop them, so no padded
  copy of Q, K, V or O is made. lse stays padded: its rows are TMA-stored as 1-D runs,
  whose bounds are the whole buffer's, and it is small."""
  b, t, n, d = q.shape
  kh = k.shape[2]
  tp, sp = round_up(t, cfg.q_multiple), round_up(k.shape[1], cfg.k_multiple)
  bq, bk, stages = cfg.block_q, cfg.block_kv, cfg.stages
  nq = tp // cfg.q_multiple
  ctas = -(-nq // cfg.q_tiles_per_cta)  # along q
  seg = p.mask.has_segment_ids
  q_bufs = cfg.q_buffers(d, q.dtype.itemsize, segments=seg)
  interpret = p.interpret
  # kv_multicast runs where the query tiles pair up within each (batch, head) and no
  # key ids ride with K: else the persistent grid alone.
  pair = cfg.kv_multicast and not seg and nq % 2 == 0
  # A cluster's "consumed" barriers count the consumers of both CTAs (``pair``).
  consumed = (functools.partial(plgpu.ClusterBarrier, collective_axes=("pair",)) if pair
              else plgpu.Barrier)
  scratch = [
      smem_tile((q_bufs * CONSUMER_WGS, bq, d), q.dtype),  # Q, then O
      smem_tile((stages, bk, d), k.dtype),
      smem_tile((stages, bk, d), v.dtype),
      plgpu.SMEM((CONSUMER_WGS, bq), jnp.float32),  # lse staging for its TMA store
      smem_tile((CONSUMER_WGS, bq, bk), q.dtype) if interpret else None,  # P (see above)
      # Q's and K's copies arrive once each, and once more for their ids.
      plgpu.Barrier(num_arrivals=1 + seg, num_barriers=q_bufs * CONSUMER_WGS),
      plgpu.Barrier(num_arrivals=1 + seg, num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      consumed(num_arrivals=CONSUMER_WGS, num_barriers=stages),
      # Separate "V consumed" barriers under the overlap schedule (see _kernel).
      consumed(num_arrivals=CONSUMER_WGS, num_barriers=stages) if cfg.overlap else None,
      plgpu.Barrier(num_arrivals=CONSUMER_WGS),
  ]
  scratch += [plgpu.SMEM((q_bufs * CONSUMER_WGS, bq), jnp.int32) if seg else None,  # q ids
              plgpu.SMEM((stages, bk), jnp.int32) if seg else None]  # key ids, with K
  extra = (q_seg, kv_seg, segment_ranges(q_seg, kv_seg, cfg)) if seg else ()
  if pair:
    grid_ctas = min(cfg.persistent // 2, b * n * nq // 2)  # clusters of two CTAs
  else:
    grid_ctas = min(cfg.persistent, deal_units(b * n, nq, cfg.paired_deal)) if cfg.persistent else 0
  if grid_ctas and cfg.sorted_deal:
    # Each query tile's key tiles, as the kernel's ``union``.
    work = tile_work(p.mask, CONSUMER_WGS * bq, bk, nq, sp // bk, q_valid, kv_valid,
                     extra[2][:, :, CONSUMER_WGS] if seg else None, by_rows=True)
    extra += (sorted_order(work, n),)
  kernel = functools.partial(_unpack, p=p, cfg=cfg, nq=nq, nk=sp // bk, groups=n // kh,
                             q_bufs=q_bufs, interpret=interpret, batch=b, heads=n,
                             grid_ctas=grid_ctas, pair=pair)
  # Mosaic reverses the grid: its LAST axis is CUDA's x, the fastest in launch order.
  # q innermost (default): the CTAs of one wave share a (batch, head)'s K/V in L2. With q
  # outermost at s=1k, b=16 each CTA of a wave had a (batch, head) of its own and the
  # kernel ran at HBM speed (H100: 0.6x cuDNN; benchmarks/fwd_overhead.py).
  # q_outer: every head's longest causal tiles go first.
  grid, names = ((ctas, n, b), ("q", "h", "b")) if cfg.q_outer else ((b, n, ctas), ("b", "h", "q"))
  if grid_ctas:  # persistent: the kernel deals out the (batch, head, q tile)s
    grid, names = (grid_ctas,), ("q",)
  cluster = dict(cluster=(2,), cluster_names=("pair",)) if pair else {}
  return plgpu.kernel(
      kernel,
      out_type=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
      scratch_types=scratch,
      grid=grid,
      grid_names=names,
      **cluster,
      num_threads=CONSUMER_WGS + 1,
      thread_name="wg",
      # No SMEM reserved for cross-warp reductions (2 KiB by default): the kernel's row
      # max and sum reduce within a warp, and Mosaic refuses a reduction that would need
      # it. The 2 KiB let d=64 hold a third stage of 256-key tiles.
      compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      kernel_name="jflash_mosaic_fwd",
  )(q, k, v, q_valid, kv_valid, *extra)
