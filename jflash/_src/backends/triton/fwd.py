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
from jflash._src.layout import round_up
from jflash._src.problem import Problem


def _kernel(*refs, names, p: Problem, bq: int, bk: int, nq: int, nk: int, q_len: int,
            kv_len: int):
  r = tiles.named_refs(names, refs)
  qi, b, h = nq - 1 - pl.program_id(0), pl.program_id(1), pl.program_id(2)  # see reversed_index
  q0 = qi * bq
  q_valid, kv_valid = r["q_valid"][b], r["kv_valid"][b]
  q_rows = tiles.rows_below(q0, bq, q_len, bq)
  q = tiles.load(r["q"], q_rows)
  q_seg = r["q_seg"][...] if "q_seg" in r else None
  ranges = mask_lib.kv_block_range(p.mask, q0, bq, bk, nk, q_valid, kv_valid,
                                  tiles.segment_range(r))

  def step(j, carry, masked):
    acc, m, l = carry
    k0 = pl.multiple_of(j * bk, bk)
    k_rows = tiles.rows_below(k0, bk, kv_len, bk)
    k = tiles.load(r["k"].at[pl.ds(k0, bk), :], k_rows)
    kv_seg = r["kv_seg"][pl.ds(k0, bk)] if "kv_seg" in r else None
    bias = tiles.load_row_tile(r["bias"], k0, bk) if "bias" in r else None
    dense = tiles.load_row_tile(r["dense"], k0, bk) if "dense" in r else None
    s, _, _ = tiles.masked_scores(p, tiles.dot(q, k, trans_b=True), q0, k0, q_valid, kv_valid,
                                  q_seg, kv_seg, bias=bias, dense=dense, masked=masked)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    # A row that has seen only masked keys keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
    pr = jnp.exp2(s - m_use[:, None])
    alpha = jnp.exp2(m - m_use)
    l = l * alpha + jnp.sum(pr, axis=1)
    if p.dropout_rate:
      pr = pr * tiles.dropout_scale(p, r["seed"], b, h, q0, k0, bq, bk)
    v = tiles.load(r["v"].at[pl.ds(k0, bk), :], k_rows)
    acc = acc * alpha[:, None] + tiles.dot(pr.astype(v.dtype), v)
    return acc, m_new, l

  d = q.shape[-1]
  init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  live = None
  if "flags" in r:
    live = lambda j: r["flags"][0, j if r["flags"].shape[1] > 1 else 0] != 0
  acc, m, l = tiles.three_phase_loop(ranges, step, init, live)
  live = (l > 0.0) & (q0 + jnp.arange(bq) < q_valid)
  l_safe = jnp.where(live, l, 1.0)
  tiles.store(r["o"], jnp.where(live[:, None], acc / l_safe[:, None], 0.0).astype(r["o"].dtype),
              q_rows)
  r["lse"][...] = jnp.where(live, (m + jnp.log2(l_safe)) * logits_lib.LN2, jnp.inf)


def forward(p: Problem, cfg: TritonConfig, q, k, v, bias, arrays: mask_lib.MaskArrays):
  """``q [B, T, N, D]``, ``k, v [B, S, K, D]`` -> ``out [B, T, N, D]``, ``lse [B, N, Tp]``,
  where Tp is T rounded up to ``cfg.q_multiple`` (Sp: S to ``cfg.k_multiple``).

  Q, K and V come unpadded along the sequence: the kernel's loads read the rows of a tile
  past T or S as zeros, and its stores leave them out (tiles.load, tiles.store). ``bias``,
  ``arrays.dense`` (int8; broadcastable ``[B', N', Tp|1, Sp|1]``) and the segment ids
  come padded to Tp and Sp.
  """
  b, t, n, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  tp, sp = round_up(t, cfg.q_multiple), round_up(s, cfg.k_multiple)
  groups = n // kh
  bq, bk = cfg.block_q, cfg.block_k
  nq, nk = tp // bq, sp // bk
  qt = tiles.reversed_index(nq)
  names = ["q", "k", "v", "q_valid", "kv_valid"]
  in_specs = [
      pl.BlockSpec((None, bq, None, d), lambda i, j, h: (j, qt(i), h, 0)),
      pl.BlockSpec((None, sp, None, d), lambda i, j, h: (j, 0, h // groups, 0)),
      pl.BlockSpec((None, sp, None, d), lambda i, j, h: (j, 0, h // groups, 0)),
      pl.BlockSpec((b,), lambda i, j, h: (0,)),
      pl.BlockSpec((b,), lambda i, j, h: (0,)),
  ]
  args = [q, k, v, arrays.q_valid, arrays.kv_valid]
  extra = tiles.optional_inputs(p, arrays, bias, by_rows=True, bq=bq, bk=bk, tp=tp, sp=sp,
                                q_tile=qt)
  names, in_specs, args = names + extra[0], in_specs + extra[1], args + extra[2]
  names += ["o", "lse"]
  kernel = functools.partial(_kernel, names=tuple(names), p=p, bq=bq, bk=bk, nq=nq, nk=nk,
                             q_len=t, kv_len=s)
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
