"""Padding helpers shared by the backends: tiles need block multiples, kernels pow2 dims."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def pad_axis(x: jax.Array | None, axis: int, size: int, value=0) -> jax.Array | None:
  """Pads ``x`` with ``value`` at the end of ``axis`` up to ``size`` (no-op if equal)."""
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)
