"""The split-K decode forward of the "triton" implementation (backends/triton/decode.py).

A few query tokens against a long KV cache take that path instead of the regular forward
kernel; the backward pass stays on the regular kernels. Checked against the independent
reference (tests/reference.py) in Pallas interpret mode here, at a realistic size on the
GPU machine (``-m gpu``).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jflash
import reference
from helpers import Case, assert_close, assert_lse_close
from jflash._src.backends.triton import decode
from jflash._src.backends.triton.config import DecodeConfig
from jflash._src.mask import MaskArrays, MaskSpec
from jflash._src.problem import Problem
from test_attention import check_case


class DocsCase(Case):
  """Packed documents in the cache (ids 0, 1, 2 in runs of 10, 20, S - 30); the query
  tokens of batch row b belong to document b + 1. Sorted ids: whole key tiles of other
  documents are skipped, tiles of the query's own document run without the predicate."""

  def segment_ids(self):
    kv = np.repeat(np.arange(3, dtype=np.int32), [10, 20, self.s - 30])
    q = np.repeat(np.arange(1, self.b + 1, dtype=np.int32)[:, None], self.t, axis=1)
    return jnp.asarray(q), jnp.asarray(np.broadcast_to(kv, (self.b, self.s)))


# Run under one small config (16-key tiles, 3 splits): at S=37 each split gets one tile,
# at S=200 four or five, and short caches leave splits empty.
SMALL = DecodeConfig(block_k=16, num_splits=3)
CASES = {
    "t1_s37_mqa_len0": Case(t=1, s=37, n=4, k=1, kv_lengths=[37, 0]),
    "t1_s200_gqa4": Case(t=1, s=200, n=8, k=2, kv_lengths=[200, 93]),
    "t2_s200_bf16_lengths": Case(t=2, s=200, n=8, k=2, dtype=jnp.bfloat16, q_lengths=[2, 1],
                                 kv_lengths=[131, 200]),
    "t4_s200_g1_window_softcap": Case(t=4, s=200, n=2, k=2, h=32, window=(1, 120), softcap=3.0,
                                      scale=0.4),
    "t4_s37_mqa_causal_bf16": Case(t=4, s=37, n=4, k=1, dtype=jnp.bfloat16, is_causal=True,
                                   kv_lengths=[2, 37]),
    "t2_s37_segments_h24": Case(t=2, s=37, n=4, k=2, h=24, segments="pair"),
    "t2_s37_sorted_docs": DocsCase(t=2, s=37, n=4, k=2, segments="docs", is_causal=False),
}

_reference = jax.jit(reference.attention, static_argnames=("scale", "softcap", "dtype"))


@pytest.fixture
def spy(monkeypatch):
  """Records decode.forward calls (q and k shapes); clears the jit caches so that a
  cached trace cannot hide whether the path is taken."""
  calls = []
  real = decode.forward

  def forward(p, q, k, v, arrays, cfg=None):
    calls.append((q.shape, k.shape))
    return real(p, q, k, v, arrays, cfg)

  monkeypatch.setattr(decode, "forward", forward)
  jax.clear_caches()
  yield calls
  jax.clear_caches()


def _triton(case: Case):
  return jax.jit(functools.partial(jflash.dot_product_attention, implementation="triton",
                                   return_residual=True, **case.kwargs()))


def check_forward(case: Case, spy):
  q, k, v, _ = case.inputs()
  f = _triton(case)
  out, lse = f(q, k, v)
  assert spy and set(spy) == {(q.shape, k.shape)}, "the decode path was not taken"
  np_out, np_lse = reference.attention_np64(q, k, v, case.mask(), scale=case.scale,
                                            softcap=case.softcap)
  base, _ = _reference(q, k, v, jnp.asarray(case.mask()), scale=case.scale,
                       softcap=case.softcap, dtype=case.dtype)
  assert out.dtype == case.dtype and out.shape == q.shape and lse.shape == q.shape[:-1]
  assert_close("out", out, np_out, base, case.dtype)
  assert_lse_close(lse, np_lse, case.dtype)
  empty = ~case.mask().any(-1)  # [B, T]: rows with no visible key give 0, never NaN
  np.testing.assert_array_equal(np.asarray(out, np.float32)[empty], 0.0)
  for x, y in zip(f(q, k, v), (out, lse)):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


class TestSplits:
  """The public call under SMALL: several splits per (batch, kv head)."""

  @pytest.fixture(autouse=True, scope="class")
  def small_config(self):
    with decode.settings(config=SMALL):
      yield

  @pytest.mark.parametrize("name", list(CASES))
  def test_against_reference(self, name, spy):
    check_forward(CASES[name], spy)


def test_default_config_against_reference(spy):
  check_forward(Case(t=1, s=150, n=4, k=2, dtype=jnp.bfloat16, kv_lengths=[150, 61]), spy)


def test_splits_are_exact_and_balanced_for_any_cache_length():
  """The kernel itself (no merge into the public layout), with cache lengths that leave
  most of 8 splits empty; its lse is jflash's internal one ([B, N, T])."""
  case = Case(b=4, t=1, s=70, n=4, k=2, h=16, kv_lengths=[70, 17, 1, 0])
  q, k, v, _ = case.inputs()
  p = Problem(mask=MaskSpec(q_len=1, kv_len=70), scale=0.25, implementation="triton",
              interpret=True)
  arrays = MaskArrays(q_valid=jnp.ones((4,), jnp.int32),
                      kv_valid=jnp.asarray(case.kv_lengths, jnp.int32))
  run = jax.jit(lambda cfg: decode.forward(p, q, k, v, arrays, cfg), static_argnums=0)
  outs = [run(DecodeConfig(block_k=16, num_splits=n)) for n in (2, 8)]
  np_out, np_lse = reference.attention_np64(q, k, v, case.mask(), scale=0.25)
  internal_lse = np.where(np.isneginf(np_lse), np.inf, np_lse)  # +inf: no visible key
  for out, lse in outs:
    np.testing.assert_allclose(out, np_out, atol=2e-6)
    np.testing.assert_allclose(jnp.swapaxes(lse, 1, 2), internal_lse, atol=2e-6)
  np.testing.assert_array_equal(outs[1][0][3], 0.0)


def test_gradients_through_the_decode_forward(spy):
  """Backward runs the regular kernels from the decode path's lse: dq, dk, dv and the
  lse itself against the reference's autodiff (check_case of the shared suite)."""
  check_case(Case(t=2, s=45, n=4, k=1, kv_lengths=[45, 20], softcap=4.0), "triton")
  assert spy and spy[0][0][1] == 2


def test_decode_path_choice(spy):
  """Short queries without bias/mask/dropout take it; others keep the regular kernels."""
  case = Case(t=1, s=40, n=4, k=2)
  q, k, v, _ = case.inputs()
  spec = MaskSpec(q_len=1, kv_len=40)
  p = Problem(mask=spec, scale=0.25, implementation="triton", interpret=True)
  arrays = MaskArrays(q_valid=jnp.ones((2,), jnp.int32), kv_valid=jnp.full((2,), 40, jnp.int32))
  assert decode.applies(p, q, k, None, arrays)
  assert not decode.applies(p, q, k, jnp.zeros((1, 1, 1, 40)), arrays)
  assert not decode.applies(p, q, k, None, MaskArrays(arrays.q_valid, arrays.kv_valid,
                                                       dense=jnp.ones((1, 1, 1, 40), bool)))
  assert not decode.applies(Problem(mask=spec, scale=0.25, dropout_rate=0.1), q, k, None, arrays)
  long_q = jnp.zeros((2, DecodeConfig.MAX_Q_LEN + 1, 4, 16))
  assert not decode.applies(p, long_q, k, None, arrays)
  many_heads = jnp.zeros((2, 1, DecodeConfig.MAX_ROWS + 1, 16))
  assert not decode.applies(p, many_heads, k[:, :, :1], None, arrays)
  with decode.settings(enabled=False):
    assert not decode.applies(p, q, k, None, arrays)
    regular = jflash.dot_product_attention(q, k, v, implementation="triton")
  assert not spy
  out = jflash.dot_product_attention(q, k, v, implementation="triton")
  assert spy and set(spy) == {(q.shape, k.shape)}
  np.testing.assert_allclose(out, regular, atol=1e-6)


def test_default_config_heuristic():
  # One token, GQA 32/8, d=128 on 132 SMs: splits fill the GPU at 32k, not at 1k.
  long = DecodeConfig.for_problem(1, 8, 32768, 16, 128, num_sms=132)
  assert long.block_k == 64 and long.num_splits == 66 and long.num_warps == 4
  assert DecodeConfig.for_problem(8, 8, 32768, 16, 128).num_splits == 9
  assert DecodeConfig.for_problem(1, 8, 1024, 16, 128).num_splits == 4
  assert DecodeConfig.for_problem(1, 1, 37, 16, 16).num_splits == 1
  assert DecodeConfig.for_problem(1, 1, 37, 16, 16).block_k == 64


@pytest.mark.parametrize("window", [None, 2])
def test_nnx_decode_takes_the_decode_path(window, spy):
  """jflash.nnx decoding runs on the decode path with implementation="triton" (a token
  against the cache prefix, key_value_seq_lengths = cache index; with a window, against
  the window's slab of the cache, cut by segment ids) and matches a full causal pass."""
  b, t, f, heads = 2, 5, 32, 4
  x = jax.random.normal(jax.random.PRNGKey(3), (b, t, f), jnp.float32)
  make = lambda impl: jflash.nnx.MultiHeadAttention(
      heads, f, num_kv_heads=2, is_causal=True, logits_soft_cap=5.0, implementation=impl,
      local_window_size=None if window is None else (window, 0), rngs=nnx.Rngs(4))
  full = make("xla")(x)
  model = make("triton")
  model.init_cache(x.shape)
  chex.clear_trace_counter()

  @nnx.jit
  @chex.assert_max_traces(n=1)
  def step(m, tok):
    return m(tok, decode=True)

  outs = [step(model, x[:, i:i + 1]) for i in range(t)]
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5, rtol=2e-5)
  # Traced once: the new token against itself (S=1) and against the cache (S=t) or the
  # window's slab (S=window).
  assert {k_shape[1] for _, k_shape in spy} == {1, t if window is None else window}


# ---------------------------------------------------------------------------------------
# GPU (pytest -m gpu): a realistic decode step.


@pytest.mark.gpu
def test_gpu_decode_realistic_size(spy):
  """B=4, N=32, K=8, H=128, S=32k, one bf16 token, per-batch cache lengths."""
  case = Case(b=4, t=1, s=32768, n=32, k=8, h=128, dtype=jnp.bfloat16,
              kv_lengths=[32768, 20000, 77, 0])
  q, k, v, _ = case.inputs()
  f = _triton(case)
  out, lse = f(q, k, v)
  assert spy, "the decode path was not taken"
  mask = jnp.asarray(case.mask())
  # At T=1 the naive reference is small ([B, N, 1, S] logits): f32 is the truth, bf16 the
  # baseline for the tolerance.
  ref = jax.jit(functools.partial(reference.attention, dtype=jnp.float32))
  base = jax.jit(functools.partial(reference.attention, dtype=jnp.bfloat16))
  exp_out, exp_lse = ref(q, k, v, mask)
  base_out, _ = base(q, k, v, mask)
  assert_close("out", out, exp_out, base_out, case.dtype)
  assert_lse_close(lse, exp_lse, case.dtype)
  np.testing.assert_array_equal(np.asarray(out[3], np.float32), 0.0)
  again, _ = f(q, k, v)
  np.testing.assert_array_equal(np.asarray(again, np.float32), np.asarray(out, np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    Case(b=2, t=1, s=3000, n=8, k=2, h=128, dtype=jnp.bfloat16, kv_lengths=[3000, 1234]),
    Case(b=2, t=4, s=2500, n=16, k=2, h=64, dtype=jnp.float16, window=(0, 900)),
    Case(b=1, t=2, s=1999, n=4, k=1, h=96, softcap=30.0, segments="pair"),
], ids=["bf16_t1", "f16_t4_window", "f32_d96_segments"])
def test_gpu_decode_with_gradients(case, spy):
  check_case(case, "triton")
  assert spy
