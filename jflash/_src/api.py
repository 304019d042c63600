"""``jflash.dot_product_attention``: validate, canonicalise, dispatch, fall back."""

from __future__ import annotations

import logging
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jflash._src import dropout as dropout_lib
from jflash._src import vjp
from jflash._src.backends import registry
from jflash._src.mask import MaskArrays, MaskSpec
from jflash._src.problem import Problem

logger = logging.getLogger("jflash")

_FLOAT_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def _check_qkv(query, key, value):
  for name, x in (("query", query), ("key", key), ("value", value)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim not in (3, 4):
      raise ValueError(f"{name} must have rank 3 [T, N, H] or 4 [B, T, N, H]; got {name}.shape={x.shape}")
    if jnp.dtype(x.dtype) not in _FLOAT_DTYPES:
      raise TypeError(f"{name}.dtype={x.dtype} is not supported; use float16, bfloat16 or float32")
  if not query.ndim == key.ndim == value.ndim:
    raise ValueError(f"query, key and value must have the same rank; got {query.ndim=}, {key.ndim=}, {value.ndim=}")
  if not query.dtype == key.dtype == value.dtype:
    raise TypeError(f"query, key and value must share a dtype; got {query.dtype=}, {key.dtype=}, {value.dtype=}")
  if key.shape != value.shape:
    raise ValueError(f"key and value must have the same shape; got {key.shape=}, {value.shape=}")


def _check_shapes(query, key):
  b, t, n, h = query.shape
  bk, s, kh, hk = key.shape
  if b != bk:
    raise ValueError(f"query and key batch sizes differ: {query.shape=}, {key.shape=}")
  if h != hk:
    raise ValueError(f"query and key head dims differ: {query.shape[-1]=}, {key.shape[-1]=}")
  if n % kh:
    raise ValueError(f"query heads must be a multiple of key/value heads (GQA); got {n=} query heads, {kh=} kv heads")
  if min(t, s, n, h) == 0:
    raise ValueError(f"empty dimension in {query.shape=} or {key.shape=}")


def _lengths(x, name, batch, limit):
  if x is None:
    return jnp.full((batch,), limit, jnp.int32)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must be an integer array, got {name}.dtype={x.dtype}")
  if x.shape != (batch,):
    raise ValueError(f"{name} must have shape (batch,)=({batch},); got {name}.shape={x.shape}")
  return jnp.clip(x.astype(jnp.int32), 0, limit)


def _window(local_window_size):
  if local_window_size is None:
    return None, None
  if isinstance(local_window_size, (int, np.integer)) and not isinstance(local_window_size, bool):
    left = right = int(local_window_size)
  elif (isinstance(local_window_size, (tuple, list)) and len(local_window_size) == 2
        and all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in local_window_size)):
    left, right = (int(w) for w in local_window_size)
  else:
    raise TypeError(f"local_window_size must be an int or a pair of ints; got {local_window_size=}")
  if left < 0 or right < 0:
    raise ValueError(f"local_window_size must be non-negative; got {local_window_size=}")
  return left, right


def _segments(segment_ids, batch, t, s):
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError(f"segment_ids must be one [B, T] array or a pair (q_ids, kv_ids); got {len(segment_ids)} items")
    q_ids, kv_ids = (jnp.asarray(x) for x in segment_ids)
  else:
    q_ids = kv_ids = jnp.asarray(segment_ids)
    if t != s:
      raise ValueError(f"a single segment_ids array needs T == S; got T={t}, S={s}: pass (q_ids, kv_ids)")
  for name, ids, length in (("segment_ids (query)", q_ids, t), ("segment_ids (key/value)", kv_ids, s)):
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise TypeError(f"{name} must be integers; got dtype={ids.dtype}")
    if ids.shape != (batch, length):
      raise ValueError(f"{name} must have shape {(batch, length)}; got {ids.shape}")
  return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)


def _static_float(x, name: str) -> float:
  """A float known at trace time (it shapes the kernels), or an error naming ``name``."""
  if isinstance(x, jax.core.Tracer):
    raise TypeError(f"{name} must be a Python float (it is static), not a traced value")
  try:
    return float(x)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name} must be a Python float (it is static); got {x!r}") from e


def _broadcastable(name, x, full, unbatched):
  """``x`` as a rank-4 array whose dims are 1 or those of ``full`` = (B, N, T, S)."""
  if x is None:
    return None
  if not hasattr(x, "shape"):
    x = jnp.asarray(x)
  if unbatched and x.ndim == 4:
    raise ValueError(f"{name} must have rank <= 3 ([N, T, S]) for unbatched inputs; got {name}.shape={x.shape}")
  if x.ndim > 4:
    raise ValueError(f"{name} must have rank <= 4 ([B, N, T, S]); got {name}.shape={x.shape}")
  x = x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))
  if any(d not in (1, f) for d, f in zip(x.shape, full)):
    raise ValueError(f"{name}.shape={x.shape} is not broadcastable to [B, N, T, S]={full}")
  return x


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _candidates(implementation) -> tuple[str, ...]:
  if implementation is None:
    return ("mosaic", "triton") if _on_gpu() else ("xla",)
  if implementation not in registry.IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} is not one of {registry.IMPLEMENTATIONS + (None,)}")
  return (implementation,)


def dot_product_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: Literal["mosaic", "triton", "xla"] | None = None,
    return_residual: bool = False,
    logits_soft_cap: float | None = None,
    segment_ids=None,
    dropout_rate: float = 0.0,
    dropout_rng=None,
):
  """Scaled dot-product attention, computed by FlashAttention kernels.

  Same arguments, layout and meaning as ``jax.nn.dot_product_attention``:
  ``query [B, T, N, H]``, ``key`` and ``value [B, S, K, H]`` (rank 3 without B),
  ``N % K == 0`` (GQA/MQA). Extras, keyword-only:

  * ``logits_soft_cap``: logits become ``cap * tanh(logits / cap)`` (after scale).
  * ``segment_ids``: ``[B, T]`` ints (self attention) or a pair ``([B, T], [B, S])``;
    a query attends only to keys with an equal id (packed documents).
  * ``dropout_rate``, ``dropout_rng``: inverted dropout on the probabilities. The mask is
    a hash of the rng and the (batch, head, query, key) position, regenerated in the
    backward pass, never stored: the same rng gives the same result.

  ``bias`` (float) and ``mask`` (bool, True = attend) broadcast to ``[B, N, T, S]``; both
  are read tile by tile, and bias gets its gradient (reduced to its own shape).

  ``implementation``: ``"mosaic"`` (Hopper), ``"triton"`` (any sm80+ GPU; interpret
  mode without a GPU), ``"xla"`` (blockwise pure JAX), or None: the fastest one that
  supports the arguments on this device. A query row with no visible key returns 0
  (and gets zero gradients). With ``return_residual=True`` also returns the f32
  natural-log logsumexp in ``[B, T, N]`` layout (-inf for such empty rows).
  """
  query, key, value = (jnp.asarray(x) if isinstance(x, (np.ndarray, list)) else x
                       for x in (query, key, value))
  _check_qkv(query, key, value)
  unbatched = query.ndim == 3
  if unbatched:
    query, key, value = query[None], key[None], value[None]
  _check_shapes(query, key)
  b, t, n, h = query.shape
  s = key.shape[1]

  bias = _broadcastable("bias", bias, (b, n, t, s), unbatched)
  if bias is not None and not jnp.issubdtype(bias.dtype, jnp.floating):
    raise TypeError(f"bias must be a float array; got bias.dtype={bias.dtype}")
  mask = _broadcastable("mask", mask, (b, n, t, s), unbatched)
  if mask is not None and mask.dtype != jnp.bool_:
    raise TypeError(f"mask must be a boolean array (True = attend); got mask.dtype={mask.dtype}")
  dropout_rate = _static_float(dropout_rate, "dropout_rate")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1); got {dropout_rate=}")
  dropout_seed = None
  if dropout_rate:
    if dropout_rng is None:
      raise ValueError(f"dropout_rate={dropout_rate} needs a dropout_rng (a PRNG key)")
    try:
      dropout_seed = dropout_lib.seed_from_rng(dropout_rng)
    except (TypeError, ValueError) as e:
      raise TypeError(f"dropout_rng must be a PRNG key; got {dropout_rng!r}") from e
  if not isinstance(is_causal, (bool, np.bool_)):
    raise TypeError(f"is_causal must be a Python bool; got {is_causal=}")
  scale = 1.0 / math.sqrt(h) if scale is None else _static_float(scale, "scale")
  if not math.isfinite(scale):
    raise ValueError(f"scale must be finite; got {scale=}")
  if logits_soft_cap is not None:
    logits_soft_cap = _static_float(logits_soft_cap, "logits_soft_cap")
    if not (logits_soft_cap > 0 and math.isfinite(logits_soft_cap)):
      raise ValueError(f"logits_soft_cap must be a positive finite float or None; got {logits_soft_cap=}")
  left, right = _window(local_window_size)
  q_ids, kv_ids = _segments(segment_ids, b, t, s)
  arrays = MaskArrays(
      q_valid=_lengths(query_seq_lengths, "query_seq_lengths", b, t),
      kv_valid=_lengths(key_value_seq_lengths, "key_value_seq_lengths", b, s),
      q_segment_ids=q_ids, kv_segment_ids=kv_ids, dense=mask, dropout_seed=dropout_seed)
  spec = MaskSpec(q_len=t, kv_len=s, causal=bool(is_causal), window_left=left,
                  window_right=right, has_segment_ids=q_ids is not None,
                  has_dense_mask=mask is not None)

  out, lse = _dispatch(implementation, spec, scale, logits_soft_cap, dropout_rate, query, key,
                       value, bias, arrays)
  if unbatched:
    out, lse = out[0], lse[0]
  if not return_residual:
    return out
  # Internal lse is [B, N, T] with +inf for empty rows; the public one is BTN, -inf there.
  lse = jnp.swapaxes(jnp.where(jnp.isposinf(lse), -jnp.inf, lse), -1, -2)
  return out, lse


# Jitted with the static Problem, so eager calls hit the compilation cache instead of
# re-tracing the kernels' Python loops every time. Under an outer jit this inlines.
_attention = jax.jit(vjp.attention, static_argnums=0)


def _dispatch(implementation, spec, scale, softcap, dropout_rate, q, k, v, bias, arrays):
  candidates = _candidates(implementation)
  reasons = []
  for name in candidates:
    p = Problem(mask=spec, scale=scale, softcap=softcap, dropout_rate=dropout_rate,
                implementation=name,
                interpret=(name == "triton" and not _on_gpu()))
    try:
      registry.get(name).supports(p, q, k, v, bias)
    except NotImplementedError as e:
      if implementation is not None:
        raise
      logger.debug("jflash: implementation %r skipped: %s", name, e)
      reasons.append(f"{name}: {e}")
      continue
    if implementation is None and name != candidates[0]:
      logger.debug("jflash: falling back to %r (%s)", name, "; ".join(reasons))
    return _attention(p, q, k, v, bias, arrays)
  raise NotImplementedError("no jflash implementation supports these arguments: " + "; ".join(reasons))
