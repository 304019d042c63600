"""The one mask of jflash: its static spec, its element predicate, its block ranges.

Every kernel (forward, dQ, dK/dV, of every backend) and the blockwise XLA path ask this
module, and only this module, which (query, key) pairs are visible:

* ``visible`` is the element predicate, evaluated on a tile of positions;
* ``kv_block_range`` (for a query tile: which key tiles to visit, and which of them need
  no per-element mask) and ``q_block_range`` (the same seen from a key tile, for dK/dV).

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

  @property
  def every_tile_masked(self) -> bool:
    """True when no tile can skip the element predicate (data-dependent masks)."""
    return self.has_segment_ids or self.has_dense_mask


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
  qi, kj = row(q_pos), col(k_pos)
  ok = (kj < kv_valid) & (qi < q_valid)
  if spec.band_lo is not None:
    ok = ok & (kj - qi >= spec.band_lo)
  if spec.band_hi is not None:
    ok = ok & (kj - qi <= spec.band_hi)
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
                   q_valid, kv_valid):
  """For the query tile at ``q_start``: ``(lo, full_lo, full_hi, hi)`` over key blocks.

  Forward and dQ kernels loop masked over ``[lo, full_lo)`` and ``[full_hi, hi)``,
  unmasked over ``[full_lo, full_hi)``. A tile of only padding rows visits nothing.
  """
  lo, full_lo, full_hi, hi = _band_range(
      q_start, block_q, block_k, num_k_blocks, spec.band_lo, spec.band_hi, kv_valid,
      spec.every_tile_masked)
  empty = q_start >= q_valid
  if isinstance(empty, bool):
    return (lo, lo, lo, lo) if empty else (lo, full_lo, full_hi, hi)
  hi = jnp.where(empty, lo, hi)
  return lo, jnp.minimum(full_lo, hi), jnp.minimum(full_hi, hi), hi


def q_block_range(spec: MaskSpec, k_start, block_k: int, block_q: int, num_q_blocks: int,
                  q_valid, kv_valid):
  """For the key tile at ``k_start``: ``(lo, full_lo, full_hi, hi)`` over query blocks.

  The same band seen from the key side (``-band_hi <= i - j <= -band_lo``). A key tile
  that sticks out past ``kv_valid`` needs the predicate in every query block.
  """
  lo_off = None if spec.band_hi is None else -spec.band_hi
  hi_off = None if spec.band_lo is None else -spec.band_lo
  lo, full_lo, full_hi, hi = _band_range(
      k_start, block_k, block_q, num_q_blocks, lo_off, hi_off, q_valid,
      spec.every_tile_masked)
  empty = k_start >= kv_valid
  partial = k_start + block_k > kv_valid
  if isinstance(empty, bool):
    if empty:
      return lo, lo, lo, lo
    return (lo, lo, lo, hi) if partial else (lo, full_lo, full_hi, hi)
  hi = jnp.where(empty, lo, hi)
  full_lo = jnp.where(partial, lo, jnp.minimum(full_lo, hi))
  full_hi = jnp.where(partial, lo, jnp.minimum(full_hi, hi))
  return lo, full_lo, full_hi, hi
