"""Counter-based dropout on the attention probabilities: no mask is ever stored.

Whether entry (b, h, i, j) survives is a hash of the seed and those four coordinates,
so the forward, dQ and dK/dV kernels of every backend regenerate the same mask, tile by
tile, in any order. The same rng gives the same result. Arithmetic is int32 with
wrapping multiplies and logical shifts, which Triton, XLA and Pallas interpret mode all
compute identically.

Coordinates are global: when the batch or heads are sharded, ``seed`` carries each
shard's offsets (``seed[2]``, ``seed[3]``), so sharded and unsharded runs drop the same
entries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Odd constants of a murmur3-style finaliser and a Weyl sequence, as int32 bit patterns.
_M1 = 0x7FEB352D
_M2 = 0x846CA68B - (1 << 32)
_W1 = 0x9E3779B9 - (1 << 32)
_W2 = 0x85EBCA6B - (1 << 32)
_W3 = 0x27D4EB2F
_BITS = 24  # the survival test compares the top 24 hash bits, as a non-negative int32


def _mix(x):
  x = x ^ lax.shift_right_logical(x, jnp.int32(16))
  x = x * jnp.int32(_M1)
  x = x ^ lax.shift_right_logical(x, jnp.int32(15))
  x = x * jnp.int32(_M2)
  return x ^ lax.shift_right_logical(x, jnp.int32(16))


def seed_from_rng(rng) -> jax.Array:
  """int32[4]: two words of seed from a PRNG key, then batch and head offsets (0)."""
  words = jax.random.bits(rng, (2,), jnp.uint32).astype(jnp.int32)
  return jnp.concatenate([words, jnp.zeros((2,), jnp.int32)])


def keep(seed, b, h, q_pos, k_pos, rate: float):
  """bool, broadcasting ``b, h, q_pos, k_pos`` (int32): True where the entry survives.

  ``seed`` is the int32[4] of ``seed_from_rng`` (offsets added by sharding). Survival
  probability is ``1 - rate`` up to 2^-24.
  """
  base = _mix(seed[0] ^ _mix(seed[1] + (b + seed[2]) * jnp.int32(_W1)
                             + (h + seed[3]) * jnp.int32(_W2)))
  x = _mix(base + q_pos * jnp.int32(_W3))
  x = _mix(x ^ (k_pos * jnp.int32(_W1)))
  threshold = int(round(rate * (1 << _BITS)))
  return lax.shift_right_logical(x, jnp.int32(32 - _BITS)) >= threshold
