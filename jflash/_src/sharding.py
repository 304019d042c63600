"""Partitioning rules: run the kernels shard by shard when batch or heads are sharded.

A Pallas call is opaque to XLA's partitioner, which would otherwise gather every input
onto every device. ``run_partitioned`` wraps a backend's forward or backward in
``jax.experimental.custom_partitioning`` with a Shardy rule in which

* batch (``b``) and key/value heads (``k``) may be sharded: each device runs the kernel
  on its own batch rows and heads, with no communication. Query heads are the compound
  ``(k g)``, so GQA groups stay whole on one device;
* sequence (``t``, ``s``) and head-dim (``h``) factors need replication: XLA gathers
  them first (correct; context parallelism is ``jflash.ring_attention``'s job).

Every argument is described by a layout string of one letter per dimension:
``b t n h`` for q, ``b s k h`` for k and v, ``b n t`` for lse, ``b`` for lengths, and
``B N T S`` (capitals) for a bias or mask that may broadcast (size-1 dims), and ``r``
for the dropout seed (replicated; each shard adds its batch and head offsets to it, so
that dropout masks do not depend on the sharding).
"""

from __future__ import annotations

import itertools
import math

import jax
from jax.experimental.custom_partitioning import custom_partitioning
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

_FACTOR = {"b": "b", "t": "t", "s": "s", "h": "h", "n": "(k g)", "k": "k",
           "B": "b", "N": "(k g)", "T": "t", "S": "s"}
_REPLICATED = ("t", "s", "h", "g")


def _rule(shapes, layouts, groups: int, fresh) -> str:
  """The Shardy rule of one argument list, e.g. ``"b t (k g) h, b s k h"``."""
  # Shardy refuses a compound factor with a size-1 part: without GQA, q heads are "k".
  factor = dict(_FACTOR, n="k", N="k") if groups == 1 else _FACTOR
  parts = []
  for shape, layout in zip(shapes, layouts):
    dims = []
    for size, d in zip(shape, layout):
      # A broadcast (size-1) dim of a bias or mask is its own unsharded factor.
      fresh_dim = d == "r" or (d.isupper() and size == 1)
      dims.append(next(fresh) if fresh_dim else factor[d])
    parts.append(" ".join(dims))
  return ", ".join(parts)


def _axes(sharding, dim: int):
  if not isinstance(sharding, NamedSharding):
    return None
  spec = tuple(sharding.spec) + (None,) * 8
  return spec[dim]


def _axis_size(mesh, axes) -> int:
  if axes is None:
    return 1
  axes = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def _fold_vmap(call, layouts, out_layouts, batch: int):
  """``call`` under ``vmap``: custom_partitioning has no batching rule, but attention is
  independent per batch row, so a vmapped axis folds into the batch dim and back."""
  call = jax.custom_batching.custom_vmap(call)

  @call.def_vmap
  def rule(axis_size, in_batched, *xs):
    if any(b for b, l in zip(in_batched, layouts) if l == "r"):
      # A different dropout rng per vmapped row cannot fold into one call: loop instead.
      xs = [x if b else jnp.broadcast_to(x, (axis_size,) + x.shape) for x, b in zip(xs, in_batched)]
      return jax.lax.map(lambda args: call(*args), tuple(xs)), (True,) * len(out_layouts)
    orig_batch = [x.shape[1] if b else x.shape[0] for x, b in zip(xs, in_batched)]
    folded = []
    for x, batched, layout in zip(xs, in_batched, layouts):
      if layout == "r":
        folded.append(x)
        continue
      x = x if batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
      # A broadcast (size-1) batch dim becomes real, so that each row of the folded batch
      # gets its own slice of the bias gradient.
      x = jnp.broadcast_to(x, (axis_size, batch) + x.shape[2:])
      folded.append(x.reshape((axis_size * batch,) + x.shape[2:]))
    outs = []
    for o, layout in zip(call(*folded), out_layouts):
      o = o.reshape((axis_size, batch) + o.shape[1:])
      if layout[0] == "B" and orig_batch[layouts.index(layout)] == 1:
        o = o.sum(axis=1, keepdims=True)  # the gradient of a batch-broadcast bias
      outs.append(o)
    return tuple(outs), (True,) * len(outs)

  return call


def run_partitioned(fn, args, layouts, out_layouts, groups: int):
  """``fn(*args)`` with batch/head partitioning. ``args`` may hold None (absent inputs).

  Outputs are a tuple matching ``out_layouts`` (None entries pass through as None).
  """
  present = [i for i, a in enumerate(args) if a is not None]

  def full_args(xs):
    out = [None] * len(args)
    for i, x in zip(present, xs):
      out[i] = x
    return out

  out_avals = jax.eval_shape(lambda *xs: fn(*full_args(xs)), *(args[i] for i in present))
  out_present = [i for i, o in enumerate(out_avals) if o is not None]

  def flat(*xs):
    outs = fn(*full_args(xs))
    return tuple(outs[i] for i in out_present)

  in_layouts = [layouts[i] for i in present]
  in_shapes = [args[i].shape for i in present]
  res_layouts = [out_layouts[i] for i in out_present]
  res_shapes = [out_avals[i].shape for i in out_present]
  k_heads = args[present[1]].shape[2]  # k is always present, second

  def shardings(mesh, arg_shapes):
    q_sharding = arg_shapes[0].sharding
    batch, heads = _axes(q_sharding, 0), _axes(q_sharding, 2)
    if in_shapes[0][0] % _axis_size(mesh, batch):
      batch = None
    if heads is not None and (k_heads % _axis_size(mesh, heads) or heads == batch):
      heads = None

    def spec(shape, layout):
      return NamedSharding(mesh, PartitionSpec(*(
          batch if d in "bB" and size > 1 else heads if d in "nkN" and size > 1 else None
          for size, d in zip(shape, layout))))

    return ([spec(s, l) for s, l in zip(in_shapes, in_layouts)],
            [spec(s, l) for s, l in zip(res_shapes, res_layouts)])

  def partition(mesh, arg_shapes, result_shape):
    arg_shardings, out_shardings = shardings(mesh, arg_shapes)
    batch, heads = (_axes(arg_shardings[0], d) for d in (0, 2))

    def local(*xs):
      xs = list(xs)
      for i, layout in enumerate(in_layouts):
        if layout == "r":  # the dropout seed: this shard's first global batch row and head
          b_off = 0 if batch is None else jax.lax.axis_index(batch) * xs[0].shape[0]
          h_off = 0 if heads is None else jax.lax.axis_index(heads) * xs[0].shape[2]
          xs[i] = xs[i] + jnp.stack([0, 0, b_off, h_off]).astype(xs[i].dtype)
      return flat(*xs)

    return mesh, local, tuple(out_shardings), tuple(arg_shardings)

  def infer(mesh, arg_shapes, result_shape):
    return tuple(shardings(mesh, arg_shapes)[1])

  fresh = (f"o{i}" for i in itertools.count())
  rule = (_rule(in_shapes, in_layouts, groups, fresh) + " -> "
          + _rule(res_shapes, res_layouts, groups, fresh))
  # Shardy wants the special factors in the order the rule first mentions them.
  tokens = rule.replace("(", " ").replace(")", " ").replace(",", " ").split()
  replicated = sorted((f for f in _REPLICATED if f in tokens), key=tokens.index)
  call = custom_partitioning(flat)
  call.def_partition(
      partition=partition,
      infer_sharding_from_operands=infer,
      sharding_rule=rule,
      need_replication_factors=tuple(replicated),
      **({"g": groups} if groups > 1 else {}))
  call = _fold_vmap(call, in_layouts, res_layouts, in_shapes[0][0])
  res = call(*(args[i] for i in present))
  out = [None] * len(out_avals)
  for i, r in zip(out_present, res):
    out[i] = r
  return tuple(out)
