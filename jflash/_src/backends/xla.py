"""The "xla" implementation: blockwise attention in plain JAX, O(T + S) memory.

Forward: for each query block (``lax.map``), an online softmax over the key blocks that
``mask.kv_block_range`` says may be visible (a ``fori_loop`` with dynamic bounds, so
masked-out blocks cost nothing). Backward: one pass over key blocks; for each, the query
blocks of ``mask.q_block_range``, accumulating dK/dV in the loop and dQ in an f32 buffer.
Probabilities are recomputed from the saved lse. Runs on any JAX platform.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jflash._src import dropout as dropout_lib
from jflash._src import logits as logits_lib
from jflash._src import mask as mask_lib
from jflash._src.layout import pad_axis, reduce_to_shape, round_up
from jflash._src.problem import Problem


@dataclasses.dataclass(frozen=True)
class XlaConfig:
  block_q: int = 256
  block_k: int = 512

  @classmethod
  def for_problem(cls, p: Problem) -> "XlaConfig":
    return cls(block_q=min(256, round_up(p.q_len, 8)), block_k=min(512, round_up(p.kv_len, 8)))


def supports(p: Problem, q, k, v, bias) -> None:
  """The XLA path serves every combination; nothing to refuse."""


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def _einsum(spec, a, b):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32,
                    precision=_precision(a.dtype))


def _pad_tq(x, tp, sp):
  """Pads the T and S dims (2, 3) of a broadcastable [B', N', T', S'] array, if full."""
  if x is None:
    return None
  x = pad_axis(x, 2, tp) if x.shape[2] > 1 else x
  return pad_axis(x, 3, sp) if x.shape[3] > 1 else x


def _batch_union(ranges):
  """[B, n, 4] segment tile ranges -> [n, 2] (lo, hi) covering every batch entry."""
  lo, hi = ranges[..., 0], ranges[..., 3]
  empty = hi <= lo
  lo = jnp.min(jnp.where(empty, jnp.iinfo(jnp.int32).max, lo), axis=0)
  hi = jnp.max(jnp.where(empty, 0, hi), axis=0)
  return jnp.stack([jnp.minimum(lo, hi), hi], axis=-1)


class _Blocks:
  """Padded, head-grouped views of one call's tensors, and per-tile mask helpers."""

  def __init__(self, p: Problem, q, k, v, bias, arrays: mask_lib.MaskArrays, cfg: XlaConfig):
    b, t, n, h = q.shape
    kh = k.shape[2]
    self.p, self.cfg, self.arrays = p, cfg, arrays
    self.b, self.n, self.kh = b, n, kh
    self.groups = n // kh
    self.tp, self.sp = round_up(t, cfg.block_q), round_up(p.kv_len, cfg.block_k)
    self.nq, self.nk = self.tp // cfg.block_q, self.sp // cfg.block_k
    # [B, T, K, G, H]: query heads grouped by the key head they share (GQA).
    self.q = pad_axis(q, 1, self.tp).reshape(b, self.tp, kh, self.groups, h)
    self.k = pad_axis(k, 1, self.sp)
    self.v = pad_axis(v, 1, self.sp)
    self.q_seg = pad_axis(arrays.q_segment_ids, 1, self.tp, -1)
    self.kv_seg = pad_axis(arrays.kv_segment_ids, 1, self.sp, -2)
    self.bias = _pad_tq(bias, self.tp, self.sp)
    self.dense = _pad_tq(arrays.dense, self.tp, self.sp)
    # Conservative scalar bounds for the block loops; the predicate is exact per batch.
    self.q_valid_max = jnp.max(arrays.q_valid)
    self.kv_valid_max = jnp.max(arrays.kv_valid)
    self.seg_ranges = None
    if p.mask.has_segment_ids:  # per tile, the union over the batch of the tiles to visit
      self.seg_ranges = [
          _batch_union(mask_lib.segment_tile_ranges(self.q_seg, self.kv_seg, cfg.block_q,
                                                    cfg.block_k, by_rows=by_rows))
          for by_rows in (False, True)]

  def segment_range(self, i, *, by_rows: bool):
    """Tile i's ``(lo, lo, lo, hi)`` over the other axis's tiles, or None."""
    if self.seg_ranges is None:
      return None
    lo, hi = self.seg_ranges[by_rows][i]
    return lo, lo, lo, hi

  def tile(self, x, q0, k0):
    """The [B', K', G', bq|1, bk|1] tile at (q0, k0) of a broadcastable [B', N', T', S']."""
    if x.shape[2] > 1:
      x = lax.dynamic_slice_in_dim(x, q0, self.cfg.block_q, axis=2)
    if x.shape[3] > 1:
      x = lax.dynamic_slice_in_dim(x, k0, self.cfg.block_k, axis=3)
    heads = (self.kh, self.groups) if x.shape[1] > 1 else (1, 1)
    return x.reshape(x.shape[:1] + heads + x.shape[2:])

  def untile(self, ds):
    """[B, K, G, bq, bk] -> [B, N, bq, bk]."""
    return ds.reshape((self.b, self.n) + ds.shape[3:])

  def visible(self, q0, k0):
    """bool[B, K|1, G|1, bq, bk] for the tile at (q0, k0)."""
    bq, bk = self.cfg.block_q, self.cfg.block_k
    qpos, kpos = q0 + jnp.arange(bq), k0 + jnp.arange(bk)
    spec = self.p.mask
    qs = ks = dense = None
    if spec.has_segment_ids:
      qs = lax.dynamic_slice_in_dim(self.q_seg, q0, bq, axis=1)
      ks = lax.dynamic_slice_in_dim(self.kv_seg, k0, bk, axis=1)
    if spec.has_dense_mask:
      dense = self.tile(self.dense, q0, k0)
      dense = jnp.broadcast_to(dense, (self.b,) + dense.shape[1:])

    def one(qv, kvv, qs, ks, dense):
      return mask_lib.visible(spec, qpos, kpos, qv, kvv, qs, ks, dense)

    vis = jax.vmap(one)(self.arrays.q_valid, self.arrays.kv_valid, qs, ks, dense)
    return vis if vis.ndim == 5 else vis[:, None, None]

  def dropout(self, q0, k0):
    """The inverted-dropout multiplier of the tile: keep / (1 - rate), or 0. [B,K,G,bq,bk]."""
    rate = self.p.dropout_rate
    b = jnp.arange(self.b)[:, None, None, None, None]
    h = (jnp.arange(self.kh)[:, None] * self.groups + jnp.arange(self.groups))[None, :, :, None, None]
    qpos = (q0 + jnp.arange(self.cfg.block_q))[:, None]
    kpos = (k0 + jnp.arange(self.cfg.block_k))[None, :]
    kept = dropout_lib.keep(self.arrays.dropout_seed, b, h, qpos, kpos, rate)
    return jnp.where(kept, 1.0 / (1.0 - rate), 0.0)

  def scores(self, qblk, kblk, q0, k0):
    qk = _einsum("btkgh,bskh->bkgts", qblk, kblk)
    bias = None if self.bias is None else self.tile(self.bias, q0, k0)
    return logits_lib.scores(qk, self.p.scale, self.p.softcap, bias)


def forward(p: Problem, q, k, v, bias, arrays: mask_lib.MaskArrays,
            cfg: XlaConfig | None = None):
  """Returns ``out [B, T, N, H]`` (q.dtype) and ``lse [B, N, T]`` (f32, +inf if empty)."""
  cfg = cfg or XlaConfig.for_problem(p)
  blk = _Blocks(p, q, k, v, bias, arrays, cfg)
  b, t, n, h = q.shape
  kh, g, bq, bk = k.shape[2], blk.groups, cfg.block_q, cfg.block_k

  def q_block(qi):
    q0 = qi * bq
    qblk = lax.dynamic_slice_in_dim(blk.q, q0, bq, axis=1)
    lo, _, _, hi = mask_lib.kv_block_range(
        p.mask, q0, bq, bk, blk.nk, blk.q_valid_max, blk.kv_valid_max,
        blk.segment_range(qi, by_rows=True))

    def body(j, carry):
      acc, m, l = carry
      k0 = j * bk
      kblk = lax.dynamic_slice_in_dim(blk.k, k0, bk, axis=1)
      vblk = lax.dynamic_slice_in_dim(blk.v, k0, bk, axis=1)
      s, _ = blk.scores(qblk, kblk, q0, k0)
      s = jnp.where(blk.visible(q0, k0), s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(-1))
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      pr = jnp.exp(s - m_use[..., None])
      alpha = jnp.exp(m - m_use)
      l = l * alpha + pr.sum(-1)
      if p.dropout_rate:
        pr = pr * blk.dropout(q0, k0)
      acc = acc * alpha[..., None] + _einsum("bkgts,bskh->bkgth", pr.astype(v.dtype), vblk)
      return acc, m_new, l

    init = (jnp.zeros((b, kh, g, bq, h), jnp.float32),
            jnp.full((b, kh, g, bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, kh, g, bq), jnp.float32))
    acc, m, l = lax.fori_loop(lo, hi, body, init)
    empty = l == 0.0
    out = jnp.where(empty[..., None], 0.0, acc / jnp.where(empty, 1.0, l)[..., None])
    lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
    return out.astype(q.dtype), lse

  out, lse = lax.map(q_block, jnp.arange(blk.nq))  # [nq, B, K, G, bq, (H)]
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, blk.tp, n, h)[:, :t]
  lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, n, blk.tp)[:, :, :t]
  return out, lse


def backward(p: Problem, q, k, v, bias, arrays: mask_lib.MaskArrays, lse, dout, delta,
             want_dbias: bool, cfg: XlaConfig | None = None):
  """Returns ``(dq, dk, dv, dbias)`` in the input dtypes (dbias None unless wanted).

  ``delta [B, N, T]`` as in vjp.py.
  """
  cfg = cfg or XlaConfig.for_problem(p)
  blk = _Blocks(p, q, k, v, bias, arrays, cfg)
  want_dbias = want_dbias and bias is not None
  b, t, n, h = q.shape
  kh, g, bq, bk = k.shape[2], blk.groups, cfg.block_q, cfg.block_k
  grouped = lambda x, fill: pad_axis(x, 2, blk.tp, fill).reshape(b, kh, g, blk.tp)
  lse_g = grouped(lse, jnp.inf)  # padded rows: p = exp(s - inf) = 0
  delta_g = grouped(delta, 0.0)
  do_g = pad_axis(dout, 1, blk.tp).reshape(b, blk.tp, kh, g, h)

  def add_dbias(dbias, ds, q0, k0):
    """Adds a tile of ds, summed over the dims the bias broadcasts, into dbias."""
    tile_shape = blk.bias.shape[:2] + tuple(
        1 if blk.bias.shape[i] == 1 else ds.shape[i + 1] for i in (2, 3))
    part = reduce_to_shape(blk.untile(ds), tile_shape, jnp.float32)
    start = (0, 0, q0 if tile_shape[2] > 1 else 0, k0 if tile_shape[3] > 1 else 0)
    return lax.dynamic_update_slice(dbias, lax.dynamic_slice(dbias, start, part.shape) + part, start)

  def k_block(j, carry):
    dq_acc, dk_all, dv_all, dbias = carry
    k0 = j * bk
    kblk = lax.dynamic_slice_in_dim(blk.k, k0, bk, axis=1)
    vblk = lax.dynamic_slice_in_dim(blk.v, k0, bk, axis=1)
    lo, _, _, hi = mask_lib.q_block_range(
        p.mask, k0, bk, bq, blk.nq, blk.q_valid_max, blk.kv_valid_max,
        blk.segment_range(j, by_rows=False))

    def body(i, inner):
      dq_acc, dk_b, dv_b, dbias = inner
      q0 = i * bq
      qblk = lax.dynamic_slice_in_dim(blk.q, q0, bq, axis=1)
      doblk = lax.dynamic_slice_in_dim(do_g, q0, bq, axis=1)
      lse_b = lax.dynamic_slice_in_dim(lse_g, q0, bq, axis=3)
      delta_b = lax.dynamic_slice_in_dim(delta_g, q0, bq, axis=3)
      s, tanh = blk.scores(qblk, kblk, q0, k0)
      pr = jnp.where(blk.visible(q0, k0), jnp.exp(s - lse_b[..., None]), 0.0)
      z = blk.dropout(q0, k0) if p.dropout_rate else 1.0
      dv_b = dv_b + _einsum("bkgts,btkgh->bskh", (pr * z).astype(q.dtype), doblk)
      dp = _einsum("btkgh,bskh->bkgts", doblk, vblk) * z
      ds32 = logits_lib.dscores(pr * (dp - delta_b[..., None]), tanh)
      if want_dbias:
        dbias = add_dbias(dbias, ds32, q0, k0)
      ds = ds32.astype(q.dtype)
      dk_b = dk_b + _einsum("bkgts,btkgh->bskh", ds, qblk)
      dq_b = lax.dynamic_slice_in_dim(dq_acc, q0, bq, axis=1)
      dq_b = dq_b + _einsum("bkgts,bskh->btkgh", ds, kblk)
      return lax.dynamic_update_slice_in_dim(dq_acc, dq_b, q0, axis=1), dk_b, dv_b, dbias

    zeros = jnp.zeros((b, bk, kh, h), jnp.float32)
    dq_acc, dk_b, dv_b, dbias = lax.fori_loop(lo, hi, body, (dq_acc, zeros, zeros, dbias))
    dk_all = lax.dynamic_update_slice_in_dim(dk_all, dk_b * p.scale, k0, axis=1)
    dv_all = lax.dynamic_update_slice_in_dim(dv_all, dv_b, k0, axis=1)
    return dq_acc, dk_all, dv_all, dbias

  init = (jnp.zeros((b, blk.tp, kh, g, h), jnp.float32),
          jnp.zeros((b, blk.sp, kh, h), jnp.float32),
          jnp.zeros((b, blk.sp, kh, h), jnp.float32),
          jnp.zeros(blk.bias.shape if want_dbias else (0,), jnp.float32))
  dq, dk, dv, dbias = lax.fori_loop(0, blk.nk, k_block, init)
  dq = (dq * p.scale).reshape(b, blk.tp, n, h)[:, :t]
  dbias = dbias[:, :, :bias.shape[2], :bias.shape[3]].astype(bias.dtype) if want_dbias else None
  return (dq.astype(q.dtype), dk[:, :p.kv_len].astype(k.dtype),
          dv[:, :p.kv_len].astype(v.dtype), dbias)
