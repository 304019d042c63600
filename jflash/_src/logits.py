"""Scores from raw q.k products: scale, then the optional soft-cap, and their derivative.

Shared by every backend so that the forward and backward passes agree on one formula.
Kernels may ask for the scores in base-2 units (``log2e`` folded in), for ``exp2``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def scores(qk: jax.Array, scale: float, softcap: float | None, bias: jax.Array | None = None,
           base2: bool = False):
  """``qk`` (f32) to logits: ``x = scale * qk + bias``, then ``softcap * tanh(x / softcap)``.

  The soft-cap comes after scale and bias, as in Gemma 2. Returns ``(s, t)``: the logits
  (times log2(e) when ``base2``), and ``t``, the tanh value needed by ``dscores`` (None
  without a soft-cap).
  """
  unit = LOG2E if base2 else 1.0
  if bias is None and softcap is None:
    return qk * (scale * unit), None
  x = qk * scale
  if bias is not None:
    x = x + bias.astype(jnp.float32)
  if softcap is None:
    return x * unit if base2 else x, None
  t = jnp.tanh(x * (1.0 / softcap))
  return t * (softcap * unit), t


def dscores(ds: jax.Array, t: jax.Array | None) -> jax.Array:
  """Chain rule through the soft-cap: d logits / d x = 1 - tanh^2.

  The result is the gradient with respect to ``x = scale * qk + bias``: it is dbias as
  it stands; the factor ``scale`` is applied once to the final dQ and dK tiles.
  """
  return ds if t is None else ds * (1.0 - t * t)
