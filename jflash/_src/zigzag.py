"""The zigzag sequence layout of ring attention, and converters into and out of it.

With a causal mask, a device holding a late chunk of the sequence has far more work than
one holding an early chunk. The zigzag layout cuts the sequence into ``2P`` half-chunks
and gives device ``d`` half-chunks ``d`` and ``2P-1-d``: one early, one late, the same
causal work on every device (ring.py relies on this order).
"""

from __future__ import annotations

import jax.numpy as jnp


def _order(num_devices: int) -> list[int]:
  """Half-chunk order of the zigzag layout: slot d holds half-chunks d and 2P-1-d."""
  p = num_devices
  return [c for d in range(p) for c in (d, 2 * p - 1 - d)]


def _check(x, axis: int, num_devices: int, name: str) -> int:
  if not isinstance(num_devices, int) or isinstance(num_devices, bool) or num_devices < 1:
    raise ValueError(f"{name}: num_devices must be a positive int; got {num_devices=}")
  if not hasattr(x, "shape"):
    raise TypeError(f"{name}: x must be an array; got {type(x).__name__}")
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(f"{name}: axis={axis} is out of range for x.shape={x.shape}")
  axis %= x.ndim
  if x.shape[axis] % (2 * num_devices):
    raise ValueError(f"{name}: the sequence length x.shape[{axis}]={x.shape[axis]} must be a "
                     f"multiple of 2 * num_devices = {2 * num_devices}")
  return axis


def _reorder(x, axis: int, order):
  n = len(order)
  parts = x.reshape(x.shape[:axis] + (n, x.shape[axis] // n) + x.shape[axis + 1:])
  return jnp.take(parts, jnp.asarray(order), axis=axis).reshape(x.shape)


def to_zigzag(x, num_devices: int, axis: int = 1):
  """Reorders a global sequence into the zigzag layout of ``ring_attention``.

  The sequence axis (length a multiple of ``2 * num_devices``) is cut into
  ``2 * num_devices`` equal half-chunks; half-chunks ``d`` and ``2 * num_devices - 1 - d``
  go next to each other in slot ``d``, so sharding the result evenly over the ring axis
  gives device ``d`` an equal share of early and late (causally cheap and costly) tokens.
  Use it on q, k, v and segment ids alike; ``from_zigzag`` undoes it.
  """
  axis = _check(x, axis, num_devices, "to_zigzag")
  return _reorder(x, axis, _order(num_devices))


def from_zigzag(x, num_devices: int, axis: int = 1):
  """The inverse of ``to_zigzag``: back to the natural order of the sequence."""
  axis = _check(x, axis, num_devices, "from_zigzag")
  order = _order(num_devices)
  return _reorder(x, axis, [order.index(c) for c in range(len(order))])
