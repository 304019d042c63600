"""The "mosaic" (Hopper, Pallas Mosaic GPU) implementation against the independent reference.

* On the GPU machine (``-m gpu``): the shared checks of test_attention.py (out, lse,
  dq/dk/dv) at GPU sizes through the public call.
* On CPU: the same forward kernel in Pallas's GPU interpreter (a few small cases, through
  the one custom_vjp, with the Triton backward in interpret mode), the GPU code path
  lowered for CUDA without running it (catches Mosaic layout and lowering errors), and
  the refusal naming the missing sm90 GPU.

The Mosaic backward kernels and their config: test_mosaic_bwd.py.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jflash
import reference
from helpers import Case, assert_close, assert_lse_close
from jflash._src import vjp
from jflash._src.backends.mosaic import backend as mosaic_backend
from jflash._src.backends.mosaic import fwd as mosaic_fwd
from jflash._src.backends.mosaic import schedule
from jflash._src.backends.mosaic.config import MosaicConfig
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
    # d=64, causal, past 4096 keys: the three-stage ring of 256-key tiles (for_problem).
    "bf16_d64_causal_5000": Case(b=1, t=5000, s=5000, n=2, k=1, h=64, dtype=jnp.bfloat16,
                                 is_causal=True),
    # Past 4k keys, d=128, and past 4096 keys, d=64 without a causal mask: QK^T takes Q
    # from registers (for_problem's q_registers).
    "bf16_d128_4096": Case(b=1, t=4096, s=4096, n=2, k=1, h=128, dtype=jnp.bfloat16),
    "bf16_d64_5000": Case(b=1, t=5000, s=5000, n=2, k=2, h=64, dtype=jnp.bfloat16),
    # d=128 without a causal mask past 4096 keys: clusters of two CTAs share K/V
    # (for_problem's kv_multicast): an even tile count per head with padded rows and
    # lengths; an odd one (4200 rows: 33 tiles) runs the persistent grid alone.
    "bf16_d128_4608_multicast_lengths": Case(b=2, t=4608, s=4608, n=2, k=1, h=128,
                                             dtype=jnp.bfloat16, q_lengths=[4608, 4500],
                                             kv_lengths=[4608, 4100]),
    "bf16_d128_4200_odd_tiles": Case(b=1, t=4200, s=4200, n=2, k=2, h=128,
                                     dtype=jnp.bfloat16),
    "f16_decode_t1": Case(b=4, t=1, s=1500, n=8, k=1, h=128, dtype=jnp.float16),
    # Packed documents: segment ranges, ids on masked tiles; the Mosaic backward for
    # d <= 128, the Triton one for d = 256.
    "segment_bf16_d128_packed_causal_gqa": Case(b=2, t=1024, s=1024, n=4, k=2, h=128,
                                                dtype=jnp.bfloat16, is_causal=True,
                                                segments="packed"),
    "segment_f16_d64_pair_lengths_empty": Case(b=2, t=700, s=900, n=4, k=1, h=64,
                                               dtype=jnp.float16, segments="pair",
                                               q_lengths=[700, 100], kv_lengths=[0, 900]),
    # Packed documents past 4096 keys: the sorted deal with Q in registers (for_problem).
    "segment_bf16_d128_4352_packed_causal": Case(b=1, t=4352, s=4352, n=2, k=1, h=128,
                                                 dtype=jnp.bfloat16, is_causal=True,
                                                 segments="packed"),
    "segment_bf16_d64_4608_packed": Case(b=1, t=4608, s=4608, n=2, k=2, h=64,
                                         dtype=jnp.bfloat16, segments="packed"),
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


@pytest.mark.parametrize("d, causal", [(128, False), (128, True), (64, False)])
def test_mosaic_persistent_default_lowers_for_cuda(d, causal):
  """The default of d=128 and of d=64 up to 1k keys without a causal mask, on an H100 or
  H200: a persistent grid of 132 CTAs."""
  cfg = MosaicConfig.for_problem(512, 512, d, causal=causal, sm_count=132, batch_heads=8)
  assert cfg.persistent == 132
  _lower_forward_for_cuda(d, causal, None, persistent=132)


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


@pytest.mark.parametrize("causal", [False, True])
def test_mosaic_long_d64_default_lowers_for_cuda(causal):
  """Past 4k keys, causal, d=64 takes three stages of 256-key tiles: they fit sm90's SMEM
  only without Mosaic's reduction scratch (fwd.py), which the lowering checks."""
  cfg = MosaicConfig.for_problem(16384, 16384, 64, causal=causal)
  assert (cfg.block_kv, cfg.stages) == (256, 3 if causal else 2)
  _lower_forward_for_cuda(64, causal, None, block_kv=cfg.block_kv, stages=cfg.stages,
                          q_tiles_per_cta=cfg.q_tiles_per_cta)


@pytest.mark.parametrize("d, causal, config", [
    (64, False, {}), (128, True, {}), (128, True, dict(overlap=True)),
    (64, True, dict(overlap=True, block_kv=64)),
    # Several q tiles per CTA: the ids of every Q buffer and K slot counted in SMEM.
    (64, True, dict(q_tiles_per_cta=3)), (128, False, dict(q_tiles_per_cta=3)),
    (128, True, dict(q_tiles_per_cta=2, overlap=True)),
    (256, True, dict(q_tiles_per_cta=2, block_kv=64)), (128, True, dict(persistent=132))])
def test_mosaic_segment_forward_lowers_for_cuda(d, causal, config):
  _lower_forward_for_cuda(d, causal, None, segments=True, **config)


@pytest.mark.parametrize("s, d, causal, segments, pingpong", [
    (1024, 64, True, False, False), (700, 64, True, False, False),
    (2048, 64, True, False, True), (1024, 64, False, False, True),
    (1024, 64, True, True, True), (1024, 128, True, False, True)])
def test_mosaic_config_pingpong_off_only_for_short_causal_d64(s, d, causal, segments,
                                                              pingpong):
  """The ping-pong barrier is dropped where it measured slower (d=64, causal, <= 1k
  keys, no segment ids) and nowhere else; both schedules run the interpret cases."""
  cfg = MosaicConfig.for_problem(s, s, d, segments=segments, causal=causal)
  assert cfg.pingpong == pingpong


@pytest.mark.parametrize("s, d, causal, segments, tiles", [
    (1024, 64, True, False, 8), (700, 64, True, False, 8), (2048, 64, True, False, 4),
    (1024, 64, False, False, 4), (1024, 64, True, True, 4), (1024, 128, True, False, 2),
    (16384, 64, True, False, 1)])
def test_mosaic_config_q_tiles_per_cta_where_they_measured_faster(s, d, causal, segments,
                                                                  tiles):
  """Eight query tiles per CTA (a whole (batch, head) at 1k) only for d=64, causal, up to
  1k keys, without segment ids; four elsewhere at d=64 up to 4k keys, two at d=128
  causal, one past 4k keys."""
  cfg = MosaicConfig.for_problem(s, s, d, segments=segments, causal=causal)
  assert cfg.q_tiles_per_cta == tiles


@pytest.mark.parametrize("s, d, causal, segments, sm_count, multicast", [
    (16384, 128, False, False, 132, True), (4608, 128, False, False, 132, True),
    (4096, 128, False, False, 132, False), (16384, 128, True, False, 132, False),
    (16384, 128, False, True, 132, False), (16384, 64, False, False, 132, False),
    (16384, 128, False, False, 0, False)])
def test_mosaic_config_kv_multicast_where_it_measured_faster(s, d, causal, segments,
                                                             sm_count, multicast):
  """d=128 without a causal mask or segment ids past 4096 keys, on the persistent grid
  (which needs the SM count) only."""
  cfg = MosaicConfig.for_problem(s, s, d, causal=causal, segments=segments,
                                 sm_count=sm_count, batch_heads=16)
  assert cfg.kv_multicast == multicast
  assert not multicast or cfg.persistent == sm_count


def test_mosaic_config_kv_multicast_needs_the_persistent_q_tile_deal():
  for bad in (dict(), dict(persistent=1), dict(persistent=4, sorted_deal=True),
              dict(persistent=4, paired_deal=True)):
    with pytest.raises(ValueError, match="kv_multicast"):
      MosaicConfig(kv_multicast=True, **bad)


@pytest.mark.parametrize("s, d, causal, v_wait_first", [
    (16384, 128, False, True), (1024, 128, True, True), (4096, 64, False, True),
    (1024, 64, True, False), (16384, 64, True, False), (16384, 256, False, False)])
def test_mosaic_config_v_wait_first_where_it_measured_faster(s, d, causal, v_wait_first):
  """V waited for before the softmax at d=128 and at d=64 without a causal mask. The
  default GPU cases run both orders (d=128, d=64 causal, d=256) against the reference,
  the variant tests the early wait everywhere."""
  for segments in (False, True):
    cfg = MosaicConfig.for_problem(s, s, d, segments=segments, causal=causal, sm_count=132,
                                   batch_heads=64)
    assert cfg.v_wait_first == v_wait_first


@pytest.mark.parametrize("s, d, causal, narrow", [
    (1024, 64, True, True), (2048, 64, True, True), (4096, 64, True, False),
    (16384, 128, True, True), (1024, 128, True, True), (16384, 128, False, False),
    (1024, 64, False, False), (16384, 256, True, False)])
def test_mosaic_config_narrow_tail_under_a_causal_mask_with_128_key_tiles(s, d, causal,
                                                                          narrow):
  """The causal diagonal narrowed where the key tiles are 128 wide (d=128, and d=64 up
  to 2k keys or with segment ids); the default GPU causal cases run it against the
  reference, the variant tests elsewhere."""
  for segments in (False, True):
    cfg = MosaicConfig.for_problem(s, s, d, segments=segments, causal=causal, sm_count=132,
                                   batch_heads=64)
    assert cfg.narrow_tail == (causal and cfg.block_kv == 128)
    if not segments:
      assert cfg.narrow_tail == narrow


@pytest.mark.parametrize("s, d, causal, segments, q_registers", [
    (4096, 128, False, False, True), (16384, 128, True, False, True),
    (1024, 128, False, False, False), (4096, 128, True, True, False),
    (16384, 64, False, False, True), (5000, 64, False, False, True),
    (4096, 64, False, False, False), (16384, 64, True, False, False),
    (16384, 256, False, False, False), (16384, 128, True, True, True),
    (4352, 64, True, True, True), (4096, 64, False, True, False),
    (16384, 256, False, True, False)])
def test_mosaic_config_q_registers_where_it_measured_faster(s, d, causal, segments,
                                                            q_registers):
  """QK^T takes Q from registers at d=128 from 4k keys and at d=64 past 4k keys without
  a causal mask; with segment ids past 4k keys at d=64 and d=128, causal or not.
  GPU_CASES bf16_d128_4096, bf16_d64_5000 and the two packed cases past 4096 keys run it
  against the reference."""
  cfg = MosaicConfig.for_problem(s, s, d, segments=segments, causal=causal, sm_count=132,
                                 batch_heads=64)
  assert cfg.q_registers == q_registers


@pytest.mark.parametrize("d, segments, sms, persistent", [
    (128, False, 132, 132), (128, False, 114, 114), (128, False, 0, 0), (128, True, 132, 132),
    (128, True, 0, 0), (64, False, 132, 132), (64, True, 132, 132), (256, False, 132, 0),
    (256, True, 132, 0)])
def test_mosaic_config_persistent_only_where_timed_faster(d, segments, sms, persistent):
  """A persistent grid of one CTA per SM where it was timed faster. Without segment ids:
  at d=128 without a causal mask, and with one on the benchmark grid's shapes up to 8k,
  whose deals are balanced; at d=64 only up to 1k keys without a causal mask. With them
  (packed documents), at d <= 128 at every length, dealt longest first (sorted_deal).
  None where the SM count is not known."""
  for s in (1024, 4096, 8192, 16384):
    for causal in (False, True):
      if d == 128 and causal and not segments and (s == 16384 or sms == 114):
        continue  # (deals not balanced: 16k at 132 CTAs, 4k at 114; the next test)
      cfg = MosaicConfig.for_problem(s, s, d, segments=segments, causal=causal, sm_count=sms,
                                     batch_heads=16384 // s * 2048 // d)
      on = persistent and (segments or d == 128 or (s <= 1024 and not causal))
      assert cfg.persistent == (persistent if on else 0), (s, causal)
      assert cfg.sorted_deal == bool(on and segments), (s, causal)


@pytest.mark.parametrize("s, batch_heads, persistent", [
    (16384, 16, 0), (16384, 64, 132), (8192, 32, 132), (4096, 16, 0), (4096, 64, 132),
    (1024, 256, 132), (4096, 0, 0)])
def test_mosaic_config_persistent_causal_only_where_the_deal_is_balanced(
    s, batch_heads, persistent):
  """Under a causal mask the persistent grid is kept only where its deal of unequal
  tiles leaves no CTA more than 6% over the ideal (s=16k, 16 heads: 1.54, and 34% slower
  on an H200); not where the batch and head count is not known (0). Without a causal
  mask it is kept at any count."""
  cfg = MosaicConfig.for_problem(s, s, 128, causal=True, sm_count=132, batch_heads=batch_heads)
  assert cfg.persistent == persistent
  cfg = MosaicConfig.for_problem(s, s, 128, sm_count=132, batch_heads=batch_heads)
  assert cfg.persistent == 132


def test_mosaic_deal_imbalance_against_a_direct_count():
  """``deal_imbalance`` against the work of each CTA's own tiles, counted one CTA at a
  time (``persistent_tiles`` of them, each ``q_tile``'s flat index): equal tiles deal
  within one tile, and a causal head of ~one run's tiles deals far from balanced."""
  rng = np.random.default_rng(0)
  for _ in range(40):
    nq, copies, ctas = (int(x) for x in rng.integers(1, 24, size=3))
    work = rng.integers(1, 9, size=nq)
    per_cta = []
    for c in range(ctas):
      n = int(schedule.persistent_tiles(jnp.int32(c), ctas, nq * copies))
      per_cta.append(sum(work[schedule.q_tile(c, j, ctas, nq * copies) % nq]
                         for j in range(n)))
    want = max(per_cta) / max(np.mean(per_cta), work.max())
    np.testing.assert_allclose(schedule.deal_imbalance(work, copies, ctas), want, rtol=1e-12)
    paired = []
    for c in range(ctas):
      n = int(schedule.paired_tiles(c, ctas, copies, nq))
      paired.append(sum(work[schedule.paired_tile(c, j, ctas, copies, nq)[1]]
                        for j in range(n)))
    want = max(paired) / max(np.mean(paired), work.max())
    np.testing.assert_allclose(schedule.deal_imbalance(work, copies, ctas, paired=True),
                               want, rtol=1e-12)
  assert schedule.deal_imbalance(np.ones(8), 33, 132) == 1.0
  causal = np.arange(1, 129)
  assert schedule.deal_imbalance(causal, 16, 132) > 1.5
  assert schedule.deal_imbalance(causal, 16, 132, paired=True) < 1.04
  assert schedule.deal_imbalance(causal[:64], 32, 132) < 1.06


def test_mosaic_sm_count_is_zero_in_interpret_mode_and_off_gpus():
  assert mosaic_backend.sm_count(interpret=True) == 0
  if jax.devices()[0].platform != "gpu":
    assert mosaic_backend.sm_count() == 0


@pytest.mark.gpu
def test_mosaic_sm_count_on_gpu():
  """The persistent grid's size: the device's SMs (132 on an H100 SXM or H200)."""
  dev = jax.devices()[0]
  assert mosaic_backend.sm_count() == dev.core_count > 0


def test_mosaic_config_fits_shared_memory():
  from jflash._src.backends.mosaic.config import SMEM_BYTES
  for d in mosaic_backend.HEAD_DIMS:
    for s, seg, causal, sms in itertools.product((64, 1000, 4096, 16384), (False, True),
                                                 (False, True), (0, 132)):
      cfg = MosaicConfig.for_problem(s, s, d, segments=seg, causal=causal, sm_count=sms)
      assert cfg.smem_bytes(d, segments=seg) <= SMEM_BYTES, (d, s, cfg)
      assert cfg.block_kv <= max(64, -(-s // 64) * 64)


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
    # A persistent grid of 3 CTAs dealing out every (batch, head, q tile): the interpret
    # cases' 4 tiles (2 heads, or 2 batch rows with their own lengths) go 2 + 2 or 1 + 1
    # + 2 per CTA, so each CTA's ring crosses heads or batch rows.
    "persistent3": dict(persistent=3),
    # The same grid dealing each head's tiles in pairs (schedule.paired_tile): the cases'
    # 2 tiles a head make one pair, so each of 2 CTAs runs a head's or a batch row's
    # pair; with 3 tiles a head, the middle tiles come last.
    "persistent3_paired": dict(persistent=3, paired_deal=True),
    # The same grid dealing the tiles longest first, by the key tiles each visits
    # (schedule.sorted_order, computed before the launch from the mask and the ids).
    "persistent3_sorted": dict(persistent=3, sorted_deal=True),
    # One cluster of two CTAs (kv_multicast) taking each (batch, head)'s two q tiles
    # side by side, its ring crossing heads or batch rows; in the interpreter each CTA
    # loads the K/V tiles itself (no multicast), paced by the cluster barriers.
    "persistent2_multicast": dict(persistent=2, kv_multicast=True),
    "qtiles3_overlap_bkv64": dict(q_tiles_per_cta=3, overlap=True, block_kv=64),
    # QK^T with Q in registers (loaded once per tile) rather than from SMEM.
    "q_registers": dict(q_registers=True),
    # Each consumer with a code copy of its own, its index a constant (common.consumers).
    "static_wg": dict(static_wg=True),
    # V's "full" barrier waited for before the softmax rather than after it.
    "v_wait_first": dict(v_wait_first=True),
    # The last masked key tile only as wide as a consumer's rows see of it (mask.tail_keys;
    # the causal diagonal), in 64-key steps (256-key tiles: test_mosaic_narrow_tail_*).
    "narrow_tail": dict(narrow_tail=True),
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
    ("segment_pair_lengths_empty", "qtiles3_overlap_bkv64"),
    # Persistent: each tile reads its own batch row's ids and segment ranges.
    ("segment_packed_causal_gqa", "persistent3"),
    ("segment_pair_lengths_empty", "persistent3"),
    ("segment_packed_causal_gqa", "persistent3_paired"),
    ("segment_packed_causal_gqa", "persistent3_sorted"),
    ("segment_pair_lengths_empty", "persistent3_sorted"),
    # Narrowed diagonal tiles: the key ids read for the first keys of K's slot.
    ("segment_packed_causal_gqa", "narrow_tail")])
def test_mosaic_segment_variant_interpret_against_reference(name, variant):
  test_mosaic_variant_interpret_against_reference(name, variant)


@pytest.mark.parametrize("name", ["bf16_causal_cross_tail", "segment_packed_causal_gqa"])
def test_mosaic_narrow_tail_256_keys_interpret(monkeypatch, name):
  """``narrow_tail`` with 256-key tiles, whose diagonal steps take three narrower widths:
  in bf16_causal_cross_tail, 64 and 128 keys (the first q tile's warpgroups) and 192 (the
  second's upper one, its rows cut at q_valid = 150)."""
  monkeypatch.setitem(VARIANTS, "narrow_tail_256", dict(narrow_tail=True, block_kv=256))
  test_mosaic_variant_interpret_against_reference(name, "narrow_tail_256")


@pytest.mark.parametrize("causal", [False, True])
def test_mosaic_narrow_tail_256_keys_lowers_for_cuda(causal):
  _lower_forward_for_cuda(64, causal, None, narrow_tail=True, block_kv=256)


@pytest.mark.parametrize("tiles", [1, 2, 3, 4])
def test_mosaic_q_tiles_cover_every_tile_once(tiles):
  """Each CTA's tiles (``q_tile``) are each query tile exactly once, past-the-end ones
  last; with an even count every CTA gets the same causal work where ``tiles`` divides
  ``nq``."""
  for nq in range(1, 12):
    ctas = -(-nq // tiles)
    runs = [[schedule.q_tile(c, j, ctas, nq) for j in range(tiles)] for c in range(ctas)]
    seen = [t for run in runs for t in run if t >= 0]
    assert sorted(seen) == list(range(nq)), (nq, runs)
    for run in runs:
      n = sum(t >= 0 for t in run)
      assert all(t >= 0 for t in run[:n]), (nq, runs)
    if tiles % 2 == 0 and nq % tiles == 0:
      assert len({sum(run) for run in runs}) == 1, (nq, runs)
    if tiles == 1:
      assert [run[0] for run in runs] == [nq - 1 - c for c in range(ctas)]


def _check_forward_under(case: Case, cfg: MosaicConfig):
  """The forward of ``case`` in interpret mode under ``cfg`` against the references."""
  q, k, v, _ = case.inputs()
  p, arrays = _problem(case, case.t, case.s)
  jax.clear_caches()
  try:
    with mosaic_backend.override_config(cfg):
      out, _ = vjp.attention(p, q, k, v, None, arrays)
  finally:
    jax.clear_caches()
  np_out, _ = reference.attention_np64(q, k, v, case.mask(), scale=case.scale)
  base_out, _ = run_reference(case, case.dtype)
  assert_close("out", out, np_out, base_out, case.dtype)


def test_mosaic_persistent_deal_covers_every_tile_once():
  """A persistent grid of ``ctas`` CTAs: each CTA runs ``persistent_tiles`` tiles (its
  live ``q_tile`` places, past-the-end ones last), and together they run every tile of
  every (batch, head) once; no two CTAs differ by more than one tile."""
  for n_all in range(1, 40):
    for ctas in range(1, n_all + 1):
      seen, counts = [], []
      for c in range(ctas):
        dealt = [schedule.q_tile(c, j, ctas, n_all) for j in range(-(-n_all // ctas) + 1)]
        n = int(schedule.persistent_tiles(jnp.int32(c), ctas, n_all))
        assert all(t >= 0 for t in dealt[:n]) and all(t < 0 for t in dealt[n:]), (n_all, ctas, c)
        seen += dealt[:n]
        counts.append(n)
      assert sorted(seen) == list(range(n_all)), (n_all, ctas)
      assert max(counts) - min(counts) <= 1, (n_all, ctas)


def test_mosaic_paired_deal_covers_every_tile_once():
  """The paired deal: each CTA runs ``paired_tiles`` tiles, together every tile of every
  (batch, head) once; each pair's tiles are one head's ``nq - 1 - k`` then ``k``; the
  busiest CTA has at most one pair (or one middle tile) more than the idlest; and every
  CTA of a grid of ``deal_units`` CTAs has work."""
  for nq in range(1, 9):
    for copies in range(1, 6):
      for ctas in range(1, schedule.deal_units(copies, nq, True) + 1):
        seen, costs = [], []
        for c in range(ctas):
          n = int(schedule.paired_tiles(jnp.int32(c), ctas, copies, nq))
          dealt = [tuple(int(x) for x in schedule.paired_tile(jnp.int32(c), jnp.int32(j),
                                                              ctas, copies, nq))
                   for j in range(n)]
          assert n >= 1, (nq, copies, ctas, c)
          for (h0, t0), (h1, t1) in zip(dealt[0:-1:2], dealt[1::2]):
            if t0 != t1 and t0 + t1 == nq - 1:
              assert h0 == h1 and t0 > t1, (nq, copies, ctas, dealt)
          seen += dealt
          costs.append(sum(t + 1 for _, t in dealt))
        assert sorted(seen) == [(h, t) for h in range(copies) for t in range(nq)]
        assert max(costs) - min(costs) <= nq + 1, (nq, copies, ctas, costs)


def test_mosaic_sorted_deal_covers_every_tile_once_longest_first():
  """The sorted deal (``sorted_order`` read at ``q_tile``'s places): together the CTAs
  run every tile of every (batch, head) once; the places are dealt in falling work,
  each (batch, tile)'s heads next to each other; a serpentine over them is balanced
  where ``q_tile``'s own order is not (8 packed documents in 16k, causal; causal 16k)."""
  rng = np.random.default_rng(1)
  for _ in range(30):
    b, nq, heads = (int(x) for x in rng.integers(1, 6, size=3))
    work = rng.integers(0, 9, size=(b, nq))
    order = schedule.sorted_order(work, heads)
    traced = np.asarray(jax.jit(schedule.sorted_order, static_argnums=1)(
        jnp.asarray(work, jnp.int32), heads))
    np.testing.assert_array_equal(order, traced)
    assert sorted(order) == list(range(b * heads * nq))
    dealt = order[::-1]  # place v = n_all - 1 - f is dealt v-th
    bh, tile = dealt // nq, dealt % nq
    w = work[bh // heads, tile]
    assert (np.diff(w) <= 0).all(), w
    # heads of one (batch, tile) side by side, in head order
    np.testing.assert_array_equal(bh % heads, np.tile(np.arange(heads), b * nq))
    assert ((bh // heads).reshape(-1, heads) == (bh // heads)[::heads, None]).all()
    assert (tile.reshape(-1, heads) == tile[::heads, None]).all()
  # 8 packed documents (the benchmark's lengths) in 16k, 128-row tiles, 128-key tiles.
  lengths = [2090, 3133, 62, 8, 1692, 5008, 2070, 2321]
  start = np.concatenate([[0], np.cumsum(lengths)])
  rows = np.arange(128)[:, None] * 128 + np.arange(128)
  doc = np.searchsorted(start, rows, side="right") - 1
  packed = rows[:, -1] // 128 - start[doc[:, 0]] // 128 + 1
  assert schedule.deal_imbalance(packed, 16, 132) > 1.4
  assert schedule.deal_imbalance(packed, 16, 132, by_work=True) < 1.01
  causal = np.arange(1, 129)
  assert schedule.deal_imbalance(causal, 16, 132, by_work=True) < 1.01


def test_mosaic_config_refuses_two_deals():
  with pytest.raises(ValueError, match="sorted_deal"):
    MosaicConfig(persistent=132, paired_deal=True, sorted_deal=True)


def test_mosaic_q_tiles_with_one_q_buffer_interpret(monkeypatch):
  """Several q tiles where a second Q buffer does not fit (d=256 on the GPU): the next
  tile's Q loads after the last tile's O has left the slot. 3 q tiles, 2 per CTA: the
  first CTA's second tile is past the end; the second CTA's ring of 2 slots runs 6
  steps over two tiles."""
  case = Case(b=1, t=260, s=190, n=1, k=1, h=64, dtype=jnp.bfloat16, q_lengths=[250])
  monkeypatch.setattr(MosaicConfig, "q_buffers", lambda self, *a, **kw: 1)
  cfg = dataclasses.replace(MosaicConfig.for_problem(case.t, case.s, 64), q_tiles_per_cta=2,
                            block_kv=64, stages=2)
  _check_forward_under(case, cfg)


@pytest.mark.parametrize("persistent, q_bufs, paired, by_work", [
    (2, 1, False, False), (64, None, False, False), (2, None, True, False),
    (3, 1, True, False), (64, None, True, False), (2, 1, False, True),
    (5, None, False, True)])
def test_mosaic_persistent_interpret(monkeypatch, persistent, q_bufs, paired, by_work):
  """A persistent grid with one Q buffer (d=256's SMEM: each tile's Q loads after the
  last tile's O has left it), over 2 batch rows of their own lengths and 2 heads (12 q
  tiles on 2 CTAs); and with more CTAs asked for than there are tiles (one each).
  ``paired``: the paired deal, whose 3 tiles a head make a pair and a middle tile (on 2
  CTAs, 2 pairs and 2 middles each; on 3, 3 CTAs' runs of 2 or 3 pairs and middles;
  with 64 asked for, 8 CTAs, one pair or middle each). ``by_work``: the sorted deal,
  whose order puts the two batch rows' tiles (of unequal lengths) side by side."""
  case = Case(b=2, t=260, s=190, n=2, k=1, h=64, dtype=jnp.bfloat16, q_lengths=[250, 70],
              kv_lengths=[190, 30], is_causal=True)
  if q_bufs is not None:
    monkeypatch.setattr(MosaicConfig, "q_buffers", lambda self, *a, **kw: q_bufs)
  cfg = dataclasses.replace(MosaicConfig.for_problem(case.t, case.s, 64), block_kv=64,
                            persistent=persistent, paired_deal=paired, sorted_deal=by_work)
  _check_forward_under(case, cfg)


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
