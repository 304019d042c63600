"""Every pair of the attention features (issue 4's table, and causal) against the
independent reference: outputs, lse and every gradient (dq, dk, dv, dbias).

The features: a causal mask, a sliding window, soft-cap, an additive bias (its gradient
reduced to its own broadcast shape), a boolean mask, padding lengths (with a batch row
whose queries are all padding), packed documents (segment ids) and dropout. A pair
without dropout goes through test_fuzz.fuzz_check (test_attention.check_case: the
float64 numpy reference for out and lse, the f32 naive reference's autodiff for the
gradients, each within twice the error of the naive attention in the case's dtype), on
small tiles so that the problems span several in each axis. A pair with dropout is
checked against the naive reference with the dropout factor written out densely from its
definition (helpers.Case.dropout_factor: jflash._src.dropout.keep, the documented
counter-based hash), within the same bound, and its lse against the float64 one.

On CPU: "xla" and "triton" (Pallas interpret mode), float32. On the GPU (``gpu``):
"triton" in float32 and bfloat16, and "mosaic" (Hopper) in bfloat16 for the pairs it
serves (no bias, dense mask or dropout: those raise NotImplementedError naming the
feature, and implementation=None falls back to "triton", tests/test_mosaic.py).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jflash
import reference
from helpers import Case, assert_lse_close
from test_fuzz import fa_assert_close, fuzz_check

FEATURES = {
    "causal": dict(is_causal=True),
    "window": dict(window=(9, 4)),
    "softcap": dict(softcap=2.5),
    "bias": dict(bias=(2, 1, 48, 48)),
    "mask": dict(dense=(2, 1, 48, 48)),
    "lengths": dict(q_lengths=[48, 0], kv_lengths=[29, 48]),
    "segments": dict(segments="packed"),
    "dropout": {},  # dropout_rate / dropout_rng, passed by _check_dropout
}
PAIRS = list(itertools.combinations(FEATURES, 2))
PAIR_IDS = [f"{a}+{b}" for a, b in PAIRS]
# Tiles of 16 (the problems are 48 long: 3 tiles along each axis).
BLOCKS = {
    "xla": dict(block_q=16, block_k=16),
    "triton": {name: 16 for name in ("block_q", "block_k", "dkv_block_q", "dkv_block_k",
                                      "dq_block_q", "dq_block_k")},
}
MOSAIC_LACKS = {"bias", "mask", "dropout"}
RATE = 0.3


def _case(pair, **kw) -> Case:
  fields = dict(b=2, t=48, s=48, n=4, k=2, h=16, seed=len(pair[0]) * 7 + len(pair[1]))
  for name in pair:
    fields.update(FEATURES[name])
  fields.update(kw)
  return Case(**fields)


def _check_dropout(case: Case, impl: str):
  """out and every gradient, with dropout at RATE, against the naive reference with the
  same dropout factor (Case.dropout_factor) and the pair's other feature: within twice
  the naive reference's own error in the case's dtype (test_fuzz's bound, with its
  FlashAttention slack on half-precision gradients)."""
  rng = jax.random.PRNGKey(case.seed + 3)
  q, k, v, do = case.inputs()
  bias = case.bias_array()
  factor = case.dropout_factor(RATE, rng)
  mask = jnp.asarray(case.mask())
  kw = case.kwargs()

  def f(q, k, v, *bias):
    return jflash.dot_product_attention(q, k, v, *bias, implementation=impl,
                                        dropout_rate=RATE, dropout_rng=rng,
                                        return_residual=True, **kw)

  def ref(dtype):
    def attend(q, k, v, *bias):
      out = reference.attention(q, k, v, mask, scale=case.scale, softcap=case.softcap,
                                bias=bias[0] if bias else None, dtype=dtype,
                                dropout=factor)[0]
      return out.astype(case.dtype)
    return jax.jit(attend)

  args = (q, k, v) + (() if bias is None else (bias,))
  (out, lse), vjp = jax.vjp(jax.jit(f), *args)
  ref_out, ref_vjp = jax.vjp(ref(jnp.float32), *args)
  base_out, base_vjp = jax.vjp(ref(case.dtype), *args)  # the naive error in case.dtype
  assert 0.6 < float((factor > 0).mean()) < 0.8  # about 1 - RATE kept
  assert out.dtype == case.dtype and out.shape == q.shape
  close = fa_assert_close(case)
  close("out", out, ref_out, base_out, case.dtype)
  _, np_lse = reference.attention_np64(q, k, v, case.mask(), scale=case.scale,
                                       softcap=case.softcap, bias=bias)
  assert_lse_close(lse, np_lse, case.dtype)  # the softmax's, before dropout
  grads = vjp((do, jnp.zeros_like(lse)))
  names = ("dq", "dk", "dv", "dbias")
  for name, g, r, b, x in zip(names, grads, ref_vjp(do), base_vjp(do), args):
    assert g.dtype == x.dtype and g.shape == x.shape, name
    close(name, g, r, b, case.dtype)
  empty = ~case.mask().any(-1)  # rows that see no key: exactly 0, never NaN
  if empty.ndim == 3:
    empty = np.transpose(empty, (0, 2, 1))
  if empty.any():
    np.testing.assert_array_equal(np.asarray(out, np.float32)[empty], 0.0)


def _check(pair, impl: str, dtype=jnp.float32, blocks=None):
  case = _case(pair, dtype=dtype)
  if "dropout" in pair:
    _check_dropout(case, impl)
  else:
    fuzz_check(case, impl, blocks)


def test_every_pair_is_listed():
  assert len(PAIRS) == 28 and len(set(PAIRS)) == 28


@pytest.mark.parametrize("impl", ["xla", "triton"])
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_feature_pair(pair, impl):
  _check(pair, impl, blocks=BLOCKS[impl])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_feature_pair_triton_gpu(pair, dtype):
  _check(pair, "triton", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("pair", [p for p in PAIRS if not MOSAIC_LACKS & set(p)],
                         ids=[i for p, i in zip(PAIRS, PAIR_IDS) if not MOSAIC_LACKS & set(p)])
def test_feature_pair_mosaic_gpu(pair):
  if str(getattr(jax.devices()[0], "compute_capability", "")) != "9.0":
    pytest.skip("mosaic needs an sm90 GPU")
  _check(pair, "mosaic", jnp.bfloat16)
