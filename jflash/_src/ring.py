"""Ring attention: context parallelism over one mesh axis, inside ``jax.shard_map``.

Each of the P devices on the ring holds one chunk of the sequence (q, k, v and segment
ids; under plain ``jit``, sharding.py adds per-batch valid lengths, made local to each
chunk). K/V chunks travel around the ring, with their ids and lengths, by
``lax.ppermute``; at every step a device runs jflash's ordinary per-chunk attention
(any backend) on its queries and the K/V chunk it holds, and merges the partial
result into its running output through the lse (exact, f32). The send of the next
K/V chunk is issued before the current chunk's compute and does not depend on it, so
XLA can overlap the two.

The backward pass is a second ring: K/V travel again, now with their dK/dV
accumulators, which arrive back home at the end; dQ accumulates locally. Every step
calls the backend's backward with the *global* lse and delta, so the per-chunk
gradients are exact parts of the full one.

Which (query, key) pairs a chunk pair holds depends on how far apart the chunks are:

* ``"contiguous"`` layout: device d holds chunk d. Against the K/V chunk ``distance``
  chunks earlier (``d - j`` for the chunk of device j), the global band of the mask
  (causal ``j - i <= 0``, window ``-left <= j - i <= right``) becomes the band shifted
  by ``distance * C`` in the pair's local positions (C tokens per chunk). Each
  distance gets its own static ``MaskSpec``: fully visible pairs need no predicate, pairs
  with nothing visible are skipped (no compute, the chunk is only passed along), and a
  window that reaches back only a few chunks ends the ring early. Causal without a
  window: earlier chunks are fully visible, the own chunk is causal, later ones are
  skipped, so device d computes d + 1 of P chunk pairs (unbalanced).
* ``"zigzag"`` layout (causal, load balanced): the sequence is cut into 2P half-chunks
  and device d holds half-chunks d and 2P-1-d (zigzag.py converts). Against K/V from
  device j != d, exactly half of the four half-chunk pairs is visible and the rest lies
  in the future: for j < d both query halves see the first K/V half; for j > d the
  second query half sees both K/V halves. Either is one non-causal call of the same
  size, so every device does the same work at every step. At step 0 (j == d) top-left
  causal over the local pair of halves is exactly the global mask.

The distance of the K/V a device holds depends on ``lax.axis_index``, so the cases are
chosen with ``lax.switch`` / ``lax.cond`` between branches with static mask specs.

Internally the lse is ``[B, N, T]`` f32 with +inf for rows that see no key (vjp.py's
convention); partial results use -inf there while they are merged.
"""

from __future__ import annotations

import dataclasses
import functools
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
  window_left: int | None  # global window: key j visible from i iff i-left <= j <= i+right
  window_right: int | None
  scale: float
  softcap: float | None
  has_segment_ids: bool
  implementation: str
  interpret: bool

  def problem(self, spec: MaskSpec) -> Problem:
    return Problem(mask=spec, scale=self.scale, softcap=self.softcap,
                   implementation=self.implementation, interpret=self.interpret)

  @property
  def zigzag(self) -> bool:
    # Without a causal mask every chunk pair is visible: the layout changes nothing.
    return self.causal and self.layout == "zigzag"

  def pair_spec(self, distance: int, q_len: int, kv_len: int) -> MaskSpec | None:
    """The mask of this device's queries against the K/V chunk ``distance`` chunks
    earlier (negative: later) in the contiguous layout, in the pair's own positions.
    None when no pair is visible. Chunks are equal whenever the mask has a band."""
    lo = None if self.window_left is None else -self.window_left
    hi = self.window_right
    if self.causal:
      hi = 0 if hi is None else min(hi, 0)
    plain = dict(q_len=q_len, kv_len=kv_len, has_segment_ids=self.has_segment_ids)
    if lo is None and hi is None:
      return MaskSpec(**plain)
    # Local j - i = global j - i + distance * C, and spans [-(C-1), C-1].
    shift, span = distance * q_len, q_len - 1
    lo = None if lo is None else lo + shift
    hi = None if hi is None else hi + shift
    if (hi is not None and hi < -span) or (lo is not None and lo > span):
      return None
    lo = None if lo is not None and lo <= -span else lo  # bounds that cut nothing
    hi = None if hi is not None and hi >= span else hi
    if lo is None and hi == 0:
      return MaskSpec(causal=True, **plain)
    return MaskSpec(window_left=None if lo is None else -lo, window_right=hi, **plain)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What the contiguous layout computes at each ring step, from static chunk sizes.

  ``specs``: the distinct pair masks of the other devices' chunks; ``table[distance + n-1]``
  (distance -(n-1) .. n-1 chunks back; the own chunk's slot is unused): 0 for a chunk
  pair with nothing visible, else 1 + its index in ``specs``; ``last``: the last step
  with anything to compute on any device (steps after it are not run).
  """

  n: int
  specs: tuple[MaskSpec, ...]
  table: tuple[int, ...]
  last: int

  @classmethod
  def make(cls, r: Ring, n: int, q_len: int, kv_len: int) -> "_Plan":
    if r.zigzag:  # every step has work on every device
      return cls(n=n, specs=(), table=(), last=n - 1)
    by_distance = [None if d == 0 else r.pair_spec(d, q_len, kv_len) for d in range(1 - n, n)]
    specs = tuple(dict.fromkeys(s for s in by_distance if s is not None))
    table = tuple(0 if s is None else 1 + specs.index(s) for s in by_distance)
    # At step s a device holds the chunk s earlier (or, wrapped around, n - s later).
    busy = [s for s in range(1, n) if table[s + n - 1] or table[s - 1]]
    return cls(n=n, specs=specs, table=table, last=max(busy, default=0))

  def choose(self, distance, run, skip):
    """``run(spec)`` for the pair at chunk ``distance`` (traced), or ``skip()``."""
    cases = {t for d, t in enumerate(self.table) if d != self.n - 1}
    if cases == {0}:
      return skip()
    if len(cases) == 1:
      return run(self.specs[cases.pop() - 1])
    index = jnp.asarray(self.table, jnp.int32)[distance + self.n - 1]
    return lax.switch(index, [skip] + [functools.partial(run, s) for s in self.specs])


def pair_specs(r: Ring, n: int, q_len: int, kv_len: int) -> tuple[MaskSpec, ...]:
  """Every chunk-pair mask a ring of ``n`` devices computes with (for ``supports``)."""
  plain = functools.partial(MaskSpec, has_segment_ids=r.has_segment_ids)
  if r.zigzag:
    c = q_len // 2
    return (plain(q_len=q_len, kv_len=kv_len, causal=True), plain(q_len=q_len, kv_len=c),
            plain(q_len=c, kv_len=kv_len))
  return (r.pair_spec(0, q_len, kv_len),) + _Plan.make(r, n, q_len, kv_len).specs


# (p, q, k, v, bias, arrays) -> (out, lse): vjp._forward.
Forward = Callable[..., tuple[jax.Array, jax.Array]]
# (p, q, k, v, bias, arrays, lse, dout, delta, want_dbias) -> (dq, dk, dv, dbias): vjp._backward.
Backward = Callable[..., tuple[Any, ...]]


def _shift(tree, r: Ring, n: int, by: int = 1):
  """Sends every leaf ``by`` devices along the ring (d -> d + by mod n)."""
  perm = [(d, (d + by) % n) for d in range(n)]
  return jax.tree.map(lambda x: lax.ppermute(x, r.axis_name, perm), tree)


def _half(x, which: int, axis: int = 1):
  """The first (0) or second (1) half of ``x`` along ``axis``; None stays None."""
  if x is None:
    return None
  c = x.shape[axis] // 2
  return lax.slice_in_dim(x, which * c, (which + 1) * c, axis=axis)


def _first_half(x):
  return _half(x, 0)


def _rows(lse):
  """``[B, N, T]`` -> ``[B, T, N, 1]``, to scale outputs row by row."""
  return jnp.swapaxes(lse, 1, 2)[..., None]


def _arrays(r: Ring, q, q_side, kv) -> MaskArrays:
  (q_seg, q_valid), (k, _, kv_seg, kv_valid) = q_side, kv
  full = lambda n: jnp.full((q.shape[0],), n, jnp.int32)
  return MaskArrays(q_valid=full(q.shape[1]) if q_valid is None else q_valid,
                    kv_valid=full(k.shape[1]) if kv_valid is None else kv_valid,
                    q_segment_ids=q_seg if r.has_segment_ids else None,
                    kv_segment_ids=kv_seg if r.has_segment_ids else None)


def _chunks(r: Ring, q, k, v, segment_ids, lengths):
  """This device's query side ``(ids, valid)`` and travelling K/V ``(k, v, ids, valid)``.

  ``segment_ids``: one ``[B, T]`` array (self attention), a ``(q_ids, kv_ids)`` pair, or
  None. ``lengths``: None, or the global valid lengths ``(q_valid [B], kv_valid [B])``,
  which become this chunk's (contiguous layout: chunk d starts at ``d * T``); a K/V
  chunk's length travels with it.
  """
  q_ids, kv_ids = segment_ids if isinstance(segment_ids, tuple) else (segment_ids,) * 2
  if lengths is None:
    return (q_ids, None), (k, v, kv_ids, None)
  me = lax.axis_index(r.axis_name)
  if r.zigzag:
    # Half-chunks me and 2P-1-me, early one first: positions still ascend, so the valid
    # ones (global position < length) remain a prefix of the local chunk.
    n = lax.axis_size(r.axis_name)

    def local(total, c):
      part = lambda half: jnp.clip(total - half * (c // 2), 0, c // 2)
      return (part(me) + part(2 * n - 1 - me)).astype(jnp.int32)
  else:
    local = lambda total, c: jnp.clip(total - me * c, 0, c).astype(jnp.int32)
  return (q_ids, local(lengths[0], q.shape[1])), (k, v, kv_ids, local(lengths[1], k.shape[1]))


def _valid_half(valid, which: int, c: int):
  """A prefix length of a chunk -> that of its half ``which`` (halves of ``c``)."""
  return None if valid is None else jnp.clip(valid - which * c, 0, c)


def _q_half(q_side, which: int, c: int):
  """The query side of one half-chunk (``c`` rows)."""
  return _half(q_side[0], which), _valid_half(q_side[1], which, c)


def _kv_first_half(kv):
  k, v, ids, valid = kv
  c = k.shape[1] // 2
  return _first_half(k), _first_half(v), _first_half(ids), _valid_half(valid, 0, c)


def _plain(r: Ring, q, k) -> MaskSpec:
  """No mask inside the pair (the zigzag layout's off-diagonal steps)."""
  return MaskSpec(q_len=q.shape[1], kv_len=k.shape[1], has_segment_ids=r.has_segment_ids)


def _around(r: Ring, plan: _Plan, kv, state, step):
  """Visits the K/V chunks of the other devices as they travel around the ring.

  ``state = step(s, distance, kv_s, state)`` for s = 1 .. plan.last, where ``kv_s`` comes
  from device ``j = (d - s) mod P`` and ``distance = d - j`` counts chunks back. The next
  chunk is sent before the compute on ``kv_s``, so XLA overlaps the two. The steps before
  the last are one loop body (compile time does not grow with P); the last step is
  peeled so that nothing is sent past it.
  """
  n = plan.n
  if plan.last == 0:
    return state
  me = lax.axis_index(r.axis_name)
  visit = lambda s, kv, state: step(s, me - (me - s) % n, kv, state)
  kv = _shift(kv, r, n)

  def body(s, carry):
    kv, state = carry
    return _shift(kv, r, n), visit(s, kv, state)

  if plan.last > 1:
    kv, state = lax.fori_loop(1, plan.last, body, (kv, state))
  return visit(plan.last, kv, state)


def _attend(r: Ring, fwd: Forward, spec: MaskSpec, q, q_side, kv):
  """One chunk pair: ``(out f32 [B,T,N,H], lse f32 [B,N,T], -inf on empty rows)``."""
  out, lse = fwd(r.problem(spec), q, kv[0], kv[1], None, _arrays(r, q, q_side, kv))
  return out.astype(jnp.float32), jnp.where(jnp.isposinf(lse), -jnp.inf, lse)


def _merge(acc, part):
  """Combines two partial softmax results over disjoint key sets, exactly."""
  (o1, l1), (o2, l2) = acc, part
  lse = jnp.logaddexp(l1, l2)
  ref = jnp.where(jnp.isneginf(lse), 0.0, lse)  # both empty: weights exp(-inf) = 0
  return o1 * _rows(jnp.exp(l1 - ref)) + o2 * _rows(jnp.exp(l2 - ref)), lse


def _forward_step(r: Ring, plan: _Plan, fwd: Forward, q, q_side, kv, acc, distance):
  """Merges the K/V chunk ``distance`` chunks back into ``acc``."""
  if not r.zigzag:
    return plan.choose(distance, lambda spec: _merge(acc, _attend(r, fwd, spec, q, q_side, kv)),
                       lambda: acc)

  def early():  # both query halves see the first K/V half
    kv_a = _kv_first_half(kv)
    return _merge(acc, _attend(r, fwd, _plain(r, q, kv_a[0]), q, q_side, kv_a))

  def late():  # the second query half sees both K/V halves
    o, lse = acc
    q_b = _half(q, 1)
    q_side_b = _q_half(q_side, 1, q_b.shape[1])
    o_b, lse_b = _merge((_half(o, 1), _half(lse, 1, 2)),
                        _attend(r, fwd, _plain(r, q_b, kv[0]), q_b, q_side_b, kv))
    return (jnp.concatenate([_half(o, 0), o_b], 1),
            jnp.concatenate([_half(lse, 0, 2), lse_b], 2))

  return lax.cond(distance > 0, early, late)


def _diagonal(r: Ring, q, k) -> MaskSpec:
  """The mask of the device's own chunk pair (step 0)."""
  if r.zigzag:  # top-left causal over the two local halves is the global mask
    return dataclasses.replace(_plain(r, q, k), causal=True)
  return r.pair_spec(0, q.shape[1], k.shape[1])


def forward(r: Ring, fwd: Forward, q, k, v, segment_ids, lengths=None):
  """``q [B,T,N,H]``, ``k, v [B,S,K,H]``, ``segment_ids [B,T]`` (or a ``(q, kv)`` pair,
  or None): this device's chunks; ``lengths``: None or global ``(q_valid, kv_valid)``
  (see ``_chunks``). Returns ``(out [B,T,N,H] q.dtype, lse [B,N,T] f32, +inf on empty
  rows)``."""
  plan = _Plan.make(r, lax.axis_size(r.axis_name), q.shape[1], k.shape[1])
  q_side, kv = _chunks(r, q, k, v, segment_ids, lengths)
  acc = _attend(r, fwd, _diagonal(r, q, k), q, q_side, kv)

  def step(s, distance, kv, acc):
    return _forward_step(r, plan, fwd, q, q_side, kv, acc, distance)

  out, lse = _around(r, plan, kv, acc, step)
  return out.astype(q.dtype), jnp.where(jnp.isneginf(lse), jnp.inf, lse)


def _grads(r: Ring, bwd: Backward, spec: MaskSpec, q, q_side, kv, lse, dout, delta):
  """dq, dk, dv (f32) of one chunk pair, given the global lse and delta of its rows."""
  dq, dk, dv, _ = bwd(r.problem(spec), q, kv[0], kv[1], None, _arrays(r, q, q_side, kv), lse,
                      dout, delta, False)
  return tuple(x.astype(jnp.float32) for x in (dq, dk, dv))


def _backward_step(r: Ring, plan: _Plan, bwd: Backward, q, q_side, kv, lse, dout, delta, acc,
                   distance):
  """Adds the gradients against the K/V chunk ``distance`` chunks back to ``(dq, dk, dv)``."""
  if not r.zigzag:
    def run(spec):
      return tuple(a + g for a, g in zip(acc, _grads(r, bwd, spec, q, q_side, kv, lse, dout,
                                                     delta)))
    return plan.choose(distance, run, lambda: acc)

  def early():  # both query halves against the first K/V half
    dq, dk, dv = acc
    kv_a = _kv_first_half(kv)
    gq, gk, gv = _grads(r, bwd, _plain(r, q, kv_a[0]), q, q_side, kv_a, lse, dout, delta)
    c = gk.shape[1]
    return dq + gq, dk.at[:, :c].add(gk), dv.at[:, :c].add(gv)

  def late():  # the second query half against both K/V halves
    dq, dk, dv = acc
    q_b = _half(q, 1)
    gq, gk, gv = _grads(r, bwd, _plain(r, q_b, kv[0]), q_b,
                        _q_half(q_side, 1, q_b.shape[1]), kv,
                        _half(lse, 1, 2), _half(dout, 1), _half(delta, 1, 2))
    c = gq.shape[1]
    return dq.at[:, c:].add(gq), dk + gk, dv + gv

  return lax.cond(distance > 0, early, late)


def backward(r: Ring, bwd: Backward, q, k, v, segment_ids, lse, dout, delta, lengths=None):
  """Gradients of ``forward``'s output for this device's chunks: ``(dq, dk, dv)``.

  ``lse [B,N,T]`` is ``forward``'s (global, +inf on empty rows) and ``delta [B,N,T]`` is
  ``rowsum(dout * out) - dlse``, as in vjp.py. ``segment_ids`` and ``lengths`` as in
  ``forward``.
  """
  n = lax.axis_size(r.axis_name)
  plan = _Plan.make(r, n, q.shape[1], k.shape[1])
  q_side, kv = _chunks(r, q, k, v, segment_ids, lengths)
  dq, dk, dv = _grads(r, bwd, _diagonal(r, q, k), q, q_side, kv, lse, dout, delta)

  # The state holds dQ and, not yet sent, the dK/dV accumulators of the K/V chunk of the
  # previous step. They are sent at the start of a step, concurrently with its compute,
  # and arrive as the accumulators of the chunk this step holds.
  def step(s, distance, kv, state):
    dq, dk, dv = state
    dk, dv = _shift((dk, dv), r, n)
    return _backward_step(r, plan, bwd, q, q_side, kv, lse, dout, delta, (dq, dk, dv),
                          distance)

  dq, dk, dv = _around(r, plan, kv, (dq, dk, dv), step)
  if plan.last % n:  # dK/dV of the chunk from plan.last devices back: send them home
    dk, dv = _shift((dk, dv), r, n, by=-plan.last)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
