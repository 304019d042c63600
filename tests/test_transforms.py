"""jflash composed with JAX transforms: jit, vmap, grad, checkpoint (remat), scan.

Every transformed call is compared with the untransformed jflash call or with the
independent naive reference of tests/reference.py. Shapes stay tiny: "triton" runs its
Pallas kernels in interpret mode on CPU.
"""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jflash
import reference
from helpers import Case

IMPLS = ["xla", "triton"]

# Causal GQA with key padding in one batch row: exercises the mask arrays (pytrees that
# pass through custom_vjp, vmap and scan) as well as the static mask spec.
CASE = Case(b=2, t=24, s=24, n=4, k=2, h=16, is_causal=True, kv_lengths=[24, 13], seed=11)
TOL = dict(atol=5e-5, rtol=5e-5)


def _attn(impl, case: Case = CASE):
  kw = case.kwargs()
  return lambda q, k, v: jflash.dot_product_attention(q, k, v, implementation=impl, **kw)


@functools.partial(jax.jit, static_argnames=("scale", "softcap"))
def _ref_value_and_grads(q, k, v, mask, do, scale=None, softcap=None):
  """Jitted (eager reference grads cost seconds of op-by-op dispatch on CPU)."""
  def loss(q, k, v):
    return jnp.sum(reference.attention(q, k, v, mask, scale=scale, softcap=softcap)[0] * do)
  return jax.value_and_grad(loss, (0, 1, 2))(q, k, v)


_ref_forward = jax.jit(reference.attention, static_argnames=("scale", "softcap", "dtype"))


def _loss(attn, do):
  return lambda q, k, v: jnp.sum(attn(q, k, v) * do)


def _assert_trees_close(actual, expected, **tol):
  tol = tol or TOL
  chex.assert_trees_all_equal_shapes_and_dtypes(actual, expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), **tol)


# ----------------------------------------------------------------------------------- jit


@pytest.mark.parametrize("impl", IMPLS)
def test_jit_matches_eager(impl):
  """The same values with and without jax.jit: outputs, lse and gradients, bit for bit."""
  q, k, v, do = CASE.inputs()
  kw = CASE.kwargs()

  def f(q, k, v):
    return jflash.dot_product_attention(q, k, v, implementation=impl, return_residual=True, **kw)

  def loss(q, k, v):
    return jnp.sum(f(q, k, v)[0] * do)

  eager = (f(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v))
  jitted = (jax.jit(f)(q, k, v), jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v))
  chex.assert_trees_all_equal(eager, jitted)
  # And both against the reference.
  _assert_trees_close(jitted[0], _ref_forward(q, k, v, CASE.mask()))


@pytest.mark.parametrize("impl", IMPLS)
def test_jit_traces_once(impl):
  """A jitted function that calls jflash is traced once for two calls of the same shapes
  (jflash keeps nothing call-dependent in its static state), and again for a new shape."""
  chex.clear_trace_counter()
  kw = CASE.kwargs()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(q, k, v, kv_lengths):
    out = jflash.dot_product_attention(
        q, k, v, implementation=impl, is_causal=True, key_value_seq_lengths=kv_lengths,
        scale=kw["scale"])
    return jnp.sum(out.astype(jnp.float32) ** 2)

  q, k, v, _ = CASE.inputs()
  a = step(q, k, v, jnp.array([24, 13], jnp.int32))
  b = step(2.0 * q, k, v, jnp.array([5, 24], jnp.int32))  # new values, same shapes: cached
  assert np.isfinite(a) and np.isfinite(b) and a != b
  with pytest.raises(AssertionError, match="traced"):  # a new shape must retrace
    step(q[:, :16], k, v, jnp.array([24, 13], jnp.int32))


def test_jit_with_static_implementation_and_flags():
  """implementation / is_causal / window passed through static_argnames of an outer jit."""
  q, k, v, _ = CASE.inputs()

  @functools.partial(jax.jit, static_argnames=("implementation", "is_causal", "local_window_size"))
  def f(q, k, v, implementation, is_causal, local_window_size):
    return jflash.dot_product_attention(q, k, v, implementation=implementation,
                                        is_causal=is_causal, local_window_size=local_window_size)

  out = f(q, k, v, implementation="xla", is_causal=True, local_window_size=(3, 0))
  mask = reference.dense_mask(2, 24, 24, is_causal=True, window=(3, 0))
  np.testing.assert_allclose(out, _ref_forward(q, k, v, mask)[0], **TOL)


# ---------------------------------------------------------------------------------- vmap


def _stacked_inputs(num=3):
  """[V, B, T, N, H] inputs and per-V key lengths, from V independent cases."""
  cases = [Case(b=1, t=24, s=24, n=4, k=2, h=16, seed=20 + i) for i in range(num)]
  q, k, v, do = (jnp.stack(xs) for xs in zip(*(c.inputs() for c in cases)))
  kv_lengths = jnp.array([[24], [9], [17]][:num], jnp.int32)  # [V, B]
  return q, k, v, do, kv_lengths


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_matches_loop(impl):
  """vmap over an extra leading axis (arrays and key lengths both batched) == a loop."""
  q, k, v, do, kv_lengths = _stacked_inputs()

  def f(q, k, v, lengths):
    return jflash.dot_product_attention(q, k, v, implementation=impl, is_causal=True,
                                        key_value_seq_lengths=lengths, return_residual=True)

  out, lse = jax.jit(jax.vmap(f))(q, k, v, kv_lengths)
  one = jax.jit(f)
  loop = [one(q[i], k[i], v[i], kv_lengths[i]) for i in range(q.shape[0])]
  loop_out = jnp.stack([o for o, _ in loop])
  loop_lse = jnp.stack([l for _, l in loop])
  assert out.shape == q.shape and lse.shape == q.shape[:-1]
  np.testing.assert_allclose(out, loop_out, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(lse, loop_lse, atol=1e-6, rtol=1e-6)
  # And the loop against the reference, so that a wrong-but-consistent vmap cannot pass.
  for i in range(q.shape[0]):
    mask = reference.dense_mask(1, 24, 24, is_causal=True, kv_lengths=np.asarray(kv_lengths[i]))
    ref_out, ref_lse = _ref_forward(q[i], k[i], v[i], mask)
    np.testing.assert_allclose(out[i], ref_out, **TOL)
    np.testing.assert_allclose(lse[i], ref_lse, **TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_of_grad_matches_loop(impl):
  q, k, v, do, kv_lengths = _stacked_inputs()

  def loss(q, k, v, lengths, do):
    out = jflash.dot_product_attention(q, k, v, implementation=impl, is_causal=True,
                                       key_value_seq_lengths=lengths)
    return jnp.sum(out * do)

  grad = jax.grad(loss, (0, 1, 2))
  batched = jax.jit(jax.vmap(grad))(q, k, v, kv_lengths, do)
  for i in range(q.shape[0]):
    mask = reference.dense_mask(1, 24, 24, is_causal=True, kv_lengths=np.asarray(kv_lengths[i]))
    _, ref = _ref_value_and_grads(q[i], k[i], v[i], mask, do[i])
    _assert_trees_close(tuple(g[i] for g in batched), ref)


def test_vmap_inner_axis_and_unbatched_operand():
  """vmap over a non-leading axis (in/out axis 2 = heads), with key/value not batched."""
  q, k, v, _ = Case(b=2, t=16, s=20, n=3, k=1, h=16, seed=5).inputs()
  f = lambda q, k, v: jflash.dot_product_attention(q, k, v, implementation="xla")
  # Map over the 3 query heads one at a time: each is a 1-head problem against K=1.
  out = jax.vmap(lambda qh: f(qh[:, :, None], k, v)[:, :, 0], in_axes=2, out_axes=2)(q)
  np.testing.assert_allclose(out, f(q, k, v), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------- grad


GRAD_CASES = {
    "causal_gqa_kvpad": CASE,
    "window_softcap_qpad": Case(b=2, t=20, s=28, n=2, k=1, h=16, window=(5, 2), softcap=3.0,
                                q_lengths=[20, 11], seed=4),
    "packed": Case(b=1, t=32, s=32, n=2, k=2, h=16, segments="packed", is_causal=True, seed=6),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_grad_and_value_and_grad_match_reference(name, impl):
  case = GRAD_CASES[name]
  q, k, v, do = case.inputs()
  ours = _loss(_attn(impl, case), do)

  @jax.jit
  def both(q, k, v):  # one compile for the two transforms
    return jax.value_and_grad(ours, (0, 1, 2))(q, k, v), jax.grad(ours, (0, 1, 2))(q, k, v)

  (val, grads), only = both(q, k, v)
  ref_val, ref_grads = _ref_value_and_grads(q, k, v, case.mask(), do, scale=case.scale,
                                            softcap=case.softcap)
  np.testing.assert_allclose(val, ref_val, rtol=1e-5, atol=1e-4)
  _assert_trees_close(grads, ref_grads)
  # jax.grad alone agrees with value_and_grad (same custom_vjp, no value needed).
  chex.assert_trees_all_close(only, grads, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_argnums_and_has_aux(impl):
  """Differentiating w.r.t. one argument only, with aux output (lse) carried along."""
  q, k, v, do = CASE.inputs()
  kw = CASE.kwargs()

  def loss(k, q, v):
    out, lse = jflash.dot_product_attention(q, k, v, implementation=impl, return_residual=True, **kw)
    return jnp.sum(out * do), lse

  dk, lse = jax.jit(jax.grad(loss, has_aux=True))(k, q, v)
  mask = CASE.mask()
  _, (_, ref_dk, _) = _ref_value_and_grads(q, k, v, mask, do)
  np.testing.assert_allclose(dk, ref_dk, **TOL)
  np.testing.assert_allclose(lse, _ref_forward(q, k, v, mask)[1], **TOL)


def _tiny_for_check_grads():
  # Small logits so that central differences in f32 are accurate.
  case = Case(b=1, t=8, s=12, n=2, k=1, h=16, is_causal=True, kv_lengths=[10], seed=2)
  q, k, v, _ = case.inputs()
  return case, (0.5 * q, 0.5 * k, v)


@pytest.mark.parametrize("impl", IMPLS)
def test_check_grads_numerical(impl):
  """Reverse-mode gradients against central finite differences (jax.test_util)."""
  case, args = _tiny_for_check_grads()
  f = jax.jit(_attn(impl, case))
  check_grads(f, args, order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_mode_is_refused_cleanly(impl):
  """jflash is a custom_vjp: forward mode raises a TypeError at trace time (no crash).

  Documented behaviour rather than a wish: reverse mode is the supported path."""
  case, args = _tiny_for_check_grads()
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(_attn(impl, case), args, tuple(jnp.ones_like(a) for a in args))


# ---------------------------------------------------------------------------- checkpoint


def _block(attn, w):
  """A small residual attention block on x [B, T, D] with D = N * H."""
  def apply(x, w_qkv, w_o):
    b, t, d = x.shape
    qkv = jnp.einsum("btd,de->bte", x, w_qkv, precision="highest")
    q, k, v = (a.reshape(b, t, 2, d // 2) for a in jnp.split(qkv, 3, axis=-1))
    o = attn(q, k, v).reshape(b, t, d)
    return x + jnp.einsum("btd,de->bte", o, w_o, precision="highest")
  return functools.partial(apply, w_qkv=w[0], w_o=w[1])


def _block_params(d, seed, layers=None):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  lead = () if layers is None else (layers,)
  w_qkv = jax.random.normal(ks[0], lead + (d, 3 * d)) / np.sqrt(d)
  w_o = jax.random.normal(ks[1], lead + (d, d)) / np.sqrt(d)
  x = jax.random.normal(ks[2], (2, 24, d))
  return x, (w_qkv, w_o)


POLICIES = {
    "default": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


@pytest.mark.parametrize("impl", IMPLS)
def test_checkpoint_gives_same_grads(impl):
  """jax.checkpoint around a block that calls jflash, under several remat policies: the
  same gradients as without remat, and as the reference attention."""
  x, w = _block_params(32, seed=3)
  attn = lambda q, k, v: jflash.dot_product_attention(q, k, v, implementation=impl, is_causal=True)
  mask = reference.dense_mask(2, 24, 24, is_causal=True)
  ref_attn = lambda q, k, v: reference.attention(q, k, v, mask)[0]

  def loss(attn, policy, x, w):
    body = lambda x, w: _block(attn, w)(x)
    if policy != "none":
      body = jax.checkpoint(body, policy=POLICIES[policy])
    return jnp.sum(jnp.tanh(body(x, w)) ** 2)

  @jax.jit
  def all_grads(x, w):  # one compile for every variant
    g = lambda a, pol: jax.grad(functools.partial(loss, a, pol), (0, 1))(x, w)
    return {"none": g(attn, "none"), "ref": g(ref_attn, "none"),
            **{pol: g(attn, pol) for pol in POLICIES}}

  grads = all_grads(x, w)
  for pol in POLICIES:
    chex.assert_trees_all_close(grads[pol], grads["none"], atol=1e-6, rtol=1e-6)
  _assert_trees_close(grads["none"], grads["ref"], atol=1e-4, rtol=1e-4)
  # The remat really happened: the checkpointed jaxpr holds a remat (checkpoint) equation.
  jaxpr = jax.make_jaxpr(jax.grad(functools.partial(loss, attn, "default"), (0, 1)))(x, w)
  assert "checkpoint" in str(jaxpr) or "remat" in str(jaxpr)


# ---------------------------------------------------------------------------------- scan


@pytest.mark.parametrize("impl", IMPLS)
def test_scan_over_layers_matches_reference(impl):
  """lax.scan over 3 layers of (self attention + residual) with per-layer weights, with
  and without remat inside the scan: gradients w.r.t. the input and every layer's weights
  equal those of the same network built on the reference attention."""
  layers = 3
  x, w = _block_params(32, seed=8, layers=layers)
  lengths = jnp.array([24, 15], jnp.int32)
  mask = reference.dense_mask(2, 24, 24, is_causal=True, q_lengths=[24, 15], kv_lengths=[24, 15])

  ours = lambda q, k, v: jflash.dot_product_attention(
      q, k, v, implementation=impl, is_causal=True, query_seq_lengths=lengths,
      key_value_seq_lengths=lengths)
  ref = lambda q, k, v: reference.attention(q, k, v, mask)[0]

  def net(attn, remat):
    def layer(x, w):
      return _block(attn, w)(x), None
    if remat:
      layer = jax.checkpoint(layer)

    def loss(x, w):
      y, _ = jax.lax.scan(layer, x, w)
      return jnp.mean(y ** 2)
    return loss

  @jax.jit
  def all_grads(x, w):  # one compile for the three networks
    return [jax.value_and_grad(net(a, remat), (0, 1))(x, w)
            for a, remat in ((ref, False), (ours, False), (ours, True))]

  (ref_val, ref_grads), *variants = all_grads(x, w)
  for val, grads in variants:
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    assert grads[1][0].shape == (layers, 32, 96)
    _assert_trees_close(grads, ref_grads, atol=1e-4, rtol=1e-4)


def test_jitted_step_compiles_once_in_a_fresh_process():
  """The first interpret-mode kernel must not change the enclosing jit's cache key (it did
  when Pallas registered a config option on first use): two calls, one compilation. In a
  subprocess, so that no earlier test has already paid that first use."""
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp
      import jflash
      f = jax.jit(lambda q: jflash.dot_product_attention(q, q, q, implementation="triton").sum())
      q = jnp.ones((1, 16, 1, 16))
      f(q); f(q)
      print("compiled", f._cache_size())
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pathlib.Path(__file__).parents[1]),
                                                    env.get("PYTHONPATH")]))
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "compiled 1" in out.stdout, out.stdout
