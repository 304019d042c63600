"""Tile-level pieces shared by the Triton forward, dQ and dK/dV kernels."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jflash._src import dropout as dropout_lib
from jflash._src import logits as logits_lib
from jflash._src import mask as mask_lib
from jflash._src.problem import Problem


def dot(a, b, *, trans_b: bool = False):
  """``a @ b`` (or ``a @ b.T``) on the tensor cores, accumulating in f32.

  f32 inputs use full f32 precision (Triton would otherwise pick tf32).
  """
  contract_b = 1 if trans_b else 0
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)


def masked_scores(p: Problem, qk, q0, k0, q_valid, kv_valid, q_seg, kv_seg, *,
                  bias=None, dense=None, masked: bool, transpose: bool = False):
  """Base-2 logits of a tile, with invisible entries at -inf when ``masked``.

  ``qk`` is ``[bq, bk]`` (``[bk, bq]`` when ``transpose``), and so are the optional
  ``bias`` and ``dense`` mask tiles (or broadcastable to it). Returns ``(s, tanh, vis)``;
  vis is None for an unmasked tile.
  """
  s, t = logits_lib.scores(qk, p.scale, p.softcap, bias, base2=True)
  if not masked:
    return s, t, None
  bq, bk = (qk.shape[1], qk.shape[0]) if transpose else qk.shape
  vis = mask_lib.visible(p.mask, q0 + jnp.arange(bq), k0 + jnp.arange(bk), q_valid, kv_valid,
                         q_seg, kv_seg, None if dense is None else dense != 0,
                         transpose=transpose)
  return jnp.where(vis, s, -jnp.inf), t, vis


def rows_below(start, size: int, length: int, multiple: int):
  """bool ``[size]``: which rows ``start ...`` of a tile lie below ``length`` (the array's
  true length along that axis), or None where no tile can cross it (``length`` a multiple
  of the tiles' size ``multiple``, every tile starting at a multiple of it)."""
  if length % multiple == 0:
    return None
  return start + jnp.arange(size) < length


def load(ref, rows, cols=None):
  """``ref[...]``, a tile whose leading axis is rows, with the rows where ``rows`` (from
  rows_below) is False read as zeros and never touched in memory: the arrays come
  unpadded, so those rows lie past the array's end (backend.py). ``cols``: the same for
  the last axis of a 2-D tile (decode.py's head dim, padded in the kernel only)."""
  if rows is None and cols is None:
    return ref[...]
  mask = None if rows is None else rows.reshape(rows.shape + (1,) * (len(ref.shape) - 1))
  if cols is not None:
    mask = cols[None, :] if mask is None else mask & cols[None, :]
  return plgpu.load(ref, mask=mask, other=0)


def store(ref, val, rows):
  """``ref[...] = val``, the rows where ``rows`` is False left out (see ``load``)."""
  if rows is None:
    ref[...] = val
    return
  plgpu.store(ref, val, mask=rows.reshape(rows.shape + (1,) * (val.ndim - 1)))


def segment_range(r):
  """This tile's ``(lo, full_lo, full_hi, hi)`` from segment_tile_ranges, or None."""
  if "seg_range" not in r:
    return None
  ref = r["seg_range"]
  return tuple(ref[i] for i in range(4))


def named_refs(names, refs):
  """Kernel refs by name; the pallas_call wrappers pass optional inputs only when used."""
  assert len(names) == len(refs), (names, len(refs))
  return dict(zip(names, refs))


def three_phase_loop(ranges, step, carry, tile_live=None):
  """Runs ``step(j, carry, masked)`` over ``[lo, full_lo)`` and ``[full_hi, hi)`` with the
  predicate and over ``[full_lo, full_hi)`` without it (the ranges of ``mask``).

  ``tile_live(j)``, when given (a dense mask), says whether tile j holds any visible
  element; masked tiles without one are skipped.
  """
  lo, full_lo, full_hi, hi = ranges

  def masked(j, c):
    if tile_live is None:
      return step(j, c, True)
    return lax.cond(tile_live(j), lambda c: step(j, c, True), lambda c: c, c)

  carry = lax.fori_loop(lo, full_lo, masked, carry)
  carry = lax.fori_loop(full_lo, full_hi, lambda j, c: step(j, c, False), carry)
  return lax.fori_loop(full_hi, hi, masked, carry)


def tile_flags(dense, bq: int, bk: int):
  """int32 ``[B', N', nq|1, nk|1]``: 1 where a ``bq x bk`` tile of the (padded, int8,
  broadcastable) dense mask holds a True. Computed once in XLA, read per tile."""
  b, n, t, s = dense.shape
  x = dense.reshape(b, n, t // bq if t > 1 else 1, bq if t > 1 else 1,
                    s // bk if s > 1 else 1, bk if s > 1 else 1)
  return jnp.any(x != 0, axis=(3, 5)).astype(jnp.int32)


def reversed_index(n: int):
  """Grid index -> tile index, last tile first. Under a causal mask the last query tiles
  have the most keys; launching them first keeps the tail of the grid short."""
  return lambda i: n - 1 - i


def bcast_dims(x):
  """Which of the (B, N, T, S) dims of a broadcastable bias/mask array are full."""
  return tuple(d > 1 for d in x.shape)


def row_tile_spec(x, bq: int, q_tile, sp: int):
  """BlockSpec over a broadcastable [B', N', T', S'] array for a (q tile, batch, head) grid:
  the kernel sees ``[bq|1, Sp|1]``."""
  fb, fn, ft, fs = bcast_dims(x)
  return pl.BlockSpec(
      (None, None, bq if ft else 1, sp if fs else 1),
      lambda i, b, h: (b if fb else 0, h if fn else 0, q_tile(i) if ft else 0, 0))


def col_tile_spec(x, bk: int, groups: int, tp: int):
  """BlockSpec over a broadcastable [B', N', T', S'] array for a (k tile, batch, kv head)
  grid: the kernel sees ``[G|1, Tp|1, bk|1]`` (the query heads of one kv head)."""
  fb, fn, ft, fs = bcast_dims(x)
  return pl.BlockSpec(
      (None, groups if fn else 1, tp if ft else 1, bk if fs else 1),
      lambda j, b, h: (b if fb else 0, h if fn else 0, 0, j if fs else 0))


def row_flag_spec(flags, q_tile):
  """BlockSpec over tile_flags for a (q tile, batch, head) grid: the kernel sees ``[1, nk|1]``."""
  fb, fn, ft, _ = bcast_dims(flags)
  return pl.BlockSpec((None, None, 1, flags.shape[3]),
                      lambda i, b, h: (b if fb else 0, h if fn else 0, q_tile(i) if ft else 0, 0))


def col_flag_spec(flags, groups: int):
  """BlockSpec over tile_flags for a (k tile, batch, kv head) grid: ``[G|1, nq|1, 1]``."""
  fb, fn, _, fs = bcast_dims(flags)
  return pl.BlockSpec((None, groups if fn else 1, flags.shape[2], 1),
                      lambda j, b, h: (b if fb else 0, h if fn else 0, 0, j if fs else 0))


def load_row_tile(ref, k0, bk: int):
  """``[bq|1, bk|1]`` from a row_tile_spec ref."""
  return ref[:, pl.ds(k0, bk)] if ref.shape[1] > 1 else ref[...]


def load_col_tile(ref, g, q0, bq: int):
  """``[bk|1, bq|1]`` (transposed) from a col_tile_spec ref, for query head ``g``."""
  head = g if ref.shape[0] > 1 else 0
  tile = ref[head, pl.ds(q0, bq), :] if ref.shape[1] > 1 else ref[head, :, :]
  return tile.T


def dropout_scale(p: Problem, seed_ref, b, h, q0, k0, bq: int, bk: int, transpose: bool = False):
  """The tile's inverted-dropout multiplier (keep / (1 - rate), else 0), ``[bq, bk]``
  (``[bk, bq]`` when ``transpose``), regenerated from the seed: see dropout.py."""
  seed = [seed_ref[i] for i in range(4)]
  qpos, kpos = q0 + jnp.arange(bq), k0 + jnp.arange(bk)
  qpos, kpos = (qpos[None, :], kpos[:, None]) if transpose else (qpos[:, None], kpos[None, :])
  kept = dropout_lib.keep(seed, b, h, qpos, kpos, p.dropout_rate)
  return jnp.where(kept, 1.0 / (1.0 - p.dropout_rate), 0.0)


def optional_inputs(p: Problem, arrays, bias, *, by_rows: bool, bq: int, bk: int, tp: int,
                    sp: int, groups: int = 1, q_tile=None):
  """(names, BlockSpecs, arrays) of the inputs a call has only sometimes: segment ids,
  bias, dense mask and its tile flags, dropout seed.

  ``by_rows``: a (query tile, batch, head) grid (forward, dQ) whose kernel loops over key
  tiles; otherwise a (key tile, batch, kv head) grid (dK/dV) looping over query tiles.
  """
  names, specs, args = [], [], []

  def add(name, spec, x):
    names.append(name)
    specs.append(spec)
    args.append(x)

  if p.mask.has_segment_ids:
    seg_ranges = mask_lib.segment_tile_ranges(arrays.q_segment_ids, arrays.kv_segment_ids,
                                              bq, bk, by_rows=by_rows)
    if by_rows:
      add("q_seg", pl.BlockSpec((None, bq), lambda i, b, h: (b, q_tile(i))), arrays.q_segment_ids)
      add("kv_seg", pl.BlockSpec((None, sp), lambda i, b, h: (b, 0)), arrays.kv_segment_ids)
      add("seg_range", pl.BlockSpec((None, None, 4), lambda i, b, h: (b, q_tile(i), 0)),
          seg_ranges)
    else:
      add("q_seg", pl.BlockSpec((None, tp), lambda j, b, h: (b, 0)), arrays.q_segment_ids)
      add("kv_seg", pl.BlockSpec((None, bk), lambda j, b, h: (b, j)), arrays.kv_segment_ids)
      add("seg_range", pl.BlockSpec((None, None, 4), lambda j, b, h: (b, j, 0)), seg_ranges)
  for name, x in (("bias", bias), ("dense", arrays.dense)):
    if x is not None:
      add(name, row_tile_spec(x, bq, q_tile, sp) if by_rows else col_tile_spec(x, bk, groups, tp), x)
  if arrays.dense is not None:
    flags = tile_flags(arrays.dense, bq, bk)
    add("flags", row_flag_spec(flags, q_tile) if by_rows else col_flag_spec(flags, groups), flags)
  if p.dropout_rate:
    add("seed", pl.BlockSpec((4,), lambda *_: (0,)), arrays.dropout_seed)
  return names, specs, args
