"""The Mosaic backward's fused dQ (``MosaicBwdConfig.dq_mode`` "atomic" or "ordered"): the
dK/dV kernel (bwd.py) also computes ``dS K`` for each query tile it visits and adds it
into an f32 dQ in HBM with a TMA reduce-add, and ``fused_backward`` launches that kernel
over blocks of batches and key heads so that the f32 buffer stays small.

"ordered" makes the key tiles that add into one query tile take turns in key order on a
semaphore per (b, head, query tile) (``dq_turn``); "atomic" adds in whatever order the
CTAs come. With two consumers (``cfg.split_dq``) one partial per CTA (``dq_half``,
``add_dq_half``), else one per consumer (``add_dq``). In the interpreter, which has
neither TMA reductions nor semaphores, each key tile (or CTA) writes an f32 slab of its
own, summed in key order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jflash._src import mask as mask_lib
from jflash._src.backends.mosaic import bwd_parts as parts
from jflash._src.backends.mosaic.config import WG_ROWS, MosaicBwdConfig
from jflash._src.problem import Problem


def dq_turn(p: Problem, bq: int, nk: int, i, k_tile, q_valid, kv_valid):
  """``"ordered"``: how many 64-key tiles add into query tile ``i`` before ``k_tile``.

  The key tiles that visit query tile ``i`` (``i`` in their mask.q_block_range) are the
  consecutive ``[first, ...)``: both ends of a key tile's query range grow with the key
  tile (a band), and the empty ranges (keys past kv_valid) come last. ``first`` is the
  ``lo`` of mask.kv_block_range for that query tile over 64-key blocks: the same band
  seen from the query side (tests/test_mosaic_bwd.py checks the two agree)."""
  first = mask_lib.kv_block_range(p.mask, i * bq, bq, WG_ROWS, nk, q_valid, kv_valid)[0]
  return k_tile - first


def add_dq(p: Problem, cfg: MosaicBwdConfig, ds_s, k_s, dq_s, dq_acc, sems, *, b, h, i,
            k_tile, nq: int, nk: int, q_valid, kv_valid, interpret: bool):
  """Adds ``dS K`` (``ds_s``: dS^T [64 keys, bq] in SMEM; ``k_s``: K [64, D]; key tile
  ``k_tile`` of ``nk``) into rows ``i * bq ...`` (query tile ``i`` of ``nq``) of query
  head ``h`` of the f32 ``dq_acc``.

  On the GPU: a TMA reduce-add of the partial, staged in ``dq_s`` (one buffer: the wait
  for the previous add's read comes a whole step after it was issued). ``"ordered"``
  waits for its turn on ``sems[b, h, i]``, lets the add land, then passes the turn on.
  In the interpreter, which has neither TMA reductions nor semaphores, each key
  tile writes its own slab ``dq_acc[k_tile]`` (summed in key order by ``backward``)."""
  bq, d = dq_s.shape
  (dq,) = parts.matmuls((bq, d), (ds_s.T, k_s))
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous add has read dq_s
  dq_s[...] = dq
  plgpu.commit_smem()
  rows = pl.ds(i * bq, bq)
  if interpret:
    plgpu.copy_smem_to_gmem(dq_s, dq_acc.at[k_tile, b, rows, h])
    return
  if cfg.dq_mode == "atomic":
    plgpu.copy_smem_to_gmem(dq_s, dq_acc.at[b, rows, h], reduction_op="add")
    return
  n = dq_acc.shape[2]
  sem = sems.at[(b * n + h) * nq + i]
  turn = dq_turn(p, bq, nk, i, k_tile, q_valid, kv_valid)
  plgpu.semaphore_wait(sem, turn, decrement=False)  # every earlier key tile has added
  plgpu.copy_smem_to_gmem(dq_s, dq_acc.at[b, rows, h], reduction_op="add")
  plgpu.wait_smem_to_gmem(0)  # landed in HBM, not only read from SMEM
  plgpu.semaphore_signal(sem, 1)


def dq_half(ds_all, k_all, *, i, wg):
  """``cfg.split_dq``: this consumer's half of ``dS K`` over the CTA's keys for query
  tile ``i``, as ``(shape, lhs, rhs)`` for ``parts.matmuls``, and where it goes:
  ``(rows, cols)`` of the query head.

  ``ds_all``: dS^T ``[2 * 64 keys, bq]`` of both consumers (SMEM; read only after the
  consumers have met, when both are written); ``k_all``: K ``[2 * 64, D]``. With
  ``bq >= 128`` each consumer takes half the rows, else half the head dim (wgmma's M is
  64 at least). One partial per CTA and query tile in all (FA3's layout), half the
  bytes of one per consumer."""
  bq = ds_all.shape[1]
  d = k_all.shape[1]
  if bq >= 2 * WG_ROWS:
    half = bq // 2
    mm = ((half, d), ds_all.at[:, pl.ds(wg * half, half)].T, k_all)
    return mm, (pl.ds(i * bq + wg * half, half), pl.ds(0, d))
  half = d // 2
  mm = ((bq, half), ds_all.T, k_all.at[:, pl.ds(wg * half, half)])
  return mm, (pl.ds(i * bq, bq), pl.ds(wg * half, half))


def add_dq_half(dq, dq_s, dq_acc, where, *, b, h, kt, interpret: bool):
  """Adds ``dq`` (a consumer's half, ``where`` = its ``(rows, cols)`` from ``dq_half``)
  into query head ``h`` of the f32 ``dq_acc`` with a TMA reduce-add staged in ``dq_s``.
  TMA reduce-adds run at ~3.2 TB/s on an H100 (benchmarks/tma_reduce_probe.py), so the
  bytes added bound the kernel. In the interpreter, which has no TMA reductions, the
  CTA writes its own slab ``dq_acc[kt]``."""
  rows, cols = where
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous add has read dq_s
  dq_s[...] = dq
  plgpu.commit_smem()
  if interpret:
    plgpu.copy_smem_to_gmem(dq_s, dq_acc.at[kt, b, rows, h, cols])
  else:
    plgpu.copy_smem_to_gmem(dq_s, dq_acc.at[b, rows, h, cols], reduction_op="add")


def dq_chunks(batch: int, k_heads: int, want: int) -> list[tuple[int, int, int, int]]:
  """The fused dQ's launches: ``(b0, nb, h0, nh)`` blocks of batches and key heads, at
  most ``want`` of them (the key heads cut into the most equal parts that do not exceed
  it, then the batches into as many as are left), so that the f32 dQ of one block is
  all that is live at once."""
  fit = lambda n, most: max(c for c in range(1, min(n, max(most, 1)) + 1) if n % c == 0)
  ch = fit(k_heads, want)
  cb = fit(batch, want // ch)
  nb, nh = batch // cb, k_heads // ch
  return [(i * nb, nb, j * nh, nh) for i in range(cb) for j in range(ch)]


def fused_dq_launches(p: Problem, cfg: MosaicBwdConfig, batch: int, heads: int,
                      head_dim: int) -> int:
  """How many launches the fused dQ wants: as many as keep ``cfg.dq_chunk_flops`` of
  forward FLOPs each (4 b h T S d, halved when causal; windows are not counted, so a
  windowed call may get more launches than its work warrants), between 1 and
  ``cfg.dq_chunks``."""
  if cfg.dq_chunk_flops == 0:
    return cfg.dq_chunks
  flops = 4 * batch * heads * p.q_len * p.kv_len * head_dim * (0.5 if p.mask.causal else 1.0)
  return max(1, min(cfg.dq_chunks, int(flops // cfg.dq_chunk_flops)))


def fused_backward(p: Problem, cfg: MosaicBwdConfig, dkv, body, args, extra, q, k, v, nk):
  """``cfg.fused_dq``: the dK/dV kernel adds dQ into an f32 buffer, launched once per
  block of ``dq_chunks`` (``fused_dq_launches`` of them) in a loop: each launch zeroes an
  f32 dQ of its block only, and its dQ is scaled and cast into the bf16/f16 result
  before the next block's buffer is made, so the f32 adds cost ``2 / launches`` of dQ's
  bytes of memory at peak instead of twice dQ. dQ, dK and dV are loop carries, updated
  in place: the kernel writes its block of dK and dV straight into them (aliased refs),
  dQ takes a dynamic_update_slice. The loop body, so the kernel, is lowered once; the
  offsets are data. H200, fwd+bwd at s=32k, d=128: 1060 MiB peak (1.18x inputs +
  outputs + gradients) in 8 launches, 1282 MiB (1.43x) in one.

  Session 7 first built this as an unrolled sequence of jitted launches with dK and dV
  refs passed through each: there the peak did not fall (likely copies of dK and dV at
  every launch)."""
  b, t, n, d = q.shape
  kh = k.shape[2]
  groups = n // kh
  blocks = dq_chunks(b, kh, fused_dq_launches(p, cfg, b, n, d))
  _, nb, _, nh = blocks[0]
  per_b = kh // nh  # blocks along the key heads, for each block of batches
  # In the interpreter one slab per 64-key tile (see add_dq), summed in key order.
  slabs = (nk * cfg.consumers,) if p.interpret else ()

  def cast_dq(acc):
    part = jax.freeze(acc)
    return ((part.sum(0) if p.interpret else part) * p.scale).astype(q.dtype)

  if len(blocks) == 1:
    # One launch writes every key's dK and dV, so they are plain outputs: no zero-filled
    # carries for the kernel to overwrite (2 x 64 MiB of writes on the grid's shapes).
    acc = jax.new_ref(jnp.zeros((*slabs, b, t, n, d), jnp.float32))
    dk, dv = dkv(body, out_type=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
                 grid=(b, kh, nk))(*args, *extra, jnp.zeros((2,), jnp.int32), acc)
    return cast_dq(acc), dk, dv

  def launch(i, carry):
    dq, dk, dv = carry
    b0, h0 = lax.div(i, per_b) * nb, lax.rem(i, per_b) * nh
    offsets = jnp.stack([b0, h0]).astype(jnp.int32)
    acc = jax.new_ref(jnp.zeros((*slabs, nb, t, nh * groups, d), jnp.float32))
    dk, dv = jax.new_ref(dk), jax.new_ref(dv)
    dkv(body, out_type=(), grid=(nb, nh, nk))(*args, *extra, offsets, acc, dk, dv)
    zero = jnp.zeros((), b0.dtype)
    dq = lax.dynamic_update_slice(dq, cast_dq(acc), (b0, zero, h0 * groups, zero))
    return dq, jax.freeze(dk), jax.freeze(dv)

  init = (jnp.zeros(q.shape, q.dtype), jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype))
  return lax.fori_loop(0, len(blocks), launch, init)
