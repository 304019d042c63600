"""Shared test helpers: random inputs, dtype-keyed tolerances, and comparisons."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

import reference

# Relative error allowed on top of twice the error of naive attention in the same dtype.
ATOL = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 2e-3, jnp.dtype(jnp.float16): 5e-4}


@dataclasses.dataclass(frozen=True)
class Case:
  """One attention problem: shapes, dtype and the jflash keyword arguments."""
  b: int = 2
  t: int = 40
  s: int = 40
  n: int = 2
  k: int = 2
  h: int = 16
  dtype: Any = jnp.float32
  is_causal: bool = False
  window: Any = None
  q_lengths: Any = None
  kv_lengths: Any = None
  segments: Any = None  # "packed" (self attention) or "pair"
  softcap: float | None = None
  scale: float | None = None
  bias: Any = None  # None, or the shape of a bias broadcastable to [B, N, T, S]
  dense: Any = None  # None, or the shape of a random boolean mask (True = attend)
  seed: int = 0
  docs: int = 4  # documents per batch row of segments="packed"

  def inputs(self):
    ks = jax.random.split(jax.random.PRNGKey(self.seed), 4)
    q = jax.random.normal(ks[0], (self.b, self.t, self.n, self.h), jnp.float32)
    k = jax.random.normal(ks[1], (self.b, self.s, self.k, self.h), jnp.float32)
    v = jax.random.normal(ks[2], (self.b, self.s, self.k, self.h), jnp.float32)
    do = jax.random.normal(ks[3], (self.b, self.t, self.n, self.h), jnp.float32)
    return tuple(x.astype(self.dtype) for x in (q, k, v, do))

  def segment_ids(self):
    if self.segments is None:
      return None
    rng = np.random.default_rng(self.seed + 7)

    def packed(length):
      # Sorted ids: documents of random lengths, as in packed training batches.
      cuts = np.sort(rng.integers(0, length, size=(self.b, self.docs - 1)), axis=1)
      pos = np.arange(length)[None, :]
      return (pos[:, :, None] >= cuts[:, None, :]).sum(-1).astype(np.int32)

    if self.segments == "packed":
      return jnp.asarray(packed(self.t))
    q_ids = rng.integers(0, 3, size=(self.b, self.t)).astype(np.int32)
    kv_ids = rng.integers(0, 3, size=(self.b, self.s)).astype(np.int32)
    return (jnp.asarray(q_ids), jnp.asarray(kv_ids))

  def bias_array(self):
    if self.bias is None:
      return None
    return jax.random.normal(jax.random.PRNGKey(self.seed + 11), self.bias, jnp.float32).astype(self.dtype)

  def dense_array(self):
    if self.dense is None:
      return None
    if self.dense == "blockdiag":
      # Diagonal blocks 48 wide: with 64-wide kernel tiles some tiles are all False
      # (and must be skipped), some partly visible.
      i, j = np.arange(self.t)[:, None], np.arange(self.s)[None, :]
      return jnp.asarray((i // 48 == j // 48)[None, None])
    return jax.random.bernoulli(jax.random.PRNGKey(self.seed + 13), 0.7, self.dense)

  def kwargs(self):
    kw = dict(is_causal=self.is_causal, local_window_size=self.window, scale=self.scale,
              logits_soft_cap=self.softcap, segment_ids=self.segment_ids(),
              mask=self.dense_array())
    if self.q_lengths is not None:
      kw["query_seq_lengths"] = jnp.asarray(self.q_lengths, jnp.int32)
    if self.kv_lengths is not None:
      kw["key_value_seq_lengths"] = jnp.asarray(self.kv_lengths, jnp.int32)
    return kw

  def dropout_factor(self, rate: float, rng):
    """f32 ``[B, N, T, S]``: what dropout at ``rate`` with ``rng`` multiplies each
    probability by (0 where dropped, 1 / (1 - rate) where kept), written out densely from
    its definition (jflash._src.dropout.keep, the documented counter-based hash)."""
    from jflash._src import dropout as dropout_def
    seed = dropout_def.seed_from_rng(rng)
    kept = dropout_def.keep(seed, jnp.arange(self.b)[:, None, None, None],
                            jnp.arange(self.n)[None, :, None, None],
                            jnp.arange(self.t)[:, None], jnp.arange(self.s)[None, :], rate)
    return jnp.where(kept, 1.0 / (1.0 - rate), 0.0)

  def mask(self):
    """bool[B, T, S], or [B, N, T, S] when a dense mask is part of the case."""
    return reference.dense_mask(
        self.b, self.t, self.s, is_causal=self.is_causal, window=self.window,
        q_lengths=self.q_lengths, kv_lengths=self.kv_lengths, segment_ids=self.segment_ids(),
        n=self.n, extra=self.dense_array())

  def shares_jax_nn_args(self) -> bool:
    """jax.nn supports everything but soft-cap and segment ids, and differs from jflash on
    rows that see no key (unless query padding, which both zero, emptied them)."""
    no_q_pad = dataclasses.replace(self, q_lengths=None)
    return (self.softcap is None and self.segments is None and self.dense is None
            and bool(no_q_pad.mask().any(-1).all()))


def rel_err(actual, expected) -> float:
  a = np.asarray(actual, np.float64)
  e = np.asarray(expected, np.float64)
  return float(np.abs(a - e).max() / max(1.0, np.abs(e).max()))


def assert_close(name, actual, expected, baseline, dtype):
  """``actual`` within 2x the error of ``baseline`` (naive attention in ``dtype``) + atol."""
  actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  assert np.isfinite(actual).all(), f"{name}: non-finite values"
  err = rel_err(actual, expected)
  bound = 2 * rel_err(baseline, expected) + ATOL[jnp.dtype(dtype)]
  assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


def assert_lse_close(actual, expected, dtype):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  empty = np.isneginf(expected)
  np.testing.assert_array_equal(np.isneginf(actual), empty, err_msg="lse: -inf rows differ")
  tol = {jnp.dtype(jnp.float32): 1e-5}.get(jnp.dtype(dtype), 2e-2)
  np.testing.assert_allclose(actual[~empty], expected[~empty], atol=tol, rtol=tol)


def rank4_pads(jaxpr) -> list[tuple[int, ...]]:
  """The output shapes of every ``pad`` of a rank-4 array (Q, K, V, dO or an output) in
  ``jaxpr`` and the jaxprs nested in it."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pad" and eqn.outvars[0].aval.ndim == 4:
      found.append(tuple(eqn.outvars[0].aval.shape))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += rank4_pads(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += rank4_pads(sub)
  return found
