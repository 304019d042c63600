"""Which query tiles each CTA of the Mosaic forward runs (the deal), and what that deal
costs where tiles differ in work: pure index arithmetic, shared by the kernel (traced
int32) and by MosaicConfig.for_problem (NumPy, at trace time)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


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
    where = np.where if isinstance(j, np.ndarray) else jnp.where
    v = j * ctas + where(j % 2 == 0, c, back)
  return nq - 1 - v


def persistent_tiles(c, ctas: int, n_all: int):
  """How many of ``n_all`` tiles ``q_tile`` deals CTA ``c`` (int32) of ``ctas``: the
  runs 0 .. full-1 are whole, and run ``full`` deals its first ``rest`` places."""
  full, rest = divmod(n_all, ctas)
  x = c if full % 2 == 0 else ctas - 1 - c
  return full + (x < rest).astype(jnp.int32)


def deal_imbalance(tile_work, copies: int, ctas: int) -> float:
  """How far the persistent deal of ``copies`` (batch x head) runs of tiles, tile ``t``
  costing ``tile_work[t]``, is from balanced: the busiest CTA's work over the least any
  deal could give it (the mean, or the longest tile where that is more). 1.0: none.

  The deal (``q_tile`` over the flat index) is balanced when each head's tiles cost the
  same, or when a run of ``ctas`` spans several heads. Under a causal mask, with about
  one head per run, a CTA's places drift slowly across the head from run to run, so the
  serpentine stops pairing long tiles with short ones: 16 heads of 128 tiles on 132 CTAs
  deal 1.54 (H200 2026-11-27, s=16k causal fwd: 418 TFLOP/s against 636 with one CTA
  per tile)."""
  work = np.asarray(tile_work, dtype=np.float64)
  nq = work.size
  n_all = nq * copies
  c = np.arange(ctas)[None, :]
  j = np.arange(-(-n_all // ctas))[:, None]
  f = q_tile(c, j, ctas, n_all)
  per_cta = np.where(f >= 0, work[np.maximum(f, 0) % nq], 0.0).sum(axis=0)
  return float(per_cta.max() / max(per_cta.mean(), work.max()))
