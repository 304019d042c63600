"""The zigzag sequence layout of ring attention, and converters into and out of it.

With a causal mask, a device holding a late chunk of the sequence has far more work than
one holding an early chunk. The zigzag layout cuts the sequence into ``2P`` half-chunks
and gives device ``d`` half-chunks ``d`` and ``2P-1-d``: one early, one late, the same
causal work on every device (ring.py relies on this order).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


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


# ---- inside shard_map: one device's chunk, moved between the layouts with ppermute.


def _home(half: int, n: int) -> int:
  """The device that holds half-chunk ``half`` of ``2n`` in the zigzag layout."""
  return half if half < n else 2 * n - 1 - half


def _sends(n: int, parity: int) -> list[tuple[int, int]]:
  """Device d's half-chunk ``2d + parity`` (contiguous layout) -> its zigzag home."""
  return [(d, _home(2 * d + parity, n)) for d in range(n)]


def _halves(x, axis: int):
  c = x.shape[axis] // 2
  return lax.slice_in_dim(x, 0, c, axis=axis), lax.slice_in_dim(x, c, 2 * c, axis=axis)


def shard_to_zigzag(x, axis_name, axis: int = 1):
  """This device's contiguous chunk (device d holds half-chunks 2d, 2d+1) -> its zigzag
  chunk (half-chunks d, 2n-1-d), like ``to_zigzag`` on the global array. Two ppermutes,
  one per half; every half-chunk moves at most once."""
  n = lax.axis_size(axis_name)
  first, second = _halves(x, axis)
  got_even = lax.ppermute(first, axis_name, _sends(n, 0))  # half-chunks 2d travel here
  got_odd = lax.ppermute(second, axis_name, _sends(n, 1))  # half-chunks 2d+1
  # Device e receives half-chunks e and 2n-1-e, which have opposite parities: e's own
  # parity says which arrival is the early one.
  even = lax.rem(lax.axis_index(axis_name), 2) == 0
  early = jnp.where(even, got_even, got_odd)
  late = jnp.where(even, got_odd, got_even)
  return jnp.concatenate([early, late], axis)


def shard_from_zigzag(x, axis_name, axis: int = 1):
  """The inverse of ``shard_to_zigzag``."""
  n = lax.axis_size(axis_name)
  early, late = _halves(x, axis)
  even = lax.rem(lax.axis_index(axis_name), 2) == 0
  mine_even = jnp.where(even, early, late)  # the even-numbered half-chunk this device holds
  mine_odd = jnp.where(even, late, early)
  back = lambda parity: [(dst, src) for src, dst in _sends(n, parity)]
  first = lax.ppermute(mine_even, axis_name, back(0))
  second = lax.ppermute(mine_odd, axis_name, back(1))
  return jnp.concatenate([first, second], axis)
