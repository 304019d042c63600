"""Triton forward kernel: one query tile per program, online softmax over key tiles."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jflash._src import logits as logits_lib
from jflash._src import mask as mask_lib
from jflash._src.backends.triton import tiles
from jflash._src.backends.triton.config import TritonConfig
from jflash._src.problem import Problem


def _kernel(*refs, p: Problem, bq: int, bk: int, nq: int, nk: int):
  if p.mask.has_segment_ids:
    q_ref, k_ref, v_ref, qv_ref, kvv_ref, qs_ref, ks_ref, o_ref, lse_ref = refs
  else:
    (q_ref, k_ref, v_ref, qv_ref, kvv_ref, o_ref, lse_ref), qs_ref, ks_ref = refs, None, None
  qi, b = nq - 1 - pl.program_id(0), pl.program_id(1)  # see tiles.reversed_index
  q0 = qi * bq
  q_valid, kv_valid = qv_ref[b], kvv_ref[b]
  q = q_ref[...]
  q_seg = None if qs_ref is None else qs_ref[...]
  ranges = mask_lib.kv_block_range(p.mask, q0, bq, bk, nk, q_valid, kv_valid)

  def step(j, carry, masked):
    acc, m, l = carry
    k0 = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(k0, bk), :]
    kv_seg = None if ks_ref is None else ks_ref[pl.ds(k0, bk)]
    s, _, _ = tiles.masked_scores(p, tiles.dot(q, k, trans_b=True), q0, k0, q_valid, kv_valid,
                                  q_seg, kv_seg, masked=masked)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    # A row that has seen only masked keys keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
    pr = jnp.exp2(s - m_use[:, None])
    alpha = jnp.exp2(m - m_use)
    l = l * alpha + jnp.sum(pr, axis=1)
    v = v_ref[pl.ds(k0, bk), :]
    acc = acc * alpha[:, None] + tiles.dot(pr.astype(v.dtype), v)
    return acc, m_new, l

  d = q_ref.shape[-1]
  init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = tiles.three_phase_loop(ranges, step, init)
  live = (l > 0.0) & (q0 + jnp.arange(bq) < q_valid)
  l_safe = jnp.where(live, l, 1.0)
  o_ref[...] = jnp.where(live[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(live, (m + jnp.log2(l_safe)) * logits_lib.LN2, jnp.inf)


def forward(p: Problem, cfg: TritonConfig, q, k, v, arrays: mask_lib.MaskArrays):
  """Padded inputs ``q [B, Tp, N, D]``, ``k, v [B, Sp, K, D]`` -> ``out, lse [B, N, Tp]``."""
  b, tp, n, d = q.shape
  sp, kh = k.shape[1], k.shape[2]
  groups = n // kh
  bq, bk = cfg.block_q, cfg.block_k
  nq, nk = tp // bq, sp // bk
  kernel = functools.partial(_kernel, p=p, bq=bq, bk=bk, nq=nq, nk=nk)
  qt = tiles.reversed_index(nq)
  in_specs = [
      pl.BlockSpec((None, bq, None, d), lambda i, j, h: (j, qt(i), h, 0)),
      pl.BlockSpec((None, sp, None, d), lambda i, j, h: (j, 0, h // groups, 0)),
      pl.BlockSpec((None, sp, None, d), lambda i, j, h: (j, 0, h // groups, 0)),
      pl.BlockSpec((b,), lambda i, j, h: (0,)),
      pl.BlockSpec((b,), lambda i, j, h: (0,)),
  ]
  args = [q, k, v, arrays.q_valid, arrays.kv_valid]
  if p.mask.has_segment_ids:
    in_specs += [pl.BlockSpec((None, bq), lambda i, j, h: (j, qt(i))),
                 pl.BlockSpec((None, sp), lambda i, j, h: (j, 0))]
    args += [arrays.q_segment_ids, arrays.kv_segment_ids]
  return pl.pallas_call(
      kernel,
      grid=(nq, b, n),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bq, None, d), lambda i, j, h: (j, qt(i), h, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, j, h: (j, h, qt(i)))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=p.interpret,
      name="jflash_fwd",
  )(*args)
