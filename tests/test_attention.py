"""The shared suite: every implementation against the independent reference.

Runs "xla" and "triton" (Pallas interpret mode on CPU) here; test_gpu.py reruns the
same checks at larger shapes on the GPU machine, "mosaic" included.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jflash
import reference
from helpers import Case, assert_close, assert_lse_close, rank4_pads

IMPLS = ["xla", "triton"]

CASES = {
    "plain": Case(),
    "causal": Case(is_causal=True),
    "cross_causal": Case(t=24, s=56, is_causal=True),
    "cross_long_q": Case(t=56, s=24, is_causal=True),
    "gqa": Case(n=4, k=2, is_causal=True),
    "mqa": Case(n=3, k=1),
    "window": Case(window=(8, 3)),
    "window_causal": Case(window=5, is_causal=True),
    "lengths": Case(q_lengths=[40, 17], kv_lengths=[23, 40]),
    "lengths_empty": Case(q_lengths=[40, 0], kv_lengths=[0, 33], is_causal=True),
    "packed_causal": Case(segments="packed", is_causal=True),
    "segment_pair": Case(t=24, s=40, segments="pair"),
    "softcap": Case(softcap=2.0, scale=0.9),
    "window_t_gt_s": Case(t=64, s=16, window=(4, 4)),
    "head_dim_80": Case(h=80, b=1, n=1, k=1),
    "head_dim_32_long": Case(h=32, b=1, t=200, s=136, n=1, k=1, is_causal=True),
    "decode_t1": Case(t=1, s=33, n=4, k=1),
    "single_key": Case(t=9, s=1),
    "bf16": Case(dtype=jnp.bfloat16, is_causal=True),
    "f16": Case(dtype=jnp.float16, window=(6, 0)),
    "bf16_packed_softcap": Case(dtype=jnp.bfloat16, segments="packed", softcap=5.0, n=4, k=1),
    "bias_full": Case(bias=(2, 2, 40, 40)),
    "bias_heads_gqa_causal": Case(n=4, k=2, bias=(1, 4, 40, 40), is_causal=True),
    "bias_keys_cross": Case(t=24, s=56, bias=(2, 1, 1, 56), kv_lengths=[56, 30]),
    "bias_rows_softcap": Case(bias=(1, 1, 40, 1), softcap=3.0),
    "mask_dense": Case(dense=(2, 2, 40, 40)),
    "mask_bcast_causal_window": Case(dense=(2, 1, 40, 40), is_causal=True, window=(9, 0)),
    "mask_blockdiag_tiles": Case(b=1, t=192, s=192, n=2, k=1, h=16, dense="blockdiag"),
    # Several 64-wide tiles per axis: tiles of other documents are skipped, tiles inside
    # one document run without the predicate (mask.segment_tile_ranges).
    "packed_tiles_causal": Case(b=2, t=192, s=192, n=2, k=1, h=16, segments="packed",
                                is_causal=True),
    "mask_bias_packed_bf16": Case(dtype=jnp.bfloat16, dense=(1, 1, 40, 40), bias=(2, 2, 40, 40),
                                  segments="packed"),
}


def run_impl(case: Case, impl: str):
  """out, lse, (dq, dk, dv[, dbias]) from jflash, differentiating sum(out * do)."""
  q, k, v, do = case.inputs()
  kw = case.kwargs()
  bias = case.bias_array()

  @jax.jit
  def f(q, k, v, bias):
    out, lse = jflash.dot_product_attention(q, k, v, bias, implementation=impl,
                                            return_residual=True, **kw)
    return out, lse

  (out, lse), vjp = jax.vjp(f, q, k, v, bias)
  grads = vjp((do, jnp.zeros_like(lse)))
  return out, lse, grads if bias is not None else grads[:3]


def run_reference(case: Case, dtype):
  q, k, v, do = case.inputs()
  args = (q, k, v) + (() if case.bias is None else (case.bias_array(),))

  @jax.jit  # one compiled program instead of op-by-op dispatch (fast on the GPU machine)
  def outputs_and_grads(mask, do, *args):
    f = lambda q, k, v, *bias: reference.attention(
        q, k, v, mask, scale=case.scale, softcap=case.softcap,
        bias=bias[0] if bias else None, dtype=dtype)[0]
    out, vjp = jax.vjp(f, *args)
    return out, vjp(do.astype(out.dtype))

  return outputs_and_grads(jnp.asarray(case.mask()), do, *args)


def check_case(case: Case, impl: str):
  out, lse, grads = run_impl(case, impl)
  ref_out, ref_grads = run_reference(case, jnp.float32)
  base_out, base_grads = run_reference(case, case.dtype)
  q, k, v, _ = case.inputs()
  np_out, np_lse = reference.attention_np64(q, k, v, case.mask(), scale=case.scale,
                                            softcap=case.softcap, bias=case.bias_array())
  assert out.dtype == case.dtype and out.shape == q.shape
  assert lse.dtype == jnp.float32 and lse.shape == q.shape[:-1]
  assert_close("out", out, np_out, base_out, case.dtype)
  assert_lse_close(lse, np_lse, case.dtype)
  inputs = (q, k, v) + (() if case.bias is None else (case.bias_array(),))
  for name, g, r, bse, x in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads, base_grads, inputs):
    assert g.dtype == x.dtype and g.shape == x.shape, name
    assert_close(name, g, r, bse, case.dtype)
  # Rows that see no key: exactly zero output, never NaN.
  empty = ~case.mask().any(-1)  # [B, T] or [B, N, T]
  if empty.ndim == 3:
    empty = np.transpose(empty, (0, 2, 1))  # -> [B, T, N], as out[..., 0]
  if empty.any():
    np.testing.assert_array_equal(np.asarray(out, np.float32)[empty], 0.0)
  return out, lse, grads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CASES))
def test_against_reference(name, impl):
  check_case(CASES[name], impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["plain", "causal", "gqa", "window", "lengths", "bf16"])
def test_matches_jax_nn(name, impl):
  """Against jax.nn.dot_product_attention(implementation="xla") on the arguments it shares."""
  case = CASES[name]
  assert case.shares_jax_nn_args()
  q, k, v, do = case.inputs()
  kw = case.kwargs()
  kw.pop("logits_soft_cap"), kw.pop("segment_ids")
  up = lambda x: x.astype(jnp.float32)

  def loss(f, q, k, v):
    return jnp.sum(f(q, k, v).astype(jnp.float32) * up(do))

  ours = lambda q, k, v: jflash.dot_product_attention(q, k, v, implementation=impl, **kw)
  theirs = lambda q, k, v: jax.nn.dot_product_attention(up(q), up(k), up(v), implementation="xla", **kw)
  g_ours = jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2))(q, k, v)
  g_theirs = jax.grad(functools.partial(loss, theirs), argnums=(0, 1, 2))(q, k, v)
  tol = 1e-4 if case.dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(up(ours(q, k, v)), theirs(q, k, v), atol=tol, rtol=tol)
  for a, b in zip(g_ours, g_theirs):
    np.testing.assert_allclose(up(a), b, atol=tol * 2, rtol=tol * 2)


@pytest.mark.parametrize("impl", IMPLS)
def test_rerun_is_bitwise_identical(impl):
  case = Case(n=4, k=2, is_causal=True, q_lengths=[40, 31], dtype=jnp.bfloat16, seed=3)
  a = run_impl(case, impl)
  b = run_impl(case, impl)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("impl", IMPLS)
def test_lse_cotangent(impl):
  """Gradients flow through the returned logsumexp too (d lse / d logits = p)."""
  case = Case(t=24, s=32, is_causal=True, kv_lengths=[32, 20])
  q, k, v, do = case.inputs()
  w = jax.random.normal(jax.random.PRNGKey(9), q.shape[:-1])
  kw = case.kwargs()

  def ours(q, k, v):
    out, lse = jflash.dot_product_attention(q, k, v, implementation=impl, return_residual=True, **kw)
    return jnp.sum(out * do) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w)

  def ref(q, k, v):
    out, lse = reference.attention(q, k, v, case.mask())
    return jnp.sum(out * do) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w)

  for a, b in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_unbatched_rank3(impl):
  case = Case(b=1, is_causal=True)
  q, k, v, _ = case.inputs()
  out3, lse3 = jflash.dot_product_attention(q[0], k[0], v[0], is_causal=True, implementation=impl,
                                            return_residual=True)
  ref_out, ref_lse = reference.attention_np64(q, k, v, case.mask())
  assert out3.shape == q.shape[1:] and lse3.shape == q.shape[1:-1]
  np.testing.assert_allclose(out3, ref_out[0], atol=2e-5)
  np.testing.assert_allclose(lse3, ref_lse[0], atol=2e-5)


@pytest.mark.parametrize("t, s", [(40, 33), (200, 136)])
def test_triton_makes_no_padded_copy_of_q_k_v(t, s):
  """fwd+bwd under "triton" at lengths that are not tile multiples pads no [B, L, N, D]
  array (its kernels mask the rows past T and S instead), and stays exact."""
  case = Case(b=2, t=t, s=s, n=2, k=1, h=64, is_causal=True)
  q, k, v, do = case.inputs()

  def fwd_bwd(q, k, v, do):
    out, pullback = jax.vjp(lambda q, k, v: jflash.dot_product_attention(
        q, k, v, is_causal=True, implementation="triton"), q, k, v)
    return out, pullback(do)

  assert rank4_pads(jax.make_jaxpr(fwd_bwd)(q, k, v, do).jaxpr) == []
  out, grads = fwd_bwd(q, k, v, do)
  ref_out, ref_grads = run_reference(case, jnp.float32)
  base_out, base_grads = run_reference(case, case.dtype)
  assert_close("out", out, ref_out, base_out, case.dtype)
  for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
    assert_close(name, g, r, b, case.dtype)


def test_default_implementation_on_cpu_is_xla():
  case = Case(is_causal=True)
  q, k, v, _ = case.inputs()
  a = jflash.dot_product_attention(q, k, v, is_causal=True)
  b = jflash.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  np.testing.assert_array_equal(a, b)


def _dropout_reference(case: Case, rate: float, rng):
  """Naive attention with the dropout factor written out densely from its definition
  (Case.dropout_factor); also the fraction of entries kept."""
  q, k, v, do = case.inputs()
  factor = case.dropout_factor(rate, rng)
  mask = jnp.asarray(case.mask())
  f = lambda q, k, v: reference.attention(q, k, v, mask, scale=case.scale, dropout=factor)[0]
  out, vjp = jax.vjp(f, q, k, v)
  return out, vjp(do), float((factor > 0).mean())


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_against_reference(impl):
  case = Case(b=2, t=40, s=33, n=4, k=2, is_causal=True, kv_lengths=[33, 20])
  rate, rng = 0.25, jax.random.PRNGKey(5)
  q, k, v, do = case.inputs()
  kw = case.kwargs()
  f = jax.jit(lambda q, k, v: jflash.dot_product_attention(
      q, k, v, implementation=impl, dropout_rate=rate, dropout_rng=rng, **kw))
  out, vjp = jax.vjp(f, q, k, v)
  grads = vjp(do)
  ref_out, ref_grads, kept = _dropout_reference(case, rate, rng)
  assert abs(kept - (1 - rate)) < 0.03, kept  # the hash keeps about 1 - rate of entries
  np.testing.assert_allclose(out, ref_out, atol=3e-5, rtol=3e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-5)
  # Same rng: same bits. Another rng: another mask.
  np.testing.assert_array_equal(np.asarray(f(q, k, v)), np.asarray(out))
  other = jflash.dot_product_attention(q, k, v, implementation=impl, dropout_rate=rate,
                                       dropout_rng=jax.random.PRNGKey(6), **kw)
  assert not np.allclose(np.asarray(other), np.asarray(out))


def test_dropout_is_the_same_in_every_implementation():
  case = Case(b=1, t=24, s=24, n=2, k=1, seed=4)
  q, k, v, _ = case.inputs()
  run = lambda impl: jflash.dot_product_attention(q, k, v, implementation=impl, dropout_rate=0.5,
                                                  dropout_rng=jax.random.PRNGKey(1))
  np.testing.assert_allclose(run("xla"), run("triton"), atol=2e-6, rtol=2e-6)
