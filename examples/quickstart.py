"""jflash in five minutes: the function, a Linen layer, an NNX layer, and Flax's own layers.

    python examples/quickstart.py

Runs on CPU in seconds (the "xla" implementation); on an sm80+ GPU the same calls run the
Pallas kernels.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jflash

B, T, N, H = 2, 128, 4, 32  # batch, sequence, heads, head dim
F = N * H


def functional():
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(kq, (B, T, N, H))
  k = jax.random.normal(kk, (B, T, 2, H))  # 2 key/value heads: grouped-query attention
  v = jax.random.normal(kv, (B, T, 2, H))

  # Same layout and meaning as jax.nn.dot_product_attention ([B, T, N, H]).
  attn = jax.jit(functools.partial(jflash.dot_product_attention, is_causal=True))
  out = attn(q, k, v)
  ref = jax.nn.dot_product_attention(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2), is_causal=True)
  print(f"functional     out {out.shape}, max |jflash - jax.nn| = {jnp.abs(out - ref).max():.1e}")

  # Padding as lengths, packed documents as segment ids, sliding windows, soft-capping.
  out = jflash.dot_product_attention(
      q, k, v, is_causal=True, key_value_seq_lengths=jnp.array([T, 100]),
      local_window_size=(64, 0), logits_soft_cap=30.0)
  # Gradients flow through a single custom VJP (recomputation, O(T) memory).
  dq = jax.jit(jax.grad(lambda q: jflash.dot_product_attention(q, k, v, is_causal=True).sum()))(q)
  print(f"functional     window+lengths+softcap out {out.shape}, dq {dq.shape}")


def linen_layer():
  x = jax.random.normal(jax.random.PRNGKey(1), (B, T, F))
  layer = jflash.linen.MultiHeadAttention(num_heads=N, num_kv_heads=2, is_causal=True)
  params = layer.init(jax.random.PRNGKey(2), x)
  y = jax.jit(layer.apply)(params, x)
  print(f"jflash.linen   out {y.shape}, params {jax.tree.map(jnp.shape, params['params']['key'])}")

  # Or keep Flax's layer and swap its attention function; same parameters as usual.
  flax_layer = nn.MultiHeadDotProductAttention(num_heads=N, attention_fn=jflash.flax_attention_fn)
  params = flax_layer.init(jax.random.PRNGKey(2), x)
  y = jax.jit(flax_layer.apply)(params, x)
  same = jflash.linen.MultiHeadAttention(num_heads=N).apply(params, x)
  print(f"flax.linen     attention_fn=jflash.flax_attention_fn: out {y.shape}, "
        f"== jflash.linen: {np.allclose(y, same, atol=1e-5)}")


def nnx_layer():
  x = jax.random.normal(jax.random.PRNGKey(3), (B, T, F))
  layer = jflash.nnx.MultiHeadAttention(N, F, num_kv_heads=2, is_causal=True, rngs=nnx.Rngs(0))
  y = nnx.jit(lambda m, x: m(x))(layer, x)
  print(f"jflash.nnx     out {y.shape}")

  # KV-cache decoding: prefill a prompt chunk, then one token at a time.
  layer.init_cache(x.shape)
  step = nnx.jit(lambda m, x: m(x, decode=True))
  outs = [step(layer, x[:, :100])] + [step(layer, x[:, i:i + 1]) for i in range(100, T)]
  err = jnp.abs(jnp.concatenate(outs, axis=1) - y).max()
  print(f"jflash.nnx     decode (prefill 100 + 28 steps) vs full pass: max diff {err:.1e}")

  # Flax's NNX layer with jflash inside; pass is_causal instead of a dense mask.
  flax_layer = nnx.MultiHeadAttention(N, F, attention_fn=jflash.flax_attention_fn, decode=False,
                                      rngs=nnx.Rngs(0))
  y = nnx.jit(lambda m, x: m(x, is_causal=True))(flax_layer, x)
  print(f"flax.nnx       attention_fn=jflash.flax_attention_fn: out {y.shape}")


if __name__ == "__main__":
  print(f"jax {jax.__version__} on {jax.default_backend()}")
  functional()
  linen_layer()
  nnx_layer()
