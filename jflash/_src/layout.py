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


def reduce_to_shape(full: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
  """Sums a full ``[B, N, T, S]`` gradient over the dims that ``shape`` broadcasts (size 1)."""
  axes = tuple(i for i, (a, b) in enumerate(zip(full.shape, shape)) if b == 1 and a != 1)
  return jnp.sum(full, axis=axes, keepdims=True).astype(dtype)
