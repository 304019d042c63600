"""Flax glue: the ``attention_fn=`` drop-in and the call shared by the jflash layers.

Nothing here imports Flax: Flax hands plain arrays and keyword arguments to an
``attention_fn``, so the adapter is pure JAX (``import jflash`` stays light).

* ``attend``: ``jflash.dot_product_attention`` for Flax's layout ``[batch..., T, N, H]``
  (any number of batch dims, including none), plus Flax-style ``mask``/``bias`` of shape
  ``[batch..., N or 1, T, S]``. It is what ``jflash.linen`` and ``jflash.nnx`` call.
* ``flax_attention_fn``: the hook for ``flax.linen.MultiHeadDotProductAttention`` and
  ``flax.nnx.MultiHeadAttention``; it translates their keyword arguments to ``attend``.

Masks and biases go to the kernels as they are (read tile by tile): nothing here
builds attention weights.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jflash._src import api


__all__ = ["attend", "flax_attention_fn", "merge_attention"]


# ---------------------------------------------------------------------------------------
# Batch dims: Flax allows [batch..., T, N, H]; jflash takes exactly one batch dim.


def _flatten_per_batch(x, batch, name, trailing):
  """Broadcast ``x`` to ``batch + trailing`` (trailing: int sizes) and fold the batch."""
  if x is None:
    return None
  x = jnp.asarray(x)
  b = math.prod(batch)
  try:
    x = jnp.broadcast_to(x, tuple(batch) + tuple(trailing))
  except ValueError as e:
    raise ValueError(f"{name} of shape {x.shape} does not broadcast to batch dims {tuple(batch)} "
                     f"+ {tuple(trailing)}") from e
  return x.reshape((b,) + tuple(trailing))


def _flatten_pairwise(x, batch, name):
  """A mask or bias broadcastable to ``[batch..., N, T, S]`` -> ``[B or 1, N or 1, T, S]``."""
  if x is None:
    return None
  x = jnp.asarray(x)
  nd = len(batch) + 3
  if x.ndim > nd:
    raise ValueError(f"{name} has rank {x.ndim}, more than [batch..., heads, T, S] (rank {nd}); "
                     f"got {name}.shape={x.shape} for batch dims {tuple(batch)}")
  x = x.reshape((1,) * (nd - x.ndim) + x.shape)
  lead, rest = x.shape[:len(batch)], x.shape[len(batch):]
  if all(d == 1 for d in lead):  # keep a broadcast batch dim broadcast (no copy)
    return x.reshape((1,) + rest)
  return jnp.broadcast_to(x, tuple(batch) + rest).reshape((math.prod(batch),) + rest)


def _canonical_window(local_window_size):
  if local_window_size is None:
    return None
  if isinstance(local_window_size, (tuple, list)):
    return tuple(local_window_size)
  return (local_window_size, local_window_size)


def attend(query, key, value, *, bias=None, mask=None, scale=None, is_causal=False,
           query_seq_lengths=None, key_value_seq_lengths=None, segment_ids=None,
           local_window_size=None, logits_soft_cap=None, implementation=None,
           dropout_rate=0.0, dropout_rng=None, return_residual=False):
  """``jflash.dot_product_attention`` on Flax's layout ``[batch..., T, N, H]``.

  ``query`` ``[batch..., T, N, H]``, ``key``/``value`` ``[batch..., S, K, H]`` with the
  same batch dims (any number, including none). Lengths broadcast to ``batch``;
  ``segment_ids`` is one ``[batch..., T]`` array or a pair ``([batch..., T],
  [batch..., S])``; ``mask`` (bool or 0/1, True = visible) and ``bias`` broadcast to
  ``[batch..., N, T, S]``. q/k/v are promoted to a common dtype. Everything else has the
  meaning of ``jflash.dot_product_attention``; the residual lse is ``[batch..., T, N]``.
  """
  dtype = jnp.result_type(query.dtype, key.dtype, value.dtype)
  query, key, value = (jnp.asarray(x).astype(dtype) for x in (query, key, value))
  if not (query.ndim == key.ndim == value.ndim) or query.ndim < 3:
    raise ValueError(f"query, key and value must be [batch..., length, heads, head_dim] of one "
                     f"rank; got {query.shape=}, {key.shape=}, {value.shape=}")
  batch = query.shape[:-3]
  if key.shape[:-3] != batch or value.shape[:-3] != batch:
    raise ValueError(f"query, key and value batch dims differ: {query.shape=}, {key.shape=}, "
                     f"{value.shape=}")
  b, t, s = math.prod(batch), query.shape[-3], key.shape[-3]
  q = query.reshape((b,) + query.shape[-3:])
  k = key.reshape((b,) + key.shape[-3:])
  v = value.reshape((b,) + value.shape[-3:])
  q_len = _flatten_per_batch(query_seq_lengths, batch, "query_seq_lengths", ())
  kv_len = _flatten_per_batch(key_value_seq_lengths, batch, "key_value_seq_lengths", ())
  if segment_ids is None:
    seg = None
  elif isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError(f"segment_ids must be one array or a pair; got {len(segment_ids)} items")
    seg = (_flatten_per_batch(segment_ids[0], batch, "segment_ids (query)", (t,)),
           _flatten_per_batch(segment_ids[1], batch, "segment_ids (key/value)", (s,)))
  else:
    if t != s:
      raise ValueError(f"a single segment_ids array needs T == S; got T={t}, S={s}")
    ids = _flatten_per_batch(segment_ids, batch, "segment_ids", (t,))
    seg = (ids, ids)
  bool_mask = _flatten_pairwise(mask, batch, "mask")
  if bool_mask is not None:
    bool_mask = bool_mask.astype(jnp.bool_)
  bias = _flatten_pairwise(bias, batch, "bias")
  window = _canonical_window(local_window_size)
  scale = None if scale is None else float(scale)
  logits_soft_cap = None if logits_soft_cap is None else float(logits_soft_cap)

  kwargs = dict(scale=scale, is_causal=is_causal, query_seq_lengths=q_len,
                key_value_seq_lengths=kv_len, segment_ids=seg, local_window_size=window,
                logits_soft_cap=logits_soft_cap)
  res = api.dot_product_attention(
      q, k, v, bias, bool_mask, implementation=implementation,
      return_residual=return_residual, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
      **kwargs)

  out, lse = res if return_residual else (res, None)
  out = out.reshape(query.shape[:-1] + (value.shape[-1],))
  if not return_residual:
    return out
  return out, lse.reshape(query.shape[:-1])


def merge_attention(parts):
  """Combine attention over disjoint key sets: ``[(out, lse), ...]`` -> ``out``.

  ``out [..., T, N, H]`` and natural-log ``lse [..., T, N]`` (-inf where a part saw no
  key), as returned by ``attend(..., return_residual=True)``. Exact: it is the online
  softmax step of FlashAttention applied to whole parts.
  """
  lses = jnp.stack([lse.astype(jnp.float32) for _, lse in parts])
  m = lses.max(0)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp(lses - m)  # [P, ..., T, N]
  den = w.sum(0)
  num = sum(o.astype(jnp.float32) * wi[..., None] for (o, _), wi in zip(parts, w))
  out = num / jnp.where(den == 0.0, 1.0, den)[..., None]
  return out.astype(parts[0][0].dtype)


# ---------------------------------------------------------------------------------------
# The attention_fn hook.


def flax_attention_fn(
    query,
    key,
    value,
    bias=None,
    mask=None,
    broadcast_dropout: bool = True,
    dropout_rng=None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype=None,
    precision=None,
    module=None,
    *,
    is_causal: bool = False,
    force_fp32_for_softmax: bool = False,
    qk_attn_weights_einsum=None,
    attn_weights_value_einsum=None,
    implementation=None,
    logits_soft_cap: float | None = None,
    local_window_size=None,
):
  """Drop-in ``attention_fn`` for Flax's multi-head attention layers, run by jflash.

  Use as ``flax.linen.MultiHeadDotProductAttention(..., attention_fn=jflash.flax_attention_fn)``
  or ``flax.nnx.MultiHeadAttention(..., attention_fn=jflash.flax_attention_fn)``. The
  positional arguments and keywords are those of ``flax.linen.dot_product_attention`` /
  ``flax.nnx.dot_product_attention`` (linen passes the subset this signature names).

  * ``query [batch..., T, N, H]``, ``key``/``value [batch..., S, K, H]``, ``N % K == 0``.
  * ``mask``: Flax mask broadcastable to ``[batch..., N, T, S]`` (bool, or float 0/1 as
    made by ``nn.make_causal_mask``/``nn.make_attention_mask``). A mask makes jflash use
    a dense fallback until its kernels take masks: for causal self-attention prefer
    ``is_causal=True`` (``nnx.MultiHeadAttention.__call__(..., is_causal=True)``) or the
    layers ``jflash.linen``/``jflash.nnx``, which express padding as lengths.
  * A query row whose mask hides every key returns zeros (Flax's default attention
    returns the mean of the values there).
  * Dropout (``deterministic=False`` and ``dropout_rate > 0``) is passed to jflash, which
    applies it inside the kernels (a counter-based mask, regenerated in the backward).
  * ``dtype``: q/k/v are cast to it when given (else promoted to a common dtype).
  * ``precision`` and ``force_fp32_for_softmax`` are accepted and ignored: the kernels
    pick matmul precision from the dtype and always run the softmax in float32.
  * ``broadcast_dropout``: jflash always draws an independent mask per batch row and head
    (Flax's ``broadcast_dropout=True`` shares one across them). The expected output is
    the same; only the correlation between heads differs.
  * ``module`` (Flax's ``sow_weights=True``) and custom ``qk_attn_weights_einsum`` /
    ``attn_weights_value_einsum`` raise NotImplementedError: flash attention never
    materialises the weights.

  jflash extras (bind with ``functools.partial``): ``implementation``,
  ``logits_soft_cap``, ``local_window_size``.
  """
  del broadcast_dropout, force_fp32_for_softmax
  # precision: ignored on purpose; see the docstring.
  del precision
  if module is not None:
    raise NotImplementedError(
        "jflash.flax_attention_fn cannot sow attention weights (sow_weights=True): flash "
        "attention never materialises them. Call the layer with sow_weights=False.")
  if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
    raise NotImplementedError(
        "jflash.flax_attention_fn does not support custom qk_attn_weights_einsum / "
        "attn_weights_value_einsum (e.g. quantised einsums).")
  if dtype is not None:
    query, key, value = (x.astype(dtype) for x in (query, key, value))
  use_dropout = (not deterministic) and dropout_rate > 0.0
  if use_dropout and dropout_rng is None:
    raise ValueError("dropout_rng is required when dropout_rate > 0 and deterministic=False")
  return attend(
      query, key, value, bias=bias, mask=mask, is_causal=bool(is_causal),
      local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
      implementation=implementation,
      dropout_rate=float(dropout_rate) if use_dropout else 0.0,
      dropout_rng=dropout_rng if use_dropout else None)
