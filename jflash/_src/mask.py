"""The one mask of jflash: its static spec, its element predicate, its block ranges.

Every kernel (forward, dQ, dK/dV, of every backend) and the blockwise XLA path ask this
module, and only this module, which (query, key) pairs are visible:

* ``visible`` is the element predicate, evaluated on a tile of positions;
* ``kv_block_range`` (for a query tile: which key tiles to visit, and which of them need
  no per-element mask) and ``q_block_range`` (the same seen from a key tile, for dK/dV);
* ``tail_keys`` (how many keys of a query tile's last masked key tile it can see: the
  width the Mosaic forward computes that tile at).

The mask is the intersection of:
  - a diagonal band  ``band_lo <= j - i <= band_hi`` (causal is ``band_hi = 0``, a window
    ``(left, right)`` is ``band_lo = -left, band_hi = right``; ``None`` means unbounded);
  - per-batch valid lengths ``i < q_valid[b]`` and ``j < kv_valid[b]`` (padding; also the
    static lengths T and S, so tiles that stick out past the end are masked);
  - optional per-token segment ids: ``q_seg[i] == kv_seg[j]`` (packed documents);
  - an optional dense boolean mask broadcastable to ``[B, N, T, S]``, read tile by tile.

A query row that sees no key produces zeros and an lse of +inf inside jflash (so that
``exp(s - lse)`` recomputes p = 0 in the backward pass without a mask); the public
residual turns that +inf into -inf, the log of an empty sum.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

# Positions and block indices are small non-negative int32 scalars. Kernels pass traced
# scalars, tests pass Python ints; both go through the same arithmetic below.
Scalar = Any


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """The static part of the mask: what is known at trace time. Hashable."""

  q_len: int  # T, the unpadded query length
  kv_len: int  # S, the unpadded key length
  causal: bool = False
  window_left: int | None = None  # key j visible iff j >= i - left
  window_right: int | None = None  # key j visible iff j <= i + right
  has_segment_ids: bool = False
  has_dense_mask: bool = False

  @property
  def band_lo(self) -> int | None:
    """Smallest visible ``j - i``, or None when unbounded."""
    return None if self.window_left is None else -self.window_left

  @property
  def band_hi(self) -> int | None:
    """Largest visible ``j - i``, or None when unbounded."""
    hi = self.window_right
    if self.causal:
      hi = 0 if hi is None else min(hi, 0)
    return hi

  def every_tile_masked(self, segment_ranges_known: bool = False) -> bool:
    """True when no tile can skip the element predicate: a dense mask, or segment ids
    whose per-tile ranges (``segment_tile_ranges``) the caller does not have."""
    return self.has_dense_mask or (self.has_segment_ids and not segment_ranges_known)


@dataclasses.dataclass(frozen=True)
class MaskArrays:
  """The dynamic part of the mask. A pytree of int32 arrays (no gradients).

  q_valid, kv_valid: ``[B]``: rows ``i >= q_valid[b]`` and keys ``j >= kv_valid[b]``
  are padding. Always present (filled with T and S when the user gives no lengths).
  q_segment_ids ``[B, T]``, kv_segment_ids ``[B, S]``: present iff
  ``MaskSpec.has_segment_ids``.
  dense: bool ``[Bm, Nm, Tm, Sm]``, each dim 1 (broadcast) or full; present iff
  ``MaskSpec.has_dense_mask``.
  dropout_seed: int32[4] (see dropout.py), present iff the Problem's dropout_rate > 0.
  """

  q_valid: jax.Array
  kv_valid: jax.Array
  q_segment_ids: jax.Array | None = None
  kv_segment_ids: jax.Array | None = None
  dense: jax.Array | None = None
  dropout_seed: jax.Array | None = None


jax.tree_util.register_dataclass(
    MaskArrays,
    data_fields=["q_valid", "kv_valid", "q_segment_ids", "kv_segment_ids", "dense",
                 "dropout_seed"],
    meta_fields=[],
)


def visible(
    spec: MaskSpec,
    q_pos: jax.Array,
    k_pos: jax.Array,
    q_valid: Scalar,
    kv_valid: Scalar,
    q_seg: jax.Array | None = None,
    kv_seg: jax.Array | None = None,
    dense: jax.Array | None = None,
    *,
    transpose: bool = False,
) -> jax.Array:
  """The element predicate on a tile: ``[bq] x [bk] -> bool[bq, bk]``.

  q_pos, k_pos: absolute positions of the tile's rows and columns (1-D).
  q_seg, kv_seg: the tile's segment ids (required iff ``spec.has_segment_ids``).
  dense: the tile of the dense mask, broadcastable to the result (iff has_dense_mask).
  transpose: return the ``[bk, bq]`` tile instead (for kernels that compute k @ q^T).
  """
  row, col = (lambda x: x[None, :], lambda x: x[:, None]) if transpose else (
      lambda x: x[:, None], lambda x: x[None, :])
  if spec.band_lo is None and spec.band_hi is None:
    # No band: the two length tests on the 1-D positions, then expanded (Mosaic GPU
    # infers no register layout for comparisons on [1, n] / [n, 1] arrays). Not the
    # per-row bound below: in the Triton forward at d=128, s=4096 without a causal
    # mask, that form's code (in the masked loops, which that call never runs) made
    # the whole kernel compile slower (H200 2026-11-28, fwd TFLOP/s 405 -> 230; at
    # 16k and under a causal mask no change; benchmarks/RESULTS.md).
    ok = col(k_pos < kv_valid) & row(q_pos < q_valid)
  else:
    # Row i sees keys ``lo_i <= j <= hi_i``: the band and both valid lengths fold into
    # two per-row bounds, worked out on the 1-D positions (a row past q_valid gets
    # hi = -1, so no key), and the tile costs one comparison per element and side of
    # the band rather than a subtraction, a comparison and the length tests. The
    # offsets are clipped to the lengths (no int32 overflow; a band wider than the keys
    # bounds nothing).
    hi_off = spec.kv_len if spec.band_hi is None else min(spec.band_hi, spec.kv_len)
    hi = jnp.where(q_pos < q_valid, jnp.minimum(q_pos + hi_off, kv_valid - 1), -1)
    kj = col(k_pos)
    ok = kj <= row(hi)
    if spec.band_lo is not None:
      ok = ok & (kj >= row(q_pos + max(spec.band_lo, -spec.q_len)))
  if spec.has_segment_ids:
    ok = ok & (row(q_seg) == col(kv_seg))
  if spec.has_dense_mask:
    ok = ok & dense
  return ok


def _max(a, b):
  return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


def _min(a, b):
  return min(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.minimum(a, b)


def _div(a, b: int):
  # Callers only divide non-negative numerators, where truncation is floor division;
  # lax.div keeps the lowering a single integer division inside kernels.
  return a // b if isinstance(a, int) else lax.div(a, jnp.asarray(b, a.dtype))


def _band_range(start, size, other_block, n_other, lo_off, hi_off, other_valid, force_mask):
  """Blocks of the other axis that a run ``[start, start + size)`` of this axis touches.

  The visible band is ``lo_off <= other - own <= hi_off`` with ``lo_off <= 0 <= hi_off``
  (None: unbounded). Returns ``(lo, full_lo, full_hi, hi)``: blocks in ``[lo, hi)`` may
  hold a visible pair; blocks in ``[full_lo, full_hi)`` are visible in every element
  (so kernels skip the predicate there); ``lo <= full_lo <= full_hi <= hi``.
  """
  last = start + size - 1
  lo = 0 if lo_off is None else _div(_max(start + lo_off, 0), other_block)
  hi = n_other if hi_off is None else _min(_div(last + hi_off, other_block) + 1, n_other)
  # Blocks past the other axis's valid length hold nothing visible.
  hi = _min(hi, _div(other_valid + other_block - 1, other_block))
  hi = _max(hi, lo)
  if force_mask:
    return lo, lo, lo, hi
  # Every element of block b visible: b*ob - last >= lo_off and b*ob + ob-1 - start <= hi_off.
  full_lo = lo if lo_off is None else _div(_max(last + lo_off + other_block - 1, 0), other_block)
  full_hi = n_other if hi_off is None else _div(start + hi_off + 1, other_block)
  full_hi = _min(full_hi, _div(other_valid, other_block))
  full_lo = _min(_max(full_lo, lo), hi)
  full_hi = _min(_max(full_hi, full_lo), hi)
  return lo, full_lo, full_hi, hi


def kv_block_range(spec: MaskSpec, q_start, block_q: int, block_k: int, num_k_blocks: int,
                   q_valid, kv_valid, segment_range=None):
  """For the query tile at ``q_start``: ``(lo, full_lo, full_hi, hi)`` over key blocks.

  Forward and dQ kernels loop masked over ``[lo, full_lo)`` and ``[full_hi, hi)``,
  unmasked over ``[full_lo, full_hi)``. A tile of only padding rows visits nothing.
  ``segment_range``: this tile's row of ``segment_tile_ranges(..., by_rows=True)``
  (4 scalars), narrowing the range to the key tiles its documents can meet.
  """
  lo, full_lo, full_hi, hi = _band_range(
      q_start, block_q, block_k, num_k_blocks, spec.band_lo, spec.band_hi, kv_valid,
      spec.every_tile_masked(segment_range is not None))
  empty = q_start >= q_valid
  if isinstance(empty, bool):
    ranges = (lo, lo, lo, lo) if empty else (lo, full_lo, full_hi, hi)
  else:
    hi = jnp.where(empty, lo, hi)
    ranges = (lo, jnp.minimum(full_lo, hi), jnp.minimum(full_hi, hi), hi)
  return ranges if segment_range is None else intersect_ranges(ranges, segment_range)


def tail_keys(spec: MaskSpec, q_start, block_q: int, block_k: int, full_hi, hi, q_valid,
              kv_valid, chunk: int):
  """How many keys of key block ``hi - 1`` (of a ``kv_block_range``) rows ``[q_start,
  q_start + block_q)`` may see, rounded up to a multiple of ``chunk``: every key they
  see in that block lies in its first ``tail_keys`` ones, so a kernel may compute the
  block at that width. Under a causal mask this narrows the diagonal block: with
  64-row query tiles and 128-key blocks, the upper rows of each 128-row tile see only
  the first 64 keys of theirs.

  ``block_k`` (no narrowing) when the range has no trailing masked block (``hi - 1 <
  full_hi``). Bounds only by the band and the valid lengths: segment ids and a dense
  mask can only hide more keys, so the answer holds under them too."""
  q_last = _min(q_start + block_q, q_valid) - 1
  last_key = kv_valid - 1
  if spec.band_hi is not None:
    last_key = _min(last_key, q_last + min(spec.band_hi, spec.kv_len))
  need = _div(_max(last_key + 1 - (hi - 1) * block_k + chunk - 1, 0), chunk) * chunk
  need = _min(_max(need, chunk), block_k)
  if isinstance(need, int) and isinstance(full_hi, int) and isinstance(hi, int):
    return need if hi - 1 >= full_hi else block_k
  return jnp.where(hi - 1 >= full_hi, need, block_k)


def q_block_range(spec: MaskSpec, k_start, block_k: int, block_q: int, num_q_blocks: int,
                  q_valid, kv_valid, segment_range=None):
  """For the key tile at ``k_start``: ``(lo, full_lo, full_hi, hi)`` over query blocks.

  The same band seen from the key side (``-band_hi <= i - j <= -band_lo``). A key tile
  that sticks out past ``kv_valid`` needs the predicate in every query block.
  ``segment_range``: this tile's row of ``segment_tile_ranges(..., by_rows=False)``.
  """
  lo_off = None if spec.band_hi is None else -spec.band_hi
  hi_off = None if spec.band_lo is None else -spec.band_lo
  lo, full_lo, full_hi, hi = _band_range(
      k_start, block_k, block_q, num_q_blocks, lo_off, hi_off, q_valid,
      spec.every_tile_masked(segment_range is not None))
  empty = k_start >= kv_valid
  partial = k_start + block_k > kv_valid
  if isinstance(empty, bool):
    if empty:
      ranges = (lo, lo, lo, lo)
    else:
      ranges = (lo, lo, lo, hi) if partial else (lo, full_lo, full_hi, hi)
  else:
    hi = jnp.where(empty, lo, hi)
    full_lo = jnp.where(partial, lo, jnp.minimum(full_lo, hi))
    full_hi = jnp.where(partial, lo, jnp.minimum(full_hi, hi))
    ranges = (lo, full_lo, full_hi, hi)
  return ranges if segment_range is None else intersect_ranges(ranges, segment_range)


def intersect_ranges(a, b):
  """The ``(lo, full_lo, full_hi, hi)`` ranges of two masks ANDed together: blocks that
  both may see, of which those that both see in full skip the predicate."""
  lo = _max(a[0], b[0])
  hi = _max(_min(a[3], b[3]), lo)
  full_lo = _min(_max(_max(a[1], b[1]), lo), hi)
  full_hi = _min(_max(_min(a[2], b[2]), full_lo), hi)
  return lo, full_lo, full_hi, hi


def _tile_min_max(ids, block: int):
  tiles = ids.reshape(ids.shape[0], -1, block)
  return tiles.min(-1), tiles.max(-1)


def segment_tile_ranges(q_seg, kv_seg, block_q: int, block_k: int, *, by_rows: bool):
  """Which tiles of the other axis each tile's documents can meet, computed once in XLA.

  ``q_seg [B, Tp]``, ``kv_seg [B, Sp]`` (padded to tile multiples). Returns int32
  ``[B, n, 4]``: for each query tile (``by_rows``) over key tiles, or for each key tile
  over query tiles, ``(lo, full_lo, full_hi, hi)`` as in ``kv_block_range``. A pair of
  tiles may hold a visible pair only if their ``[min, max]`` id intervals overlap, so
  ``[lo, hi)`` spans the first to the last such tile (exact for packed documents, whose
  ids ascend; merely conservative for ids in any other order). It is fully visible when
  both tiles hold one and the same id; the full run is used only if it is contiguous.
  """
  qmin, qmax = _tile_min_max(q_seg, block_q)  # [B, nq]
  kmin, kmax = _tile_min_max(kv_seg, block_k)  # [B, nk]
  if not by_rows:
    qmin, qmax, kmin, kmax = kmin, kmax, qmin, qmax
  meet = (qmin[:, :, None] <= kmax[:, None, :]) & (kmin[:, None, :] <= qmax[:, :, None])
  full = ((qmin == qmax)[:, :, None] & (kmin == kmax)[:, None, :]
          & (qmin[:, :, None] == kmin[:, None, :]))
  n_other = meet.shape[-1]

  def first_last(x):
    any_ = x.any(-1)
    first = jnp.argmax(x, axis=-1)
    last = n_other - jnp.argmax(x[..., ::-1], axis=-1)
    return jnp.where(any_, first, 0), jnp.where(any_, last, 0)

  lo, hi = first_last(meet)
  full_lo, full_hi = first_last(full)
  contiguous = (full_hi - full_lo) == full.sum(-1)
  full_lo = jnp.where(contiguous, full_lo, lo)
  full_hi = jnp.where(contiguous, full_hi, lo)
  return jnp.stack([lo, full_lo, full_hi, hi], axis=-1).astype(jnp.int32)
