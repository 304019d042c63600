"""The shared checks at GPU sizes, on the GPU machine (``pytest -m gpu``).

Same independent reference and tolerances as test_attention.py, on compiled kernels:
multi-tile sequences, tails that are not tile multiples, every feature, every dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jflash
from helpers import Case
from test_attention import check_case, run_impl

pytestmark = pytest.mark.gpu

GPU_CASES = {
    "bf16_d128": Case(b=2, t=1024, s=1024, n=4, k=4, h=128, dtype=jnp.bfloat16),
    "bf16_d64_causal": Case(b=2, t=1024, s=1024, n=4, k=4, h=64, dtype=jnp.bfloat16, is_causal=True),
    "bf16_d128_causal_tail": Case(b=1, t=1000, s=1000, n=4, k=2, h=128, dtype=jnp.bfloat16, is_causal=True),
    "f16_cross": Case(b=2, t=300, s=777, n=4, k=1, h=64, dtype=jnp.float16),
    "f32_d32": Case(b=1, t=257, s=300, n=2, k=2, h=32, is_causal=True),
    # f32 tiles with a bias and a mask at d=128: the shared-memory fit (config.py) must
    # shrink the pipeline, or Triton refuses to launch (a GPU fuzz find).
    "f32_d128_bias_mask": Case(b=1, t=300, s=300, n=2, k=2, h=128, bias=(1, 2, 300, 300),
                               dense=(1, 1, 300, 300), is_causal=True),
    "bf16_d80": Case(b=1, t=512, s=512, n=2, k=2, h=80, dtype=jnp.bfloat16, is_causal=True),
    "bf16_d96_window": Case(b=1, t=600, s=600, n=2, k=2, h=96, dtype=jnp.bfloat16, window=(100, 20)),
    "bf16_d256": Case(b=1, t=512, s=512, n=2, k=2, h=256, dtype=jnp.bfloat16, is_causal=True),
    "bf16_window_causal": Case(b=1, t=2048, s=2048, n=2, k=1, h=128, dtype=jnp.bfloat16, window=256, is_causal=True),
    "bf16_lengths": Case(b=3, t=700, s=900, n=2, k=2, h=64, dtype=jnp.bfloat16,
                         q_lengths=[700, 123, 0], kv_lengths=[0, 900, 301]),
    "bf16_packed": Case(b=2, t=1024, s=1024, n=4, k=2, h=128, dtype=jnp.bfloat16, segments="packed",
                        is_causal=True),
    "bf16_softcap": Case(b=1, t=512, s=512, n=2, k=2, h=128, dtype=jnp.bfloat16, softcap=20.0),
    "f16_decode": Case(b=4, t=1, s=1500, n=8, k=1, h=128, dtype=jnp.float16),
    "bf16_bias_heads": Case(b=2, t=512, s=640, n=4, k=2, h=128, dtype=jnp.bfloat16,
                            bias=(1, 4, 512, 640), is_causal=True),
    "bf16_bias_keys": Case(b=2, t=300, s=400, n=2, k=2, h=64, dtype=jnp.bfloat16, bias=(2, 1, 1, 400)),
    "bf16_dense_mask": Case(b=1, t=512, s=512, n=2, k=1, h=128, dtype=jnp.bfloat16,
                            dense=(1, 2, 512, 512)),
    "bf16_blockdiag_mask": Case(b=1, t=700, s=700, n=2, k=2, h=64, dtype=jnp.bfloat16,
                                dense="blockdiag", softcap=30.0),
}


@pytest.mark.parametrize("name", list(GPU_CASES))
def test_triton_against_reference(name):
  check_case(GPU_CASES[name], "triton")


@pytest.mark.parametrize("name", ["bf16_d128", "bf16_lengths", "bf16_packed"])
def test_xla_against_reference(name):
  check_case(GPU_CASES[name], "xla")


def test_triton_dropout_matches_xla():
  case = Case(b=2, t=512, s=512, n=4, k=2, h=128, dtype=jnp.bfloat16, is_causal=True)
  q, k, v, do = case.inputs()

  def run(impl):
    f = lambda q, k, v: jflash.dot_product_attention(
        q, k, v, is_causal=True, implementation=impl, dropout_rate=0.2,
        dropout_rng=jax.random.PRNGKey(7))
    out, vjp = jax.vjp(jax.jit(f), q, k, v)
    return (out,) + vjp(do)

  for a, b in zip(run("triton"), run("xla")):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.isfinite(a).all()
    assert np.abs(a - b).max() <= 2e-2 * max(1.0, np.abs(b).max())


def test_triton_rerun_is_bitwise_identical():
  case = GPU_CASES["bf16_packed"]
  a, b = run_impl(case, "triton"), run_impl(case, "triton")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_default_implementation_on_gpu_runs_and_is_exact():
  """None is mosaic on Hopper (for what it supports), triton elsewhere: bit for bit."""
  case = GPU_CASES["bf16_d64_causal"]
  q, k, v, _ = case.inputs()
  hopper = str(getattr(jax.devices()[0], "compute_capability", "")) == "9.0"
  a = jflash.dot_product_attention(q, k, v, is_causal=True)
  b = jflash.dot_product_attention(q, k, v, is_causal=True,
                                   implementation="mosaic" if hopper else "triton")
  np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_default_implementation_falls_back_to_triton_for_a_bias():
  """mosaic has no bias: None must serve it with triton, not fail."""
  case = GPU_CASES["bf16_bias_keys"]
  q, k, v, _ = case.inputs()
  bias = case.bias_array()
  a = jflash.dot_product_attention(q, k, v, bias)
  b = jflash.dot_product_attention(q, k, v, bias, implementation="triton")
  np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
