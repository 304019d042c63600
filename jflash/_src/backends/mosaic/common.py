"""What the Mosaic GPU kernels (fwd.py, bwd.py and the probes) share: the wgmma
layouts of per-row and per-column vectors, the SMEM tile layout, a code copy per
consumer warpgroup, and per-CTA segment ranges."""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jflash._src import mask as mask_lib

ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a wgmma tile
COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column


def smem_tile(shape, dtype):
  """An SMEM ref of ``shape`` in the layout wgmma and TMA use (shared by the Mosaic
  kernels and probes)."""
  # A 128-byte swizzle over (8, 64) tiles: the layout wgmma reads without bank conflicts.
  tiling = plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize))
  return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(128)))


def consumers(static: bool, wg, wgs: int, body):
  """Runs ``body(wg)`` in each of the ``wgs`` consumer warpgroups. ``static``: each gets
  a copy of the code of its own, with its index a Python int, so that the SMEM addresses
  and barriers that depend on it are constants; else one copy, the index traced."""
  if static:
    for w in range(wgs):
      pl.when(wg == w)(functools.partial(body, w))
  else:
    pl.when(wg < wgs)(functools.partial(body, wg))


def per_row(x, shape):
  """A per-row vector broadcast over the columns of a ``shape`` tile."""
  return lax.broadcast_in_dim(x, shape, [0])


def tile_work(spec, size: int, other_block: int, n_tiles: int, n_other: int, q_valid,
              kv_valid, union=None, *, by_rows: bool):
  """int32 ``[B, n_tiles]``: the tiles of the other axis that each CTA's tile of ``size``
  (query rows if ``by_rows``, else keys) steps through: the range its producer loads
  (mask.kv_block_range or q_block_range; ``union``: the union rows ``[B, n_tiles, 4]``
  of cta_segment_ranges, or None). Worked out in XLA, before a launch (the deals and
  launch orders by work: schedule.sorted_order)."""
  starts = jnp.arange(n_tiles, dtype=jnp.int32)[None] * size
  block_range = mask_lib.kv_block_range if by_rows else mask_lib.q_block_range
  seg = None if union is None else tuple(union[..., x] for x in range(4))
  lo, _, _, hi = block_range(spec, starts, size, other_block, n_other, q_valid[:, None],
                             kv_valid[:, None], seg)
  return jnp.broadcast_to(hi - lo, (q_valid.shape[0], n_tiles))


def cta_segment_ranges(q_seg, kv_seg, block_q: int, block_k: int, consumers: int, *,
                       by_rows: bool):
  """int32 ``[B, n_cta, consumers + 1, 4]``: for each CTA (``consumers`` consecutive
  tiles of this axis), each consumer's ``(lo, full_lo, full_hi, hi)`` over the other
  axis's tiles (mask.segment_tile_ranges), then their union ``(lo, lo, lo, hi)`` for
  the producer.

  Ranges per consumer rather than per CTA: the CTA's span is exactly the union of its
  consumers', and each consumer skips what only the others' documents meet."""
  own = mask_lib.segment_tile_ranges(q_seg, kv_seg, block_q, block_k, by_rows=by_rows)
  b, n, _ = own.shape
  own = own.reshape(b, n // consumers, consumers, 4)
  lo, hi = own[..., 0], own[..., 3]
  empty = hi <= lo  # documents that meet no tile: (0, 0, 0, 0)
  n_other = (kv_seg.shape[1] // block_k) if by_rows else (q_seg.shape[1] // block_q)
  u_lo = jnp.where(empty, n_other, lo).min(-1)
  u_hi = jnp.where(empty, 0, hi).max(-1)
  u_lo = jnp.minimum(u_lo, u_hi)  # every consumer empty: an empty range
  union = jnp.stack([u_lo, u_lo, u_lo, u_hi], axis=-1)[:, :, None]
  return jnp.concatenate([own, union], axis=2).astype(jnp.int32)
