"""The single ``jax.custom_vjp`` of jflash.

Residuals are (q, k, v, bias, mask arrays, out, lse); the backward pass recomputes the
probabilities tile by tile from the f32 natural-log lse. Every backend plugs in here
through ``backends.registry``; none defines a custom_vjp of its own.

``symbolic_zeros`` tells the forward rule which inputs are differentiated, so the
backward pass computes dbias (a T x S array per head) only when the bias needs it, and
skips the lse cotangent when nothing uses the lse.

``ring_attention`` (at the end) is the same attention spread over a ring of devices:
its custom_vjp's forward and backward are rings of the per-chunk ``_forward`` and
``_backward`` below, so no backend knows about rings either.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jflash._src import ring
from jflash._src import sharding
from jflash._src.backends import registry
from jflash._src.mask import MaskArrays
from jflash._src.problem import Problem

_MASK_LAYOUTS = ["b", "b", "bt", "bs", "BNTS", "r"]


def _mask_args(arrays: MaskArrays):
  return [arrays.q_valid, arrays.kv_valid, arrays.q_segment_ids, arrays.kv_segment_ids,
          arrays.dense, arrays.dropout_seed]


def _forward(p: Problem, q, k, v, bias, arrays: MaskArrays):
  """The backend's forward, partitioned over batch and heads (see sharding.py)."""
  backend = registry.get(p.implementation)
  fn = lambda q, k, v, bias, *m: backend.forward(p, q, k, v, bias, MaskArrays(*m))
  return sharding.run_partitioned(
      fn, [q, k, v, bias] + _mask_args(arrays), ["btnh", "bskh", "bskh", "BNTS"] + _MASK_LAYOUTS,
      ["btnh", "bnt"], groups=q.shape[2] // k.shape[2], problem=p)


def _backward(p: Problem, q, k, v, bias, arrays: MaskArrays, lse, dout, delta, want_dbias):
  backend = registry.get(p.implementation)

  def fn(q, k, v, bias, lse, dout, delta, *m):
    return backend.backward(p, q, k, v, bias, MaskArrays(*m), lse, dout, delta, want_dbias)

  return sharding.run_partitioned(
      fn, [q, k, v, bias, lse, dout, delta] + _mask_args(arrays),
      ["btnh", "bskh", "bskh", "BNTS", "bnt", "btnh", "bnt"] + _MASK_LAYOUTS,
      ["btnh", "bskh", "bskh", "BNTS"], groups=q.shape[2] // k.shape[2], problem=p)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attention(p: Problem, q, k, v, bias, arrays: MaskArrays):
  """``q [B,T,N,H]``, ``k, v [B,S,K,H]``, ``bias [Bb,Nb,Tb,Sb]`` or None ->
  ``(out [B,T,N,H], lse [B,N,T] f32)``. Rows with no visible key: out 0, lse +inf.
  """
  return _forward(p, q, k, v, bias, arrays)


@dataclasses.dataclass(frozen=True)
class _WantBiasGrad:
  """A static flag carried through the residuals (a pytree with no leaves)."""
  value: bool


jax.tree_util.register_static(_WantBiasGrad)


def _fwd(p, q, k, v, bias, arrays):
  q, k, v = (x.value for x in (q, k, v))
  arrays = jax.tree.map(lambda x: x.value, arrays)
  want_dbias = bias is not None and bias.perturbed
  bias = None if bias is None else bias.value
  out, lse = _forward(p, q, k, v, bias, arrays)
  return (out, lse), (q, k, v, bias, arrays, out, lse, _WantBiasGrad(want_dbias))


def _dout_and_delta(out, lse, cotangents):
  """The output cotangent (zeros for a symbolic zero) and ``delta [B, N, T]`` f32.

  delta_i = do_i . o_i (= sum_j p_ij dp_ij); a cotangent on lse_i adds p_ij * dlse_i to
  ds_ij, which is the same as lowering delta_i by dlse_i. A plain row reduction (not a
  dot): its result does not depend on the batch or head extent, so sharded and
  unsharded runs agree bit for bit.
  """
  dout, dlse = cotangents
  if isinstance(dout, SymbolicZero):
    dout = jnp.zeros(out.shape, out.dtype)
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
  if not isinstance(dlse, SymbolicZero):
    # An lse cotangent on an empty row (lse = +inf) has nothing to flow into.
    delta = delta - jnp.where(jnp.isinf(lse), 0.0, dlse.astype(jnp.float32))
  return dout, delta


def _bwd(p, res, cotangents):
  q, k, v, bias, arrays, out, lse, want_dbias = res
  dout, delta = _dout_and_delta(out, lse, cotangents)
  dq, dk, dv, dbias = _backward(p, q, k, v, bias, arrays, lse, dout.astype(q.dtype), delta,
                                want_dbias.value)
  if bias is not None and dbias is None:
    dbias = jnp.zeros(bias.shape, bias.dtype)
  return dq, dk, dv, dbias, jax.tree.map(lambda _: None, arrays)


attention.defvjp(_fwd, _bwd, symbolic_zeros=True)


# Ring attention (context parallelism, inside shard_map): the ring's own custom_vjp,
# whose forward and backward are rings of the per-chunk _forward / _backward above
# (ring.py). Residuals are (q, k, v, segment ids, out, global lse) of this device.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def ring_attention(r: ring.Ring, q, k, v, segment_ids):
  """This device's chunks ``q [B,T,N,H]``, ``k, v [B,S,K,H]``, ``segment_ids [B,T]`` or
  None -> ``(out [B,T,N,H], lse [B,N,T] f32)`` of attention over the whole ring's keys."""
  return ring.forward(r, _forward, q, k, v, segment_ids)


def _ring_fwd(r, q, k, v, segment_ids):
  q, k, v = (x.value for x in (q, k, v))
  segment_ids = None if segment_ids is None else segment_ids.value
  out, lse = ring.forward(r, _forward, q, k, v, segment_ids)
  return (out, lse), (q, k, v, segment_ids, out, lse)


def _ring_bwd(r, res, cotangents):
  q, k, v, segment_ids, out, lse = res
  dout, delta = _dout_and_delta(out, lse, cotangents)
  dq, dk, dv = ring.backward(r, _backward, q, k, v, segment_ids, lse, dout.astype(q.dtype), delta)
  return dq, dk, dv, None


ring_attention.defvjp(_ring_fwd, _ring_bwd, symbolic_zeros=True)
