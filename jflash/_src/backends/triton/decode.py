"""Split-K ("flash-decoding") forward for a few query tokens against a long KV cache.

The regular forward gives each (query tile, batch, query head) one program that walks
all the keys: with one query token that is a 128-row tile holding one live row, the
keys are read once per query head of a GQA group, and there are only ``B * N``
programs to fill the GPU. Here instead:

* one program per (batch, kv head, split) takes ALL query rows of the kv head's group,
  ``R = G * T`` rows (row ``g * T + t`` is query head ``g`` of the group at position
  ``t``), padded to a power of two >= 16, so each key tile is read once for the group;
* the visible key tiles (``mask.kv_block_range`` over positions ``[0, T)``) are cut
  into ``num_splits`` contiguous runs at run time, so splits stay balanced when the
  cache is only partly filled (``kv_valid``, traced: the cache index when decoding);
* each split writes a partial ``(out [R, D] f32, lse [R] f32)``; a small XLA step merges
  the splits exactly through their lse.

Keys are read straight from the caller's ``[B, S, K, H]`` arrays: no copy to pad S to a
tile multiple or H to a power of two (a copy of the whole cache per token would cost
more than the attention); loads past the ends are masked.

Rows with no visible key give zeros and lse +inf (jflash's convention), never NaN.
Bias, dense masks and dropout are not served here (``applies`` says so): the regular
kernels take those calls. The backward pass always runs the regular kernels, from the
lse computed here.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jflash._src import logits as logits_lib
from jflash._src import mask as mask_lib
from jflash._src.backends.triton import tiles
from jflash._src.backends.triton.config import DecodeConfig
from jflash._src.layout import next_pow2, pad_axis, round_up
from jflash._src.problem import Problem

_enabled = True
_override: DecodeConfig | None = None


@contextlib.contextmanager
def settings(*, enabled: bool = True, config: DecodeConfig | None = None):
  """For benchmarks, tuning and tests only: trace calls inside the block with the decode
  path switched off, or with ``config``. Never public, never changes a result.

  Clears JAX's caches on entry and exit: jflash's dispatch is jitted, and a cached trace
  would otherwise ignore the setting.
  """
  global _enabled, _override
  prev = _enabled, _override
  _enabled, _override = enabled, config
  jax.clear_caches()
  try:
    yield
  finally:
    _enabled, _override = prev
    jax.clear_caches()


def applies(p: Problem, q, k, bias, arrays: mask_lib.MaskArrays) -> bool:
  """Whether the decode path serves this forward call (an internal choice)."""
  if not _enabled or bias is not None or arrays.dense is not None or p.dropout_rate:
    return False
  return DecodeConfig.takes(q.shape[1], q.shape[2] // k.shape[2])


def _num_sms() -> int:
  return getattr(jax.devices()[0], "core_count", None) or 132


def _split_ranges(ranges, split, num_splits: int):
  """The ``split``-th of ``num_splits`` contiguous runs of the key tiles ``[lo, hi)``,
  with the (masked, unmasked, masked) phases of ``ranges`` clipped to it."""
  lo, _, _, hi = ranges
  n = hi - lo
  start = lo + lax.div(split * n, num_splits)
  stop = lo + lax.div((split + 1) * n, num_splits)
  return tuple(jnp.minimum(jnp.maximum(x, start), stop) for x in ranges)


def _load_rows(ref, k0, bk: int, d: int):
  """``[bk, d]`` from a ``[S, H]`` ref; rows past S and columns past H read as zeros (as
  the regular kernels' tiles.load), so no NaN from memory past the end can reach
  ``p @ v``."""
  s, h = ref.shape
  cols = jnp.arange(d) < h if h != d else None
  return tiles.load(ref.at[pl.ds(k0, bk), pl.ds(0, d)], tiles.rows_below(k0, bk, s, bk), cols)


def _kernel(*refs, names, p: Problem, rows: int, bk: int, nk: int, num_splits: int):
  r = tiles.named_refs(names, refs)
  b, split = pl.program_id(0), pl.program_id(2)
  q_valid, kv_valid = r["q_valid"][b], r["kv_valid"][b]
  q = r["q"][...]
  rp, d = q.shape
  t = p.q_len
  row = jnp.arange(rp)
  # Padding rows get position T, which no query length reaches: never visible.
  q_pos = jnp.where(row < rows, lax.rem(row, t), t)
  q_seg = r["q_seg"][...] if "q_seg" in r else None
  ranges = mask_lib.kv_block_range(p.mask, 0, t, bk, nk, q_valid, kv_valid,
                                   tiles.segment_range(r))
  ranges = _split_ranges(ranges, split, num_splits)

  def step(j, carry, masked):
    acc, m, l = carry
    k0 = pl.multiple_of(j * bk, bk)
    k = _load_rows(r["k"], k0, bk, d)
    x, _ = logits_lib.scores(tiles.dot(q, k, trans_b=True), p.scale, p.softcap, base2=True)
    if masked:
      kv_seg = r["kv_seg"][pl.ds(k0, bk)] if "kv_seg" in r else None
      vis = mask_lib.visible(p.mask, q_pos, k0 + jnp.arange(bk), q_valid, kv_valid, q_seg,
                             kv_seg)
      x = jnp.where(vis, x, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(x, axis=1))
    # A row that has seen only masked keys keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
    pr = jnp.exp2(x - m_use[:, None])
    alpha = jnp.exp2(m - m_use)
    l = l * alpha + jnp.sum(pr, axis=1)
    v = _load_rows(r["v"], k0, bk, d)
    acc = acc * alpha[:, None] + tiles.dot(pr.astype(v.dtype), v)
    return acc, m_new, l

  init = (jnp.zeros((rp, d), jnp.float32), jnp.full((rp,), -jnp.inf, jnp.float32),
          jnp.zeros((rp,), jnp.float32))
  acc, m, l = tiles.three_phase_loop(ranges, step, init)
  live = (l > 0.0) & (q_pos < q_valid)
  l_safe = jnp.where(live, l, 1.0)
  r["o"][...] = jnp.where(live[:, None], acc / l_safe[:, None], 0.0)
  # -inf (an empty sum) for the merge; the merge turns rows empty in every split to +inf.
  r["lse"][...] = jnp.where(live, (m + jnp.log2(l_safe)) * logits_lib.LN2, -jnp.inf)


def _segments(p: Problem, arrays, rows: int, rp: int, bk: int):
  """``(q_seg [B, Rp], kv_seg [B, nk * bk], seg_range [B, 1, 4])`` for the kernel: the
  query ids of each row, the key ids padded to whole tiles, and the key tiles the
  query's documents can meet (``mask.segment_tile_ranges``, all rows as one tile)."""
  q_seg, kv_seg = arrays.q_segment_ids, arrays.kv_segment_ids
  kv_seg = pad_axis(kv_seg, 1, round_up(p.kv_len, bk), -2)
  seg_range = mask_lib.segment_tile_ranges(q_seg, kv_seg, p.q_len, bk, by_rows=True)
  q_rows = pad_axis(jnp.tile(q_seg, (1, rows // p.q_len)), 1, rp, -1)
  return q_rows, kv_seg, seg_range


def _partials(p: Problem, cfg: DecodeConfig, q_rows, k, v, arrays, rows: int):
  """``q_rows [B, K, Rp, D]``, ``k, v [B, S, K, H]`` -> per split ``o [B, K, P, Rp, D]``,
  ``lse [B, K, P, Rp]`` (f32, -inf where a split saw no key)."""
  b, kh, rp, d = q_rows.shape
  s, h = k.shape[1], k.shape[3]
  bk, splits = cfg.block_k, cfg.num_splits
  nk = -(-s // bk)
  names = ["q", "k", "v", "q_valid", "kv_valid"]
  in_specs = [
      pl.BlockSpec((None, None, rp, d), lambda i, j, c: (i, j, 0, 0)),
      pl.BlockSpec((None, s, None, h), lambda i, j, c: (i, 0, j, 0)),
      pl.BlockSpec((None, s, None, h), lambda i, j, c: (i, 0, j, 0)),
      pl.BlockSpec((b,), lambda i, j, c: (0,)),
      pl.BlockSpec((b,), lambda i, j, c: (0,)),
  ]
  args = [q_rows, k, v, arrays.q_valid, arrays.kv_valid]
  if p.mask.has_segment_ids:
    q_seg, kv_seg, seg_range = _segments(p, arrays, rows, rp, bk)
    names += ["q_seg", "kv_seg", "seg_range"]
    in_specs += [pl.BlockSpec((None, rp), lambda i, j, c: (i, 0)),
                 pl.BlockSpec((None, nk * bk), lambda i, j, c: (i, 0)),
                 pl.BlockSpec((None, None, 4), lambda i, j, c: (i, 0, 0))]
    args += [q_seg, kv_seg, seg_range]
  names += ["o", "lse"]
  kernel = functools.partial(_kernel, names=tuple(names), p=p, rows=rows, bk=bk, nk=nk,
                             num_splits=splits)
  return pl.pallas_call(
      kernel,
      grid=(b, kh, splits),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, None, rp, d), lambda i, j, c: (i, j, c, 0, 0)),
                 pl.BlockSpec((None, None, None, rp), lambda i, j, c: (i, j, c, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, kh, splits, rp, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, kh, splits, rp), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=p.interpret,
      name="jflash_decode",
  )(*args)


def merge_splits(o, lse):
  """Exact softmax merge of per-split results: ``o [..., P, R, D]`` and ``lse [..., P, R]``
  (f32, natural log, -inf where a split saw no key) -> ``o [..., R, D]``, ``lse [..., R]``,
  with zero output and +inf lse where no split saw a key."""
  m = jnp.max(lse, axis=-2, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp(lse - m)
  den = jnp.sum(w, axis=-2)
  out = jnp.sum(o * w[..., None], axis=-3)
  live = den > 0.0
  den_safe = jnp.where(live, den, 1.0)
  out = jnp.where(live[..., None], out / den_safe[..., None], 0.0)
  lse = jnp.where(live, m[..., 0, :] + jnp.log(den_safe), jnp.inf)
  return out, lse


def forward(p: Problem, q, k, v, arrays: mask_lib.MaskArrays, cfg: DecodeConfig | None = None):
  """``q [B, T, N, H]``, ``k, v [B, S, K, H]`` -> ``out [B, T, N, H]``, ``lse [B, N, T]``
  (f32, +inf on rows with no visible key), as the regular forward returns them."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  rows = g * t
  rp = max(16, next_pow2(rows))
  d = max(16, next_pow2(h))
  cfg = cfg or _override or DecodeConfig.for_problem(b, kh, s, rp, d, _num_sms())
  # Row g * T + t of kv head j is query head j * G + g at position t.
  q_rows = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, rows, h)
  q_rows = pad_axis(pad_axis(q_rows, 2, rp), 3, d)
  o, lse = _partials(p, cfg, q_rows, k, v, arrays, rows)
  o, lse = merge_splits(o[..., :rows, :h], lse[..., :rows])  # [B, K, R, H], [B, K, R]
  out = o.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  return out.astype(q.dtype), lse.reshape(b, n, t)
