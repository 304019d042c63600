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

from jflash._src import logits as logits_lib
from jflash._src import mask as mask_lib
from jflash._src.layout import pad_axis, round_up
from jflash._src.problem import Problem


@dataclasses.dataclass(frozen=True)
class XlaConfig:
  block_q: int = 256
  block_k: int = 512

  @classmethod
  def for_problem(cls, p: Problem) -> "XlaConfig":
    return cls(block_q=min(256, round_up(p.q_len, 8)), block_k=min(512, round_up(p.kv_len, 8)))


def supports(p: Problem, q, k, v) -> None:
  """The XLA path serves every combination; nothing to refuse."""


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def _einsum(spec, a, b):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32,
                    precision=_precision(a.dtype))


class _Blocks:
  """Padded, head-grouped views of one call's tensors, and per-tile mask helpers."""

  def __init__(self, p: Problem, q, k, v, arrays: mask_lib.MaskArrays, cfg: XlaConfig):
    b, t, n, h = q.shape
    kh = k.shape[2]
    self.p, self.cfg, self.arrays = p, cfg, arrays
    self.groups = n // kh
    self.tp, self.sp = round_up(t, cfg.block_q), round_up(p.kv_len, cfg.block_k)
    self.nq, self.nk = self.tp // cfg.block_q, self.sp // cfg.block_k
    # [B, T, K, G, H]: query heads grouped by the key head they share (GQA).
    self.q = pad_axis(q, 1, self.tp).reshape(b, self.tp, kh, self.groups, h)
    self.k = pad_axis(k, 1, self.sp)
    self.v = pad_axis(v, 1, self.sp)
    self.q_seg = pad_axis(arrays.q_segment_ids, 1, self.tp, -1)
    self.kv_seg = pad_axis(arrays.kv_segment_ids, 1, self.sp, -2)
    # Conservative scalar bounds for the block loops; the predicate is exact per batch.
    self.q_valid_max = jnp.max(arrays.q_valid)
    self.kv_valid_max = jnp.max(arrays.kv_valid)

  def visible(self, q0, k0):
    """bool[B, 1, 1, bq, bk] for the tile at (q0, k0)."""
    bq, bk = self.cfg.block_q, self.cfg.block_k
    qpos, kpos = q0 + jnp.arange(bq), k0 + jnp.arange(bk)

    def one(qv, kvv, qs, ks):
      return mask_lib.visible(self.p.mask, qpos, kpos, qv, kvv, qs, ks)

    if self.p.mask.has_segment_ids:
      qs = lax.dynamic_slice_in_dim(self.q_seg, q0, bq, axis=1)
      ks = lax.dynamic_slice_in_dim(self.kv_seg, k0, bk, axis=1)
      vis = jax.vmap(one)(self.arrays.q_valid, self.arrays.kv_valid, qs, ks)
    else:
      vis = jax.vmap(lambda a, c: one(a, c, None, None))(
          self.arrays.q_valid, self.arrays.kv_valid)
    return vis[:, None, None]

  def scores(self, qblk, kblk):
    qk = _einsum("btkgh,bskh->bkgts", qblk, kblk)
    return logits_lib.scores(qk, self.p.scale, self.p.softcap)


def forward(p: Problem, q, k, v, arrays: mask_lib.MaskArrays, cfg: XlaConfig | None = None):
  """Returns ``out [B, T, N, H]`` (q.dtype) and ``lse [B, N, T]`` (f32, +inf if empty)."""
  cfg = cfg or XlaConfig.for_problem(p)
  blk = _Blocks(p, q, k, v, arrays, cfg)
  b, t, n, h = q.shape
  kh, g, bq, bk = k.shape[2], blk.groups, cfg.block_q, cfg.block_k

  def q_block(qi):
    q0 = qi * bq
    qblk = lax.dynamic_slice_in_dim(blk.q, q0, bq, axis=1)
    lo, _, _, hi = mask_lib.kv_block_range(
        p.mask, q0, bq, bk, blk.nk, blk.q_valid_max, blk.kv_valid_max)

    def body(j, carry):
      acc, m, l = carry
      k0 = j * bk
      kblk = lax.dynamic_slice_in_dim(blk.k, k0, bk, axis=1)
      vblk = lax.dynamic_slice_in_dim(blk.v, k0, bk, axis=1)
      s, _ = blk.scores(qblk, kblk)
      s = jnp.where(blk.visible(q0, k0), s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(-1))
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      pr = jnp.exp(s - m_use[..., None])
      alpha = jnp.exp(m - m_use)
      l = l * alpha + pr.sum(-1)
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


def backward(p: Problem, q, k, v, arrays: mask_lib.MaskArrays, lse, dout, delta,
             cfg: XlaConfig | None = None):
  """Returns ``(dq, dk, dv)`` in the input dtypes. ``delta [B, N, T]`` as in vjp.py."""
  cfg = cfg or XlaConfig.for_problem(p)
  blk = _Blocks(p, q, k, v, arrays, cfg)
  b, t, n, h = q.shape
  kh, g, bq, bk = k.shape[2], blk.groups, cfg.block_q, cfg.block_k
  grouped = lambda x, fill: pad_axis(x, 2, blk.tp, fill).reshape(b, kh, g, blk.tp)
  lse_g = grouped(lse, jnp.inf)  # padded rows: p = exp(s - inf) = 0
  delta_g = grouped(delta, 0.0)
  do_g = pad_axis(dout, 1, blk.tp).reshape(b, blk.tp, kh, g, h)

  def k_block(j, carry):
    dq_acc, dk_all, dv_all = carry
    k0 = j * bk
    kblk = lax.dynamic_slice_in_dim(blk.k, k0, bk, axis=1)
    vblk = lax.dynamic_slice_in_dim(blk.v, k0, bk, axis=1)
    lo, _, _, hi = mask_lib.q_block_range(
        p.mask, k0, bk, bq, blk.nq, blk.q_valid_max, blk.kv_valid_max)

    def body(i, inner):
      dq_acc, dk_b, dv_b = inner
      q0 = i * bq
      qblk = lax.dynamic_slice_in_dim(blk.q, q0, bq, axis=1)
      doblk = lax.dynamic_slice_in_dim(do_g, q0, bq, axis=1)
      lse_b = lax.dynamic_slice_in_dim(lse_g, q0, bq, axis=3)
      delta_b = lax.dynamic_slice_in_dim(delta_g, q0, bq, axis=3)
      s, tanh = blk.scores(qblk, kblk)
      pr = jnp.where(blk.visible(q0, k0), jnp.exp(s - lse_b[..., None]), 0.0)
      dv_b = dv_b + _einsum("bkgts,btkgh->bskh", pr.astype(q.dtype), doblk)
      dp = _einsum("btkgh,bskh->bkgts", doblk, vblk)
      ds = logits_lib.dscores(pr * (dp - delta_b[..., None]), tanh).astype(q.dtype)
      dk_b = dk_b + _einsum("bkgts,btkgh->bskh", ds, qblk)
      dq_b = lax.dynamic_slice_in_dim(dq_acc, q0, bq, axis=1)
      dq_b = dq_b + _einsum("bkgts,bskh->btkgh", ds, kblk)
      return lax.dynamic_update_slice_in_dim(dq_acc, dq_b, q0, axis=1), dk_b, dv_b

    zeros = jnp.zeros((b, bk, kh, h), jnp.float32)
    dq_acc, dk_b, dv_b = lax.fori_loop(lo, hi, body, (dq_acc, zeros, zeros))
    dk_all = lax.dynamic_update_slice_in_dim(dk_all, dk_b * p.scale, k0, axis=1)
    dv_all = lax.dynamic_update_slice_in_dim(dv_all, dv_b, k0, axis=1)
    return dq_acc, dk_all, dv_all

  init = (jnp.zeros((b, blk.tp, kh, g, h), jnp.float32),
          jnp.zeros((b, blk.sp, kh, h), jnp.float32),
          jnp.zeros((b, blk.sp, kh, h), jnp.float32))
  dq, dk, dv = lax.fori_loop(0, blk.nk, k_block, init)
  dq = (dq * p.scale).reshape(b, blk.tp, n, h)[:, :t]
  return dq.astype(q.dtype), dk[:, :p.kv_len].astype(k.dtype), dv[:, :p.kv_len].astype(v.dtype)
