"""An independent reference for the tests: naive dense attention, written from scratch.

It shares no code with jflash: the mask is built densely from its definition, the
softmax is the textbook one, computed in f32 (or f64 with numpy). Rows with no visible
key give 0 and lse = -inf, the contract jflash promises.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def dense_mask(b, t, s, *, is_causal=False, window=None, q_lengths=None, kv_lengths=None,
               segment_ids=None, n=1, extra=None):
  """bool[B, T, S] (``[B, N, T, S]`` with ``extra``) from the definitions in jax.nn and
  the jflash docs. ``extra``: a boolean mask broadcastable to [B, N, T, S], and-ed in."""
  i = np.arange(t)[:, None]
  j = np.arange(s)[None, :]
  m = np.ones((b, t, s), bool)
  if is_causal:
    m &= (j <= i)[None]
  if window is not None:
    left, right = (window, window) if isinstance(window, int) else window
    m &= ((j >= i - left) & (j <= i + right))[None]
  if q_lengths is not None:
    m &= (i[None] < np.asarray(q_lengths)[:, None, None])
  if kv_lengths is not None:
    m &= (j[None] < np.asarray(kv_lengths)[:, None, None])
  if segment_ids is not None:
    qs, ks = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
    m &= np.asarray(qs)[:, :, None] == np.asarray(ks)[:, None, :]
  if extra is not None:
    m = np.broadcast_to(m[:, None], (b, n, t, s)) & np.broadcast_to(np.asarray(extra), (b, n, t, s))
  return m


def _per_head(mask, n, xp=np):
  """[B, T, S] or [B, N, T, S] -> [B, N, T, S] (numpy or jax.numpy as ``xp``)."""
  mask = xp.asarray(mask)
  return xp.broadcast_to(mask[:, None] if mask.ndim == 3 else mask, (mask.shape[0], n) + mask.shape[-2:])


def attention(q, k, v, mask, *, scale=None, softcap=None, bias=None, dtype=jnp.float32,
              dropout=None):
  """Naive attention in ``dtype`` (f32 default), differentiable, NaN-free on empty rows.

  q [B,T,N,H], k/v [B,S,K,H], mask bool[B,T,S] or [B,N,T,S], bias broadcastable to
  [B,N,T,S] (added after scale, before the soft-cap). ``dropout``: None, or the factor
  each probability is multiplied by before P V (0 where dropped, 1 / (1 - rate) where
  kept), broadcastable to [B,N,T,S]; the lse is the softmax's, before dropout.
  Returns (out, lse [B,T,N]).
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  scale = 1.0 / np.sqrt(h) if scale is None else scale
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  k = jnp.repeat(k, n // kh, axis=2)
  v = jnp.repeat(v, n // kh, axis=2)
  prec = jax.lax.Precision.HIGHEST
  logits = jnp.einsum("btnh,bsnh->bnts", q, k, precision=prec).astype(jnp.float32) * scale
  if bias is not None:
    logits = logits + jnp.asarray(bias, jnp.float32)
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  mask = _per_head(mask, n, jnp)
  empty = ~mask.any(-1, keepdims=True)
  # Double where: empty rows see finite logits, so no NaN reaches the gradient.
  safe = jnp.where(mask, logits, jnp.where(empty, 0.0, -jnp.inf))
  mx = jax.lax.stop_gradient(safe.max(-1, keepdims=True))
  e = jnp.where(mask, jnp.exp(safe - mx), 0.0)
  z = e.sum(-1, keepdims=True)
  probs = e / jnp.where(empty, 1.0, z)
  if dropout is not None:
    probs = probs * jnp.asarray(dropout, jnp.float32)
  out = jnp.einsum("bnts,bsnh->btnh", probs.astype(dtype), v, precision=prec)
  lse = jnp.where(empty, -jnp.inf, mx + jnp.log(jnp.where(empty, 1.0, z)))[..., 0]
  return out.astype(dtype), jnp.transpose(lse, (0, 2, 1))


def attention_np64(q, k, v, mask, *, scale=None, softcap=None, bias=None):
  """The same in float64 numpy, forward only: the ground truth for outputs and lse."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, n, h = q.shape
  kh = k.shape[2]
  scale = 1.0 / np.sqrt(h) if scale is None else scale
  k = np.repeat(k, n // kh, axis=2)
  v = np.repeat(v, n // kh, axis=2)
  # matmul over [B, N] stacks runs BLAS per head (einsum with batch dims would not).
  qt, kt, vt = (np.transpose(x, (0, 2, 1, 3)) for x in (q, k, v))  # [B, N, T|S, H]
  logits = np.matmul(qt, np.swapaxes(kt, -1, -2)) * scale
  if bias is not None:
    logits = logits + np.asarray(jnp.asarray(bias, jnp.float32), np.float64)
  if softcap is not None:
    logits = softcap * np.tanh(logits / softcap)
  mask = _per_head(mask, n)
  logits = np.where(mask, logits, -np.inf)
  mx = logits.max(-1, keepdims=True)
  mx = np.where(np.isfinite(mx), mx, 0.0)
  e = np.exp(logits - mx)
  z = e.sum(-1, keepdims=True)
  probs = e / np.where(z == 0, 1.0, z)
  out = np.transpose(np.matmul(probs, vt), (0, 2, 1, 3))
  with np.errstate(divide="ignore"):
    lse = np.where(z[..., 0] == 0, -np.inf, mx[..., 0] + np.log(z[..., 0]))
  return out, np.transpose(lse, (0, 2, 1))
