"""Argument validation and numerical safety of ``jflash.dot_product_attention``.

Part 1: every bad argument is refused with a ValueError / TypeError /
NotImplementedError whose message names the argument, eagerly and at trace time under
jax.jit (never as an XLA runtime failure).

Part 2: numerically hard but valid inputs: rows that see no key (exact zeros, zero
gradients, nothing non-finite), logits in the thousands, and large-magnitude f16/bf16.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jflash
import reference
from helpers import Case, assert_close, rel_err

IMPLS = ["xla", "triton"]
B, T, S, N, K, H = 2, 8, 8, 2, 2, 16


def _arr(shape, dtype=jnp.float32):
  return jnp.ones(shape, dtype)


def _good():
  return _arr((B, T, N, H)), _arr((B, S, K, H)), _arr((B, S, K, H))


@dataclasses.dataclass(frozen=True)
class Bad:
  """A bad call: ``make() -> (q, k, v, kwargs)``, the exception and a regex it must match."""
  make: Callable[[], tuple[Any, Any, Any, dict]]
  exc: type
  match: str
  jit: bool = True  # False where the bad value cannot be passed through jax.jit


def _kw(**kwargs):
  return lambda: (*_good(), kwargs)


def _qkv(q=None, k=None, v=None, **kwargs):
  def make():
    gq, gk, gv = _good()
    return (gq if q is None else q(), gk if k is None else k(), gv if v is None else v(), kwargs)
  return make


_i32 = lambda *shape: jnp.zeros(shape, jnp.int32)

BAD = {
    # ---- query / key / value
    "query_rank_2": Bad(_qkv(q=lambda: _arr((T, H))), ValueError, r"query must have rank 3"),
    "query_rank_5": Bad(_qkv(q=lambda: _arr((1, B, T, N, H))), ValueError, r"query must have rank"),
    "key_rank_5": Bad(_qkv(k=lambda: _arr((1, B, S, K, H))), ValueError, r"key must have rank"),
    "value_rank_2": Bad(_qkv(v=lambda: _arr((S, H))), ValueError, r"value must have rank"),
    "rank_mismatch_q4_kv3": Bad(_qkv(k=lambda: _arr((S, K, H)), v=lambda: _arr((S, K, H))),
                                ValueError, r"query, key and value must have the same rank"),
    "rank_mismatch_q3_kv4": Bad(_qkv(q=lambda: _arr((T, N, H))), ValueError,
                                r"query, key and value must have the same rank"),
    "rank_mismatch_v": Bad(_qkv(v=lambda: _arr((S, K, H))), ValueError, r"same rank"),
    "head_dim_q_vs_kv": Bad(_qkv(k=lambda: _arr((B, S, K, 8)), v=lambda: _arr((B, S, K, 8))),
                            ValueError, r"query and key head dims differ"),
    "value_head_dim": Bad(_qkv(v=lambda: _arr((B, S, K, 8))), ValueError,
                          r"key and value must have the same shape"),
    "value_length": Bad(_qkv(v=lambda: _arr((B, S + 1, K, H))), ValueError,
                        r"key and value must have the same shape"),
    "value_heads": Bad(_qkv(v=lambda: _arr((B, S, 1, H))), ValueError,
                       r"key and value must have the same shape"),
    "batch_mismatch": Bad(_qkv(k=lambda: _arr((B + 1, S, K, H)), v=lambda: _arr((B + 1, S, K, H))),
                          ValueError, r"query and key batch sizes differ"),
    "heads_not_divisible": Bad(_qkv(q=lambda: _arr((B, T, 3, H))), ValueError,
                               r"query heads must be a multiple of key/value heads"),
    "more_kv_heads_than_q": Bad(_qkv(k=lambda: _arr((B, S, 4, H)), v=lambda: _arr((B, S, 4, H))),
                                ValueError, r"query heads must be a multiple of key/value heads"),
    "empty_query_length": Bad(_qkv(q=lambda: _arr((B, 0, N, H))), ValueError, r"empty dimension.*query"),
    "int_query": Bad(_qkv(q=lambda: _arr((B, T, N, H), jnp.int32)), TypeError, r"query\.dtype=int32"),
    "int_key_value": Bad(_qkv(k=lambda: _arr((B, S, K, H), jnp.int8), v=lambda: _arr((B, S, K, H), jnp.int8)),
                         TypeError, r"key\.dtype=int8"),
    "bool_value": Bad(_qkv(v=lambda: _arr((B, S, K, H), jnp.bool_)), TypeError, r"value\.dtype=bool"),
    "complex_query": Bad(_qkv(q=lambda: _arr((B, T, N, H), jnp.complex64)), TypeError, r"query\.dtype"),
    "mixed_dtypes": Bad(_qkv(q=lambda: _arr((B, T, N, H), jnp.bfloat16)), TypeError,
                        r"query, key and value must share a dtype"),
    "mixed_dtypes_value": Bad(_qkv(v=lambda: _arr((B, S, K, H), jnp.float16)), TypeError,
                              r"must share a dtype.*value\.dtype=.*float16"),
    "query_not_array": Bad(_qkv(q=lambda: 3.0), TypeError, r"query must be an array", jit=False),
    # ---- implementation
    "implementation_unknown": Bad(_kw(implementation="cudnn"), ValueError, r"implementation='cudnn'"),
    "implementation_case": Bad(_kw(implementation="XLA"), ValueError, r"implementation='XLA'"),
    "implementation_mosaic_cpu": Bad(_kw(implementation="mosaic"), NotImplementedError,
                                     r"implementation='mosaic'"),
    # ---- local_window_size
    "window_negative": Bad(_kw(local_window_size=-1), ValueError, r"local_window_size must be non-negative"),
    "window_pair_negative": Bad(_kw(local_window_size=(3, -2)), ValueError, r"local_window_size"),
    "window_float": Bad(_kw(local_window_size=2.5), TypeError, r"local_window_size"),
    "window_triple": Bad(_kw(local_window_size=(1, 2, 3)), TypeError, r"local_window_size"),
    "window_pair_float": Bad(_kw(local_window_size=(1.0, 2)), TypeError, r"local_window_size"),
    "window_bool": Bad(_kw(local_window_size=True), TypeError, r"local_window_size"),
    "window_str": Bad(_kw(local_window_size="4"), TypeError, r"local_window_size"),
    "window_array": Bad(_kw(local_window_size=jnp.array(3)), TypeError, r"local_window_size"),
    # ---- logits_soft_cap
    "softcap_zero": Bad(_kw(logits_soft_cap=0.0), ValueError, r"logits_soft_cap must be a positive"),
    "softcap_negative": Bad(_kw(logits_soft_cap=-30.0), ValueError, r"logits_soft_cap must be a positive"),
    "softcap_nan": Bad(_kw(logits_soft_cap=float("nan")), ValueError, r"logits_soft_cap"),
    # ---- is_causal / scale
    "is_causal_int": Bad(_kw(is_causal=1), TypeError, r"is_causal"),
    "is_causal_array": Bad(_kw(is_causal=jnp.array(True)), TypeError, r"is_causal"),
    "scale_array": Bad(_kw(scale=jnp.ones((2,))), TypeError, r"scale"),
    # ---- sequence lengths
    "q_lengths_float": Bad(_kw(query_seq_lengths=jnp.array([3.0, 4.0])), TypeError, r"query_seq_lengths"),
    "q_lengths_bool": Bad(_kw(query_seq_lengths=jnp.array([True, False])), TypeError, r"query_seq_lengths"),
    "q_lengths_shape": Bad(_kw(query_seq_lengths=_i32(B + 1)), ValueError, r"query_seq_lengths must have shape"),
    "q_lengths_2d": Bad(_kw(query_seq_lengths=_i32(B, 1)), ValueError, r"query_seq_lengths must have shape"),
    "q_lengths_scalar": Bad(_kw(query_seq_lengths=jnp.int32(3)), ValueError, r"query_seq_lengths"),
    "kv_lengths_float": Bad(_kw(key_value_seq_lengths=jnp.array([3.0, 4.0])), TypeError,
                            r"key_value_seq_lengths"),
    "kv_lengths_shape": Bad(_kw(key_value_seq_lengths=_i32(1)), ValueError,
                            r"key_value_seq_lengths must have shape"),
    # ---- segment ids
    "segments_shape": Bad(_kw(segment_ids=_i32(B, T + 1)), ValueError, r"segment_ids"),
    "segments_1d": Bad(_kw(segment_ids=_i32(T)), ValueError, r"segment_ids"),
    "segments_batch": Bad(_kw(segment_ids=_i32(B + 1, T)), ValueError, r"segment_ids"),
    "segments_float": Bad(_kw(segment_ids=jnp.zeros((B, T))), TypeError, r"segment_ids"),
    "segments_pair_kv_shape": Bad(_kw(segment_ids=(_i32(B, T), _i32(B, S + 2))), ValueError,
                                  r"segment_ids \(key/value\)"),
    "segments_triple": Bad(_kw(segment_ids=(_i32(B, T),) * 3), ValueError, r"segment_ids"),
    "segments_single_t_ne_s": Bad(
        _qkv(k=lambda: _arr((B, S + 4, K, H)), v=lambda: _arr((B, S + 4, K, H)), segment_ids=_i32(B, T)),
        ValueError, r"segment_ids.*T == S"),
    # ---- not supported yet
    "bias_bad_shape": Bad(_kw(bias=jnp.zeros((B, N, T, S + 1))), ValueError, r"bias\.shape"),
    "bias_rank5": Bad(_kw(bias=jnp.zeros((1, B, N, T, S))), ValueError, r"bias must have rank"),
    "bias_int": Bad(_kw(bias=jnp.zeros((B, N, T, S), jnp.int32)), TypeError, r"bias must be a float"),
    "mask_bad_shape": Bad(_kw(mask=jnp.ones((B, 3, T, S), bool)), ValueError, r"mask\.shape"),
    "mask_float": Bad(_kw(mask=jnp.ones((B, N, T, S))), TypeError, r"mask must be a boolean"),
    "dropout_without_rng": Bad(_kw(dropout_rate=0.1), ValueError, r"dropout_rng"),
    "dropout_rng_not_a_key": Bad(_kw(dropout_rate=0.5, dropout_rng="seed"), TypeError, r"dropout_rng"),
}


@pytest.mark.parametrize("impl", ["xla", "triton"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_argument_is_refused(name, impl):
  bad = BAD[name]
  q, k, v, kw = bad.make()
  kw = {"implementation": impl, **kw}
  with pytest.raises(bad.exc, match=bad.match):
    jflash.dot_product_attention(q, k, v, **kw)


def _split_traced(kw):
  """Array-valued keyword arguments become jit arguments (traced); the rest stay static."""
  is_arr = lambda x: isinstance(x, jax.Array) or (
      isinstance(x, tuple) and x and all(isinstance(y, jax.Array) for y in x))
  traced = {key: val for key, val in kw.items() if is_arr(val)}
  static = {key: val for key, val in kw.items() if not is_arr(val)}
  return traced, static


@pytest.mark.parametrize("name", [n for n, b in BAD.items() if b.jit])
def test_bad_argument_is_refused_at_trace_time_under_jit(name):
  """Inside jax.jit (arrays traced) the same error is raised while tracing."""
  bad = BAD[name]
  q, k, v, kw = bad.make()
  traced, static = _split_traced(kw)
  static.setdefault("implementation", "xla")
  f = jax.jit(lambda q, k, v, traced: jflash.dot_product_attention(q, k, v, **traced, **static))
  with pytest.raises(bad.exc, match=bad.match):
    f.trace(q, k, v, traced)  # tracing only: nothing is compiled or run
  with pytest.raises(bad.exc, match=bad.match):
    jax.eval_shape(f, q, k, v, traced)


def test_traced_scale_is_refused_by_name():
  q, k, v = _good()
  f = jax.jit(lambda q, k, v, s: jflash.dot_product_attention(q, k, v, scale=s))
  with pytest.raises(TypeError, match=r"scale must be a Python float"):
    f(q, k, v, 0.5)


def test_traced_window_is_refused_by_name():
  q, k, v = _good()
  f = jax.jit(lambda q, k, v, w: jflash.dot_product_attention(q, k, v, local_window_size=w))
  with pytest.raises(TypeError, match=r"local_window_size"):
    f(q, k, v, 3)


# Static float arguments: traced, unparsable or non-finite values are refused by name.

def test_traced_softcap_is_refused_by_name():
  q, k, v = _good()
  f = jax.jit(lambda q, k, v, c: jflash.dot_product_attention(q, k, v, logits_soft_cap=c))
  with pytest.raises(TypeError, match=r"logits_soft_cap"):
    f(q, k, v, 30.0)


def test_traced_dropout_rate_is_refused_by_name():
  q, k, v = _good()
  f = jax.jit(lambda q, k, v, r: jflash.dot_product_attention(q, k, v, dropout_rate=r))
  with pytest.raises((TypeError, NotImplementedError), match=r"dropout_rate"):
    f(q, k, v, 0.1)


@pytest.mark.parametrize("arg", ["scale", "logits_soft_cap"])
def test_string_float_argument_is_refused_by_name(arg):
  q, k, v = _good()
  with pytest.raises((TypeError, ValueError), match=arg):
    jflash.dot_product_attention(q, k, v, **{arg: "abc"})


def test_infinite_softcap_is_refused():
  q, k, v, _ = Case(b=1, t=8, s=8, n=2, k=2, h=16).inputs()
  with pytest.raises(ValueError, match="logits_soft_cap"):
    jflash.dot_product_attention(q, k, v, logits_soft_cap=math.inf, implementation="xla")


@pytest.mark.parametrize("rate", [-0.1, 1.0])
def test_dropout_rate_out_of_range_is_a_value_error(rate):
  q, k, v = _good()
  with pytest.raises(ValueError, match="dropout_rate"):
    jflash.dot_product_attention(q, k, v, dropout_rate=rate)


def test_errors_are_not_deferred_to_runtime():
  """A refused call raises before any XLA computation: lowering fails, not execution."""
  q, k, v = _good()
  f = jax.jit(lambda q, k, v: jflash.dot_product_attention(q, k, v, local_window_size=-3))
  with pytest.raises(ValueError, match="local_window_size"):
    f.lower(q, k, v)


# ----------------------------------------------------------------- numerical safety


def _run(case: Case, impl: str, q=None, k=None, v=None, do=None):
  """out, lse, (dq, dk, dv) of sum(out * do) through jflash, jitted."""
  q0, k0, v0, do0 = case.inputs()
  q, k, v, do = (a if a is not None else b for a, b in zip((q, k, v, do), (q0, k0, v0, do0)))
  kw = case.kwargs()

  @jax.jit
  def f(q, k, v, do):
    def loss(q, k, v):
      out, lse = jflash.dot_product_attention(q, k, v, implementation=impl, return_residual=True, **kw)
      return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)), (out, lse)
    (_, (out, lse)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return out, lse, grads
  return f(q, k, v, do)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _ref_run(q, k, v, do, mask, dtype=jnp.float32):
  def loss(q, k, v):
    out, lse = reference.attention(q, k, v, mask, dtype=dtype)
    return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)), (out, lse)
  (_, (out, lse)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
  return out, lse, grads


def _all_finite(*trees):
  for x in jax.tree.leaves(trees):
    x = np.asarray(jnp.asarray(x, jnp.float32))
    assert np.isfinite(x).all(), "non-finite values"


EMPTY_CASES = {
    # Batch row 1 has no keys at all; batch row 0 some padding.
    "kv_length_zero": Case(b=2, t=16, s=24, n=2, k=1, kv_lengths=[17, 0], seed=1),
    # T > S with a window: rows i > S - 1 + left (or past a row's key length) see nothing.
    "window_past_keys_causal": Case(b=2, t=36, s=12, n=2, k=2, window=(3, 0), is_causal=True,
                                    kv_lengths=[12, 5], seed=3),
    # Query ids that no key carries.
    "segments_absent": Case(b=2, t=16, s=24, n=2, k=2, segments="pair", seed=4),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(EMPTY_CASES))
def test_rows_without_visible_keys(name, impl):
  case = EMPTY_CASES[name]
  q, k, v, do = case.inputs()
  mask = case.mask()
  empty = ~mask.any(-1)  # [B, T]
  if name == "segments_absent":  # make some query ids absent from the keys
    q_ids, kv_ids = case.segment_ids()
    q_ids = q_ids.at[:, ::3].set(7)
    case = dataclasses.replace(case, segments=None)
    kw_segments = (q_ids, kv_ids)
    mask = reference.dense_mask(case.b, case.t, case.s, segment_ids=kw_segments)
    empty = ~mask.any(-1)
    out, lse, grads = _run_with_segments(q, k, v, do, kw_segments, impl)
  else:
    out, lse, grads = _run(case, impl)
  assert empty.any() and not empty.all(), "the case must have both empty and non-empty rows"
  _all_finite(out, grads)
  dq, dk, dv = grads
  np.testing.assert_array_equal(np.asarray(out)[empty], 0.0)
  np.testing.assert_array_equal(np.asarray(dq)[empty], 0.0)
  assert np.isneginf(np.asarray(lse)[empty]).all()
  assert np.isfinite(np.asarray(lse)[~empty]).all()
  # Keys that no query sees get exactly zero dK, dV.
  unseen = ~mask.any(1)  # [B, S]
  if unseen.any():
    np.testing.assert_array_equal(np.asarray(dk)[unseen], 0.0)
    np.testing.assert_array_equal(np.asarray(dv)[unseen], 0.0)
  ref_out, ref_lse, ref_grads = _ref_run(q, k, v, do, mask)
  np.testing.assert_allclose(out, ref_out, atol=5e-5, rtol=5e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-5)


def _run_with_segments(q, k, v, do, segment_ids, impl):
  @jax.jit
  def f(q, k, v, do, segment_ids):
    def loss(q, k, v):
      out, lse = jflash.dot_product_attention(q, k, v, implementation=impl, return_residual=True,
                                              segment_ids=segment_ids)
      return jnp.sum(out * do), (out, lse)
    (_, (out, lse)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return out, lse, grads
  return f(q, k, v, do, segment_ids)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_rows_empty(impl):
  """Every key padded away: all-zero output and gradients, lse all -inf, no NaN."""
  case = Case(b=2, t=16, s=16, n=2, k=2, kv_lengths=[0, 0], is_causal=True)
  out, lse, grads = _run(case, impl)
  _all_finite(out, grads)
  assert not np.asarray(out).any()
  assert not any(np.asarray(g).any() for g in grads)
  assert np.isneginf(np.asarray(lse)).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [False, True])
def test_logits_in_the_thousands(impl, causal):
  """q scaled x300 (f32): logits of several thousand; no overflow, still the reference."""
  case = Case(b=1, t=24, s=32, n=2, k=1, is_causal=causal, kv_lengths=[29], seed=5)
  q, k, v, do = case.inputs()
  q = 300.0 * q
  mask = case.mask()
  logits = np.einsum("btnh,bsnh->bnts", np.asarray(q), np.repeat(np.asarray(k), 2, 2)) / 4.0
  assert np.abs(logits).max() > 1000.0
  out, lse, grads = _run(case, impl, q=q)
  _all_finite(out, lse, grads)
  np_out, np_lse = reference.attention_np64(q, k, v, mask)
  ref_out, _, ref_grads = _ref_run(q, k, v, do, mask)
  assert_close("out", out, np_out, ref_out, jnp.float32)
  np.testing.assert_allclose(lse, np_lse, rtol=1e-6)
  # Gradients recompute p = exp(s - lse) from the stored f32 lse, whose ulp at |s| ~ 4000
  # is ~5e-4: p (hence dK, which also cancels p * (dp - delta)) carries errors of that
  # order, where the reference subtracts the exact row max. Bugs give O(1) errors.
  for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert rel_err(g, r) < 1e-3, (name, rel_err(g, r))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_large_magnitude_low_precision(impl, dtype):
  """Inputs of magnitude ~200 (q.k up to ~1e5, beyond f16's 65504): no overflow; close to
  the f32 reference computed from the same rounded inputs."""
  magnitude = 200.0
  case = Case(b=1, t=24, s=24, n=2, k=2, is_causal=True, dtype=dtype, seed=6)
  q, k, v, do = (x.astype(jnp.float32) for x in case.inputs())
  q, k, v = ((magnitude * x).astype(dtype) for x in (q, k, v))
  do = do.astype(dtype)
  up = lambda x: np.asarray(jnp.asarray(x, jnp.float32))
  assert np.abs(np.einsum("btnh,bsnh->bnts", up(q), up(k))).max() > 65504
  out, lse, grads = _run(case, impl, q=q, k=k, v=v, do=do)
  assert out.dtype == dtype
  _all_finite(out, lse, grads)
  mask = case.mask()
  ref_out, ref_lse, ref_grads = _ref_run(*(x.astype(jnp.float32) for x in (q, k, v, do)), mask)
  if dtype == jnp.float16:  # the test has teeth: naive attention in f16 overflows here
    naive_out = reference.attention(q, k, v, mask, dtype=jnp.float16)[0]
    assert not np.isfinite(up(naive_out)).all()
  # Output: within a few ulps of the f32 answer rounded to dtype.
  ulp = {jnp.dtype(jnp.float16): 2 ** -10, jnp.dtype(jnp.bfloat16): 2 ** -7}[jnp.dtype(dtype)]
  assert rel_err(up(out), ref_out) < 4 * ulp
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-3)
  # Gradients. The softmax is saturated (logits ~1e5 apart), so the true dQ, dK are ~0:
  # what is left is f32 round-off in dp - delta (~1e-7 * |do.v| ~ 1e-7 * magnitude)
  # amplified by |k| * scale, i.e. ~1e-6 * magnitude**2 in absolute terms. A real fault
  # (no max subtraction, a wrong ds) shows up as inf/NaN or as errors ~magnitude**2.
  atol = 1e-5 * magnitude ** 2
  for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert g.dtype == dtype
    err = np.abs(up(g) - np.asarray(r)).max()
    assert err <= atol + 2 * ulp * np.abs(np.asarray(r)).max(), (name, err)
