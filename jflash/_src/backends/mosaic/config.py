"""Tuning for the Mosaic GPU (Hopper) kernels: tiles and pipeline depth. Never meaning."""

from __future__ import annotations

import dataclasses
import math

from jflash._src import mask as mask_lib
from jflash._src.backends.mosaic.schedule import deal_imbalance

# One consumer warpgroup owns 64 query rows: the M of one wgmma instruction.
WG_ROWS = 64
# Two consumer warpgroups per CTA (FA3): they share one K/V ring and order their matmuls
# with a schedule barrier (ping-pong); their softmaxes run side by side (fwd.py).
CONSUMER_WGS = 2
# Bytes of shared memory a CTA may use on sm90 (227 KiB), less a margin for barriers and
# what Mosaic adds to the scratch buffers counted here: its lowering reports 2.6 KiB more
# than smem_bytes (d=128: 232552 against 229888 with three Q buffers, 232544 with one Q
# buffer and stages=3), over 227 KiB, where a 1 KiB margin had passed both. 2 KiB of
# that is Mosaic's reduction scratch, which the forward no longer reserves (fwd.py).
SMEM_BYTES = 227 * 1024 - 4 * 1024
# 64K registers per SM over 128 threads per warpgroup: the per-thread register counts of
# the producer and the consumers (setmaxnreg) may add up to at most this.
REGISTERS_PER_THREAD_SLOT = 65536 // 128
# MosaicBwdConfig.dq_mode: see its docstring.
DQ_MODES = ("separate", "atomic", "ordered")


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """``block_q``: query rows per consumer warpgroup (a CTA holds ``2 * block_q``);
  ``block_kv``: keys per pipeline step; ``stages``: K/V tiles in flight in the SMEM ring;
  ``pingpong``: order the two warpgroups' matmuls with a schedule barrier (H100
  2026-11-27, fwd without it: -3..-12% at s=16k; at 1k even, but +3% at d=64 causal).

  Variants (benchmarks/mosaic_probe.py; timings in benchmarks/MOSAIC_NOTES.md):
  ``overlap``: FA3's intra-warpgroup overlap: a consumer issues QK^T of tile i and PV of
  tile i-1 back to back, then runs the softmax of tile i while PV runs; K and V slots get
  separate "consumed" barriers, so K goes back to the producer as soon as S is read.
  ``q_registers``: QK^T takes Q from registers (loaded once per query tile) instead of
  SMEM, so each QK^T wgmma reads only K from SMEM: at d=128 and 128-key tiles, 64 in
  place of 96 bytes of SMEM per tensor-core cycle, beside the TMA writes. Costs the
  consumer ``d / 4`` registers a thread for the whole tile.
  ``fold_scale``: take the row max of the raw scores and fold scale*log2(e) into the
  exp2 argument (one FMA per score instead of a multiply and a subtract); used only
  where it is exact in meaning (no soft-cap, scale > 0).
  ``q_outer``: launch the q tiles outermost (every head's last q tile first), so that
  under a causal mask all the longest tiles run in the first waves.
  ``producer_regs`` / ``consumer_regs``: setmaxnreg per thread of the TMA warpgroup and
  of each consumer warpgroup.
  ``q_tiles_per_cta``: query tiles (of ``2 * block_q`` rows) one CTA runs in turn; the
  grid's q axis shrinks by as much (rounded up). The K/V ring runs on across the tiles,
  so the producer loads the next tile's first keys while the consumers finish the last
  one, and the next tile's Q loads under this one's keys where a second Q buffer fits
  (``q_buffers``). Worth it where a tile has few key tiles (short sequences), whose
  prologue and epilogue one CTA per tile cannot hide. 1: one tile per CTA.
  ``persistent``: a grid of this many CTAs (at most one per query tile) in place of one
  CTA per ``q_tiles_per_cta`` tiles of one (batch, head). The query tiles of all batches
  and heads, head by head, are dealt out in runs of that many (serpentine, as
  ``q_tile``): the CTAs running side by side share the keys of a few heads (read once
  from DRAM), and each CTA's ring runs on across heads. It replaces ``q_tiles_per_cta``
  and ``q_outer``, which then do not apply. 0: off."""

  block_q: int = 64
  block_kv: int = 128
  stages: int = 2
  pingpong: bool = True
  overlap: bool = False
  q_registers: bool = False
  fold_scale: bool = True  # H200: +4-10% fwd at d=64, +6% at d=128 s=16k, 0 at 4k
  q_outer: bool = False
  producer_regs: int = 40
  consumer_regs: int = 232
  q_tiles_per_cta: int = 1
  # Variant (off by default; benchmarks/MOSAIC_NOTES.md, session 16): each consumer
  # warpgroup runs a copy of the code of its own, its index a constant (common.consumers).
  static_wg: bool = False
  # for_problem: the SM count at d=128 without segment ids (MOSAIC_NOTES.md, session 17),
  # and with them at d <= 128 (under sorted_deal).
  persistent: int = 0
  # for_problem's choice at d=128 without a causal mask past 4k keys (MOSAIC_NOTES.md,
  # session 23): the persistent grid runs as clusters of two CTAs that take two
  # neighbouring query tiles of one (batch, head) and share each K/V tile: each CTA's
  # producer loads half of it and TMA multicasts it to both, and a slot goes back to the
  # producers once all four consumers are done with it (a cluster barrier). Half the K/V
  # bytes read from L2 (FlashAttention-3 does this at d >= 128 without a causal mask).
  # Needs ``persistent`` (whose CTA count it rounds down to pairs); runs only where the
  # problem allows (no segment ids, an even count of query tiles, fwd.forward), else as
  # ``persistent`` alone.
  kv_multicast: bool = False
  # Variant (off by default; MOSAIC_NOTES.md, session 18): the persistent grid deals
  # each head's tiles in equal-cost pairs (schedule.paired_tile) instead of q_tile's
  # serpentine, balanced under a causal mask at any head count.
  paired_deal: bool = False
  # Variant (off by default; MOSAIC_NOTES.md, session 19): the persistent grid deals the
  # tiles of all (batch, head)s longest first, by each tile's key-tile count worked out
  # before the launch (schedule.sorted_order), the heads of one tile side by side: a
  # serpentine over tiles sorted by work is balanced under any mask, packed documents
  # included (8 docs in 16k, causal, 16 heads: 1.00 against q_tile's 1.44).
  # for_problem's choice with segment ids at d <= 128.
  sorted_deal: bool = False
  # for_problem's choice at d=128, and at d=64 without a causal mask (MOSAIC_NOTES.md,
  # session 24): a consumer waits for V's tile right after QK^T's scores are in, before
  # the softmax, instead of between the softmax and PV. Each barrier wait is a loop,
  # which ends ptxas's basic block: with V's wait after the softmax, the exp2s fall in
  # one block and the accumulator's rescale and P's bf16 packing in the next, so the
  # exp2s issue back to back on the MUFU pipe, one row-sum add between each (ncu, H200,
  # d=128 16k: 12% of the consumers' stall samples on them, against cuDNN's 0.7%).
  # That was the reason to try it; the gain is measured, but its cause is not settled:
  # with it, ncu still finds 12.8% there (MOSAIC_NOTES.md, session 25).
  # The default schedule's step only: ``overlap`` orders its waits itself.
  v_wait_first: bool = False
  # A consumer runs the last masked key tile of its range only as wide as its rows can
  # see of it, in 64-key swizzle tiles (mask.tail_keys; QK^T's N and PV's K narrowed):
  # under a causal mask the diagonal tile. With 128-key tiles, the upper warpgroup of
  # each query tile runs its diagonal at half width. Not under ``overlap``.
  # for_problem's choice under a causal mask with 128-key tiles (MOSAIC_NOTES.md,
  # session 26).
  narrow_tail: bool = False
  # The backward pass: the Mosaic kernels of bwd.py (tuned by MosaicBwdConfig) where they
  # support the call, else the Triton ones. H200, s=4k: fwd+bwd 0.81-0.99x cuDNN with
  # them vs 0.74-0.86x with Triton's.
  mosaic_backward: bool = True

  def __post_init__(self):
    if self.block_q != WG_ROWS:
      raise ValueError(f"block_q={self.block_q} must be {WG_ROWS} (one wgmma M per warpgroup)")
    if self.block_kv % 64 or not 64 <= self.block_kv <= 256:
      # Mosaic's wgmma takes the K of P V (the keys) in whole 64-element swizzle tiles.
      raise ValueError(f"block_kv={self.block_kv} must be 64, 128, 192 or 256")
    if self.stages < 2:
      raise ValueError(f"stages={self.stages} must be >= 2 (a ring of one tile cannot overlap)")
    for name in ("producer_regs", "consumer_regs"):
      r = getattr(self, name)
      if r % 8 or not 24 <= r <= 256:
        raise ValueError(f"{name}={r} must be a multiple of 8 in [24, 256] (setmaxnreg)")
    if not isinstance(self.q_tiles_per_cta, int) or self.q_tiles_per_cta < 1:
      raise ValueError(f"q_tiles_per_cta={self.q_tiles_per_cta!r} must be an int >= 1")
    if self.producer_regs + CONSUMER_WGS * self.consumer_regs > REGISTERS_PER_THREAD_SLOT:
      raise ValueError(
          f"producer_regs={self.producer_regs} + {CONSUMER_WGS} * consumer_regs="
          f"{self.consumer_regs} must be <= {REGISTERS_PER_THREAD_SLOT} (64K registers per SM)")
    if not isinstance(self.persistent, int) or self.persistent < 0:
      raise ValueError(f"persistent={self.persistent!r} must be an int >= 0 (0: off)")
    if self.kv_multicast and (self.persistent < 2 or self.paired_deal or self.sorted_deal):
      raise ValueError("kv_multicast runs on the persistent grid's q_tile deal: it needs "
                       "persistent >= 2 (a pair of CTAs) and neither paired_deal nor "
                       "sorted_deal")
    if self.paired_deal and self.sorted_deal:
      raise ValueError("paired_deal and sorted_deal are two deals of the persistent grid: "
                       "choose one")

  @classmethod
  def for_problem(cls, q_len: int, kv_len: int, head_dim: int, itemsize: int = 2, *,
                  segments: bool = False, causal: bool = False,
                  sm_count: int = 0, batch_heads: int = 0) -> "MosaicConfig":
    """A heuristic default per (padded) head dim, shrunk to fit shared memory.
    ``segments``: the call has segment ids (packed documents); ``causal``: a causal mask;
    ``sm_count``: the GPU's SMs (0: not known, as in interpret mode); ``batch_heads``:
    batch x query heads (0: not known)."""
    # d=64: 256-key tiles (H100, 2026-11-22, fwd vs cuDNN: 0.95 -> 1.04-1.07 at s=16k,
    # 0.91 -> 0.97 at 4k non-causal; 192 keys lost at 1k/4k): half the steps, so half the
    # per-step barrier and ping-pong handoffs per key. Not with packed documents, whose
    # key runs are short and whose edges waste up to a tile each (8 docs in 16k, causal:
    # 288 -> 236 useful TFLOP/s), nor causal up to 2k keys, where a 64-row consumer has
    # 2.5 steps of 256 keys on average, 40% of them masked (H200, 2026-11-26, s=1k, four
    # q tiles per CTA: 231-256 TFLOP/s with 128 keys against 204-216 with 256; even at 4k).
    # d=128 keeps 128 (a 64x256 f32 score tile would not fit in registers beside the
    # accumulator); d=256 needs 64-key tiles to keep the 64x256 f32 accumulator, the
    # scores and the ring within registers and SMEM.
    # d=64, causal, past 4k keys: a third 256-key stage (two H100 runs, 2026-11-26, s=16k
    # fwd TFLOP/s against two stages: causal 471 -> 479 and 468 -> 487; non-causal 476 ->
    # 485 but 493 -> 482, so not there; 4k -1%). It fits since the forward reserves no
    # SMEM for cross-warp reductions (fwd.py).
    short_causal = causal and kv_len <= 2048
    long_causal = causal and kv_len > 4096
    d64 = (128, 3) if segments else (128 if short_causal else 256, 3 if long_causal else 2)
    block_kv, stages = {64: d64, 128: (128, 2), 256: (64, 2)}[head_dim]
    block_kv = min(block_kv, max(64, -(-kv_len // 64) * 64))
    # Several q tiles per CTA up to 4k keys: the K/V ring runs on from one tile to the
    # next, hiding each tile's prologue and epilogue. Two at d>=128 (H100, 2026-11-22:
    # +1..+12% fwd at s=1k/4k over one); four at d=64, whose tiles are shorter (H200,
    # 2026-11-26, fwd TFLOP/s, four against two: 1k 357-380 / 338, 4k 478-485 / 449-454
    # non-causal; 4k causal 372-387 / 374; eight mixed), and at d=128 without a causal
    # mask (two H200 runs, four against two: 1k +6%, +7%; 4k +3%, -3%; causal 1k -5%).
    # At 16k one (two: -2..-3% causal, 0 otherwise). d=64, causal up to 1k keys: eight,
    # a whole (batch, head) per CTA at 1k (H200 2026-11-28, sustained fwd TFLOP/s, two
    # calls: four 295.0, 293.7 -> eight 298.4, 298.0; sixteen 297.7; two lose). Against
    # cuDNN, three more calls: 1.01-1.02x (MOSAIC_NOTES.md, session 25).
    tiles = (4 if head_dim <= 64 or not causal else 2) if kv_len <= 4096 else 1
    if head_dim == 64 and causal and kv_len <= 1024 and not segments:
      tiles = 8
    # d=64, causal up to 1k keys: no ping-pong. H100 2026-11-27, fwd TFLOP/s without /
    # with it, two calls: s=1k 268.3, 268.4 / 256.8, 260.9 and 264.6, 251.8, 255.0 /
    # 251.0, 246.9; but s=2k 327.1, 328.1, 325.1 / 337.2, 329.8, and s=16k -9..-12%.
    pingpong = not (head_dim == 64 and causal and kv_len <= 1024 and not segments)
    # d=128 without segment ids: a persistent grid, one CTA per SM (H100 2026-11-27, fwd
    # TFLOP/s, default -> persistent, two readings each: 1k 462, 464 -> 533, 528; 1k
    # causal 353, 359 -> 393, 392; 4k causal 498, 497 -> 514, 523; 4k 565, 559 -> 565,
    # 570; 16k 587, 607 -> 606, 612). At d=64 even (1k and 4k causal); packed documents
    # and d=256 not timed. Packed documents lose (H200 2026-11-27, 8 docs in 16k, causal:
    # 361, 370 -> 333 useful TFLOP/s); so does d=64 past 1k (4k 453 -> 436, 16k 471 ->
    # 457). d=64 at 1k without a causal mask gains (H200 2026-11-27, fwd TFLOP/s, two
    # calls: 383 -> 400; 367, 375 -> 394, 404). Under a causal mask only where the deal
    # is balanced (``deal_imbalance``; 8k causal 535 -> 556-559, but 16k 636 -> 418-421
    # at 1.54).
    short_d64 = head_dim == 64 and not causal and kv_len <= 1024
    persistent = sm_count if (head_dim == 128 or short_d64) and not segments else 0
    # Packed documents (segment ids, d <= 128): a persistent grid dealing tiles longest
    # first (``sorted_deal``), balanced whatever the documents' lengths (H200 2026-11-27,
    # 8 docs in 16k, causal, fwd useful TFLOP/s, one CTA per tile -> sorted deal: d=128
    # 390 -> 401, 386 -> 401 and with mask.visible's row bounds 421 -> 432; d=64 280 ->
    # 292-295, 278 -> 292 and 288 -> 313). The serpentine deal loses there (342, 1.44).
    sorted_deal = bool(segments and sm_count and head_dim <= 128)
    if sorted_deal:
      persistent = sm_count
    elif persistent and causal:
      rows, nk = CONSUMER_WGS * WG_ROWS, -(-kv_len // block_kv)
      spec = mask_lib.MaskSpec(q_len=q_len, kv_len=kv_len, causal=True)
      ranges = (mask_lib.kv_block_range(spec, t * rows, rows, block_kv, nk, q_len, kv_len)
                for t in range(-(-q_len // rows)))
      work = [hi - lo for lo, _, _, hi in ranges]
      if not batch_heads or deal_imbalance(work, batch_heads, sm_count) > 1.06:
        persistent = 0
    # Q in registers for QK^T (H200 2026-11-27, two calls, fwd TFLOP/s, default ->
    # q_registers): d=128 4k 570-573 -> 578-584, causal 531-553 -> 535-548; 16k 586-602 ->
    # 603-610, causal 581-586 -> 589-595; d=64 16k 447-455 -> 472-477. Not d=64 causal
    # (16k 462-466 -> 455-461) nor d=64 at 4k (-1..-2%); d=128 at 1k +-1%. Packed
    # documents past 4k keys (16k keys, useful TFLOP/s, q_registers off -> on, 4 then 8
    # documents, one H200 call each, 2026-11-27): d=128 522 -> 534-540 and 469 ->
    # 477-487, causal 495-498 -> 504-506 and 405-419 -> 419-423; d=64 385 -> 388-391 and
    # 351 -> 354-356, causal 366-370 -> 372-375 and 303-305 -> 309. At 4k, within the
    # calls' noise.
    q_registers = (head_dim in (64, 128) and kv_len > 4096) if segments else (
        (head_dim == 128 and kv_len >= 4096) or (head_dim == 64 and not causal and kv_len > 4096))
    # K/V shared by clusters of two CTAs (TMA multicast) at d=128 without a causal mask
    # past 4k keys, on the persistent grid (2026-11-28, s=16k fwd, sustained TFLOP/s,
    # default -> kv_multicast, two readings each: H100 607.8, 610.8 -> 621.0, 619.6, its
    # SM clock 1531-1544 -> 1575-1577 MHz at the 700 W cap; H200 600.8, 602.3 -> 605.8,
    # 606.2). Half the L2 -> SM traffic costs less power, so the capped clock rises; per
    # cycle it is level or 0.5% lower. At 4k +0.2..+0.5%, at 1k -0.3%: not there.
    kv_multicast = persistent >= 2 and head_dim == 128 and not causal and not segments and (
        kv_len > 4096)
    # V waited for before the softmax (two H200 calls, 2026-11-28, sustained fwd TFLOP/s,
    # default -> v_wait_first): d=128 16k 618.9, 612.7 -> 640.0, 631.4 (per GHz +5%), 4k
    # 596.4, 590.9 -> 613.9, 609.2, 1k 525.9 -> 537.7; causal 16k 601.2, 591.7 -> 602.9,
    # 593.4, 4k 540.3, 535.8 -> 550.3, 546.8, 1k 403.6 -> 406.6. d=64 without a causal
    # mask: 16k 474.3, 472.3 -> 478.1, 474.5, 1k 404.4, 403.4 -> 413.0, 410.9, 4k level;
    # causal it loses (16k 461.3, 457.4 -> 454.1, 450.8; 1k 291.0, 290.2 -> 286.2, 285.9).
    v_wait_first = head_dim == 128 or (head_dim == 64 and not causal)
    # The causal diagonal narrowed to what each warpgroup's rows see of it, with 128-key
    # tiles (two H200 calls, 2026-11-28, sustained fwd TFLOP/s, off -> on: d=64 1k
    # 298.1 -> 305.5 and 291.3 -> 294.7; d=128 1k 410.8 -> 419.9, 4k 547.6 -> 553.5, 16k
    # 586.4 -> 589.0; 8 packed documents in 16k at d=128 402.9 -> 404.7 useful). With
    # 256-key tiles (d=64 past 2k keys) level: 4k 402.9 -> 400.7, 16k 457.4 -> 454.4.
    narrow_tail = causal and block_kv == 128
    cfg = cls(block_kv=block_kv, stages=stages, q_tiles_per_cta=tiles, pingpong=pingpong,
              persistent=persistent, sorted_deal=sorted_deal, q_registers=q_registers,
              kv_multicast=kv_multicast, v_wait_first=v_wait_first, narrow_tail=narrow_tail)
    while cfg.stages > 2 and cfg.smem_bytes(head_dim, itemsize) > SMEM_BYTES:
      cfg = dataclasses.replace(cfg, stages=cfg.stages - 1)
    return cfg

  def smem_bytes(self, head_dim: int, itemsize: int = 2, *, segments: bool = False) -> int:
    """Q (reused for O) of both warpgroups, ``q_buffers`` times + the K and V rings + lse
    staging (+ with ``segments``, the int32 ids staged with each Q buffer and K slot)."""
    n = self.q_buffers(head_dim, itemsize, segments=segments)
    return self._smem_bytes(n, head_dim, itemsize, segments)

  def q_buffers(self, head_dim: int, itemsize: int = 2, *, segments: bool = False) -> int:
    """Q buffers per consumer: with several q tiles per CTA, as many as fit of
    ``min(q_tiles_per_cta, 3)``. Two let the next tile's Q load while this one's keys
    stream; a third spares that load the wait for the last tile's O to leave the
    buffer (its store was issued just before). With ``persistent``, up to 3."""
    want = 3 if self.persistent else min(self.q_tiles_per_cta, 3)
    return next(n for n in range(want, 0, -1)
                if n == 1 or self._smem_bytes(n, head_dim, itemsize, segments) <= SMEM_BYTES)

  def _smem_bytes(self, q_buffers: int, head_dim: int, itemsize: int, segments: bool) -> int:
    q = q_buffers * CONSUMER_WGS * self.block_q * head_dim * itemsize
    ring = 2 * self.stages * self.block_kv * head_dim * itemsize
    ids = (q_buffers * CONSUMER_WGS * self.block_q + self.stages * self.block_kv) * 4
    return q + ring + CONSUMER_WGS * self.block_q * 4 + (ids if segments else 0)

  @property
  def q_multiple(self) -> int:
    return CONSUMER_WGS * self.block_q

  @property
  def k_multiple(self) -> int:
    return self.block_kv


@dataclasses.dataclass(frozen=True)
class MosaicBwdConfig:
  """Tuning of the Mosaic backward kernels (bwd.py). Each of ``consumers`` warpgroups owns
  64 keys (dK/dV kernel) or 64 query rows (dQ kernel): the M of its wgmma.

  ``dkv_block_q``, ``dkv_stages``: query rows per step, and steps in flight, of the dK/dV
  kernel's Q/dO/lse/delta ring; ``dq_block_kv``, ``dq_stages``: the same for the dQ
  kernel's K/V ring.

  ``dq_mode``: how dQ is made.
  * ``"separate"``: a dQ kernel of its own, a query tile per CTA, which recomputes S and
    dP (7 matmuls per pair of tiles). Bitwise deterministic.
  * ``"atomic"``: the dK/dV kernel also computes ``dS K`` for each query tile it visits
    and adds it into an f32 dQ buffer in HBM with a TMA reduce-add (FA3's 5 matmuls; no
    dQ kernel); with two consumers one add per CTA (``split_dq``). NOT bitwise
    deterministic: the order of the adds into a row varies from run to run, so
    ``for_problem`` picks it only where reproducibility is not asked for
    (jflash._src.determinism). Its f32 buffer would raise the fwd+bwd peak from 1.15x
    to 1.43x inputs + outputs + gradients (H200, s=32k), so large problems run it in
    launches over blocks of heads (``dq_chunks``, ``dq_chunk_flops``).
  * ``"ordered"``: as ``"atomic"``, but the key tiles that add into one query tile take
    turns in key order (a global semaphore per (batch, head, query tile)), so the sum is
    the same every run. Deterministic, at the cost of waiting for the turn (slower than
    ``"separate"`` on the H100).
  ``producer_regs``: setmaxnreg of the TMA warpgroup; the consumers share what is left
  (``consumer_regs``).
  ``dv_early``: the dK/dV kernel issues dV's wgmma from P^T before it computes dS^T
  (bwd.early_step), so fewer f32 score tiles are live at once (GPU only: the
  interpreter stages both through SMEM either way).
  ``split_head_dim``: the consumers share one 64-row tile (the keys of the dK/dV kernel,
  the query rows of the dQ kernel) and each accumulates its half of the gradients' head
  dim, where one warpgroup's registers cannot hold the whole: d=256, whose f32 dK and dV
  (or dQ) of 64 rows take 256 (128) registers a thread. They divide the score tiles by
  role: consumer 0 computes S^T and P^T (dQ kernel: S and P), consumer 1 dP^T and dS^T
  (dP and dS), each over the whole streamed tile, and they pass P^T, dS^T and dS^T's
  factor to each other through SMEM (bwd.role_step), so no matmul is done twice. Needs
  ``consumers=2`` and ``dq_mode="separate"``. (Sessions 11-12 divided the streamed rows
  into halves instead, wgmma N=32: 3-6% slower, benchmarks/MOSAIC_NOTES.md.)
  ``static_wg``: each consumer warpgroup runs a copy of the code of its own, with its
  index a constant (common.consumers), instead of one copy that computes its tile's SMEM
  addresses from the traced index (``for_problem``: on, but with ``split_head_dim``).
  ``dq_chunks``, ``dq_chunk_flops``: fused dQ only: the dK/dV kernel runs as up to
  ``dq_chunks`` launches over blocks of batches and key heads (fused_dq.dq_chunks), each
  adding into an f32 dQ of its block alone, so that the buffer costs ``2 / launches``
  of dQ's bytes at peak; but each launch keeps at least ``dq_chunk_flops`` of forward
  FLOPs (4 b h T S d, halved when causal). Each launch costs a fixed start and a tail
  (its last wave, longest under a causal mask): H200, d=64, 8 launches against one
  lost nothing at s=16k (0.14-0.28 TFLOP a launch) but 1-15% at 4k (0.03-0.07) and
  9-14% at 1k (0.01-0.02); see fused_dq.fused_dq_launches.
  """

  dkv_block_q: int = 64
  dkv_stages: int = 2
  dq_block_kv: int = 64
  dq_stages: int = 2
  consumers: int = 2
  dq_mode: str = "separate"
  producer_regs: int = 40
  dq_chunks: int = 8
  dq_chunk_flops: float = 1.5e11
  dv_early: bool = False
  split_head_dim: bool = False
  static_wg: bool = False
  # for_problem's choice with segment ids (MOSAIC_NOTES.md, session 19): dq_mode=
  # "separate"'s dK/dV and dQ kernels launch their CTAs longest first, by each tile's
  # work worked out in XLA before the launch (schedule.sorted_order), so that the last
  # wave holds the shortest tiles. Packed documents (8 in 16k, causal): a list schedule
  # in launch order ends 1.11x past the mean work per SM, sorted 1.00x (CPU count). The
  # fused dQ modes' launches (fused_dq.py) do not use it.
  sorted_grid: bool = False

  def __post_init__(self):
    for name in ("dkv_block_q", "dq_block_kv"):
      x = getattr(self, name)
      if x % 64 or not 64 <= x <= 256:
        raise ValueError(f"{name}={x} must be 64, 128, 192 or 256")
    for name in ("dkv_stages", "dq_stages"):
      if getattr(self, name) < 2:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 2")
    if not 1 <= self.consumers <= 2:
      raise ValueError(f"consumers={self.consumers} must be 1 or 2")
    if self.dq_mode not in DQ_MODES:
      raise ValueError(f"dq_mode={self.dq_mode!r} must be one of {DQ_MODES}")
    if not isinstance(self.dq_chunks, int) or self.dq_chunks < 1:
      raise ValueError(f"dq_chunks={self.dq_chunks!r} must be an int >= 1")
    if not self.dq_chunk_flops >= 0:
      raise ValueError(f"dq_chunk_flops={self.dq_chunk_flops!r} must be >= 0")
    if self.producer_regs % 8 or not 24 <= self.producer_regs <= 256:
      raise ValueError(f"producer_regs={self.producer_regs} must be a multiple of 8 in "
                       "[24, 256] (setmaxnreg)")
    if self.static_wg and self.split_head_dim:
      # Its consumers' roles are branches on the index: with a constant index each copy
      # holds one branch, and Mosaic's layout inference finds no solution (d=256).
      raise ValueError("static_wg is not built for split_head_dim (d=256): set one of them")
    if self.split_head_dim and (self.consumers != 2 or self.dq_mode != "separate"):
      raise ValueError(f"split_head_dim needs consumers=2 and dq_mode='separate'; got "
                       f"consumers={self.consumers}, dq_mode={self.dq_mode!r}")

  @property
  def tiles_per_cta(self) -> int:
    """64-row tiles a CTA owns (keys in dK/dV, query rows in dQ): one per consumer, or
    one in all with ``split_head_dim``."""
    return 1 if self.split_head_dim else self.consumers

  def head_cols(self, head_dim: int) -> int:
    """Columns of the head dim each consumer's gradients cover."""
    return head_dim // 2 if self.split_head_dim else head_dim

  def split_head_dim_unsupported(self, head_dim: int) -> str | None:
    """Why ``split_head_dim`` cannot run at ``head_dim`` (None if it can): its halves
    must be whole 64-column tiles, which Mosaic slices."""
    if self.split_head_dim and head_dim % 128:
      return (f"MosaicBwdConfig(split_head_dim=True) halves head_dim={head_dim} into "
              f"{head_dim // 2} columns, and Mosaic slices whole 64-column tiles")
    if self.split_head_dim and (self.dkv_block_q != WG_ROWS or self.dq_block_kv != WG_ROWS):
      return ("MosaicBwdConfig(split_head_dim=True) streams 64-row tiles only (the "
              f"only size built and tested); got dkv_block_q={self.dkv_block_q}, "
              f"dq_block_kv={self.dq_block_kv}")
    return None

  @property
  def consumer_regs(self) -> int:
    """setmaxnreg of each consumer: what the producer leaves of the SM's 64K registers
    (over 128-thread warpgroups), rounded down to 8, at most 240."""
    left = REGISTERS_PER_THREAD_SLOT - self.producer_regs
    return min(240, left // self.consumers // 8 * 8)

  @property
  def fused_dq(self) -> bool:
    """dQ made inside the dK/dV kernel (no dQ kernel)."""
    return self.dq_mode != "separate"

  @property
  def split_dq(self) -> bool:
    """"atomic" with two consumers: FA3's layout, one dQ partial per CTA (its 128 keys)
    and query tile, each consumer computing half of it (fused_dq.dq_half), rather than
    one partial per consumer: half the bytes added into HBM."""
    return self.dq_mode == "atomic" and self.consumers == 2

  def dq_half_shape(self, head_dim: int) -> tuple[int, int]:
    """``split_dq``: each consumer's share of the ``dkv_block_q x head_dim`` partial:
    half the rows where that leaves a wgmma's 64, else half the head dim."""
    if self.dkv_block_q >= 2 * WG_ROWS:
      return self.dkv_block_q // 2, head_dim
    return self.dkv_block_q, head_dim // 2

  def split_dq_unsupported(self, head_dim: int) -> str | None:
    """Why ``split_dq`` cannot run at ``head_dim`` (None if it can): halving the head
    dim of a 64-row partial must leave whole 64-column tiles, which Mosaic slices."""
    cols = self.dq_half_shape(head_dim)[1]
    if self.split_dq and cols % 64:
      return (f"MosaicBwdConfig(dq_mode='atomic', consumers=2, dkv_block_q="
              f"{self.dkv_block_q}) splits dQ at head_dim={head_dim} into {cols}-column "
              "halves, and Mosaic slices whole 64-column tiles: use dkv_block_q >= 128 "
              "or dq_mode='separate'")
    return None

  @classmethod
  def for_problem(cls, q_len: int, kv_len: int, head_dim: int, itemsize: int = 2, *,
                  deterministic: bool = True, segments: bool = False,
                  causal: bool = False) -> "MosaicBwdConfig":
    """A heuristic default per (padded) head dim (64, 128 or 256), shrunk to fit SMEM.
    ``deterministic``: bitwise reproducible results asked for; ``segments``: the call
    has segment ids (packed documents); ``causal``: a causal mask."""
    # The f32 accumulators (dK + dV, or dQ) grow with the head dim, so the score tiles
    # shrink with it to stay within the consumers' registers.
    # d=256 splits the head dim between the consumers (``split_head_dim``).
    dkv_block_q, dq_block_kv = {64: (128, 128), 128: (64, 64), 256: (64, 64)}[head_dim]
    # Tiles no longer than the padded lengths, which are multiples of 128 (two
    # consumers of 64) at least: a 128-row dK/dV step keeps the split dQ's halves whole
    # 64-row wgmma tiles at d=64 (dq_half_shape), where 64 rows would halve the head dim.
    rows = lambda n: max(64, min(n, -(-q_len // 128) * 128))
    cols = lambda n: max(64, min(n, -(-kv_len // 128) * 128))
    # d=256 shares each tile between the two consumers (``split_head_dim``). Its score
    # tiles by role rather than by halves of rows: the dK/dV kernel H100 2026-11-26
    # ~22:26, fwd+bwd TFLOP/s, two runs each: 4k 369-373 -> 388-401, causal 350 -> 357;
    # 16k 389-392 -> 412-414, causal 387-389 -> 396-400; then the dQ kernel, H200
    # 2026-11-27 ~00:33: 16k 400.0, 402.1 -> 416.7, 415.5, causal 387.7, 386.8 -> 405.2;
    # 4k causal 1.00 -> 1.02x cuDNN. (Commit 77f0bb8 has the halves.)
    # A code copy per consumer (``static_wg``) except where they split the head dim:
    # H100 2026-11-27, fwd+bwd TFLOP/s, default -> static_wg, two readings each: d=128
    # 4k 487, 494 -> 522, 528; 16k 526, 521 -> 556, 558; 16k causal 511, 510 -> 535,
    # 545; 4k causal ("separate") 431, 426 -> 428, 428; d=64 4k 1.02 -> 1.10x cuDNN,
    # 16k 1.09 -> 1.12x (benchmarks/MOSAIC_NOTES.md, session 16).
    cfg = cls(dkv_block_q=rows(dkv_block_q), dq_block_kv=cols(dq_block_kv),
              split_head_dim=head_dim == 256, static_wg=head_dim != 256)
    # "atomic" (5 matmuls, dQ added into HBM) where it measured faster than "separate"
    # (7 matmuls), H200 2026-11-26, fwd+bwd x cuDNN (benchmarks/MOSAIC_NOTES.md,
    # "Session 8"): at d=64 in every cell (one launch 1.02-1.10 against 0.94-1.01); at
    # d=128 from 4k keys without a causal mask and from 8k with one, with
    # producer_regs=24 (its consumers spill registers at d=128; more for them helps):
    # 4k 0.97 against 0.93, 16k 0.95 / 0.98 against 0.90 / 0.95; not at 4k causal (0.97
    # against 0.98) nor at 1k (0.97 / 0.99 against 1.07 / 1.16). Packed documents keep
    # "separate" (8 docs in 16k, causal, H100: 363 against 324 useful TFLOP/s at d=128,
    # 291 against 284 at d=64).
    # d=128: dV's wgmma issued before dS^T is made (``dv_early``; fewer live f32 tiles:
    # ptxas spills 180-304 bytes instead of 232-368 with "atomic"). H200 2026-11-26,
    # fwd+bwd x cuDNN, default -> dv_early: 1k 1.05 -> 1.07, 1.13 -> 1.14 (causal); 4k
    # 0.95 -> 0.98, 1.01 -> 1.04; 16k 0.95 -> 0.95, 0.94 -> 0.95. Not at d=64: 1.11 ->
    # 1.04, 1.08 -> 1.01, 1.06 -> 1.02 without a causal mask (even with one).
    if head_dim == 128:
      cfg = dataclasses.replace(cfg, dv_early=True)
    # d=256: more registers for the consumers (H100 2026-11-26, fwd+bwd TFLOP/s with
    # producer_regs 40 -> 24: 4k 344 -> 350, 309 -> 321 causal; 16k 354 -> 365, 355 ->
    # 363 causal; dv_early mixed: -1.4% .. +2.5%; measured on the first split_head_dim,
    # which computed S and dP in both consumers).
    if head_dim == 256:
      cfg = dataclasses.replace(cfg, producer_regs=24)
    # Packed documents ("separate"): CTAs launched longest first (``sorted_grid``). H200
    # 2026-11-27, 8 docs in 16k, causal, fwd+bwd useful TFLOP/s, off -> on in one run:
    # d=128 365.8 -> 378.6, 378.1; d=64 292.2 -> 295.7, 296.7. d=256 not timed.
    if segments and head_dim <= 128:
      cfg = dataclasses.replace(cfg, sorted_grid=True)
    long = kv_len >= (8192 if causal else 4096)
    if not (deterministic or segments or cfg.split_head_dim) and (head_dim == 64 or long):
      # (The 128-row floor of ``rows`` keeps its split dQ whole: split_dq_unsupported.)
      cfg = dataclasses.replace(cfg, dq_mode="atomic",
                                producer_regs=40 if head_dim == 64 else 24)
    while cfg.dkv_stages > 2 and cfg.dkv_smem_bytes(head_dim, itemsize) > SMEM_BYTES:
      cfg = dataclasses.replace(cfg, dkv_stages=cfg.dkv_stages - 1)
    while cfg.dq_stages > 2 and cfg.dq_smem_bytes(head_dim, itemsize) > SMEM_BYTES:
      cfg = dataclasses.replace(cfg, dq_stages=cfg.dq_stages - 1)
    return cfg

  def dkv_smem_bytes(self, head_dim: int, itemsize: int = 2) -> int:
    """K and V of every consumer (reused for dK, dV) + the Q/dO/lse/delta ring; with a
    fused dQ, each consumer's dS^T tile and its f32 dQ partial (staged for the TMA add),
    or with ``split_dq`` two buffers of all consumers' dS^T and the partial in halves."""
    kv = 2 * self.tiles_per_cta * WG_ROWS * head_dim * itemsize
    ring = self.dkv_stages * self.dkv_block_q * (2 * head_dim * itemsize + 2 * 4)
    dq = 0
    if self.split_dq:  # two dS^T buffers of the CTA's keys + the partial, in halves
      dq = 2 * self.consumers * WG_ROWS * self.dkv_block_q * itemsize
      dq += self.dkv_block_q * head_dim * 4
    elif self.fused_dq:
      dq = self.consumers * self.dkv_block_q * (WG_ROWS * itemsize + head_dim * 4)
    elif self.split_head_dim:  # the exchanged P^T, dS^T and dS^T's factor
      dq = 3 * WG_ROWS * self.dkv_block_q * itemsize
    return kv + ring + dq

  def dq_smem_bytes(self, head_dim: int, itemsize: int = 2) -> int:
    """Q and dO of every query tile (Q reused for dQ), their lse/delta + the K/V ring."""
    q = self.tiles_per_cta * WG_ROWS * (2 * head_dim * itemsize + 2 * 4)
    # The exchanged dS and its factor (in f16).
    ds = 2 * WG_ROWS * self.dq_block_kv * itemsize
    ds = ds if self.split_head_dim else 0
    return q + ds + 2 * self.dq_stages * self.dq_block_kv * head_dim * itemsize

  @property
  def q_multiple(self) -> int:
    return math.lcm(self.tiles_per_cta * WG_ROWS, self.dkv_block_q)

  @property
  def k_multiple(self) -> int:
    return math.lcm(self.tiles_per_cta * WG_ROWS, self.dq_block_kv)
