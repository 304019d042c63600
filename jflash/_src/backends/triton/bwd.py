"""Triton backward kernels: dK/dV (a key tile per program) and dQ (a query tile per program).

Both recompute ``p = exp(s - lse)`` tile by tile; ``delta = rowsum(dO * O) - dlse`` comes
in precomputed. No atomics: every output tile is owned by one program, so results are
bitwise reproducible. GQA: the dK/dV program of a key head loops over its query heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jflash._src import logits as logits_lib
from jflash._src import mask as mask_lib
from jflash._src.backends.triton import tiles
from jflash._src.backends.triton.config import TritonConfig
from jflash._src.problem import Problem


def _split(refs, has_seg, n_in):
  """(inputs, q_seg_ref, kv_seg_ref, outputs) from a kernel's flat refs."""
  if has_seg:
    return refs[:n_in], refs[n_in], refs[n_in + 1], refs[n_in + 2:]
  return refs[:n_in], None, None, refs[n_in:]


def _dkv_kernel(*refs, p: Problem, bq: int, bk: int, nq: int, groups: int):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qv_ref, kvv_ref), qs_ref, ks_ref, (
      dk_ref, dv_ref) = _split(refs, p.mask.has_segment_ids, 8)
  kj, b = pl.program_id(0), pl.program_id(1)
  k0 = kj * bk
  q_valid, kv_valid = qv_ref[b], kvv_ref[b]
  k, v = k_ref[...], v_ref[...]
  kv_seg = None if ks_ref is None else ks_ref[...]
  ranges = mask_lib.q_block_range(p.mask, k0, bk, bq, nq, q_valid, kv_valid)

  def head(g, carry):
    def step(i, carry, masked):
      dk, dv = carry
      q0 = pl.multiple_of(i * bq, bq)
      rows = pl.ds(q0, bq)
      q = q_ref[rows, g, :]
      do = do_ref[rows, g, :]
      lse2 = lse_ref[g, rows] * logits_lib.LOG2E
      delta = delta_ref[g, rows]
      q_seg = None if qs_ref is None else qs_ref[rows]
      s, t, vis = tiles.masked_scores(p, tiles.dot(k, q, trans_b=True), q0, k0, q_valid,
                                      kv_valid, q_seg, kv_seg, masked=masked, transpose=True)
      pt = jnp.exp2(s - lse2[None, :])  # [bk, bq]; 0 where masked (s = -inf) or empty row
      dv = dv + tiles.dot(pt.astype(do.dtype), do)
      dpt = tiles.dot(v, do, trans_b=True)
      dst = logits_lib.dscores(pt * (dpt - delta[None, :]), t)
      dk = dk + tiles.dot(dst.astype(q.dtype), q)
      return dk, dv

    return tiles.three_phase_loop(ranges, step, carry)

  d = k_ref.shape[-1]
  zeros = jnp.zeros((bk, d), jnp.float32)
  dk, dv = lax.fori_loop(0, groups, head, (zeros, zeros))
  dk_ref[...] = (dk * p.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, p: Problem, bq: int, bk: int, nq: int, nk: int):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qv_ref, kvv_ref), qs_ref, ks_ref, (
      dq_ref,) = _split(refs, p.mask.has_segment_ids, 8)
  qi, b = nq - 1 - pl.program_id(0), pl.program_id(1)  # see tiles.reversed_index
  q0 = qi * bq
  q_valid, kv_valid = qv_ref[b], kvv_ref[b]
  q, do = q_ref[...], do_ref[...]
  lse2 = lse_ref[...] * logits_lib.LOG2E
  delta = delta_ref[...]
  q_seg = None if qs_ref is None else qs_ref[...]
  ranges = mask_lib.kv_block_range(p.mask, q0, bq, bk, nk, q_valid, kv_valid)

  def step(j, dq, masked):
    k0 = pl.multiple_of(j * bk, bk)
    cols = pl.ds(k0, bk)
    k, v = k_ref[cols, :], v_ref[cols, :]
    kv_seg = None if ks_ref is None else ks_ref[cols]
    s, t, _ = tiles.masked_scores(p, tiles.dot(q, k, trans_b=True), q0, k0, q_valid, kv_valid,
                                  q_seg, kv_seg, masked=masked)
    pr = jnp.exp2(s - lse2[:, None])
    dp = tiles.dot(do, v, trans_b=True)
    ds = logits_lib.dscores(pr * (dp - delta[:, None]), t)
    return dq + tiles.dot(ds.astype(k.dtype), k)

  dq = tiles.three_phase_loop(ranges, step, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * p.scale).astype(dq_ref.dtype)


def backward(p: Problem, cfg: TritonConfig, q, k, v, arrays: mask_lib.MaskArrays, dout,
             lse, delta):
  """Padded ``q, dout [B, Tp, N, D]``, ``k, v [B, Sp, K, D]``, ``lse, delta [B, N, Tp]``."""
  b, tp, n, d = q.shape
  sp, kh = k.shape[1], k.shape[2]
  groups = n // kh
  has_seg = p.mask.has_segment_ids
  lengths = [arrays.q_valid, arrays.kv_valid]
  seg_args = [arrays.q_segment_ids, arrays.kv_segment_ids] if has_seg else []
  full_len = lambda: pl.BlockSpec((b,), lambda *_: (0,))

  # dK, dV: grid over (key tiles, batch, key heads).
  bq, bk = cfg.dkv_block_q, cfg.dkv_block_k
  in_specs = [
      pl.BlockSpec((None, tp, groups, d), lambda j, i, h: (i, 0, h, 0)),
      pl.BlockSpec((None, bk, None, d), lambda j, i, h: (i, j, h, 0)),
      pl.BlockSpec((None, bk, None, d), lambda j, i, h: (i, j, h, 0)),
      pl.BlockSpec((None, tp, groups, d), lambda j, i, h: (i, 0, h, 0)),
      pl.BlockSpec((None, groups, tp), lambda j, i, h: (i, h, 0)),
      pl.BlockSpec((None, groups, tp), lambda j, i, h: (i, h, 0)),
      full_len(), full_len(),
  ]
  if has_seg:
    in_specs += [pl.BlockSpec((None, tp), lambda j, i, h: (i, 0)),
                 pl.BlockSpec((None, bk), lambda j, i, h: (i, j))]
  kv_out = pl.BlockSpec((None, bk, None, d), lambda j, i, h: (i, j, h, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, p=p, bq=bq, bk=bk, nq=tp // bq, groups=groups),
      grid=(sp // bk, b, kh),
      in_specs=in_specs,
      out_specs=[kv_out, kv_out],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=plgpu.CompilerParams(num_warps=cfg.dkv_warps, num_stages=cfg.dkv_stages),
      interpret=p.interpret,
      name="jflash_bwd_dkv",
  )(q, k, v, dout, lse, delta, *lengths, *seg_args)

  # dQ: grid over (query tiles, batch, query heads); the last query tiles first.
  bq, bk = cfg.dq_block_q, cfg.dq_block_k
  qt = tiles.reversed_index(tp // bq)
  in_specs = [
      pl.BlockSpec((None, bq, None, d), lambda i, j, h: (j, qt(i), h, 0)),
      pl.BlockSpec((None, sp, None, d), lambda i, j, h: (j, 0, h // groups, 0)),
      pl.BlockSpec((None, sp, None, d), lambda i, j, h: (j, 0, h // groups, 0)),
      pl.BlockSpec((None, bq, None, d), lambda i, j, h: (j, qt(i), h, 0)),
      pl.BlockSpec((None, None, bq), lambda i, j, h: (j, h, qt(i))),
      pl.BlockSpec((None, None, bq), lambda i, j, h: (j, h, qt(i))),
      full_len(), full_len(),
  ]
  if has_seg:
    in_specs += [pl.BlockSpec((None, bq), lambda i, j, h: (j, qt(i))),
                 pl.BlockSpec((None, sp), lambda i, j, h: (j, 0))]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, p=p, bq=bq, bk=bk, nq=tp // bq, nk=sp // bk),
      grid=(tp // bq, b, n),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, bq, None, d), lambda i, j, h: (j, qt(i), h, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=cfg.dq_warps, num_stages=cfg.dq_stages),
      interpret=p.interpret,
      name="jflash_bwd_dq",
  )(q, k, v, dout, lse, delta, *lengths, *seg_args)
  return dq, dk, dv
