"""Sharded inputs under jit, on 8 fake CPU devices (XLA_FLAGS in conftest.py).

Batch/head sharding must run the kernels shard by shard with no collectives and keep
the input's sharding; sequence sharding must still be correct (XLA gathers first).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jflash
from jflash._src import ring as ring_lib
import reference
from helpers import Case, assert_lse_close

COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "collective-permute", "reduce-scatter")

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")


def _mesh():
  return jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def _fns(impl, case):
  kw = case.kwargs()
  bias = case.bias_array()

  def f(q, k, v, bias):
    return jflash.dot_product_attention(q, k, v, bias, implementation=impl, **kw)

  def loss(q, k, v, bias, do):
    return jnp.sum(f(q, k, v, bias) * do)

  return jax.jit(f), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3) if bias is not None else (0, 1, 2))), bias


def _collectives(compiled) -> list[str]:
  text = compiled.as_text()
  return [c for c in COLLECTIVES if c in text]


LAYOUTS = {
    "batch": P("data", None, None, None),
    "heads": P(None, None, "model", None),
    "batch_and_heads": P("data", None, "model", None),
}


@pytest.mark.parametrize("impl", ["xla", "triton"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_batch_head_sharding_runs_locally(impl, layout):
  case = Case(b=4, t=24, s=24, n=4, k=2, h=16, is_causal=True, q_lengths=[24, 10, 24, 3],
              segments="packed", bias=(4, 4, 24, 24))
  q, k, v, do = case.inputs()
  mesh = _mesh()
  spec = LAYOUTS[layout]
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, spec))
  bias_spec = P(spec[0], spec[2], None, None)
  f, g, bias = _fns(impl, case)
  sq, sk, sv, sdo = (shard(x) for x in (q, k, v, do))
  sbias = jax.device_put(bias, NamedSharding(mesh, bias_spec))

  out = f(sq, sk, sv, sbias)
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, spec), out.ndim)
  assert _collectives(f.lower(sq, sk, sv, sbias).compile()) == []
  grads = g(sq, sk, sv, sbias, sdo)
  assert _collectives(g.lower(sq, sk, sv, sbias, sdo).compile()) == []
  assert grads[0].sharding.is_equivalent_to(NamedSharding(mesh, spec), 4)

  ref_out = f(q, k, v, bias)
  ref_grads = g(q, k, v, bias, do)
  if impl == "triton":
    # Each kernel program sees the same tiles sharded or not: bitwise equal.
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))
  else:
    # XLA's CPU einsums block differently for a batch of 1 than of 4.
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-6, atol=1e-6)
  for a, b in zip(grads, ref_grads):
    # XLA may fuse the cotangent arithmetic around the kernels differently in the
    # sharded program: equal up to f32 rounding.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_sequence_sharded_inputs_are_correct(impl):
  case = Case(b=2, t=32, s=32, n=2, k=2, h=16, is_causal=True)
  q, k, v, do = case.inputs()
  mesh = _mesh()
  spec = P(None, "data", "model", None)
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, spec))
  f, g, _ = _fns(impl, case)
  sq, sk, sv, sdo = (shard(x) for x in (q, k, v, do))
  np.testing.assert_allclose(np.asarray(f(sq, sk, sv, None)), np.asarray(f(q, k, v, None)),
                             rtol=1e-6, atol=1e-6)
  for a, b in zip(g(sq, sk, sv, None, sdo), g(q, k, v, None, do)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_vmap_of_sharded_call_is_correct():
  """custom_partitioning has no vmap rule: under vmap the kernels batch by their grid."""
  case = Case(b=4, t=16, s=16, n=2, k=2, h=16)
  q, k, v, _ = case.inputs()
  mesh = _mesh()
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
  f = jax.jit(jax.vmap(lambda q, k, v: jflash.dot_product_attention(q, k, v, implementation="xla")))
  got = f(shard(q[:, None]), shard(k[:, None]), shard(v[:, None]))[:, 0]
  want = jflash.dot_product_attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_vmap_of_grad_with_broadcast_bias():
  """Per-example gradients (vmap of grad) of one bias shared by every example."""
  case = Case(b=3, t=16, s=16, n=2, k=1, h=16, is_causal=True, bias=(1, 2, 16, 16))
  q, k, v, do = case.inputs()
  bias = case.bias_array()

  def loss(q, k, v, bias, do):
    out = jflash.dot_product_attention(q[None], k[None], v[None], bias, is_causal=True,
                                       implementation="xla")
    return jnp.sum(out[0] * do)

  per_example = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 3)), in_axes=(0, 0, 0, None, 0)))
  dq, dbias = per_example(q, k, v, bias, do)
  assert dbias.shape == (case.b,) + bias.shape
  for i in range(case.b):
    dq_i, dbias_i = jax.grad(loss, argnums=(0, 3))(q[i], k[i], v[i], bias, do[i])
    np.testing.assert_allclose(np.asarray(dq[i]), np.asarray(dq_i), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dbias[i]), np.asarray(dbias_i), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_dropout_mask_does_not_depend_on_sharding(impl):
  """Each shard offsets the dropout hash by its first global batch row and head."""
  case = Case(b=4, t=16, s=16, n=4, k=2, h=16, is_causal=True)
  q, k, v, _ = case.inputs()
  mesh = _mesh()
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", None, "model", None)))
  f = jax.jit(lambda q, k, v: jflash.dot_product_attention(
      q, k, v, is_causal=True, implementation=impl, dropout_rate=0.4,
      dropout_rng=jax.random.PRNGKey(3)))
  np.testing.assert_allclose(np.asarray(f(shard(q), shard(k), shard(v))), np.asarray(f(q, k, v)),
                             rtol=1e-6, atol=1e-6)


# Sequence sharding under plain jit: context parallelism through the ring (ring.py) when
# q's T and k/v's S are split over one mesh axis; calls the ring cannot run are gathered.


def _seq_mesh():
  return jax.make_mesh((4,), ("x",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])


def _with_lse(impl, case):
  """jit'd forward (out, lse) and grads of a loss that uses both (lse cotangent too)."""
  kw = case.kwargs()
  bias = case.bias_array()

  def f(q, k, v):
    return jflash.dot_product_attention(q, k, v, bias, implementation=impl,
                                        return_residual=True, **kw)

  def loss(q, k, v, do):
    out, lse = f(q, k, v)
    return jnp.sum(out * do) + 0.5 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  return jax.jit(f), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _reference_with_lse(case, q, k, v, do):
  def f(q, k, v):
    out, lse = reference.attention(q, k, v, case.mask(), scale=case.scale, softcap=case.softcap,
                                   bias=case.bias_array())
    return out, lse

  def loss(q, k, v):
    out, lse = f(q, k, v)
    return jnp.sum(out * do) + 0.5 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  return f(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _check_against_reference(case, got, got_grads, q, k, v, do):
  out, lse = got
  (ref_out, ref_lse), ref_grads = _reference_with_lse(case, q, k, v, do)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=2e-5, atol=2e-5)
  assert_lse_close(lse, ref_lse, case.dtype)
  for name, a, b in zip("qkv", got_grads, ref_grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4,
                               err_msg=f"d{name}")


RING_CASES = {
    "plain": Case(b=2, t=32, s=32, n=4, k=2, h=16),
    "causal": Case(b=2, t=32, s=32, n=4, k=2, h=16, is_causal=True),
    "segments": Case(b=2, t=32, s=32, n=4, k=2, h=16, is_causal=True, segments="packed"),
    # Lengths become per-chunk lengths; the window reaches one chunk back.
    "window_lengths": Case(b=2, t=32, s=32, n=2, k=1, h=16, window=(5, 3), q_lengths=[32, 13],
                           kv_lengths=[21, 32], softcap=5.0),
    # Causal runs the zigzag layout: lengths end inside an early and a late half-chunk.
    "causal_lengths": Case(b=2, t=32, s=32, n=2, k=1, h=16, is_causal=True, q_lengths=[32, 13],
                           kv_lengths=[27, 6]),
}


@pytest.mark.parametrize("impl,name", [("xla", n) for n in RING_CASES] + [("triton", "causal")])
def test_sequence_sharding_runs_a_ring(impl, name):
  case = RING_CASES[name]
  q, k, v, do = case.inputs()
  sharding = NamedSharding(_seq_mesh(), P(None, "x"))
  sq, sk, sv, sdo = (jax.device_put(x, sharding) for x in (q, k, v, do))
  f, g = _with_lse(impl, case)

  for compiled in (f.lower(sq, sk, sv).compile(), g.lower(sq, sk, sv, sdo).compile()):
    text = compiled.as_text()
    assert "collective-permute" in text
    assert "all-gather" not in text  # K/V are never gathered

  out, lse = f(sq, sk, sv)
  grads = g(sq, sk, sv, sdo)
  assert out.sharding.is_equivalent_to(sharding, 4)
  for x in grads:
    assert x.sharding.is_equivalent_to(sharding, 4)
  _check_against_reference(case, (out, jnp.asarray(lse)), grads, q, k, v, do)
  np.testing.assert_array_equal(np.asarray(f(sq, sk, sv)[0]), np.asarray(out))  # rerun


@pytest.mark.parametrize("name,layout", [("causal", "zigzag"), ("window_lengths", "contiguous"),
                                         ("plain", "contiguous")])
def test_sequence_sharded_causal_ring_is_load_balanced(monkeypatch, name, layout):
  """A plain causal mask runs the zigzag layout (every device the same work); windows
  and unmasked calls keep the contiguous one."""
  seen = []
  for pass_name in ("forward", "backward"):
    run = getattr(ring_lib, pass_name)

    def spy(r, *args, run=run, **kwargs):
      seen.append(r.layout)
      return run(r, *args, **kwargs)

    monkeypatch.setattr(ring_lib, pass_name, spy)
  case = RING_CASES[name]
  q, k, v, do = case.inputs()
  sharding = NamedSharding(_seq_mesh(), P(None, "x"))
  sq, sk, sv, sdo = (jax.device_put(x, sharding) for x in (q, k, v, do))
  f, g = _with_lse("xla", case)
  f.lower(sq, sk, sv).compile()
  g.lower(sq, sk, sv, sdo).compile()
  assert seen and set(seen) == {layout}, seen


def test_sequence_sharding_with_bias_is_gathered():
  """The ring takes no bias: the call falls back to gathering the sequence."""
  case = Case(b=1, t=32, s=32, n=2, k=2, h=16, is_causal=True, bias=(1, 2, 32, 32))
  q, k, v, do = case.inputs()
  sharding = NamedSharding(_seq_mesh(), P(None, "x"))
  sq, sk, sv, sdo = (jax.device_put(x, sharding) for x in (q, k, v, do))
  f, g = _with_lse("xla", case)
  assert "all-gather" in f.lower(sq, sk, sv).compile().as_text()
  _check_against_reference(case, f(sq, sk, sv), g(sq, sk, sv, sdo), q, k, v, do)
