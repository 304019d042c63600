"""Ring attention: context parallelism over one mesh axis, inside ``jax.shard_map``.

Each of the P devices on the ring holds one chunk of the sequence (q, k, v and segment
ids). K/V chunks travel around the ring with ``lax.ppermute``; at every step a device
runs jflash's ordinary per-chunk attention (any backend) on its queries and the K/V
chunk it holds, and merges the partial result into its running output through the
lse (exact, f32). The send of the next K/V chunk is issued before the current chunk's
compute, so XLA can overlap the two.

The backward pass is a second ring: K/V travel again, now with their dK/dV
accumulators, which arrive back home after P hops; dQ accumulates locally. Every step
calls the backend's backward with the *global* lse and delta, so the per-chunk
gradients are exact parts of the full one.

Causal masks, chunk by chunk (chunks on one device have equal lengths):

* ``"contiguous"`` layout: device d holds chunk d. The K/V chunk from device j is fully
  visible (j < d), the diagonal (j == d, step 0: causal inside the chunk), or entirely in
  the future (j > d: skipped, only passed along). Device d computes d + 1 chunk pairs,
  so the last device works P times as long as the first.
* ``"zigzag"`` layout (load balanced): the sequence is cut into 2P half-chunks and device
  d holds half-chunks d and 2P-1-d (``to_zigzag`` / ``from_zigzag`` convert). Against
  K/V from device j != d, exactly half of the four half-chunk pairs is visible and the
  rest lies in the future: for j < d both query halves see the first K/V half; for
  j > d the second query half sees both K/V halves. Either is one non-causal call of
  the same size, so every device does the same work at every step. At step 0 (j == d)
  top-left causal over the local pair of halves is exactly the global mask.

The chunk index of the K/V a device holds depends on ``lax.axis_index``, so the cases
are chosen with ``lax.cond``; each branch's static ``MaskSpec`` is causal or not.

Internally the lse is ``[B, N, T]`` f32 with +inf for rows that see no key (vjp.py's
convention); partial results use -inf there while they are merged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from jflash._src.mask import MaskArrays, MaskSpec
from jflash._src.problem import Problem

LAYOUTS = ("contiguous", "zigzag")


@dataclasses.dataclass(frozen=True)
class Ring:
  """The static description of one ring attention call. Hashable."""

  axis_name: Any  # a mesh axis name, or a tuple of them
  layout: str  # one of LAYOUTS
  causal: bool
  scale: float
  softcap: float | None
  has_segment_ids: bool
  implementation: str
  interpret: bool

  def problem(self, q_len: int, kv_len: int, causal: bool) -> Problem:
    """The per-chunk-pair attention problem of one ring step."""
    spec = MaskSpec(q_len=q_len, kv_len=kv_len, causal=causal,
                    has_segment_ids=self.has_segment_ids)
    return Problem(mask=spec, scale=self.scale, softcap=self.softcap,
                   implementation=self.implementation, interpret=self.interpret)

  @property
  def zigzag(self) -> bool:
    # Without a causal mask every chunk pair is visible: the layout changes nothing.
    return self.causal and self.layout == "zigzag"


# (p, q, k, v, bias, arrays) -> (out, lse): vjp._forward.
Forward = Callable[..., tuple[jax.Array, jax.Array]]
# (p, q, k, v, bias, arrays, lse, dout, delta, want_dbias) -> (dq, dk, dv, dbias): vjp._backward.
Backward = Callable[..., tuple[Any, ...]]


def _shift(tree, axis_name, n: int):
  """Sends every leaf to the next device on the ring (d -> d + 1 mod n)."""
  perm = [(d, (d + 1) % n) for d in range(n)]
  return jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), tree)


def _half(x, which: int, axis: int = 1):
  """The first (0) or second (1) half of ``x`` along ``axis``; None stays None."""
  if x is None:
    return None
  c = x.shape[axis] // 2
  return lax.slice_in_dim(x, which * c, (which + 1) * c, axis=axis)


def _half0(x):
  return _half(x, 0)


def _rows(lse):
  """``[B, N, T]`` -> ``[B, T, N, 1]``, to scale outputs row by row."""
  return jnp.swapaxes(lse, 1, 2)[..., None]


def _arrays(r: Ring, q, k, q_seg, kv_seg) -> MaskArrays:
  b = q.shape[0]
  return MaskArrays(q_valid=jnp.full((b,), q.shape[1], jnp.int32),
                    kv_valid=jnp.full((b,), k.shape[1], jnp.int32),
                    q_segment_ids=q_seg if r.has_segment_ids else None,
                    kv_segment_ids=kv_seg if r.has_segment_ids else None)


def _attend(r: Ring, fwd: Forward, q, q_seg, kv, causal: bool):
  """One chunk pair: ``(out f32 [B,T,N,H], lse f32 [B,N,T], -inf on empty rows)``."""
  k, v, kv_seg = kv
  p = r.problem(q.shape[1], k.shape[1], causal)
  out, lse = fwd(p, q, k, v, None, _arrays(r, q, k, q_seg, kv_seg))
  return out.astype(jnp.float32), jnp.where(jnp.isposinf(lse), -jnp.inf, lse)


def _merge(acc, part):
  """Combines two partial softmax results over disjoint key sets, exactly."""
  (o1, l1), (o2, l2) = acc, part
  lse = jnp.logaddexp(l1, l2)
  ref = jnp.where(jnp.isneginf(lse), 0.0, lse)  # both empty: weights exp(-inf) = 0
  return o1 * _rows(jnp.exp(l1 - ref)) + o2 * _rows(jnp.exp(l2 - ref)), lse


def _forward_step(r: Ring, fwd: Forward, q, q_seg, kv, acc, earlier):
  """Merges the K/V chunk of a ring step other than the first into ``acc``.

  ``earlier``: traced bool, the chunk comes from an earlier device on the ring.
  """
  if not r.causal:
    return _merge(acc, _attend(r, fwd, q, q_seg, kv, False))
  if not r.zigzag:
    return lax.cond(earlier, lambda: _merge(acc, _attend(r, fwd, q, q_seg, kv, False)),
                    lambda: acc)

  def early():  # both query halves see the first K/V half
    return _merge(acc, _attend(r, fwd, q, q_seg, jax.tree.map(_half0, kv), False))

  def late():  # the second query half sees both K/V halves
    (o, lse) = acc
    o2, lse2 = _merge((_half(o, 1), _half(lse, 1, 2)),
                      _attend(r, fwd, _half(q, 1), _half(q_seg, 1), kv, False))
    return (jnp.concatenate([_half(o, 0), o2], 1),
            jnp.concatenate([_half(lse, 0, 2), lse2], 2))

  return lax.cond(earlier, early, late)


def _around(r: Ring, kv, state, step):
  """Visits the K/V chunks of the other devices as they travel around the ring.

  ``state = step(s, kv_s, state)`` for s = 1 .. P-1, where ``kv_s`` comes from device
  ``(d - s) mod P``. The next chunk is sent before the compute on ``kv_s`` and does not
  depend on it, so XLA overlaps the two. Steps 1 .. P-2 are one loop body (compile time
  does not grow with P); the last step is peeled so that nothing is sent past it.
  """
  n = lax.axis_size(r.axis_name)
  if n == 1:
    return state
  kv = _shift(kv, r.axis_name, n)

  def body(s, carry):
    kv, state = carry
    return _shift(kv, r.axis_name, n), step(s, kv, state)

  if n > 2:
    kv, state = lax.fori_loop(1, n - 1, body, (kv, state))
  return step(n - 1, kv, state)


def _earlier(r: Ring, s):
  """Traced bool: at step ``s`` this device holds the K/V of an earlier device."""
  me = lax.axis_index(r.axis_name)
  return (me - s) % lax.axis_size(r.axis_name) < me


def forward(r: Ring, fwd: Forward, q, k, v, segment_ids):
  """``q [B,T,N,H]``, ``k, v [B,S,K,H]``, ``segment_ids [B,T]`` or None: this device's
  chunks. Returns ``(out [B,T,N,H] q.dtype, lse [B,N,T] f32, +inf on empty rows)``."""
  kv = (k, v, segment_ids)
  acc = _attend(r, fwd, q, segment_ids, kv, r.causal)  # our own chunk: the diagonal

  def step(s, kv, acc):
    return _forward_step(r, fwd, q, segment_ids, kv, acc, _earlier(r, s))

  out, lse = _around(r, kv, acc, step)
  return out.astype(q.dtype), jnp.where(jnp.isneginf(lse), jnp.inf, lse)


def _grads(r: Ring, bwd: Backward, q, q_seg, kv, lse, dout, delta, causal: bool):
  """dq, dk, dv (f32) of one chunk pair, given the global lse and delta of its rows."""
  k, v, kv_seg = kv
  p = r.problem(q.shape[1], k.shape[1], causal)
  dq, dk, dv, _ = bwd(p, q, k, v, None, _arrays(r, q, k, q_seg, kv_seg), lse, dout, delta,
                      False)
  return tuple(x.astype(jnp.float32) for x in (dq, dk, dv))


def _add(acc, part):
  return tuple(a + b for a, b in zip(acc, part))


def _backward_step(r: Ring, bwd: Backward, q, q_seg, kv, lse, dout, delta, acc, earlier):
  """Adds the gradients of a ring step other than the first to ``(dq, dk, dv)``."""
  full = lambda: _add(acc, _grads(r, bwd, q, q_seg, kv, lse, dout, delta, False))
  if not r.causal:
    return full()
  if not r.zigzag:
    return lax.cond(earlier, full, lambda: acc)

  def early():  # both query halves against the first K/V half
    dq, dk, dv = acc
    gq, gk, gv = _grads(r, bwd, q, q_seg, jax.tree.map(_half0, kv), lse, dout, delta, False)
    c = gk.shape[1]
    return dq + gq, dk.at[:, :c].add(gk), dv.at[:, :c].add(gv)

  def late():  # the second query half against both K/V halves
    dq, dk, dv = acc
    gq, gk, gv = _grads(r, bwd, _half(q, 1), _half(q_seg, 1), kv, _half(lse, 1, 2),
                        _half(dout, 1), _half(delta, 1, 2), False)
    c = gq.shape[1]
    return dq.at[:, c:].add(gq), dk + gk, dv + gv

  return lax.cond(earlier, early, late)


def backward(r: Ring, bwd: Backward, q, k, v, segment_ids, lse, dout, delta):
  """Gradients of ``forward``'s output for this device's chunks: ``(dq, dk, dv)``.

  ``lse [B,N,T]`` is ``forward``'s (global, +inf on empty rows) and ``delta [B,N,T]`` is
  ``rowsum(dout * out) - dlse``, as in vjp.py.
  """
  n = lax.axis_size(r.axis_name)
  kv = (k, v, segment_ids)
  dq, dk, dv = _grads(r, bwd, q, segment_ids, kv, lse, dout, delta, r.causal)

  # The state holds dQ and, not yet sent, the dK/dV accumulators of the K/V chunk of the
  # previous step. They are sent at the start of a step, concurrently with its compute,
  # and arrive as the accumulators of the chunk this step holds.
  def step(s, kv, state):
    dq, dk, dv = state
    dk, dv = _shift((dk, dv), r.axis_name, n)
    return _backward_step(r, bwd, q, segment_ids, kv, lse, dout, delta, (dq, dk, dv),
                          _earlier(r, s))

  dq, dk, dv = _around(r, kv, (dq, dk, dv), step)
  dk, dv = _shift((dk, dv), r.axis_name, n)  # the last hop home (identity when P == 1)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _zigzag_index(num_devices: int):
  """Half-chunk order of the zigzag layout: device d gets half-chunks d and 2P-1-d."""
  p = num_devices
  return [c for d in range(p) for c in (d, 2 * p - 1 - d)]


def _check_zigzag(x, axis: int, num_devices: int, name: str):
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
  axis = _check_zigzag(x, axis, num_devices, "to_zigzag")
  return _reorder(x, axis, _zigzag_index(num_devices))


def from_zigzag(x, num_devices: int, axis: int = 1):
  """The inverse of ``to_zigzag``: back to the natural order of the sequence."""
  axis = _check_zigzag(x, axis, num_devices, "from_zigzag")
  order = _zigzag_index(num_devices)
  inverse = [order.index(c) for c in range(len(order))]
  return _reorder(x, axis, inverse)
