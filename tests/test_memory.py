"""Memory: jflash's temporaries grow linearly in the sequence length, jax.nn's quadratically.

Measured without running anything: ``jax.jit(f).lower(...).compile().memory_analysis()``
reports the bytes of temporaries XLA allocates for the compiled program (arguments and
outputs excluded). On CPU that is the real buffer plan of the "xla" implementation.
"triton" on CPU runs in Pallas interpret mode, whose buffers are the interpreter's, so it
is measured only on a GPU (``@pytest.mark.gpu``, skipped here by conftest.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jflash

SEQ_LENS = (1024, 2048, 4096)
B, N, H = 1, 2, 32


def _attn(kind, is_causal):
  if kind == "jax.nn":
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=is_causal,
                                                        implementation="xla")
  return lambda q, k, v: jflash.dot_product_attention(q, k, v, is_causal=is_causal,
                                                      implementation=kind)


def temp_bytes(kind, s, *, is_causal=True, backward=True, dtype=jnp.float32, h=H):
  """Bytes of temporaries of the compiled program (fwd, or fwd + bwd when ``backward``)."""
  attn = _attn(kind, is_causal)
  x = jax.ShapeDtypeStruct((B, s, N, h), dtype)

  def loss(q, k, v):
    return jnp.sum(attn(q, k, v).astype(jnp.float32) ** 2)

  f = jax.grad(loss, (0, 1, 2)) if backward else attn
  compiled = jax.jit(f).lower(x, x, x).compile()
  stats = compiled.memory_analysis()
  if stats is None:  # some backends/plugins do not implement it
    pytest.skip(f"memory_analysis() is not available on {jax.default_backend()}")
  return int(stats.temp_size_in_bytes)


def _growth(kind, **kw):
  temps = [temp_bytes(kind, s, **kw) for s in SEQ_LENS]
  # ratio: temp(4S)/temp(2S), ~2 for linear, ~4 for quadratic, but a constant part (e.g.
  # fixed-size tiles) pulls it toward 1. The ratio of successive increments has no
  # constant part: 2 for linear, 4 for quadratic growth.
  ratio = temps[2] / temps[1]
  increments = (temps[2] - temps[1]) / max(temps[1] - temps[0], 1)
  return temps, ratio, increments


def _score_matrix_bytes(s, dtype=jnp.float32):
  return B * N * s * s * jnp.dtype(dtype).itemsize


def _assert_linear(kind, **kw):
  temps, ratio, increments = _growth(kind, **kw)
  msg = f"{kind} {kw}: temp bytes {dict(zip(SEQ_LENS, temps))}"
  assert ratio <= 2.3, msg
  assert increments <= 2.5, msg
  # And small in absolute terms: well under one [B, N, S, S] f32 score matrix.
  assert temps[-1] < _score_matrix_bytes(SEQ_LENS[-1]) / 4, msg
  return temps


@pytest.mark.parametrize("is_causal", [False, True])
def test_xla_fwd_bwd_memory_is_linear(is_causal):
  _assert_linear("xla", is_causal=is_causal, backward=True)


def test_xla_forward_memory_is_linear():
  _assert_linear("xla", is_causal=False, backward=False)


def test_jax_nn_memory_is_quadratic():
  """The control: jax.nn's XLA attention materialises [B, N, T, S] scores (and their
  gradient), so the same measurement shows quadratic growth."""
  temps, ratio, increments = _growth("jax.nn", is_causal=True, backward=True)
  msg = f"jax.nn: temp bytes {dict(zip(SEQ_LENS, temps))}"
  assert ratio >= 3.0, msg
  assert increments >= 3.5, msg
  assert temps[-1] >= _score_matrix_bytes(SEQ_LENS[-1]), msg


def test_xla_uses_far_less_memory_than_jax_nn():
  s = SEQ_LENS[-1]
  ours = temp_bytes("xla", s)
  theirs = temp_bytes("jax.nn", s)
  assert ours * 10 < theirs, (ours, theirs)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["triton", "xla"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_gpu_fwd_bwd_memory_is_linear(kind, is_causal):
  """On the GPU machine: the real buffer plan of the Triton kernels (and of "xla")."""
  _assert_linear(kind, is_causal=is_causal, backward=True)
  _assert_linear(kind, is_causal=is_causal, backward=True, dtype=jnp.bfloat16, h=64)


@pytest.mark.gpu
def test_gpu_jax_nn_memory_is_quadratic():
  temps, ratio, _ = _growth("jax.nn", is_causal=True, backward=True)
  assert ratio >= 3.0, temps
