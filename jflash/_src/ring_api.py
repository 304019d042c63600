"""``jflash.ring_attention``: validate, canonicalise, pick a backend, call the ring."""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jflash._src import api
from jflash._src import ring
from jflash._src import vjp
from jflash._src.backends import registry

# Jitted with the static Ring, so that eager shard_map calls hit the compilation cache.
_ring_attention = jax.jit(vjp.ring_attention, static_argnums=0)


def _varying_axes(x) -> frozenset:
  """The manual mesh axes ``x`` varies over: empty unless shard_map checks them."""
  axis_type = getattr(jax.typeof(x), "manual_axis_type", None)
  return getattr(axis_type, "varying", frozenset())


def _ring_size(axis_name) -> int:
  if axis_name is None:
    raise ValueError("axis_name is required: the mesh axis of jax.shard_map that the sequence "
                     "is split over")
  try:
    hash(axis_name)
    return lax.axis_size(axis_name)
  except (NameError, TypeError) as e:
    raise ValueError(f"axis_name={axis_name!r} is not a mesh axis bound here: call "
                     f"ring_attention inside jax.shard_map over that axis ({e})") from e


def _segment_ids(segment_ids, batch: int, t: int, s: int):
  if segment_ids is None:
    return None
  if isinstance(segment_ids, (tuple, list)):
    raise ValueError("segment_ids must be one [B, T] array: ring attention is self attention, "
                     "the key/value chunks carry the same ids as the queries")
  ids = jnp.asarray(segment_ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"segment_ids must be integers; got segment_ids.dtype={ids.dtype}")
  if t != s:
    raise ValueError(f"segment_ids need query and key/value chunks of one length; got T={t}, S={s}")
  if ids.shape != (batch, t):
    raise ValueError(f"segment_ids must have shape (B, T)={(batch, t)} (this device's chunk); "
                     f"got segment_ids.shape={ids.shape}")
  return ids.astype(jnp.int32)


def _pick(implementation, make_ring, n_devices: int, q, k, v) -> ring.Ring:
  """The first backend of the usual preference order that supports every ring step."""
  reasons = []
  for name in api._candidates(implementation):
    r = make_ring(name, name == "triton" and not api._on_gpu())
    try:
      for spec in ring.pair_specs(r, n_devices, q.shape[1], k.shape[1]):
        registry.get(name).supports(r.problem(spec), q, k, v, None)
    except NotImplementedError as e:
      if implementation is not None:
        raise
      reasons.append(f"{name}: {e}")
      continue
    return r
  raise NotImplementedError("no jflash implementation supports these arguments: " + "; ".join(reasons))


def ring_attention(
    query,
    key,
    value,
    *,
    axis_name,
    is_causal: bool = False,
    scale: float | None = None,
    segment_ids=None,
    logits_soft_cap: float | None = None,
    local_window_size=None,
    layout: Literal["contiguous", "zigzag"] = "contiguous",
    implementation: Literal["mosaic", "triton", "xla"] | None = None,
    return_residual: bool = False,
):
  """Attention over a sequence split across the mesh axis ``axis_name`` (ring attention).

  Call it inside ``jax.shard_map(..., check_vma=False)``, where each device along
  ``axis_name`` holds one chunk of the sequence: ``query [B, T, N, H]``, ``key`` and
  ``value [B, S, K, H]`` (rank 3 without B; ``N % K == 0``), ``segment_ids [B, T]``.
  The result is this device's chunk of the output of attention over the whole
  sequence, ``[B, T, N, H]``, exactly (up to rounding) what ``dot_product_attention``
  gives on the gathered sequence; gradients are exact too. K/V chunks circulate with
  ``lax.ppermute`` (a ring of ``P`` steps, communication overlapped with compute);
  no device ever holds more than two K/V chunks.

  ``layout`` says which part of the sequence each device holds (it matters only with
  ``is_causal``, which needs ``T == S``):

  * ``"contiguous"``: device ``d`` holds chunk ``d``. Future chunks are skipped, so
    device ``d`` computes ``d + 1`` of ``P`` chunk pairs: the load is unbalanced.
  * ``"zigzag"``: device ``d`` holds half-chunks ``d`` and ``2P-1-d`` of ``2P``, which
    balances the causal load exactly. Reorder the global arrays with
    ``jflash.to_zigzag(x, P)`` before sharding and undo it with ``jflash.from_zigzag``.

  ``scale``, ``is_causal``, ``local_window_size`` (contiguous layout only),
  ``logits_soft_cap``, ``implementation`` and ``return_residual`` (the lse, ``[B, T, N]``
  f32, -inf on empty rows) mean what they mean in ``dot_product_attention``, on the
  positions of the whole sequence; ``segment_ids`` travel with their K/V chunk. Chunk
  pairs with nothing visible are never computed, and a window that sees no later keys
  (causal, or ``right == 0``) and reaches back ``W`` tokens ends the ring after
  ``ceil(W / T)`` steps.
  """
  if layout not in ring.LAYOUTS:
    raise ValueError(f"layout={layout!r} is not one of {ring.LAYOUTS}")
  left, right = api._window(local_window_size)
  if left is not None and layout == "zigzag":
    raise NotImplementedError(
        f"local_window_size={local_window_size!r} needs layout='contiguous' (a window already "
        "balances the causal load; the zigzag layout does not support windows)")
  n_devices = _ring_size(axis_name)
  query, key, value = (jnp.asarray(x) if isinstance(x, (np.ndarray, list)) else x
                       for x in (query, key, value))
  api._check_qkv(query, key, value)
  if any(_varying_axes(x) for x in (query, key, value)):
    raise NotImplementedError(
        "ring_attention needs jax.shard_map(..., check_vma=False): jflash's kernels do not "
        "declare how their outputs vary over manual mesh axes yet")
  unbatched = query.ndim == 3
  if unbatched:
    query, key, value = query[None], key[None], value[None]
    if segment_ids is not None and not isinstance(segment_ids, (tuple, list)):
      segment_ids = jnp.asarray(segment_ids)[None]
  api._check_shapes(query, key)
  b, t, n, h = query.shape
  s = key.shape[1]
  if not isinstance(is_causal, (bool, np.bool_)):
    raise TypeError(f"is_causal must be a Python bool; got {is_causal=}")
  if is_causal and t != s:
    raise ValueError(f"is_causal=True needs query and key/value chunks of one length; got T={t}, S={s}")
  if left is not None and t != s:
    raise ValueError(f"local_window_size needs query and key/value chunks of one length; got T={t}, S={s}")
  if is_causal and layout == "zigzag" and t % 2:
    raise ValueError(f"layout='zigzag' needs an even chunk length (two half-chunks); got T={t}")
  scale = 1.0 / math.sqrt(h) if scale is None else api._static_float(scale, "scale")
  if not math.isfinite(scale):
    raise ValueError(f"scale must be finite; got {scale=}")
  if logits_soft_cap is not None:
    logits_soft_cap = api._static_float(logits_soft_cap, "logits_soft_cap")
    if not (logits_soft_cap > 0 and math.isfinite(logits_soft_cap)):
      raise ValueError(f"logits_soft_cap must be a positive finite float or None; got {logits_soft_cap=}")
  segment_ids = _segment_ids(segment_ids, b, t, s)

  def make_ring(name, interpret):
    return ring.Ring(axis_name=axis_name, layout=layout, causal=bool(is_causal),
                     window_left=left, window_right=right, scale=scale,
                     softcap=logits_soft_cap, has_segment_ids=segment_ids is not None,
                     implementation=name, interpret=interpret)

  r = _pick(implementation, make_ring, n_devices, query, key, value)
  out, lse = _ring_attention(r, query, key, value, segment_ids)
  if unbatched:
    out, lse = out[0], lse[0]
  if not return_residual:
    return out
  return out, jnp.swapaxes(jnp.where(jnp.isposinf(lse), -jnp.inf, lse), -1, -2)
