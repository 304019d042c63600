"""Flax integration: jflash.flax_attention_fn, jflash.linen, jflash.nnx (CPU, mostly "xla").

References are Flax's own layers with their default attention (jax.nn.dot_product_attention
on the XLA path) and the same parameters. Flax returns the mean of the values for a query
row whose mask hides every key, jflash returns zeros: padding tests compare valid rows.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jflash
from jflash._src import flax_adapter

TOL = dict(atol=2e-5, rtol=2e-5)
B, T, F, HEADS = 2, 12, 32, 4
# "xla" pins the f32 numerics (on CPU it is also what implementation=None picks).
ATTN_FN = functools.partial(jflash.flax_attention_fn, implementation="xla")


def JLinen(**kw):
  return jflash.linen.MultiHeadAttention(implementation="xla", **kw)


def JNnx(*args, **kw):
  return jflash.nnx.MultiHeadAttention(*args, implementation="xla", **kw)


def _x(shape=(B, T, F), seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _lengths():
  return jnp.array([T, 7], jnp.int32)


def _valid_rows(lengths, t=T):
  return (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.float32)[..., None]


# ---------------------------------------------------------------------------------------
# Package surface.


def test_imports():
  import flax.linen
  import jflash.linen
  import jflash.nnx as jnnx
  from jflash import linen, nnx as jflash_nnx
  assert linen is jflash.linen and jflash_nnx is jnnx
  assert jflash.linen.nn is flax.linen  # absolute import, not shadowed by jflash.linen
  assert jflash.nnx.nnx is nnx
  assert callable(jflash.flax_attention_fn)


# ---------------------------------------------------------------------------------------
# Linen.


def _linen_pair(**kw):
  ref = nn.MultiHeadDotProductAttention(num_heads=HEADS, **kw)
  params = ref.init(jax.random.PRNGKey(1), _x())
  return ref, params


def test_linen_causal_mask_attention_fn_and_layer():
  x = _x()
  ref, params = _linen_pair()
  hooked = nn.MultiHeadDotProductAttention(num_heads=HEADS, attention_fn=jflash.flax_attention_fn)
  layer = JLinen(num_heads=HEADS, is_causal=True)
  # Same parameter tree as Flax's layer.
  chex.assert_trees_all_equal_shapes(layer.init(jax.random.PRNGKey(1), x), params)
  cmask = nn.make_causal_mask(x[..., 0])  # float 0/1, [B, 1, T, T]

  def losses(p):
    w = jnp.arange(F, dtype=jnp.float32)
    return (jnp.sum(ref.apply(p, x, mask=cmask) * w),
            jnp.sum(hooked.apply(p, x, mask=cmask) * w),
            jnp.sum(layer.apply(p, x) * w))

  f = jax.jit(lambda p: (losses(p), [jax.grad(lambda q, i=i: losses(q)[i])(p) for i in range(3)]))
  (l_ref, l_hook, l_layer), (g_ref, g_hook, g_layer) = f(params)
  np.testing.assert_allclose(l_hook, l_ref, rtol=1e-5)
  np.testing.assert_allclose(l_layer, l_ref, rtol=1e-5)
  chex.assert_trees_all_close(g_hook, g_ref, **TOL)
  chex.assert_trees_all_close(g_layer, g_ref, **TOL)


def test_linen_padding_mask_vs_lengths():
  x = _x(seed=2)
  lengths = _lengths()
  ref, params = _linen_pair()
  hooked = nn.MultiHeadDotProductAttention(num_heads=HEADS, attention_fn=jflash.flax_attention_fn)
  layer = JLinen(num_heads=HEADS)
  valid = jnp.arange(T)[None, :] < lengths[:, None]
  pmask = nn.make_attention_mask(valid, valid)
  rows = _valid_rows(lengths)

  @jax.jit
  def run(p):
    def loss(fn):
      return lambda p: jnp.sum(fn(p) * rows)
    fns = [lambda p: ref.apply(p, x, mask=pmask), lambda p: hooked.apply(p, x, mask=pmask),
           lambda p: layer.apply(p, x, query_seq_lengths=lengths, key_value_seq_lengths=lengths)]
    return [fn(p) for fn in fns], [jax.grad(loss(fn))(p) for fn in fns]

  (y_ref, y_hook, y_layer), (g_ref, g_hook, g_layer) = run(params)
  np.testing.assert_allclose(y_hook * rows, y_ref * rows, **TOL)
  np.testing.assert_allclose(y_layer * rows, y_ref * rows, **TOL)
  chex.assert_trees_all_close(g_hook, g_ref, **TOL)
  chex.assert_trees_all_close(g_layer, g_ref, **TOL)
  # A fully masked row: jflash's contract is zero attention, i.e. the output bias.
  out_bias = params["params"]["out"]["bias"]
  np.testing.assert_allclose(y_hook[1, 7:], jnp.broadcast_to(out_bias, (T - 7, F)), atol=1e-6)


def test_linen_extra_batch_dims_and_cross_attention():
  xq, xkv = _x((2, 3, T, F), seed=3), _x((2, 3, 9, F), seed=4)
  ref = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=16, out_features=8)
  params = ref.init(jax.random.PRNGKey(0), xq, xkv)
  layer = JLinen(num_heads=HEADS, qkv_features=16, out_features=8)
  hooked = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=16, out_features=8,
                                           attention_fn=ATTN_FN)
  y_ref = ref.apply(params, xq, xkv)
  np.testing.assert_allclose(layer.apply(params, xq, xkv), y_ref, **TOL)
  np.testing.assert_allclose(hooked.apply(params, xq, xkv), y_ref, **TOL)


def _assert_dropout_applied(off, on_a, on_b, on_c):
  """Dropout changes the output, the same rng repeats it, another rng changes it."""
  assert np.isfinite(np.asarray(on_a)).all()
  assert not np.allclose(np.asarray(off), np.asarray(on_a))
  np.testing.assert_array_equal(np.asarray(on_a), np.asarray(on_b))
  assert not np.allclose(np.asarray(on_a), np.asarray(on_c))


def test_linen_dropout_is_applied_and_repeatable():
  x = _x()
  layer = JLinen(num_heads=HEADS, dropout_rate=0.3)
  params = layer.init(jax.random.PRNGKey(0), x, deterministic=True)
  off = layer.apply(params, x, deterministic=True)
  run = lambda m, seed: m.apply(params, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(seed)})
  _assert_dropout_applied(off, run(layer, 1), run(layer, 1), run(layer, 2))
  hooked = nn.MultiHeadDotProductAttention(num_heads=HEADS, dropout_rate=0.3,
                                           attention_fn=jflash.flax_attention_fn)
  _assert_dropout_applied(off, run(hooked, 1), run(hooked, 1), run(hooked, 2))
  with pytest.raises(NotImplementedError, match="sow"):
    hooked.apply(params, x, deterministic=True, sow_weights=True, mutable=["intermediates"])


# ---------------------------------------------------------------------------------------
# NNX.


def _nnx_pair(**kw):
  ref = nnx.MultiHeadAttention(HEADS, F, decode=False, rngs=nnx.Rngs(0), **kw)
  ours = JNnx(HEADS, F, rngs=nnx.Rngs(0), **kw)
  chex.assert_trees_all_equal(nnx.state(ours, nnx.Param), nnx.state(ref, nnx.Param))
  return ref, ours


def _grads_and_out(model, fn):
  return nnx.jit(lambda m: nnx.value_and_grad(lambda m: jnp.sum(fn(m) ** 2))(m))(model)


def test_nnx_causal_layer_and_attention_fn():
  x = _x(seed=5)
  ref, ours = _nnx_pair()
  hooked = nnx.MultiHeadAttention(HEADS, F, decode=False, rngs=nnx.Rngs(0), attention_fn=ATTN_FN)
  cmask = nnx.make_causal_mask(x[..., 0])
  l_ref, g_ref = _grads_and_out(ref, lambda m: m(x, is_causal=True))
  l_mask, g_mask = _grads_and_out(ref, lambda m: m(x, mask=cmask))
  for model, fn in ((ours, lambda m: m(x, is_causal=True)),
                    (hooked, lambda m: m(x, is_causal=True)),  # jflash kernels, no mask
                    (hooked, lambda m: m(x, mask=cmask))):  # dense-mask path
    loss, grads = _grads_and_out(model, fn)
    np.testing.assert_allclose(loss, l_ref, rtol=1e-5)
    np.testing.assert_allclose(loss, l_mask, rtol=1e-5)
    chex.assert_trees_all_close(grads, g_ref, **TOL)


def test_nnx_padding_and_segments():
  x = _x(seed=6)
  ref, ours = _nnx_pair()
  lengths = _lengths()
  valid = jnp.arange(T)[None, :] < lengths[:, None]
  rows = _valid_rows(lengths)
  y_ref = ref(x, mask=nnx.make_attention_mask(valid, valid))
  y = ours(x, query_seq_lengths=lengths, key_value_seq_lengths=lengths)
  np.testing.assert_allclose(y * rows, y_ref * rows, **TOL)
  # Packed documents: segment ids == a block-diagonal mask (with causal on top).
  seg = jnp.array([[0] * 5 + [1] * 7, [0] * 3 + [1] * 4 + [2] * 5], jnp.int32)
  smask = nnx.combine_masks(nnx.make_attention_mask(seg, seg, jnp.equal),
                            nnx.make_causal_mask(seg))
  np.testing.assert_allclose(ours(x, segment_ids=seg, is_causal=True), ref(x, mask=smask), **TOL)


def test_nnx_gqa_vs_repeated_kv_heads():
  x = _x(seed=7)
  ours = JNnx(HEADS, F, qkv_features=16, num_kv_heads=2,
                                       is_causal=True, rngs=nnx.Rngs(3))
  assert ours.key.kernel.shape == (F, 2, 4) and ours.query.kernel.shape == (F, HEADS, 4)

  def reference(m):
    q, k, v = m.query(x), m.key(x), m.value(x)
    k, v = (jnp.repeat(a, HEADS // 2, axis=2) for a in (k, v))
    return m.out(jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"))

  l_ref, g_ref = _grads_and_out(ours, reference)
  loss, grads = _grads_and_out(ours, lambda m: m(x))
  np.testing.assert_allclose(loss, l_ref, rtol=1e-5)
  chex.assert_trees_all_close(grads, g_ref, **TOL)


def test_nnx_dropout_is_applied():
  x = _x()
  for make in (lambda: jflash.nnx.MultiHeadAttention(HEADS, F, dropout_rate=0.3, rngs=nnx.Rngs(0)),
               lambda: nnx.MultiHeadAttention(HEADS, F, dropout_rate=0.3, decode=False,
                                              rngs=nnx.Rngs(0), attention_fn=jflash.flax_attention_fn)):
    layer = make()
    off = layer(x, deterministic=True)
    on = layer(x, deterministic=False)
    assert np.isfinite(np.asarray(on)).all()
    assert not np.allclose(np.asarray(off), np.asarray(on))


# ---------------------------------------------------------------------------------------
# NNX decoding with the KV cache.


@pytest.mark.parametrize("window", [None, 3])
def test_nnx_decode_matches_full_causal_pass(window):
  x = _x((B, T, F), seed=8)
  model = JNnx(
      HEADS, F, num_kv_heads=2, is_causal=True, logits_soft_cap=5.0,
      local_window_size=None if window is None else (window, 0), rngs=nnx.Rngs(4))
  full = model(x)

  # One token per step, a jitted step: traced once, the cache index is a traced value.
  model.init_cache(x.shape)
  chex.clear_trace_counter()

  @nnx.jit
  @chex.assert_max_traces(n=1)
  def step(m, tok):
    return m(tok, decode=True)

  outs = [step(model, x[:, i:i + 1]) for i in range(T)]
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)
  assert int(model.cache_index[...]) == T

  # A prompt prefill chunk, single tokens, then another chunk.
  model.init_cache(x.shape)
  chunks = [(0, 5), (5, 6), (6, 7), (7, T)]
  outs = [model(x[:, a:b], decode=True) for a, b in chunks]
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)


def test_flax_nnx_decode_with_attention_fn():
  """Flax's own cache (an occupancy mask each step) with jflash as its attention_fn."""
  x = _x((B, 6, F), seed=9)
  models = [nnx.MultiHeadAttention(HEADS, F, decode=True, rngs=nnx.Rngs(0), **kw)
            for kw in ({}, {"attention_fn": jflash.flax_attention_fn})]
  outs = []
  for m in models:
    m.init_cache(x.shape)
    outs.append(jnp.concatenate([m(x[:, i:i + 1]) for i in range(6)], axis=1))
  np.testing.assert_allclose(outs[1], outs[0], **TOL)


def test_nnx_decode_errors():
  model = jflash.nnx.MultiHeadAttention(HEADS, F, is_causal=True, decode=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="init_cache"):
    model(_x((B, 1, F)))
  model.init_cache((B, 4, F))
  with pytest.raises(ValueError, match="do not fit"):
    model(_x((B, 5, F)))
  with pytest.raises(NotImplementedError, match="key_value_seq_lengths"):
    model(_x((B, 1, F)), key_value_seq_lengths=jnp.array([1, 1]))


# ---------------------------------------------------------------------------------------
# A jitted optax training step, jflash vs Flax's default attention from the same init.


class _TinyLM(nnx.Module):

  def __init__(self, attention_cls, *, rngs):
    self.embed = nnx.Embed(16, F, rngs=rngs)
    self.attn = attention_cls(HEADS, F, rngs=rngs)
    self.head = nnx.Linear(F, 16, rngs=rngs)

  def __call__(self, tokens):
    h = self.embed(tokens)
    h = h + self.attn(h, is_causal=True)
    return self.head(h)


def test_jitted_training_step_traced_once_and_matches_flax():
  tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 3, T + 1), 0, 16)
  flax_attn = functools.partial(nnx.MultiHeadAttention, decode=False)
  results = {}
  for name, cls in (("jflash", JNnx), ("flax", flax_attn)):
    model = _TinyLM(cls, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    chex.clear_trace_counter()

    @nnx.jit
    @chex.assert_max_traces(n=1)
    def train_step(model, opt, batch):
      def loss_fn(model):
        logits = model(batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
      loss, grads = nnx.value_and_grad(loss_fn)(model)
      opt.update(model, grads)
      return loss

    results[name] = [float(train_step(model, opt, tokens[i])) for i in range(4)]
  np.testing.assert_allclose(results["jflash"], results["flax"], rtol=1e-4)
  assert results["jflash"][-1] < results["jflash"][0]


# ---------------------------------------------------------------------------------------
# The adapter itself.


def test_attention_fn_bias_and_unbatched():
  q, k, v = (_x((T, HEADS, 8), seed=s) for s in (10, 11, 12))
  bias = 0.5 * _x((HEADS, T, T), seed=13)
  mask = jax.random.bernoulli(jax.random.PRNGKey(14), 0.7, (1, T, T)).at[:, :, 0].set(True)
  expect = jax.jit(jax.nn.dot_product_attention)(q[None], k[None], v[None], bias[None], mask[None])[0]
  got = jax.jit(jflash.flax_attention_fn)(q, k, v, bias, mask.astype(jnp.float32))
  np.testing.assert_allclose(got, expect, **TOL)


def test_merge_attention_exact_with_gradients():
  """What decode relies on: attention over disjoint key sets, merged by lse (one part empty)."""
  q, k, v = _x((2, 5, 4, 8), seed=40), _x((2, 9, 2, 8), seed=41), _x((2, 9, 2, 8), seed=42)
  w = _x((2, 5, 4, 8), seed=43)

  def split(q, k, v):
    a = flax_adapter.attend(q, k[:, :6], v[:, :6], key_value_seq_lengths=jnp.array([4, 0]),
                            return_residual=True, implementation="xla")
    b = flax_adapter.attend(q, k[:, 6:], v[:, 6:], return_residual=True, implementation="xla")
    return flax_adapter.merge_attention([a, b])

  def whole(q, k, v):
    kv_ids = jnp.array([[1] * 4 + [0] * 2 + [1] * 3, [0] * 6 + [1] * 3])
    return flax_adapter.attend(q, k, v, segment_ids=(jnp.ones((2, 5), jnp.int32), kv_ids),
                               implementation="xla")

  run = lambda fn: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2)))
  (l1, g1), (l2, g2) = run(split)(q, k, v), run(whole)(q, k, v)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  chex.assert_trees_all_close(g1, g2, **TOL)


def test_triton_interpret_tiny():
  x = _x((1, 16, F), seed=30)
  ref = nnx.MultiHeadAttention(2, F, decode=False, rngs=nnx.Rngs(0))
  hooked = nnx.MultiHeadAttention(
      2, F, decode=False, rngs=nnx.Rngs(0),
      attention_fn=functools.partial(jflash.flax_attention_fn, implementation="triton"))
  l_ref, g_ref = _grads_and_out(ref, lambda m: m(x, is_causal=True))
  loss, grads = _grads_and_out(hooked, lambda m: m(x, is_causal=True))
  np.testing.assert_allclose(loss, l_ref, rtol=1e-5)
  chex.assert_trees_all_close(grads, g_ref, atol=1e-4, rtol=1e-4)
