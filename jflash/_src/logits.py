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


def scores(qk: jax.Array, scale: float, softcap: float | None, base2: bool = False):
  """``qk`` (f32) to logits ``softcap * tanh(scale * qk / softcap)`` or ``scale * qk``.

  Returns ``(s, t)``: the logits (times log2(e) when ``base2``), and ``t``, the tanh
  value needed by ``dscores`` (None without a soft-cap).
  """
  unit = LOG2E if base2 else 1.0
  if softcap is None:
    return qk * (scale * unit), None
  t = jnp.tanh(qk * (scale / softcap))
  return t * (softcap * unit), t


def dscores(ds: jax.Array, t: jax.Array | None) -> jax.Array:
  """Chain rule through the soft-cap: d logits / d (scale * qk) = 1 - tanh^2.

  The remaining factor, ``scale``, is applied once to the final dQ and dK tiles.
  """
  return ds if t is None else ds * (1.0 - t * t)
