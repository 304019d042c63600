"""Triton backward kernels: dK/dV (a key tile per program) and dQ (a query tile per program).

Both recompute ``p = exp(s - lse)`` tile by tile; ``delta = rowsum(dO * O) - dlse`` comes
in precomputed. No atomics: every output tile is owned by one program, so results are
bitwise reproducible. GQA: the dK/dV program of a key head loops over its query heads.
The dQ kernel also writes dbias tiles (the gradient of ``x = scale * qk + bias``) when
the bias is differentiated.
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
from jflash._src.layout import round_up
from jflash._src.problem import Problem


def _dkv_kernel(*refs, names, p: Problem, bq: int, bk: int, nq: int, groups: int, q_len: int,
                kv_len: int):
  r = tiles.named_refs(names, refs)
  kj, b, kh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  k0 = kj * bk
  q_valid, kv_valid = r["q_valid"][b], r["kv_valid"][b]
  k_rows = tiles.rows_below(k0, bk, kv_len, bk)
  k, v = tiles.load(r["k"], k_rows), tiles.load(r["v"], k_rows)
  kv_seg = r["kv_seg"][...] if "kv_seg" in r else None
  ranges = mask_lib.q_block_range(p.mask, k0, bk, bq, nq, q_valid, kv_valid,
                                 tiles.segment_range(r))

  def head(g, carry):
    def step(i, carry, masked):
      dk, dv = carry
      q0 = pl.multiple_of(i * bq, bq)
      rows = pl.ds(q0, bq)
      q_rows = tiles.rows_below(q0, bq, q_len, bq)
      q = tiles.load(r["q"].at[rows, g, :], q_rows)
      do = tiles.load(r["do"].at[rows, g, :], q_rows)
      lse2 = r["lse"][g, rows] * logits_lib.LOG2E
      delta = r["delta"][g, rows]
      q_seg = r["q_seg"][rows] if "q_seg" in r else None
      bias = tiles.load_col_tile(r["bias"], g, q0, bq) if "bias" in r else None
      dense = tiles.load_col_tile(r["dense"], g, q0, bq) if "dense" in r else None
      s, t, _ = tiles.masked_scores(p, tiles.dot(k, q, trans_b=True), q0, k0, q_valid,
                                    kv_valid, q_seg, kv_seg, bias=bias, dense=dense,
                                    masked=masked, transpose=True)
      pt = jnp.exp2(s - lse2[None, :])  # [bk, bq]; 0 where masked (s = -inf) or empty row
      z = 1.0
      if p.dropout_rate:
        z = tiles.dropout_scale(p, r["seed"], b, kh * groups + g, q0, k0, bq, bk,
                                transpose=True)
      dv = dv + tiles.dot((pt * z).astype(do.dtype), do)
      dpt = tiles.dot(v, do, trans_b=True) * z
      dst = logits_lib.dscores(pt * (dpt - delta[None, :]), t)
      dk = dk + tiles.dot(dst.astype(q.dtype), q)
      return dk, dv

    live = None
    if "flags" in r:
      f = r["flags"]
      live = lambda i: f[g if f.shape[0] > 1 else 0, i if f.shape[1] > 1 else 0, 0] != 0
    return tiles.three_phase_loop(ranges, step, carry, live)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, groups, head, (zeros, zeros))
  tiles.store(r["dk"], (dk * p.scale).astype(r["dk"].dtype), k_rows)
  tiles.store(r["dv"], dv.astype(r["dv"].dtype), k_rows)


def _dq_kernel(*refs, names, p: Problem, bq: int, bk: int, nq: int, nk: int, q_len: int,
               kv_len: int):
  r = tiles.named_refs(names, refs)
  qi, b, h = nq - 1 - pl.program_id(0), pl.program_id(1), pl.program_id(2)  # reversed_index
  q0 = qi * bq
  q_valid, kv_valid = r["q_valid"][b], r["kv_valid"][b]
  q_rows = tiles.rows_below(q0, bq, q_len, bq)
  q, do = tiles.load(r["q"], q_rows), tiles.load(r["do"], q_rows)
  lse2 = r["lse"][...] * logits_lib.LOG2E
  delta = r["delta"][...]
  q_seg = r["q_seg"][...] if "q_seg" in r else None
  ranges = mask_lib.kv_block_range(p.mask, q0, bq, bk, nk, q_valid, kv_valid,
                                  tiles.segment_range(r))

  def step(j, dq, masked):
    k0 = pl.multiple_of(j * bk, bk)
    cols = pl.ds(k0, bk)
    k_rows = tiles.rows_below(k0, bk, kv_len, bk)
    k, v = tiles.load(r["k"].at[cols, :], k_rows), tiles.load(r["v"].at[cols, :], k_rows)
    kv_seg = r["kv_seg"][cols] if "kv_seg" in r else None
    bias = tiles.load_row_tile(r["bias"], k0, bk) if "bias" in r else None
    dense = tiles.load_row_tile(r["dense"], k0, bk) if "dense" in r else None
    s, t, _ = tiles.masked_scores(p, tiles.dot(q, k, trans_b=True), q0, k0, q_valid, kv_valid,
                                  q_seg, kv_seg, bias=bias, dense=dense, masked=masked)
    pr = jnp.exp2(s - lse2[:, None])
    dp = tiles.dot(do, v, trans_b=True)
    if p.dropout_rate:
      dp = dp * tiles.dropout_scale(p, r["seed"], b, h, q0, k0, bq, bk)
    ds = logits_lib.dscores(pr * (dp - delta[:, None]), t)
    if "dbias" in r:
      r["dbias"][:, cols] = ds
    return dq + tiles.dot(ds.astype(k.dtype), k)

  live = None
  if "flags" in r:
    live = lambda j: r["flags"][0, j if r["flags"].shape[1] > 1 else 0] != 0
  dq = tiles.three_phase_loop(ranges, step, jnp.zeros(q.shape, jnp.float32), live)
  tiles.store(r["dq"], (dq * p.scale).astype(r["dq"].dtype), q_rows)


def backward(p: Problem, cfg: TritonConfig, q, k, v, bias, arrays: mask_lib.MaskArrays, dout,
             lse, delta, want_dbias: bool):
  """``q, dout [B, T, N, D]``, ``k, v [B, S, K, D]``, ``lse, delta [B, N, Tp]`` (Tp, Sp:
  T, S rounded up to ``cfg.q_multiple``, ``cfg.k_multiple``; bias, dense mask and
  segment ids padded to them). Q, K, V and dO come unpadded along the sequence, as in
  fwd.forward.

  Returns ``dq, dk, dv`` (the shapes of q, k, v) and, if ``want_dbias``, the full f32
  ``[B, N, Tp, Sp]`` gradient of the logits (zero outside visited tiles), for the caller
  to reduce.
  """
  b, t, n, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  tp, sp = round_up(t, cfg.q_multiple), round_up(s, cfg.k_multiple)
  groups = n // kh
  full_len = lambda: pl.BlockSpec((b,), lambda *_: (0,))

  # dK, dV: grid over (key tiles, batch, key heads).
  bq, bk = cfg.dkv_block_q, cfg.dkv_block_k
  names = ["q", "k", "v", "do", "lse", "delta", "q_valid", "kv_valid"]
  in_specs = [
      pl.BlockSpec((None, tp, groups, d), lambda j, i, h: (i, 0, h, 0)),
      pl.BlockSpec((None, bk, None, d), lambda j, i, h: (i, j, h, 0)),
      pl.BlockSpec((None, bk, None, d), lambda j, i, h: (i, j, h, 0)),
      pl.BlockSpec((None, tp, groups, d), lambda j, i, h: (i, 0, h, 0)),
      pl.BlockSpec((None, groups, tp), lambda j, i, h: (i, h, 0)),
      pl.BlockSpec((None, groups, tp), lambda j, i, h: (i, h, 0)),
      full_len(), full_len(),
  ]
  args = [q, k, v, dout, lse, delta, arrays.q_valid, arrays.kv_valid]
  extra = tiles.optional_inputs(p, arrays, bias, by_rows=False, bq=bq, bk=bk, tp=tp, sp=sp,
                                groups=groups)
  names, in_specs, args = names + extra[0], in_specs + extra[1], args + extra[2]
  kv_out = pl.BlockSpec((None, bk, None, d), lambda j, i, h: (i, j, h, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, names=tuple(names + ["dk", "dv"]), p=p, bq=bq, bk=bk,
                        nq=tp // bq, groups=groups, q_len=t, kv_len=s),
      grid=(sp // bk, b, kh),
      in_specs=in_specs,
      out_specs=[kv_out, kv_out],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=plgpu.CompilerParams(num_warps=cfg.dkv_warps, num_stages=cfg.dkv_stages),
      interpret=p.interpret,
      name="jflash_bwd_dkv",
  )(*args)

  # dQ (and dbias): grid over (query tiles, batch, query heads); the last query tiles first.
  bq, bk = cfg.dq_block_q, cfg.dq_block_k
  qt = tiles.reversed_index(tp // bq)
  names = ["q", "k", "v", "do", "lse", "delta", "q_valid", "kv_valid"]
  in_specs = [
      pl.BlockSpec((None, bq, None, d), lambda i, j, h: (j, qt(i), h, 0)),
      pl.BlockSpec((None, sp, None, d), lambda i, j, h: (j, 0, h // groups, 0)),
      pl.BlockSpec((None, sp, None, d), lambda i, j, h: (j, 0, h // groups, 0)),
      pl.BlockSpec((None, bq, None, d), lambda i, j, h: (j, qt(i), h, 0)),
      pl.BlockSpec((None, None, bq), lambda i, j, h: (j, h, qt(i))),
      pl.BlockSpec((None, None, bq), lambda i, j, h: (j, h, qt(i))),
      full_len(), full_len(),
  ]
  args = [q, k, v, dout, lse, delta, arrays.q_valid, arrays.kv_valid]
  extra = tiles.optional_inputs(p, arrays, bias, by_rows=True, bq=bq, bk=bk, tp=tp, sp=sp,
                                q_tile=qt)
  names, in_specs, args = names + extra[0], in_specs + extra[1], args + extra[2]
  out_specs = [pl.BlockSpec((None, bq, None, d), lambda i, j, h: (j, qt(i), h, 0))]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  aliases = {}
  if want_dbias:
    # Tiles the mask skips are never written: start from zeros (aliased into the output).
    dbias_spec = pl.BlockSpec((None, None, bq, sp), lambda i, j, h: (j, h, qt(i), 0))
    names.append("dbias_init")
    in_specs.append(dbias_spec)
    args.append(jnp.zeros((b, n, tp, sp), jnp.float32))
    aliases = {len(args) - 1: 1}
    out_specs.append(dbias_spec)
    out_shape.append(jax.ShapeDtypeStruct((b, n, tp, sp), jnp.float32))
  outs = pl.pallas_call(
      functools.partial(_dq_kernel, names=tuple(names + ["dq", "dbias"][:len(out_shape)]), p=p,
                        bq=bq, bk=bk, nq=tp // bq, nk=sp // bk, q_len=t, kv_len=s),
      grid=(tp // bq, b, n),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.dq_warps, num_stages=cfg.dq_stages),
      interpret=p.interpret,
      name="jflash_bwd_dq",
  )(*args)
  return outs[0], dk, dv, (outs[1] if want_dbias else None)
