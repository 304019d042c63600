"""Which query tiles each CTA of the Mosaic forward runs (the deal), and what that deal
costs where tiles differ in work: pure index arithmetic, shared by the kernel (traced
int32) and by MosaicConfig.for_problem (NumPy, at trace time)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _traced(x) -> bool:
  return isinstance(x, jax.Array)


def _div(a, b: int):
  """``a // b`` of non-negative ints: Python, NumPy or traced int32 (lax.div)."""
  return lax.div(a, jnp.asarray(b, a.dtype)) if _traced(a) else a // b


def _rem(a, b: int):
  return lax.rem(a, jnp.asarray(b, a.dtype)) if _traced(a) else a % b


def _lt(a, b):
  """``a < b`` as 0 or 1, of the type of ``a``."""
  if _traced(a):
    return (a < b).astype(a.dtype)
  return (np.asarray(a) < b).astype(np.int64) if isinstance(a, np.ndarray) else int(a < b)


def _where(cond, x, y):
  return (jnp.where if _traced(cond) or _traced(x) or _traced(y) else np.where)(cond, x, y)


def q_tile(c, j, ctas: int, nq: int):
  """The query tile (of ``2 * block_q`` rows) that CTA ``c`` of ``ctas`` runs ``j``-th;
  negative past the end (where ``q_tiles_per_cta`` does not divide ``nq``).

  The ``j``-th tiles of all CTAs form the ``j``-th run of ``ctas`` tiles, counted from
  the last tile (under a causal mask, the longest first), forwards in even runs and
  backwards in odd ones (a serpentine): a CTA pairs a long tile with a short one, so
  with an even ``q_tiles_per_cta`` every CTA gets the same causal work. Run ``j`` lies
  wholly before run ``j + 1``, so a CTA's tiles past the end are its last ones. With one
  tile per CTA, CTA ``c`` runs tile ``nq - 1 - c``. ``c`` and ``j``: ints, traced
  int32, or NumPy arrays (``deal_imbalance``)."""
  back = ctas - 1 - c
  if isinstance(j, int):
    v = j * ctas + (c if j % 2 == 0 else back)
  else:
    v = j * ctas + _where(j % 2 == 0, c, back)
  return nq - 1 - v


def persistent_tiles(c, ctas: int, n_all: int):
  """How many of ``n_all`` tiles ``q_tile`` deals CTA ``c`` of ``ctas``: the
  runs 0 .. full-1 are whole, and run ``full`` deals its first ``rest`` places."""
  full, rest = divmod(n_all, ctas)
  x = c if full % 2 == 0 else ctas - 1 - c
  return full + _lt(x, rest)


def _paired_counts(c, ctas: int, copies: int, nq: int):
  """CTA ``c``'s pairs and singles under the paired deal, and its place among the
  singles' CTAs (see ``paired_tile``)."""
  units = copies * (nq // 2)
  singles = copies if nq % 2 else 0
  pairs_c = units // ctas + _lt(c, units % ctas)
  place = _rem(c + (ctas - units % ctas), ctas)
  return pairs_c, singles // ctas + _lt(place, singles % ctas), place


def paired_tiles(c, ctas: int, copies: int, nq: int):
  """How many tiles ``paired_tile`` deals CTA ``c`` of ``ctas``."""
  pairs_c, singles_c, _ = _paired_counts(c, ctas, copies, nq)
  return 2 * pairs_c + singles_c


def paired_tile(c, j, ctas: int, copies: int, nq: int):
  """``(copy, tile)`` of the ``j``-th tile (``j < paired_tiles``) that CTA ``c`` of
  ``ctas`` runs under the paired deal of ``copies`` (batch x head) runs of ``nq`` tiles.

  Each copy's tiles go in pairs, tile ``nq - 1 - k`` then tile ``k``: under a causal mask
  every pair costs the same (the longest with the shortest). Pairs are dealt round-robin
  (unit ``u`` = pair ``u mod nq//2`` of copy ``u div nq//2`` goes to CTA ``u mod
  ctas``), so the CTAs running side by side hold a few copies' pairs and no CTA has
  more than one pair above another. An odd ``nq`` leaves each copy's middle tile: these
  cost the same and are dealt last, round-robin from the CTA after the last pair's, so
  the CTAs with one pair fewer take them first. Each CTA's tiles have no holes: all of
  ``0 .. paired_tiles - 1`` are live."""
  pairs = nq // 2
  pairs_c, _, place = _paired_counts(c, ctas, copies, nq)
  single = place + (j - 2 * pairs_c) * ctas  # the copy whose middle tile it is
  if not pairs:
    return single, single * 0
  u = _div(j, 2) * ctas + c
  k = _rem(u, pairs)
  in_pair = j < 2 * pairs_c
  tile = _where(_rem(j, 2) == 0, nq - 1 - k, k)
  return _where(in_pair, _div(u, pairs), single), _where(in_pair, tile, pairs)


def sorted_order(work, heads: int):
  """The sorted deal: which (batch, head, tile) runs at each ``q_tile`` place.

  ``work [B, nq]``: each query tile's key tiles (the same for every head of a batch
  row). Returns int32 ``[B * heads * nq]``, indexed by ``q_tile``'s flat index (which
  counts from the end): the flat ``(b * heads + h) * nq + tile`` dealt there. Tiles go
  longest first, each (batch, tile)'s heads side by side, ties in (batch, tile) order;
  ``q_tile``'s serpentine over runs of falling work then gives every CTA about the same
  work, whatever the mask. NumPy or traced arrays (in XLA, before the launch)."""
  xp = jnp if _traced(work) else np
  b, nq = work.shape
  by_work = xp.argsort(-work.reshape(-1), stable=True)  # (batch, tile)s, longest first
  bt = xp.repeat(by_work, heads)
  h = xp.tile(xp.arange(heads), b * nq)
  flat = (bt // nq * heads + h) * nq + bt % nq
  return flat[::-1].astype(xp.int32)


def deal_units(copies: int, nq: int, paired: bool) -> int:
  """The most CTAs a persistent deal can keep busy: tiles, or pairs and middle tiles."""
  return copies * (nq // 2 + nq % 2) if paired else copies * nq


def deal_imbalance(tile_work, copies: int, ctas: int, paired: bool = False,
                   by_work: bool = False) -> float:
  """How far a persistent deal of ``copies`` (batch x head) runs of tiles, tile ``t``
  costing ``tile_work[t]``, is from balanced: the busiest CTA's work over the least any
  deal could give it (the mean, or the longest tile where that is more). 1.0: none.
  ``paired``: ``paired_tile``'s deal; ``by_work``: the sorted deal (``sorted_order``);
  else ``q_tile``'s over the flat index.

  The serpentine deal is balanced when each head's tiles cost the same, or when a run
  of ``ctas`` spans several heads. Under a causal mask, with about one head per run, a
  CTA's places drift slowly across the head from run to run, so the serpentine stops
  pairing long tiles with short ones: 16 heads of 128 tiles on 132 CTAs deal 1.54 (H200
  2026-11-27, s=16k causal fwd: 418 TFLOP/s against 636 with one CTA per tile)."""
  work = np.asarray(tile_work, dtype=np.float64)
  nq = work.size
  c = np.arange(ctas)
  if paired:
    count = paired_tiles(c, ctas, copies, nq)
  else:
    count = persistent_tiles(c, ctas, nq * copies)
  order = sorted_order(work[None], copies) if by_work else None
  per_cta = np.zeros(ctas)
  for j in range(int(count.max())):
    if paired:
      tile = paired_tile(c, j, ctas, copies, nq)[1]
    else:
      tile = np.clip(q_tile(c, j, ctas, nq * copies), 0, None)
      if by_work:
        tile = order[tile]
    per_cta += np.where(j < count, work[tile % nq], 0.0)
  return float(per_cta.max() / max(per_cta.mean(), work.max()))
