"""``jflash.nnx``: a Flax NNX multi-head attention layer computed by jflash, with a KV cache.

``jflash.nnx.MultiHeadAttention`` has the constructor and the parameters of
``flax.nnx.MultiHeadAttention`` (``query``, ``key``, ``value``, ``out`` LinearGeneral
modules of the same shapes, so ``nnx.update(ours, nnx.state(theirs, nnx.Param))`` works),
and adds jflash's options: ``is_causal``, ``local_window_size``, ``logits_soft_cap``,
``implementation``, and per-call padding lengths and segment ids instead of dense masks.

Autoregressive decoding (``decode=True`` after ``init_cache``) is always causal
self-attention over the cache. A call may bring one token or a chunk of ``t`` tokens
(a prompt prefill is just a first chunk); the layer writes them at ``cache_index`` and
attends with two jflash calls merged exactly through their logsumexps:

* the new chunk against itself: top-left causal, which is right because the chunk's
  query r and key p sit at the same offset ``cache_index``;
* the new chunk against the cached prefix ``[0, cache_index)``, all of it visible:
  ``key_value_seq_lengths = cache_index`` (a traced value: no recompilation per step).
  With a sliding window ``left``, only the ``left`` cached keys before ``cache_index``
  are gathered, and the band "prefix key p visible from row r iff p >= r" is a static
  ``local_window_size=(0, left)`` relative to that slab.

This is why no dense mask is needed: jflash's ``is_causal`` is top-left aligned and its
window is static, while the query offset ``cache_index`` is traced.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx
from jax import lax

from jflash._src.flax_adapter import attend, merge_attention

__all__ = ["MultiHeadAttention"]

Array = Any
Dtype = Any
Initializer = Callable[..., Any]


def _first(*values):
  for v in values:
    if v is not None:
      return v
  return None


class MultiHeadAttention(nnx.Module):
  """Multi-head (or grouped-query) dot-product attention, computed by jflash.

  Args (Flax's meaning unless noted):
    num_heads: query heads.
    in_features: width of ``inputs_q``.
    qkv_features: q/k/v projection width (default ``in_features``);
      ``head_dim = qkv_features // num_heads``.
    out_features: output width (default ``in_features``).
    num_kv_heads: key/value heads (GQA/MQA), dividing ``num_heads`` (default ``num_heads``).
    in_kv_features: width of ``inputs_k``/``inputs_v`` (default ``in_features``).
    dtype, param_dtype, precision, kernel_init, out_kernel_init, bias_init,
    out_bias_init, use_bias, normalize_qk: as ``flax.nnx.MultiHeadAttention``
      (``precision`` applies to the projections).
    dropout_rate, deterministic: attention dropout; jflash raises NotImplementedError for
      ``dropout_rate > 0`` in non-deterministic calls until its kernels have dropout.
    decode: use the autoregressive KV cache (call ``init_cache`` first).
    is_causal: jflash: default causal flag of calls (key j visible from query i iff j <= i).
    local_window_size: jflash: ``w`` or ``(left, right)``: key j visible from query i iff
      ``i - left <= j <= i + right``; in decode only ``left`` matters.
    logits_soft_cap: jflash: logits become ``cap * tanh(logits / cap)``.
    implementation: jflash backend: ``"mosaic"``, ``"triton"``, ``"xla"`` or None (best).
    rngs: initialisation rngs (and the dropout stream, kept when ``dropout_rate > 0``).
  """

  def __init__(
      self,
      num_heads: int,
      in_features: int,
      qkv_features: int | None = None,
      out_features: int | None = None,
      num_kv_heads: int | None = None,
      in_kv_features: int | None = None,
      *,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      dropout_rate: float = 0.0,
      deterministic: bool | None = None,
      precision: Any = None,
      kernel_init: Initializer = nnx.initializers.lecun_normal(),
      out_kernel_init: Initializer | None = None,
      bias_init: Initializer = nnx.initializers.zeros_init(),
      out_bias_init: Initializer | None = None,
      use_bias: bool = True,
      decode: bool = False,
      normalize_qk: bool = False,
      is_causal: bool = False,
      local_window_size: int | tuple[int, int] | None = None,
      logits_soft_cap: float | None = None,
      implementation: str | None = None,
      rngs: nnx.Rngs,
      keep_rngs: bool = True,
  ):
    self.num_heads = num_heads
    self.in_features = in_features
    self.qkv_features = qkv_features if qkv_features is not None else in_features
    self.out_features = out_features if out_features is not None else in_features
    self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
    self.in_kv_features = in_kv_features if in_kv_features is not None else in_features
    if self.qkv_features % num_heads:
      raise ValueError(f"qkv_features={self.qkv_features} must be divisible by {num_heads=}")
    if num_heads % self.num_kv_heads:
      raise ValueError(f"{num_heads=} must be divisible by num_kv_heads={self.num_kv_heads}")
    self.head_dim = self.qkv_features // num_heads
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.dropout_rate = dropout_rate
    self.deterministic = deterministic
    self.precision = precision
    self.use_bias = use_bias
    self.decode = decode
    self.normalize_qk = normalize_qk
    self.is_causal = is_causal
    self.local_window_size = local_window_size
    self.logits_soft_cap = logits_soft_cap
    self.implementation = implementation

    def linear(in_f, heads):
      return nnx.LinearGeneral(
          in_f, (heads, self.head_dim), dtype=dtype, param_dtype=param_dtype,
          kernel_init=kernel_init, bias_init=bias_init, use_bias=use_bias,
          precision=precision, rngs=rngs)

    # Creation order (query, key, value, out) follows Flax, so equal rngs give equal params.
    self.query = linear(in_features, num_heads)
    self.key = linear(self.in_kv_features, self.num_kv_heads)
    self.value = linear(self.in_kv_features, self.num_kv_heads)
    if normalize_qk:
      self.query_ln = nnx.LayerNorm(self.head_dim, use_bias=False, dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)
      self.key_ln = nnx.LayerNorm(self.head_dim, use_bias=False, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    else:
      self.query_ln = nnx.data(None)
      self.key_ln = nnx.data(None)
    self.out = nnx.LinearGeneral(
        (num_heads, self.head_dim), self.out_features, axis=(-2, -1),
        kernel_init=out_kernel_init or kernel_init, bias_init=out_bias_init or bias_init,
        use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision,
        rngs=rngs)
    self.rngs = rngs.dropout.fork() if keep_rngs and dropout_rate > 0 else None
    self.cached_key = nnx.data(None)
    self.cached_value = nnx.data(None)
    self.cache_index = nnx.data(None)

  # -------------------------------------------------------------------------------------

  def init_cache(self, input_shape, dtype: Dtype = jnp.float32):
    """Allocates an empty KV cache for ``input_shape = (batch..., max_length, features)``."""
    shape = (*input_shape[:-1], self.num_kv_heads, self.head_dim)
    self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
    self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
    self.cache_index = nnx.Cache(jnp.array(0, dtype=jnp.int32))

  def __call__(
      self,
      inputs_q: Array,
      inputs_k: Array | None = None,
      inputs_v: Array | None = None,
      *,
      segment_ids: Array | tuple[Array, Array] | None = None,
      query_seq_lengths: Array | None = None,
      key_value_seq_lengths: Array | None = None,
      mask: Array | None = None,
      deterministic: bool | None = None,
      rngs: nnx.Rngs | nnx.RngStream | None = None,
      decode: bool | None = None,
      is_causal: bool | None = None,
  ):
    """Attention of ``inputs_q [batch..., T, F]`` over ``inputs_k``/``inputs_v``.

    ``inputs_k`` defaults to ``inputs_q`` and ``inputs_v`` to ``inputs_k`` (as Flax).
    ``query_seq_lengths``/``key_value_seq_lengths`` ``[batch...]`` mark padding;
    ``segment_ids`` ``[batch..., T]`` or a pair separates packed documents; ``mask`` is an
    optional Flax-style mask (dense fallback, see ``jflash.flax_attention_fn``).
    ``is_causal``/``decode``/``deterministic`` override the constructor's values.
    In decode mode only ``inputs_q`` (and optionally ``inputs_k``/``inputs_v``) of the
    next ``t`` positions may be given; see the module docstring.
    """
    if inputs_k is None:
      if inputs_v is not None:
        raise ValueError("inputs_k cannot be None when inputs_v is given")
      inputs_k = inputs_q
    if inputs_v is None:
      inputs_v = inputs_k
    if inputs_q.shape[-1] != self.in_features:
      raise ValueError(f"inputs_q has {inputs_q.shape[-1]} features; the layer expects "
                       f"in_features={self.in_features}")

    query = self.query(inputs_q)
    key = self.key(inputs_k)
    value = self.value(inputs_v)
    if self.normalize_qk:
      query = self.query_ln(query)
      key = self.key_ln(key)

    dropout_rate, dropout_rng = 0.0, None
    if self.dropout_rate > 0.0:
      deterministic = _first(deterministic, self.deterministic)
      if deterministic is None:
        raise ValueError("dropout_rate > 0 needs `deterministic`, given to the constructor or "
                         "to __call__ (as in flax.nnx.MultiHeadAttention)")
    if self.dropout_rate > 0.0 and not deterministic:
      stream = self.rngs if rngs is None else (rngs.dropout if isinstance(rngs, nnx.Rngs) else rngs)
      if stream is None:
        raise ValueError("rngs must be given to __call__ when the layer has keep_rngs=False "
                         "and dropout is active")
      dropout_rate, dropout_rng = self.dropout_rate, stream()

    common = dict(local_window_size=self.local_window_size,
                  logits_soft_cap=self.logits_soft_cap, implementation=self.implementation,
                  dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    if _first(decode, self.decode, False):
      extras = {"segment_ids": segment_ids, "query_seq_lengths": query_seq_lengths,
                "key_value_seq_lengths": key_value_seq_lengths, "mask": mask}
      given = [name for name, x in extras.items() if x is not None]
      if given:
        raise NotImplementedError(f"decode=True does not take {', '.join(given)}: decoding is "
                                  "causal self-attention over the cache")
      x = self._decode(query, key, value, common)
    else:
      causal = bool(_first(is_causal, self.is_causal))
      x = attend(query, key, value, mask=mask, is_causal=causal,
                 query_seq_lengths=query_seq_lengths,
                 key_value_seq_lengths=key_value_seq_lengths, segment_ids=segment_ids,
                 **common)
    return self.out(x)

  def _decode(self, query, key, value, common):
    """Writes ``t`` new keys/values at ``cache_index`` and attends causally to the cache."""
    if self.cached_key is None or self.cached_value is None or self.cache_index is None:
      raise ValueError("the KV cache is not initialised: call init_cache(input_shape) first")
    cache_k, cache_v = self.cached_key[...], self.cached_value[...]
    *batch, max_len, kv_heads, head_dim = cache_k.shape
    t = key.shape[-3]
    if key.shape[:-3] != tuple(batch) or key.shape[-2:] != (kv_heads, head_dim):
      raise ValueError(f"KV cache shape error: cache holds {cache_k.shape}, new keys are {key.shape}")
    if t > max_len:
      raise ValueError(f"{t} new tokens do not fit a cache of max_length={max_len}")
    # Writing past max_length is not checked at run time: dynamic_update_slice would clamp.
    idx = self.cache_index[...]
    zero = jnp.zeros((), idx.dtype)
    at = (zero,) * len(batch) + (idx, zero, zero)
    key = key.astype(cache_k.dtype)
    value = value.astype(cache_v.dtype)
    self.cached_key[...] = cache_k = lax.dynamic_update_slice(cache_k, key, at)
    self.cached_value[...] = cache_v = lax.dynamic_update_slice(cache_v, value, at)
    self.cache_index[...] = idx + t
    query = query.astype(cache_k.dtype)

    window = common.pop("local_window_size")
    left = None if window is None else (window[0] if isinstance(window, (tuple, list)) else window)
    # The new chunk against itself: query r and key p share the offset idx.
    parts = [attend(query, key, value, is_causal=True,
                    local_window_size=None if left is None else (left, 0),
                    return_residual=True, **common)]
    # The new chunk against the cached prefix [0, idx).
    if left is None or left >= max_len:
      parts.append(attend(query, cache_k, cache_v,
                          key_value_seq_lengths=jnp.broadcast_to(idx, tuple(batch)),
                          return_residual=True, **common))
    elif left > 0:
      pos = idx - left + jnp.arange(left)  # absolute positions of the slab [idx-left, idx)
      take = lambda c: jnp.take(c, jnp.clip(pos, 0, max_len - 1), axis=len(batch))
      kv_ids = jnp.broadcast_to((pos >= 0).astype(jnp.int32), (*batch, left))
      q_ids = jnp.ones((*batch, t), jnp.int32)
      parts.append(attend(query, take(cache_k), take(cache_v), segment_ids=(q_ids, kv_ids),
                          local_window_size=(0, left), return_residual=True, **common))
    return merge_attention(parts)
