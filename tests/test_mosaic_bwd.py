"""The Mosaic backward kernels (bwd.py: dK/dV, dQ, the fused dQ modes) against the
independent reference, and their config (MosaicBwdConfig).

* On the GPU machine (``-m gpu``): the shared checks of test_attention.py through the
  public call with the Mosaic backward forced on, per dQ mode, and the XLA determinism
  switch.
* On CPU: the kernels in Pallas's GPU interpreter (small cases), lowered for CUDA without
  running them, and the config's choices (dQ mode, launches, tiles).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jflash
from helpers import Case, assert_close, rank4_pads
from jflash._src import mask as mask_lib
from jflash._src import vjp
from jflash._src.backends.mosaic import backend as mosaic_backend
from jflash._src.backends.mosaic import bwd as mosaic_bwd
from jflash._src.backends.mosaic import fused_dq
from jflash._src.backends.mosaic import fwd as mosaic_fwd
from jflash._src.backends.mosaic.config import MosaicBwdConfig, MosaicConfig
from jflash._src.mask import MaskSpec
from jflash._src.problem import Problem
from test_attention import check_case, run_reference
from test_mosaic import GPU_CASES, SEGMENT_INTERPRET_CASES, _problem

# ---- The Mosaic backward kernels (bwd.py), forced on with MosaicConfig.mosaic_backward.


@contextlib.contextmanager
def _mosaic_backward(case: Case, bwd_cfg: MosaicBwdConfig | None = None):
  """Traces inside the block with the Mosaic backward on (and ``bwd_cfg`` if given). The
  public call's jit caches traces by Problem, not by config: clear them on both sides."""
  d = mosaic_backend.padded_head_dim(case.h)
  cfg = dataclasses.replace(
      MosaicConfig.for_problem(case.t, case.s, d, jnp.dtype(case.dtype).itemsize,
                               segments=case.segments is not None),
      mosaic_backward=True)
  jax.clear_caches()
  try:
    with contextlib.ExitStack() as stack:
      stack.enter_context(mosaic_backend.override_config(cfg))
      if bwd_cfg is not None:
        stack.enter_context(mosaic_backend.override_bwd_config(bwd_cfg))
      yield
  finally:
    jax.clear_caches()


@pytest.fixture
def mosaic_bwd_calls(monkeypatch):
  """The dq_mode of each trace of the Mosaic backward kernels: proves that a test ran
  them, and which config it ran."""
  calls = []
  real = mosaic_bwd.backward

  def counted(p, cfg, *args, **kwargs):
    calls.append(cfg.dq_mode)
    return real(p, cfg, *args, **kwargs)

  monkeypatch.setattr(mosaic_bwd, "backward", counted)
  return calls


BWD_INTERPRET_CASES = {
    "bf16_causal_cross_tail_gqa": (
        Case(b=1, t=150, s=200, n=2, k=1, h=64, dtype=jnp.bfloat16, is_causal=True), None),
    "f16_lengths_empty_window_d80": (
        Case(b=2, t=130, s=140, n=1, k=1, h=80, dtype=jnp.float16, q_lengths=[130, 0],
             kv_lengths=[100, 140], window=(40, 10)), None),
    # One consumer warpgroup, a deeper ring than steps, 64-row tiles; empty rows (kv 0).
    "bf16_softcap_gqa_t_gt_s_one_wg": (
        Case(b=2, t=200, s=90, n=4, k=2, h=64, dtype=jnp.bfloat16, softcap=5.0,
             kv_lengths=[90, 0]),
        MosaicBwdConfig(dkv_block_q=64, dkv_stages=3, dq_block_kv=64, dq_stages=3,
                        consumers=1)),
    # Segment ids: ranges per consumer over key tiles (dQ) and query tiles (dK/dV), here
    # with one consumer and 128-wide streamed tiles (the default config runs the Mosaic
    # backward of test_mosaic_interpret_against_reference's segment cases).
    "segment_pair_lengths_empty_one_wg": (
        SEGMENT_INTERPRET_CASES["segment_pair_lengths_empty"],
        MosaicBwdConfig(dkv_block_q=128, dq_block_kv=128, consumers=1)),
    # d=256 (its default config splits the head dim between the consumers, who share
    # one 64-row tile); and d=160, padded to 256, with lengths, an empty kv row, GQA.
    "bf16_causal_cross_tail_gqa_d256": (
        Case(b=1, t=150, s=200, n=2, k=1, h=256, dtype=jnp.bfloat16, is_causal=True), None),
    "f16_softcap_lengths_empty_gqa_d160": (
        Case(b=2, t=130, s=90, n=2, k=1, h=160, dtype=jnp.float16, softcap=5.0,
             q_lengths=[130, 70], kv_lengths=[90, 0]), None),
    # Unordered segment ids with lengths: each consumer's tile ids where it computes.
    "segment_pair_lengths_empty_d256": (
        dataclasses.replace(SEGMENT_INTERPRET_CASES["segment_pair_lengths_empty"], h=256),
        None),
    # The consumers divide the score tiles by role (bwd.role_step); in f16 without a
    # soft-cap P^T's own tile is dS^T's factor, otherwise an f16 copy (bf16 above).
    "f16_causal_cross_tail_gqa_d256": (
        Case(b=1, t=150, s=200, n=2, k=1, h=256, dtype=jnp.float16, is_causal=True), None),
}


def test_d256_interpret_cases_split_the_head_dim():
  names = [n for n in BWD_INTERPRET_CASES if n.endswith(("_d256", "_d160"))]
  assert len(names) == 4
  for name in names:
    case, cfg = BWD_INTERPRET_CASES[name]
    d = mosaic_backend.padded_head_dim(case.h)
    assert d == 256
    cfg = cfg or MosaicBwdConfig.for_problem(case.t, case.s, d)
    assert cfg.split_head_dim and cfg.tiles_per_cta == 1 and cfg.head_cols(d) == 128


@pytest.mark.parametrize("name", list(BWD_INTERPRET_CASES))
def test_mosaic_backward_interpret_against_reference(name, mosaic_bwd_calls):
  _check_backward_interpret(*BWD_INTERPRET_CASES[name], mosaic_bwd_calls)


def _check_backward_interpret(case: Case, bwd_cfg: MosaicBwdConfig | None, mosaic_bwd_calls):
  q, k, v, do = case.inputs()
  p, arrays = _problem(case, case.t, case.s)

  def grads_of(q, k, v):
    (_, lse), pullback = jax.vjp(lambda q, k, v: vjp.attention(p, q, k, v, None, arrays),
                                 q, k, v)
    return pullback((do, jnp.zeros_like(lse)))

  with _mosaic_backward(case, bwd_cfg):
    grads = grads_of(q, k, v)
  assert mosaic_bwd_calls
  ref_out, ref_grads = run_reference(case, jnp.float32)
  base_out, base_grads = run_reference(case, case.dtype)
  for name_, g, r, bse in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
    assert g.shape == r.shape and g.dtype == case.dtype, name_
    assert_close(name_, g, r, bse, case.dtype)
  # Rows that see no key get exactly zero dq.
  empty = ~case.mask().any(-1)
  if empty.any():
    np.testing.assert_array_equal(np.asarray(grads[0], np.float32)[empty], 0.0)


# The fused dQ (MosaicBwdConfig.dq_mode): the interpreter has neither TMA reductions nor
# semaphores, so there each key tile (or with split_dq, each CTA) writes its own f32 slab
# (fused_dq.add_dq, fused_dq.add_dq_half) and "atomic" with one consumer and "ordered" run the
# same code; the dS K matmul, the rows and heads it lands on and
# the masking are what these check (one mode each, to save CPU time).
# dq_chunk_flops=0: as many launches as the blocks of batches and key heads allow (the
# shapes here are far below the default's work per launch, which gives one).
FUSED_DQ_INTERPRET_CASES = {
    "bf16_causal_cross_tail_gqa": (
        Case(b=1, t=150, s=200, n=4, k=2, h=64, dtype=jnp.bfloat16, is_causal=True),
        dict(dq_mode="atomic", dq_chunk_flops=0)),
    "f16_lengths_empty_window_d80_one_wg_bq128": (
        Case(b=2, t=130, s=140, n=1, k=1, h=80, dtype=jnp.float16, q_lengths=[130, 0],
             kv_lengths=[100, 140], window=(40, 10)),
        dict(dq_mode="ordered", consumers=1, dkv_block_q=128, dq_chunk_flops=0)),
    # "atomic" with two consumers shares one partial per CTA (MosaicBwdConfig.split_dq):
    # the case above splits its 128 rows between them, this one (64-row query tiles)
    # its head dim; a window leaves each consumer steps outside its own range.
    "f16_window_d80_split_head_dim": (
        Case(b=1, t=130, s=140, n=2, k=1, h=80, dtype=jnp.float16, kv_lengths=[100],
             window=(40, 10)),
        dict(dq_mode="atomic")),
    # Segment ids: the dQ partials of the query tiles each consumer's ranges visit.
    "segment_packed_causal_gqa_atomic": (
        SEGMENT_INTERPRET_CASES["segment_packed_causal_gqa"],
        dict(dq_mode="atomic", dq_chunk_flops=0)),
    "segment_pair_lengths_empty_atomic_one_wg": (
        SEGMENT_INTERPRET_CASES["segment_pair_lengths_empty"],
        dict(dq_mode="atomic", consumers=1, dkv_block_q=128)),
}


def test_split_dq_interpret_cases_cover_both_halvings():
  """The "atomic" cases above run the split dQ (two consumers) both ways: half the rows
  each (128-row query tiles) and half the head dim each (64-row tiles)."""
  halves = set()
  for case, fields in FUSED_DQ_INTERPRET_CASES.values():
    d = mosaic_backend.padded_head_dim(case.h)
    cfg = dataclasses.replace(MosaicBwdConfig.for_problem(case.t, case.s, d), **fields)
    if cfg.split_dq:
      rows, cols = cfg.dq_half_shape(d)
      halves.add("rows" if cols == d else "head dim")
      assert rows * cols * 2 == cfg.dkv_block_q * d
  assert halves == {"rows", "head dim"}


def test_mosaic_ordered_dq_refuses_segment_ids():
  """"ordered" takes turns by the band's first key tile (fused_dq.dq_turn), which segment
  ranges do not follow: refused, naming both, rather than left to hang."""
  case = SEGMENT_INTERPRET_CASES["segment_packed_causal_gqa"]
  d = mosaic_backend.padded_head_dim(case.h)
  cfg = dataclasses.replace(MosaicBwdConfig.for_problem(case.t, case.s, d), dq_mode="ordered")
  with pytest.raises(NotImplementedError, match="dq_mode='ordered'.*segment_ids"):
    _lower_backward_for_cuda(64, True, None, 2, segments=True, dq_mode="ordered")
  p, _ = _problem(case, case.t, case.s)
  with mosaic_backend.override_bwd_config(cfg):
    with pytest.raises(NotImplementedError, match="dq_mode='ordered'.*segment_ids"):
      mosaic_backend.supports(p, *case.inputs()[:3], None)


@pytest.mark.parametrize("name", list(FUSED_DQ_INTERPRET_CASES))
def test_mosaic_backward_fused_dq_interpret_against_reference(name, mosaic_bwd_calls):
  case, fields = FUSED_DQ_INTERPRET_CASES[name]
  d = mosaic_backend.padded_head_dim(case.h)
  bwd_cfg = dataclasses.replace(MosaicBwdConfig.for_problem(case.t, case.s, d), **fields)
  _check_backward_interpret(case, bwd_cfg, mosaic_bwd_calls)


@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (False, (40, 10)),
                                            (True, (100, None)), (False, (0, 200))])
@pytest.mark.parametrize("bq", [64, 128])
def test_mosaic_ordered_dq_turns_count_exactly_the_visitors(causal, window, bq):
  """"ordered" dQ (fused_dq.dq_turn): the 64-key tiles that visit query tile i (by
  mask.q_block_range, as the dK/dV kernel loops) must get the turns 0, 1, ..., in key
  order, or a CTA waits forever (a turn too high) or two add at once (a repeat)."""
  left, right = window or (None, None)
  for t, s, q_valid, kv_valid in [(700, 900, 700, 900), (700, 900, 123, 301), (260, 900, 0, 900),
                                  (900, 260, 900, 0), (1000, 1000, 1000, 999)]:
    spec = MaskSpec(q_len=t, kv_len=s, causal=causal, window_left=left, window_right=right)
    p = Problem(mask=spec, scale=1.0, implementation="mosaic")
    nq, nk = -(-t // 128) * 128 // bq, -(-s // 128) * 128 // 64
    visitors = {i: [] for i in range(nq)}
    for j in range(nk):
      lo, _, _, hi = mask_lib.q_block_range(spec, j * 64, 64, bq, nq, q_valid, kv_valid)
      for i in range(lo, hi):
        visitors[i].append(j)
    for i, js in visitors.items():
      turns = [fused_dq.dq_turn(p, bq, nk, i, j, q_valid, kv_valid) for j in js]
      assert turns == list(range(len(js))), (t, s, q_valid, kv_valid, i, js, turns)


@pytest.mark.parametrize("d, causal, softcap, kh, segments", [
    (64, False, None, 2, False), (128, True, None, 4, False), (128, False, 30.0, 1, False),
    (64, True, None, 2, True), (128, False, None, 4, True),
    (256, True, None, 2, False), (256, False, 30.0, 4, True)])
def test_mosaic_backward_kernels_lower_for_cuda(d, causal, softcap, kh, segments):
  _lower_backward_for_cuda(d, causal, softcap, kh, segments=segments)


@pytest.mark.parametrize("dq_mode", ["atomic", "ordered"])
@pytest.mark.parametrize("d, causal, kh, fields", [
    (64, False, 2, {}), (64, True, 4, {}), (128, True, 1, {}), (128, False, 2, {}),
    (64, True, 2, dict(consumers=1, dkv_block_q=64))])
def test_mosaic_backward_fused_dq_lowers_for_cuda(dq_mode, d, causal, kh, fields, monkeypatch):
  # "ordered": one semaphore array for the whole kernel (each get_global is a new one; a
  # step traced per loop with its own would wait for turns nobody passes). The launches
  # over blocks of heads and batches (dq_chunks) share one trace of the kernel.
  calls = []
  real = mosaic_bwd.pl.get_global
  monkeypatch.setattr(mosaic_bwd.pl, "get_global", lambda *a: calls.append(a) or real(*a))
  _lower_backward_for_cuda(d, causal, None, kh, dq_mode=dq_mode, **fields)
  assert len(calls) == (dq_mode == "ordered"), calls


# ``static_wg`` is the default up to d=128 (a code copy per consumer warpgroup, its index
# a constant: common.consumers), so every default case above runs it; d=256 runs the
# traced index. These run the traced index at d<=128 too (``static_wg=False``, the
# option off): both kernels ("separate") and the dK/dV kernel with the fused dQ.
TRACED_WG_INTERPRET_CASES = {
    "bf16_causal_cross_tail_gqa": (BWD_INTERPRET_CASES["bf16_causal_cross_tail_gqa"][0], {}),
    "segment_packed_causal_gqa_atomic": (
        SEGMENT_INTERPRET_CASES["segment_packed_causal_gqa"], dict(dq_mode="atomic")),
}


def test_mosaic_bwd_config_takes_static_wg_but_at_d256():
  for d in (64, 128, 256):
    assert MosaicBwdConfig.for_problem(4096, 4096, d).static_wg == (d != 256)


@pytest.mark.parametrize("name", list(TRACED_WG_INTERPRET_CASES))
def test_mosaic_backward_traced_wg_interpret_against_reference(name, mosaic_bwd_calls):
  case, fields = TRACED_WG_INTERPRET_CASES[name]
  d = mosaic_backend.padded_head_dim(case.h)
  cfg = dataclasses.replace(MosaicBwdConfig.for_problem(case.t, case.s, d), static_wg=False,
                            **fields)
  _check_backward_interpret(case, cfg, mosaic_bwd_calls)


@pytest.mark.parametrize("d, causal, segments, fields", [
    (64, False, False, {}), (64, True, True, dict(dq_mode="atomic")),
    (128, False, False, dict(dq_mode="atomic", producer_regs=24)),  # with dv_early
    (128, True, False, {}), (128, False, True, {})])
def test_mosaic_backward_traced_wg_lowers_for_cuda(d, causal, segments, fields):
  _lower_backward_for_cuda(d, causal, 30.0 if segments else None, 2, segments=segments,
                           static_wg=False, **fields)


def test_mosaic_bwd_config_static_wg_refuses_split_head_dim():
  with pytest.raises(ValueError, match="static_wg.*split_head_dim"):
    MosaicBwdConfig(split_head_dim=True, static_wg=True)


@pytest.mark.parametrize("batch, k_heads, want, blocks", [
    (1, 16, 8, [(0, 1, h, 2) for h in range(0, 16, 2)]),
    (1, 2, 8, [(0, 1, 0, 1), (0, 1, 1, 1)]),  # fewer key heads than wanted: no more
    (4, 2, 8, [(b, 1, h, 1) for b in range(4) for h in range(2)]),
    (16, 32, 8, [(0, 16, h, 4) for h in range(0, 32, 4)]),
    (3, 6, 8, [(0, 3, h, 1) for h in range(6)]),  # 6 parts: none left for the batch
    (1, 16, 1, [(0, 1, 0, 16)]),
    (2, 12, 8, [(0, 2, h, 2) for h in range(0, 12, 2)]),
    (6, 1, 4, [(b, 2, 0, 1) for b in range(0, 6, 2)]),  # 6 batches into 3, not 4
])
def test_dq_chunks_cover_every_block_once(batch, k_heads, want, blocks):
  got = fused_dq.dq_chunks(batch, k_heads, want)
  assert got == blocks
  cover = np.zeros((batch, k_heads), int)
  for b0, nb, h0, nh in got:
    cover[b0:b0 + nb, h0:h0 + nh] += 1
  np.testing.assert_array_equal(cover, 1)


@pytest.mark.parametrize("d, causal, kh", [(64, True, 2), (128, False, 4)])
def test_mosaic_backward_fused_dq_with_segments_lowers_for_cuda(d, causal, kh):
  _lower_backward_for_cuda(d, causal, None, kh, segments=True, dq_mode="atomic")


def _lower_backward_for_cuda(d, causal, softcap, kh, segments=False, t=512, cfg=None,
                            **fields):
  """The full Pallas -> Mosaic GPU compile of the backward kernels (no GPU needed), with
  ``cfg`` (default: the reproducible MosaicBwdConfig for ``d``) updated by ``fields``;
  ``t``: the padded query and key length (multiple of 128)."""
  b, n = 2, 4
  q = jax.ShapeDtypeStruct((b, t, n, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, t, kh, d), jnp.bfloat16)
  rows = jax.ShapeDtypeStruct((b, n, t), jnp.float32)
  lens = jax.ShapeDtypeStruct((b,), jnp.int32)
  ids = [jax.ShapeDtypeStruct((b, t), jnp.int32)] * 2 if segments else []
  p = Problem(mask=MaskSpec(q_len=t - 5, kv_len=t - 9, causal=causal,
                            has_segment_ids=segments),
              scale=0.1, softcap=softcap, implementation="mosaic")
  cfg = dataclasses.replace(cfg or MosaicBwdConfig.for_problem(t, t, d), **fields)
  f = jax.jit(lambda *a: mosaic_bwd.backward(p, cfg, *a))
  f.trace(q, kv, kv, q, rows, rows, lens, lens, *ids).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("t, s", [(776, 904), (5, 1000), (1000, 8)])
@pytest.mark.parametrize("d, causal, dq_mode", [(128, True, "separate"), (64, False, "atomic")])
def test_mosaic_kernels_lower_for_cuda_at_unpadded_lengths(t, s, d, causal, dq_mode):
  """The kernels take Q, K, V and dO at their own lengths, not padded to whole tiles, where
  Mosaic's TMA can tile them (backend.tma_length: at most 8 rows, or a multiple of 8);
  their loads zero-fill the tail tiles. Only lse, delta and the ids come padded."""
  assert (mosaic_backend.tma_length(t), mosaic_backend.tma_length(s)) == (t, s)
  b, n, kh = 2, 4, 2
  fcfg = MosaicConfig.for_problem(t, s, d, causal=causal, sm_count=132, batch_heads=b * n)
  bcfg = dataclasses.replace(MosaicBwdConfig.for_problem(t, s, d, causal=causal),
                             dq_mode=dq_mode)
  p = Problem(mask=MaskSpec(q_len=t, kv_len=s, causal=causal), scale=0.1, softcap=None,
              implementation="mosaic")
  q = jax.ShapeDtypeStruct((b, t, n, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, s, kh, d), jnp.bfloat16)
  lens = jax.ShapeDtypeStruct((b,), jnp.int32)
  rows = jax.ShapeDtypeStruct((b, n, -(-t // bcfg.q_multiple) * bcfg.q_multiple), jnp.float32)
  fwd = jax.jit(lambda *a: mosaic_fwd.forward(p, fcfg, *a)).trace(q, kv, kv, lens, lens)
  out, lse = fwd.out_info
  assert out.shape == q.shape  # not padded
  assert lse.shape == (b, n, -(-t // fcfg.q_multiple) * fcfg.q_multiple)
  fwd.lower(lowering_platforms=("cuda",))
  bwd = jax.jit(lambda *a: mosaic_bwd.backward(p, bcfg, *a)).trace(
      q, kv, kv, q, rows, rows, lens, lens)
  assert [g.shape for g in bwd.out_info] == [q.shape, kv.shape, kv.shape]
  bwd.lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("t, s, pads", [
    (296, 200, []),  # multiples of 8, not of the 128-row tiles: no copy
    (300, 203, [(2, 304, 2, 64)] * 3 + [(2, 208, 1, 64)] * 4),  # Q twice, dO; K, V twice
])
def test_mosaic_copies_only_lengths_tma_cannot_tile(t, s, pads):
  """fwd+bwd under "mosaic" pads Q, K, V and dO (by a copy) only where backend.tma_length
  asks: to a multiple of 8, not to whole tiles."""
  case = Case(b=2, t=t, s=s, n=2, k=1, h=64, dtype=jnp.bfloat16, is_causal=True)
  q, k, v, do = case.inputs()
  p, arrays = _problem(case, t, s)

  def fwd_bwd(q, k, v, do):
    (out, lse), pullback = jax.vjp(lambda q, k, v: vjp.attention(p, q, k, v, None, arrays),
                                   q, k, v)
    return out, pullback((do, jnp.zeros_like(lse)))

  assert sorted(rank4_pads(jax.make_jaxpr(fwd_bwd)(q, k, v, do).jaxpr)) == sorted(pads)


def test_mosaic_lengths_tma_cannot_tile_are_padded_to_eight():
  """Why backend.tma_length pads 777 rows to 784: Mosaic refuses to tile an array whose
  length is over 8 and not a multiple of 8 for TMA (checked when it lowers for CUDA)."""
  assert [mosaic_backend.tma_length(n) for n in (1, 8, 9, 777, 784, 1000)] == [
      1, 8, 16, 784, 784, 1000]
  p = Problem(mask=MaskSpec(q_len=777, kv_len=777), scale=0.1, softcap=None,
              implementation="mosaic")
  x = jax.ShapeDtypeStruct((1, 777, 2, 64), jnp.bfloat16)
  lens = jax.ShapeDtypeStruct((1,), jnp.int32)
  cfg = MosaicConfig.for_problem(777, 777, 64)
  f = jax.jit(lambda *a: mosaic_fwd.forward(p, cfg, *a)).trace(x, x, x, lens, lens)
  with pytest.raises(ValueError, match="multiple of its tiling"):
    f.lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("d", mosaic_bwd.HEAD_DIMS)
@pytest.mark.parametrize("q_len", [1, 64, 65, 128, 200, 1000])
def test_mosaic_bwd_default_atomic_lowers_at_any_length(d, q_len):
  """The fast default (no determinism asked for) at any length: a 64-row dK/dV step
  would split d=64's dQ into 32-column halves, which Mosaic cannot slice (the GPU fuzz
  test's t = s = 1, h = 8 failed so on an H100, 2026-11-26)."""
  cfg = MosaicBwdConfig.for_problem(q_len, q_len, d, deterministic=False)
  assert cfg.split_dq_unsupported(d) is None
  if q_len in (1, 200):
    _lower_backward_for_cuda(d, True, None, 2, t=-(-q_len // 128) * 128, cfg=cfg)


def test_mosaic_split_dq_refuses_half_tiles():
  cfg = MosaicBwdConfig(dq_mode="atomic", dkv_block_q=64)
  assert "32-column" in cfg.split_dq_unsupported(64)
  assert cfg.split_dq_unsupported(128) is None
  with pytest.raises(NotImplementedError, match="dkv_block_q=64.*32-column"):
    _lower_backward_for_cuda(64, False, None, 2, t=128, cfg=cfg)


def test_mosaic_bwd_config_refuses_unknown_dq_mode():
  with pytest.raises(ValueError, match="dq_mode='fused'"):
    MosaicBwdConfig(dq_mode="fused")


@pytest.mark.parametrize("fields", [dict(consumers=1), dict(dq_mode="atomic")])
def test_mosaic_bwd_config_split_head_dim_needs_two_consumers_and_no_fused_dq(fields):
  with pytest.raises(ValueError, match="split_head_dim needs consumers=2"):
    MosaicBwdConfig(split_head_dim=True, **fields)


def test_mosaic_bwd_split_head_dim_refuses_half_tiles():
  """d=64 would split into 32-column halves, which Mosaic cannot slice: refused before
  any kernel is built, naming the config."""
  cfg = MosaicBwdConfig(split_head_dim=True)
  assert cfg.split_head_dim_unsupported(128) is None
  assert "split_head_dim" in cfg.split_head_dim_unsupported(64)
  with pytest.raises(NotImplementedError, match="split_head_dim=True"):
    _lower_backward_for_cuda(64, False, None, 2, cfg=cfg)


@pytest.mark.parametrize("d, s, causal, deterministic, segments, mode", [
    (64, 1, False, False, False, "atomic"),  # 128-row steps: halves of whole tiles
    (64, 64, True, False, False, "atomic"),
    (64, 1024, False, False, False, "atomic"),
    (64, 16384, True, False, False, "atomic"),
    (128, 1024, False, False, False, "separate"),  # measured slower at d=128 up to 1k
    (128, 4096, True, False, False, "separate"),  # and at 4k causal
    (128, 4096, False, False, False, "atomic"),
    (128, 16384, True, False, False, "atomic"),
    (64, 16384, False, True, False, "separate"),  # reproducible results asked for
    (128, 16384, False, True, False, "separate"),
    (64, 16384, True, False, True, "separate"),  # packed documents
    (128, 16384, True, False, True, "separate"),
    (256, 16384, False, False, False, "separate"),  # split_head_dim has no fused dQ
])
def test_mosaic_bwd_config_picks_dq_mode(d, s, causal, deterministic, segments, mode):
  cfg = MosaicBwdConfig.for_problem(s, s, d, deterministic=deterministic, segments=segments,
                                    causal=causal)
  assert cfg.dq_mode == mode
  assert not cfg.fused_dq or cfg.split_dq  # "atomic" only in FA3's one-partial-per-CTA form
  # dV's wgmma before dS^T at d=128 in every mode (measured faster there, slower at d=64).
  assert cfg.dv_early == (d == 128)
  assert cfg.split_head_dim == (d == 256)
  # Without a word on determinism, a direct caller gets the reproducible config.
  assert MosaicBwdConfig.for_problem(s, s, d, causal=causal).dq_mode == "separate"


@pytest.mark.parametrize("flags, mode", [
    ("", "atomic"),
    ("--xla_gpu_deterministic_ops=true", "separate"),
    ("--xla_gpu_exclude_nondeterministic_ops", "separate"),
])
def test_mosaic_default_backward_follows_xla_determinism(flags, mode, monkeypatch,
                                                         mosaic_bwd_calls):
  """d=64: the default backward adds dQ with atomics unless XLA_FLAGS asks for
  reproducible results; either way the gradients match the reference."""
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 " + flags)
  case = BWD_INTERPRET_CASES["bf16_causal_cross_tail_gqa"][0]
  assert case.h == 64
  _check_backward_interpret(case, None, mosaic_bwd_calls)
  assert set(mosaic_bwd_calls) == {mode}


@pytest.mark.parametrize("b, n, s, d, causal, launches", [
    # The benchmark grid at d=64 (b*s = 16k, 32 heads): 1k and 4k causal in one launch.
    (16, 32, 1024, 64, False, 1),
    (16, 32, 1024, 64, True, 1),
    (4, 32, 4096, 64, False, 3),
    (4, 32, 4096, 64, True, 1),
    (1, 32, 16384, 64, False, 8),
    (1, 32, 16384, 64, True, 7),
    (1, 32, 32768, 64, False, 8),  # capped at dq_chunks
    (1, 1, 64, 64, True, 1),
])
def test_fused_dq_launches_keep_work_per_launch(b, n, s, d, causal, launches):
  cfg = MosaicBwdConfig(dq_mode="atomic")
  p = Problem(mask=MaskSpec(q_len=s, kv_len=s, causal=causal), scale=1.0)
  got = fused_dq.fused_dq_launches(p, cfg, b, n, d)
  assert got == launches
  flops = 4 * b * n * s * s * d / (2 if causal else 1)
  # Each launch keeps its share of work, unless one launch is all there is.
  assert got == 1 or flops / got >= cfg.dq_chunk_flops
  assert fused_dq.fused_dq_launches(p, dataclasses.replace(cfg, dq_chunk_flops=0), b, n,
                                      d) == cfg.dq_chunks


def test_mosaic_bwd_config_fits_shared_memory():
  from jflash._src.backends.mosaic.config import DQ_MODES, SMEM_BYTES
  for d in mosaic_bwd.HEAD_DIMS:
    for s in (64, 1000, 16384):
      for dq_mode in DQ_MODES if d < 256 else ["separate"]:  # d=256: split_head_dim
        cfg = dataclasses.replace(MosaicBwdConfig.for_problem(s, s, d), dq_mode=dq_mode)
        assert cfg.dkv_smem_bytes(d) <= SMEM_BYTES, (d, s, cfg)
        assert cfg.dq_smem_bytes(d) <= SMEM_BYTES, (d, s, cfg)


# The Mosaic backward is the default for padded head dims <= 128 without a bias, so every
# such GPU_CASES entry above runs it too; these add shapes of their own, with the kernels
# forced on and their use asserted.
BWD_GPU_CASES = {
    "bf16_d64": Case(b=2, t=1024, s=1024, n=8, k=8, h=64, dtype=jnp.bfloat16),
    "bf16_d64_causal_gqa": GPU_CASES["bf16_d64_causal_gqa"],
    "bf16_d128_gqa_tail_1000": Case(b=1, t=1000, s=1000, n=4, k=2, h=128,
                                    dtype=jnp.bfloat16),
    "bf16_d64_causal_tail_1000": Case(b=1, t=1000, s=1000, n=4, k=1, h=64,
                                      dtype=jnp.bfloat16, is_causal=True),
    "segment_bf16_d64_s4096_8docs_causal_gqa": Case(b=1, t=4096, s=4096, n=4, k=2, h=64,
                                                    dtype=jnp.bfloat16, is_causal=True,
                                                    segments="packed", docs=8, seed=2),
    "segment_f16_d128_pair_lengths_empty": Case(b=2, t=700, s=900, n=4, k=1, h=128,
                                                dtype=jnp.float16, segments="pair",
                                                q_lengths=[700, 100], kv_lengths=[0, 900]),
    # d=256 (split_head_dim), padded d=192 with a window, GQA.
    "bf16_d256_causal_gqa_tail_1000": Case(b=1, t=1000, s=1000, n=4, k=2, h=256,
                                           dtype=jnp.bfloat16, is_causal=True),
    "f16_d192_window_gqa_lengths": Case(b=2, t=700, s=900, n=4, k=1, h=192,
                                        dtype=jnp.float16, window=(200, 30),
                                        q_lengths=[700, 300], kv_lengths=[900, 500]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(BWD_GPU_CASES))
def test_mosaic_backward_against_reference(name, mosaic_bwd_calls):
  case = BWD_GPU_CASES[name]
  with _mosaic_backward(case):
    check_case(case, "mosaic")
  assert mosaic_bwd_calls


@pytest.mark.gpu
@pytest.mark.parametrize("dq_mode", ["separate", "ordered"])
def test_mosaic_backward_rerun_is_bitwise_identical(dq_mode, mosaic_bwd_calls):
  case = BWD_GPU_CASES["bf16_d64_causal_gqa"]
  q, k, v, do = case.inputs()
  with _mosaic_backward(case, _fused_dq_config(case, dq_mode)):
    f = jax.jit(lambda q, k, v: jax.vjp(lambda q, k, v: jflash.dot_product_attention(
        q, k, v, implementation="mosaic", **case.kwargs()), q, k, v)[1](do))
    a, b = f(q, k, v), f(q, k, v)
  assert mosaic_bwd_calls
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_mosaic_default_backward_under_xla_determinism(deterministic, monkeypatch,
                                                       mosaic_bwd_calls):
  """The default config through the public call: "atomic" dQ at d=64, against the
  reference; under --xla_gpu_deterministic_ops "separate", bitwise identical reruns."""
  flags = os.environ.get("XLA_FLAGS", "")
  monkeypatch.setenv("XLA_FLAGS", flags + " --xla_gpu_deterministic_ops" * deterministic)
  case = BWD_GPU_CASES["bf16_d64_causal_gqa"]
  with _mosaic_backward(case):
    check_case(case, "mosaic")
    if deterministic:
      q, k, v, do = case.inputs()
      f = jax.jit(lambda q, k, v: jax.vjp(lambda q, k, v: jflash.dot_product_attention(
          q, k, v, implementation="mosaic", **case.kwargs()), q, k, v)[1](do))
      for x, y in zip(f(q, k, v), f(q, k, v)):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
  assert set(mosaic_bwd_calls) == {"separate" if deterministic else "atomic"}


def _fused_dq_config(case: Case, dq_mode: str, **fields) -> MosaicBwdConfig:
  d = mosaic_backend.padded_head_dim(case.h)
  return dataclasses.replace(MosaicBwdConfig.for_problem(case.t, case.s, d), dq_mode=dq_mode,
                             **fields)


# The fused dQ modes on the GPU: every BWD_GPU_CASES shape up to d=128 (d=256 splits
# the head dim, which has no fused dQ) plus the ones with empty rows, a window and a
# long causal run (many key tiles take turns on one query tile).
FUSED_DQ_GPU_CASES = {
    **{name: case for name, case in BWD_GPU_CASES.items()
       if mosaic_backend.padded_head_dim(case.h) <= 128},
    "bf16_lengths_empty_rows": GPU_CASES["bf16_lengths_empty_rows"],
    "bf16_window": GPU_CASES["bf16_window"],
    "bf16_d128_causal_4k": Case(b=1, t=4096, s=4096, n=2, k=1, h=128, dtype=jnp.bfloat16,
                                is_causal=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name, dq_mode", [
    (name, mode) for name in FUSED_DQ_GPU_CASES for mode in ("atomic", "ordered")
    # "ordered" refuses segment ids (test_mosaic_ordered_dq_refuses_segment_ids).
    if not (mode == "ordered" and FUSED_DQ_GPU_CASES[name].segments)])
def test_mosaic_backward_fused_dq_against_reference(name, dq_mode, mosaic_bwd_calls):
  """In as many launches as the blocks of batches and key heads allow (dq_chunk_flops=0).
  One launch, what the default gives these small shapes, is what every d<=64 case of
  the default tests runs ("atomic" is the default there)."""
  case = FUSED_DQ_GPU_CASES[name]
  cfg = _fused_dq_config(case, dq_mode, dq_chunk_flops=0)
  with _mosaic_backward(case, cfg):
    check_case(case, "mosaic")
  assert mosaic_bwd_calls


@pytest.mark.gpu
@pytest.mark.parametrize("name, dq_mode", [
    (name, mode) for name in FUSED_DQ_GPU_CASES for mode in ("separate", "atomic")])
def test_mosaic_backward_traced_wg_against_reference(name, dq_mode, mosaic_bwd_calls):
  """``static_wg=False`` (the default's option off, as at d=256): one code copy for both
  consumer warpgroups, their index traced. (With it on, these cases ran on an H100,
  2026-11-27: 18 passed; the default tests above now run it.)"""
  case = FUSED_DQ_GPU_CASES[name]
  with _mosaic_backward(case, _fused_dq_config(case, dq_mode, static_wg=False)):
    check_case(case, "mosaic")
  assert set(mosaic_bwd_calls) == {dq_mode}


# ---- sorted_grid: dq_mode="separate"'s kernels launch their CTAs longest first, through
# a launch order worked out in XLA (bwd._launch_order). Each CTA must still run its own
# tile's keys and rows: the cases mix batch rows of their own lengths, empty rows, GQA,
# windows and segment ids, so a tile run with another's (batch, head, tile) shows.
SORTED_GRID_INTERPRET_CASES = {
    "bf16_causal_cross_tail_gqa": Case(b=1, t=150, s=200, n=2, k=1, h=64,
                                       dtype=jnp.bfloat16, is_causal=True),
    "f16_lengths_empty_window_d80": Case(b=2, t=130, s=140, n=1, k=1, h=80,
                                         dtype=jnp.float16, q_lengths=[130, 0],
                                         kv_lengths=[100, 140], window=(40, 10)),
    "segment_packed_causal_gqa": SEGMENT_INTERPRET_CASES["segment_packed_causal_gqa"],
    "segment_pair_lengths_empty": SEGMENT_INTERPRET_CASES["segment_pair_lengths_empty"],
}


def _sorted_grid_config(case: Case) -> MosaicBwdConfig:
  d = mosaic_backend.padded_head_dim(case.h)
  return dataclasses.replace(MosaicBwdConfig.for_problem(case.t, case.s, d),
                             dq_mode="separate", sorted_grid=True)


@pytest.mark.parametrize("name", list(SORTED_GRID_INTERPRET_CASES))
def test_mosaic_backward_sorted_grid_interpret_against_reference(name, mosaic_bwd_calls):
  case = SORTED_GRID_INTERPRET_CASES[name]
  _check_backward_interpret(case, _sorted_grid_config(case), mosaic_bwd_calls)


@pytest.mark.parametrize("d, causal, segments", [(64, True, True), (128, False, True),
                                                 (128, True, False), (256, True, True)])
def test_mosaic_backward_sorted_grid_lowers_for_cuda(d, causal, segments):
  _lower_backward_for_cuda(d, causal, None, 2, segments=segments, dq_mode="separate",
                           sorted_grid=True)


def test_mosaic_bwd_config_sorts_the_grid_for_segment_ids():
  """Launched longest first with segment ids (packed documents), whose tiles differ in
  work, where that was timed (d <= 128); the fused dQ ("atomic", lowered here with it
  set) keeps its own launches."""
  for d in mosaic_bwd.HEAD_DIMS:
    for causal, deterministic in ((False, True), (True, False)):
      cfg = MosaicBwdConfig.for_problem(4096, 4096, d, deterministic=deterministic,
                                        segments=True, causal=causal)
      assert cfg.sorted_grid == (d <= 128) and cfg.dq_mode == "separate", (d, causal)
      assert not MosaicBwdConfig.for_problem(4096, 4096, d, causal=causal).sorted_grid
  _lower_backward_for_cuda(64, True, None, 2, segments=True, dq_mode="atomic",
                           sorted_grid=True)


def test_mosaic_backward_launch_order_runs_every_tile_once_longest_first():
  """bwd._launch_order and bwd._launched: the CTA launched i-th runs ``order[i]``, each
  (batch, head, tile) once, in falling work; the flat index splits back into the grid's
  (batch, head, tile) with the tile fastest."""
  work = jnp.asarray([[3, 0, 7, 7], [1, 9, 2, 0]], jnp.int32)
  heads = 3
  order = np.asarray(mosaic_bwd._launch_order(work, heads))
  assert sorted(order) == list(range(2 * heads * 4))
  b, h, t = order // (heads * 4), order // 4 % heads, order % 4
  w = np.asarray(work)[b, t]
  assert (np.diff(w) <= 0).all() and w[0] == 9, w
  ids = np.asarray(jax.vmap(lambda i: jnp.stack(mosaic_bwd._launched(
      jnp.asarray(order), (i // (heads * 4), i // 4 % heads, i % 4), (2, heads, 4))))(
          jnp.arange(2 * heads * 4)))
  np.testing.assert_array_equal(ids, np.stack([b, h, t], axis=1))


@pytest.mark.gpu
@pytest.mark.parametrize("name", [
    "segment_bf16_d64_s4096_8docs_causal_gqa", "segment_f16_d128_pair_lengths_empty",
    "bf16_d256_causal_gqa_tail_1000", "bf16_lengths_empty_rows", "bf16_window"])
def test_mosaic_backward_sorted_grid_against_reference(name, mosaic_bwd_calls):
  case = {**BWD_GPU_CASES, **FUSED_DQ_GPU_CASES}[name]
  with _mosaic_backward(case, _sorted_grid_config(case)):
    check_case(case, "mosaic")
  assert set(mosaic_bwd_calls) == {"separate"}
