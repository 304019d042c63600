"""The single ``jax.custom_vjp`` of jflash.

Residuals are (q, k, v, mask arrays, out, lse); the backward pass recomputes the
probabilities tile by tile from the f32 natural-log lse. Every backend plugs in here
through ``backends.registry``; none defines a custom_vjp of its own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jflash._src.backends import registry
from jflash._src.mask import MaskArrays
from jflash._src.problem import Problem


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attention(p: Problem, q, k, v, arrays: MaskArrays):
  """``q [B,T,N,H]``, ``k, v [B,S,K,H]`` -> ``(out [B,T,N,H], lse [B,N,T] f32)``.

  Rows with no visible key have ``out = 0`` and ``lse = +inf``.
  """
  return registry.get(p.implementation).forward(p, q, k, v, arrays)


def _fwd(p, q, k, v, arrays):
  out, lse = registry.get(p.implementation).forward(p, q, k, v, arrays)
  return (out, lse), (q, k, v, arrays, out, lse)


def _bwd(p, res, cotangents):
  q, k, v, arrays, out, lse = res
  dout, dlse = cotangents
  # An lse cotangent on an empty row (lse = +inf) has nothing to flow into.
  dlse = jnp.where(jnp.isinf(lse), 0.0, dlse.astype(jnp.float32))
  # delta_i = do_i . o_i (= sum_j p_ij dp_ij); a cotangent on lse_i adds p_ij * dlse_i to
  # ds_ij, which is the same as lowering delta_i by dlse_i.
  delta = jnp.einsum("btnh,btnh->bnt", dout.astype(jnp.float32), out.astype(jnp.float32))
  dq, dk, dv = registry.get(p.implementation).backward(
      p, q, k, v, arrays, lse, dout.astype(q.dtype), delta - dlse)
  return dq, dk, dv, jax.tree_util.tree_map(lambda _: None, arrays)


attention.defvjp(_fwd, _bwd)
