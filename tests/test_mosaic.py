"""The "mosaic" (Hopper, Pallas Mosaic GPU) implementation against the independent reference.

* On the GPU machine (``-m gpu``): the shared checks of test_attention.py (out, lse,
  dq/dk/dv) at GPU sizes through the public call.
* On CPU: the same forward kernel in Pallas's GPU interpreter (a few small cases, through
  the one custom_vjp, with the Triton backward in interpret mode), the GPU code path
  lowered for CUDA without running it (catches Mosaic layout and lowering errors), and
  the refusal naming the missing sm90 GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jflash
import reference
from helpers import Case, assert_close, assert_lse_close
from jflash._src import mask as mask_lib
from jflash._src import vjp
from jflash._src.backends.mosaic import backend as mosaic_backend
from jflash._src.backends.mosaic import bwd as mosaic_bwd
from jflash._src.backends.mosaic import fwd as mosaic_fwd
from jflash._src.backends.mosaic.config import MosaicBwdConfig, MosaicConfig
from jflash._src.mask import MaskArrays, MaskSpec
from jflash._src.problem import Problem
from test_attention import check_case, run_reference

GPU_CASES = {
    "bf16_d128": Case(b=2, t=1024, s=1024, n=4, k=4, h=128, dtype=jnp.bfloat16),
    "bf16_d128_causal": Case(b=2, t=1024, s=1024, n=4, k=4, h=128, dtype=jnp.bfloat16,
                             is_causal=True),
    "bf16_d64_causal_gqa": Case(b=2, t=1024, s=1024, n=8, k=2, h=64, dtype=jnp.bfloat16,
                                is_causal=True),
    "f16_d64": Case(b=2, t=512, s=512, n=4, k=4, h=64, dtype=jnp.float16),
    "f16_d256_causal": Case(b=1, t=512, s=512, n=2, k=2, h=256, dtype=jnp.float16, is_causal=True),
    "bf16_d256": Case(b=1, t=640, s=640, n=2, k=1, h=256, dtype=jnp.bfloat16),
    "bf16_tail_1000_causal": Case(b=1, t=1000, s=1000, n=4, k=2, h=128, dtype=jnp.bfloat16,
                                  is_causal=True),
    "bf16_cross_t_lt_s": Case(b=2, t=300, s=777, n=4, k=1, h=64, dtype=jnp.bfloat16),
    "f16_cross_t_gt_s_causal": Case(b=1, t=900, s=260, n=2, k=2, h=128, dtype=jnp.float16,
                                    is_causal=True),
    "bf16_lengths_empty_rows": Case(b=3, t=700, s=900, n=2, k=2, h=64, dtype=jnp.bfloat16,
                                    q_lengths=[700, 123, 0], kv_lengths=[0, 900, 301],
                                    is_causal=True),
    "bf16_window": Case(b=1, t=1500, s=1500, n=2, k=1, h=128, dtype=jnp.bfloat16,
                        window=(200, 30)),
    "bf16_d80_softcap": Case(b=1, t=512, s=512, n=2, k=2, h=80, dtype=jnp.bfloat16,
                             softcap=20.0, is_causal=True),
    "f16_decode_t1": Case(b=4, t=1, s=1500, n=8, k=1, h=128, dtype=jnp.float16),
    # Packed documents: segment ranges, ids on masked tiles; the Mosaic backward for
    # d <= 128, the Triton one for d = 256.
    "segment_bf16_d128_packed_causal_gqa": Case(b=2, t=1024, s=1024, n=4, k=2, h=128,
                                                dtype=jnp.bfloat16, is_causal=True,
                                                segments="packed"),
    "segment_f16_d64_pair_lengths_empty": Case(b=2, t=700, s=900, n=4, k=1, h=64,
                                               dtype=jnp.float16, segments="pair",
                                               q_lengths=[700, 100], kv_lengths=[0, 900]),
    "segment_bf16_d256_packed": Case(b=1, t=640, s=640, n=2, k=1, h=256, dtype=jnp.bfloat16,
                                     segments="packed"),
    "segment_bf16_d80_packed_window_softcap": Case(b=2, t=1000, s=1000, n=2, k=2, h=80,
                                                   dtype=jnp.bfloat16, segments="packed",
                                                   window=(100, 0), softcap=20.0),
    # Long rows: 8 documents of random length over 4096 tokens.
    "segment_bf16_d128_s4096_8docs_causal": Case(b=1, t=4096, s=4096, n=4, k=1, h=128,
                                                 dtype=jnp.bfloat16, is_causal=True,
                                                 segments="packed", docs=8, seed=1),
    "segment_bf16_d64_s4096_8docs": Case(b=2, t=4096, s=4096, n=2, k=2, h=64,
                                         dtype=jnp.bfloat16, segments="packed", docs=8),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_mosaic_against_reference(name):
  check_case(GPU_CASES[name], "mosaic")


@pytest.mark.gpu
def test_mosaic_rerun_is_bitwise_identical():
  case = GPU_CASES["bf16_lengths_empty_rows"]
  q, k, v, _ = case.inputs()
  f = jax.jit(lambda q, k, v: jflash.dot_product_attention(
      q, k, v, implementation="mosaic", return_residual=True, **case.kwargs()))
  a, b = f(q, k, v), f(q, k, v)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("kw, what", [
    (dict(dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0)), "dropout"),
    (dict(mask=jnp.ones((1, 1, 256, 256), bool)), "dense mask"),
])
def test_mosaic_refuses_what_it_lacks_and_none_falls_back(kw, what):
  q = k = v = jnp.ones((1, 256, 2, 128), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match=what):
    jflash.dot_product_attention(q, k, v, implementation="mosaic", **kw)
  jflash.dot_product_attention(q, k, v, **kw)  # None: falls back to triton


@pytest.mark.gpu
def test_mosaic_refuses_f32():
  q = jnp.ones((1, 128, 2, 64), jnp.float32)
  with pytest.raises(NotImplementedError, match="bfloat16 and float16"):
    jflash.dot_product_attention(q, q, q, implementation="mosaic")


def test_mosaic_names_the_missing_sm90_gpu_on_cpu():
  if jax.default_backend() == "gpu":
    pytest.skip("this machine has a GPU")
  q = jnp.ones((1, 8, 1, 64), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match=r"implementation='mosaic' needs an sm90.*found 'cpu'"):
    jflash.dot_product_attention(q, q, q, implementation="mosaic")


# ---- CPU: the kernel in Pallas's GPU interpreter (small: the interpreter is slow).

INTERPRET_CASES = {
    "bf16_causal_cross_tail": Case(b=1, t=150, s=200, n=2, k=1, h=64, dtype=jnp.bfloat16,
                                   is_causal=True),
    "f16_lengths_empty_window_d80": Case(b=2, t=130, s=140, n=1, k=1, h=80, dtype=jnp.float16,
                                         q_lengths=[130, 0], kv_lengths=[100, 140],
                                         window=(40, 10)),
}


def _problem(case: Case, q_len: int, kv_len: int) -> tuple[Problem, MaskArrays]:
  """What jflash.dot_product_attention would build for ``case``, with interpret=True."""
  left, right = (None, None) if case.window is None else (
      (case.window, case.window) if isinstance(case.window, int) else case.window)
  ids = case.segment_ids()
  q_ids, kv_ids = (None, None) if ids is None else ids if isinstance(ids, tuple) else (ids, ids)
  spec = MaskSpec(q_len=q_len, kv_len=kv_len, causal=case.is_causal, window_left=left,
                  window_right=right, has_segment_ids=ids is not None)
  scale = case.scale if case.scale is not None else 1.0 / np.sqrt(case.h)
  p = Problem(mask=spec, scale=scale, softcap=case.softcap, implementation="mosaic",
              interpret=True)
  lengths = lambda x, n: jnp.asarray([n] * case.b if x is None else x, jnp.int32)
  return p, MaskArrays(lengths(case.q_lengths, q_len), lengths(case.kv_lengths, kv_len),
                       q_ids, kv_ids)


# Packed documents (segment ids): the Mosaic forward and (default config, d <= 128) the
# Mosaic backward.
SEGMENT_INTERPRET_CASES = {
    # Self attention, causal, GQA; 300 tokens = 3 CTAs of 128 rows, 3 key tiles of 128.
    "segment_packed_causal_gqa": Case(b=2, t=300, s=300, n=2, k=1, h=64, dtype=jnp.bfloat16,
                                      is_causal=True, segments="packed", seed=3),
    # (q_ids, kv_ids) of random ids (no order): every tile is masked; lengths empty a
    # batch row's keys and cut another's queries.
    "segment_pair_lengths_empty": Case(b=2, t=130, s=200, n=2, k=2, h=64,
                                       dtype=jnp.float16, segments="pair",
                                       q_lengths=[100, 130], kv_lengths=[150, 0]),
}


def test_mosaic_segment_ranges_cover_each_half():
  """The CTA's union row spans both consumers' rows; empty halves add nothing."""
  cfg = MosaicConfig(block_kv=64)
  q_seg = jnp.asarray([[0] * 64 + [5] * 64 + [1] * 128], jnp.int32)  # 2 CTAs
  kv_seg = jnp.asarray([[0] * 64 + [1] * 64 + [2] * 64 + [3] * 64], jnp.int32)
  r = np.asarray(mosaic_fwd.segment_ranges(q_seg, kv_seg, cfg))
  np.testing.assert_array_equal(r[0, 0], [[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 1]])
  np.testing.assert_array_equal(r[0, 1], [[1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 1, 2]])


ALL_INTERPRET_CASES = {**INTERPRET_CASES, **SEGMENT_INTERPRET_CASES}


@pytest.mark.parametrize("name", list(ALL_INTERPRET_CASES))
def test_mosaic_interpret_against_reference(name):
  case = ALL_INTERPRET_CASES[name]
  q, k, v, do = case.inputs()
  p, arrays = _problem(case, case.t, case.s)
  (out, lse), pullback = jax.vjp(lambda q, k, v: vjp.attention(p, q, k, v, None, arrays), q, k, v)
  grads = pullback((do, jnp.zeros_like(lse)))
  ref_out, ref_grads = run_reference(case, jnp.float32)
  base_out, base_grads = run_reference(case, case.dtype)
  np_out, np_lse = reference.attention_np64(q, k, v, case.mask(), scale=case.scale)
  assert_close("out", out, np_out, base_out, case.dtype)
  lse = jnp.swapaxes(jnp.where(jnp.isposinf(lse), -jnp.inf, lse), 1, 2)  # public convention
  assert_lse_close(lse, np_lse, case.dtype)
  for name_, g, r, bse in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
    assert_close(name_, g, r, bse, case.dtype)
  empty = ~case.mask().any(-1)
  if empty.any():
    np.testing.assert_array_equal(np.asarray(out, np.float32)[empty], 0.0)


# ---- CPU: the GPU code path, lowered for CUDA (Mosaic layout inference) but not run.

@pytest.mark.parametrize("d, causal, softcap", [(64, False, None), (128, True, None),
                                                (256, True, None), (128, False, 30.0)])
def test_mosaic_gpu_kernel_lowers_for_cuda(d, causal, softcap):
  _lower_forward_for_cuda(d, causal, softcap)


def _lower_forward_for_cuda(d, causal, softcap, segments=False, **config):
  """Runs the full Pallas -> Mosaic GPU compile of the forward (no GPU needed), with the
  default MosaicConfig for ``d`` updated by ``config`` (and segment ids if asked)."""
  b, t, n, kh = 2, 512, 4, 2
  q = jax.ShapeDtypeStruct((b, t, n, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, t, kh, d), jnp.bfloat16)
  lens = jax.ShapeDtypeStruct((b,), jnp.int32)
  ids = [jax.ShapeDtypeStruct((b, t), jnp.int32)] * 2 if segments else []
  p = Problem(mask=MaskSpec(q_len=t - 5, kv_len=t - 9, causal=causal,
                            has_segment_ids=segments),
              scale=0.1, softcap=softcap, implementation="mosaic")
  cfg = dataclasses.replace(MosaicConfig.for_problem(t, t, d), **config)
  f = jax.jit(lambda q, k, v, a, c, *ids: mosaic_fwd.forward(p, cfg, q, k, v, a, c, *ids))
  f.trace(q, kv, kv, lens, lens, *ids).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("d, causal, config", [
    (64, False, {}), (128, True, {}), (128, True, dict(overlap=True)),
    (64, True, dict(overlap=True, block_kv=64)),
    # Several q tiles per CTA: the ids of every Q buffer and K slot counted in SMEM.
    (64, True, dict(q_tiles_per_cta=3)), (128, False, dict(q_tiles_per_cta=3)),
    (128, True, dict(q_tiles_per_cta=2, overlap=True)),
    (256, True, dict(q_tiles_per_cta=2, block_kv=64))])
def test_mosaic_segment_forward_lowers_for_cuda(d, causal, config):
  _lower_forward_for_cuda(d, causal, None, segments=True, **config)


def test_mosaic_config_fits_shared_memory():
  from jflash._src.backends.mosaic.config import SMEM_BYTES
  for d in mosaic_backend.HEAD_DIMS:
    for s, seg, causal in itertools.product((64, 1000, 4096, 16384), (False, True),
                                            (False, True)):
      cfg = MosaicConfig.for_problem(s, s, d, segments=seg, causal=causal)
      assert cfg.smem_bytes(d, segments=seg) <= SMEM_BYTES, (d, s, cfg)
      assert cfg.block_kv <= max(64, -(-s // 64) * 64)


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
}


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
# (bwd._add_dq, bwd._add_dq_half) and "atomic" with one consumer and "ordered" run the
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
  """"ordered" takes turns by the band's first key tile (bwd._dq_turn), which segment
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
  """"ordered" dQ (bwd._dq_turn): the 64-key tiles that visit query tile i (by
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
      turns = [mosaic_bwd._dq_turn(p, bq, nk, i, j, q_valid, kv_valid) for j in js]
      assert turns == list(range(len(js))), (t, s, q_valid, kv_valid, i, js, turns)


@pytest.mark.parametrize("d, causal, softcap, kh, segments", [
    (64, False, None, 2, False), (128, True, None, 4, False), (128, False, 30.0, 1, False),
    (64, True, None, 2, True), (128, False, None, 4, True)])
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
  got = mosaic_bwd.dq_chunks(batch, k_heads, want)
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
])
def test_mosaic_bwd_config_picks_dq_mode(d, s, causal, deterministic, segments, mode):
  cfg = MosaicBwdConfig.for_problem(s, s, d, deterministic=deterministic, segments=segments,
                                    causal=causal)
  assert cfg.dq_mode == mode
  assert not cfg.fused_dq or cfg.split_dq  # "atomic" only in FA3's one-partial-per-CTA form
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
  got = mosaic_bwd.fused_dq_launches(p, cfg, b, n, d)
  assert got == launches
  flops = 4 * b * n * s * s * d / (2 if causal else 1)
  # Each launch keeps its share of work, unless one launch is all there is.
  assert got == 1 or flops / got >= cfg.dq_chunk_flops
  assert mosaic_bwd.fused_dq_launches(p, dataclasses.replace(cfg, dq_chunk_flops=0), b, n,
                                      d) == cfg.dq_chunks


def test_mosaic_bwd_config_fits_shared_memory():
  from jflash._src.backends.mosaic.config import DQ_MODES, SMEM_BYTES
  for d in mosaic_bwd.HEAD_DIMS:
    for s in (64, 1000, 16384):
      for dq_mode in DQ_MODES:
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


# The fused dQ modes on the GPU: every BWD_GPU_CASES shape plus the ones with empty rows,
# a window and a long causal run (many key tiles take turns on one query tile).
FUSED_DQ_GPU_CASES = {
    **BWD_GPU_CASES,
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


# ---- Forward variants (MosaicConfig flags, off by default until timed on the GPU): each
# must give the reference's answer. Every case runs under mosaic_backend.override_config;
# the jitted dispatch caches traces by Problem, not by config, hence the cache clears.

VARIANTS = {
    "overlap": dict(overlap=True),
    "overlap_no_pingpong_bkv64": dict(overlap=True, pingpong=False, block_kv=64),
    "overlap_fold_qouter_regs": dict(overlap=True, fold_scale=True, q_outer=True,
                                     producer_regs=24, consumer_regs=240),
    "fold_qouter": dict(fold_scale=True, q_outer=True),
    # Q tiles per CTA: the default is 2 (d>=128) or 4 (d=64) up to 4k keys (the
    # interpret cases have 2 q tiles, so both run in one CTA, two Q buffers), so 1 (a
    # CTA per tile) is the variant here; 3 (three Q buffers) leaves the CTA's last tile past the end, and with overlap
    # and 64-key tiles runs a longer ring.
    "qtiles1": dict(q_tiles_per_cta=1),
    "qtiles3_overlap_bkv64": dict(q_tiles_per_cta=3, overlap=True, block_kv=64),
}


def _variant_config(case: Case, variant: str) -> MosaicConfig:
  d = mosaic_backend.padded_head_dim(case.h)
  return dataclasses.replace(MosaicConfig.for_problem(case.t, case.s, d), **VARIANTS[variant])


# The default configuration runs every GPU case above; a variant (a flag that is off by
# default) runs the three that cover tails, empty rows and soft-cap, to stay in budget.
VARIANT_GPU_CASES = ["bf16_tail_1000_causal", "bf16_lengths_empty_rows", "bf16_d80_softcap",
                     "segment_bf16_d128_packed_causal_gqa"]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", VARIANT_GPU_CASES)
def test_mosaic_variant_against_reference(name, variant):
  case = GPU_CASES[name]
  jax.clear_caches()
  try:
    with mosaic_backend.override_config(_variant_config(case, variant)):
      check_case(case, "mosaic")
  finally:
    jax.clear_caches()


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mosaic_variant_long_causal_and_full(variant):
  """Many key tiles per query tile (the steady state of the pipelines), fwd only."""
  for causal in (False, True):
    case = Case(b=1, t=4096, s=4096, n=2, k=1, h=128, dtype=jnp.bfloat16, is_causal=causal)
    q, k, v, _ = case.inputs()
    jax.clear_caches()
    try:
      with mosaic_backend.override_config(_variant_config(case, variant)):
        out, lse = jflash.dot_product_attention(q, k, v, implementation="mosaic",
                                                return_residual=True, **case.kwargs())
    finally:
      jax.clear_caches()
    np_out, np_lse = reference.attention_np64(q, k, v, case.mask(), scale=case.scale)
    base_out, _ = run_reference(case, case.dtype)
    assert_close("out", out, np_out, base_out, case.dtype)
    assert_lse_close(lse, np_lse, case.dtype)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(INTERPRET_CASES))
def test_mosaic_variant_interpret_against_reference(name, variant):
  """The forward only (a variant changes nothing else), in Pallas's GPU interpreter."""
  case = ALL_INTERPRET_CASES[name]
  q, k, v, _ = case.inputs()
  p, arrays = _problem(case, case.t, case.s)
  with mosaic_backend.override_config(_variant_config(case, variant)):
    out, lse = vjp.attention(p, q, k, v, None, arrays)
  np_out, np_lse = reference.attention_np64(q, k, v, case.mask(), scale=case.scale)
  base_out, _ = run_reference(case, case.dtype)
  assert_close("out", out, np_out, base_out, case.dtype)
  lse = jnp.swapaxes(jnp.where(jnp.isposinf(lse), -jnp.inf, lse), 1, 2)  # public convention
  assert_lse_close(lse, np_lse, case.dtype)
  empty = ~case.mask().any(-1)
  if empty.any():
    np.testing.assert_array_equal(np.asarray(out, np.float32)[empty], 0.0)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("d, causal, softcap, block_kv", [
    (64, False, None, 128), (64, True, None, 192), (128, True, None, 128),
    (128, False, 30.0, 128), (256, True, None, 64)])
def test_mosaic_variant_lowers_for_cuda(variant, d, causal, softcap, block_kv):
  _lower_forward_for_cuda(d, causal, softcap, **{"block_kv": block_kv, **VARIANTS[variant]})


def test_mosaic_config_refuses_too_many_registers():
  with pytest.raises(ValueError, match="consumer_regs"):
    MosaicConfig(producer_regs=40, consumer_regs=240)
  with pytest.raises(ValueError, match="producer_regs"):
    MosaicConfig(producer_regs=20)


# The overlap schedule with segment ids: K's slot (holding the key ids) is released only
# after the softmax has read them.
@pytest.mark.parametrize("name, variant", [
    ("segment_packed_causal_gqa", "overlap"),
    ("segment_pair_lengths_empty", "overlap_no_pingpong_bkv64"),
    # Q tiles per CTA: each tile reads its own rows of the segment ranges (by q_tile).
    # Packed, 3 q tiles: one per CTA (the default runs 2 per CTA, the second CTA's last
    # past the end); the pair, 2 q tiles in one CTA of 3 with the overlap schedule and
    # 64-key tiles.
    ("segment_packed_causal_gqa", "qtiles1"),
    ("segment_pair_lengths_empty", "qtiles3_overlap_bkv64")])
def test_mosaic_segment_variant_interpret_against_reference(name, variant):
  test_mosaic_variant_interpret_against_reference(name, variant)


@pytest.mark.parametrize("tiles", [1, 2, 3, 4])
def test_mosaic_q_tiles_cover_every_tile_once(tiles):
  """Each CTA's tiles (``q_tile``) are each query tile exactly once, past-the-end ones
  last; with an even count every CTA gets the same causal work where ``tiles`` divides
  ``nq``."""
  for nq in range(1, 12):
    ctas = -(-nq // tiles)
    runs = [[mosaic_fwd.q_tile(c, j, ctas, nq) for j in range(tiles)] for c in range(ctas)]
    seen = [t for run in runs for t in run if t >= 0]
    assert sorted(seen) == list(range(nq)), (nq, runs)
    for run in runs:
      n = sum(t >= 0 for t in run)
      assert all(t >= 0 for t in run[:n]), (nq, runs)
    if tiles % 2 == 0 and nq % tiles == 0:
      assert len({sum(run) for run in runs}) == 1, (nq, runs)
    if tiles == 1:
      assert [run[0] for run in runs] == [nq - 1 - c for c in range(ctas)]


def test_mosaic_q_tiles_with_one_q_buffer_interpret(monkeypatch):
  """Several q tiles where a second Q buffer does not fit (d=256 on the GPU): the next
  tile's Q loads after the last tile's O has left the slot. 3 q tiles, 2 per CTA: the
  first CTA's second tile is past the end; the second CTA's ring of 2 slots runs 6
  steps over two tiles."""
  case = Case(b=1, t=260, s=190, n=1, k=1, h=64, dtype=jnp.bfloat16, q_lengths=[250])
  q, k, v, _ = case.inputs()
  p, arrays = _problem(case, case.t, case.s)
  monkeypatch.setattr(MosaicConfig, "q_buffers", lambda self, *a, **kw: 1)
  cfg = dataclasses.replace(MosaicConfig.for_problem(case.t, case.s, 64), q_tiles_per_cta=2,
                            block_kv=64, stages=2)
  jax.clear_caches()
  try:
    with mosaic_backend.override_config(cfg):
      out, _ = vjp.attention(p, q, k, v, None, arrays)
  finally:
    jax.clear_caches()
  np_out, _ = reference.attention_np64(q, k, v, case.mask(), scale=case.scale)
  base_out, _ = run_reference(case, case.dtype)
  assert_close("out", out, np_out, base_out, case.dtype)


def test_mosaic_config_q_tiles():
  from jflash._src.backends.mosaic.config import SMEM_BYTES
  with pytest.raises(ValueError, match="q_tiles_per_cta"):
    MosaicConfig(q_tiles_per_cta=0)
  for d in mosaic_backend.HEAD_DIMS:
    one = dataclasses.replace(MosaicConfig.for_problem(1024, 1024, d), q_tiles_per_cta=1)
    assert one.q_buffers(d) == 1
    for tiles in (2, 3, 5):
      many = dataclasses.replace(one, q_tiles_per_cta=tiles)
      assert many.smem_bytes(d) <= SMEM_BYTES
      # Next to the ring fit three Q buffers at d=64, two at d=128, one at d=256.
      assert many.q_buffers(d) == min(tiles, {64: 3, 128: 2, 256: 1}[d]), (d, tiles)
      # Segment ids add their int32 staging next to each Q buffer and K slot.
      assert many.smem_bytes(d, segments=True) <= SMEM_BYTES
      assert many.smem_bytes(d, segments=True) > many.smem_bytes(d)


@pytest.mark.parametrize("d", mosaic_backend.HEAD_DIMS)
def test_mosaic_q_tiles_fit_shared_memory_when_lowered(d):
  """As many Q buffers as ``q_buffers`` allows next to the default ring: Mosaic's own
  count of the kernel's SMEM (checked when lowering) stays within sm90's."""
  _lower_forward_for_cuda(d, False, None, q_tiles_per_cta=3)
