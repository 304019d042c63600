"""Partitioning rules: run the kernels shard by shard when batch or heads are sharded,
and as a ring when the sequence is.

A Pallas call is opaque to XLA's partitioner, which would otherwise gather every input
onto every device. ``run_partitioned`` wraps a backend's forward or backward in
``jax.experimental.custom_partitioning`` with a Shardy rule in which

* batch (``b``) and key/value heads (``k``) may be sharded: each device runs the kernel
  on its own batch rows and heads, with no communication. Query heads are the compound
  ``(k g)``, so GQA groups stay whole on one device;
* the sequence (``t``, ``s``) may stay sharded when the ring supports the call (self
  attention, T == S, no bias, dense mask or dropout) and q's T and k/v's S are split over
  the same single mesh axis: each device then runs ring.py's forward or backward on its
  chunks (K/V travel by ``ppermute`` over that axis; lengths and segment ids travel
  with them). A causal mask without a window runs the ring in the zigzag layout (load
  balanced): each pass moves its inputs' chunks into that layout and its outputs back
  with two ``ppermute``s each, O(T) traffic against the ring's own. Any other sequence
  sharding is gathered first (correct, not parallel);
* the head dim (``h``) needs replication.

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

from jflash._src import ring as ring_lib
from jflash._src import zigzag
from jflash._src.backends import registry
from jflash._src.problem import Problem

_FACTOR = {"b": "b", "t": "t", "s": "s", "h": "h", "n": "(k g)", "k": "k",
           "B": "b", "N": "(k g)", "T": "t", "S": "s"}
_REPLICATED = ("t", "s", "h", "g")

# The argument lists of vjp.py's forward and backward (role, layout), and their outputs:
# the ring needs to know which argument is which.
_MASK_ROLES = [("q_valid", "b"), ("kv_valid", "b"), ("q_ids", "bt"), ("kv_ids", "bs"),
               ("dense", "BNTS"), ("seed", "r")]
_QKV_BIAS = [("q", "btnh"), ("k", "bskh"), ("v", "bskh"), ("bias", "BNTS")]
_PASSES = {
    "forward": (_QKV_BIAS + _MASK_ROLES, ["btnh", "bnt"]),
    "backward": (_QKV_BIAS + [("lse", "bnt"), ("dout", "btnh"), ("delta", "bnt")] + _MASK_ROLES,
                 ["btnh", "bskh", "bskh", "BNTS"]),
}


def _rule(shapes, layouts, groups: int, k_heads: int, fresh) -> str:
  """The Shardy rule of one argument list, e.g. ``"b t (k g) h, b s k h"``."""
  # Shardy refuses a compound factor with a size-1 part: without GQA, q heads are "k";
  # with one K/V head (MQA), they are "g" (replicated, like the K/V head).
  factor = (dict(_FACTOR, n="k", N="k") if groups == 1
            else dict(_FACTOR, n="g", N="g") if k_heads == 1 else _FACTOR)
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


def _ring_pass(p: Problem | None, args, layouts, out_layouts):
  """``(pass name, role of each argument)`` when the ring can run this call should its
  sequence be sharded, else None."""
  if p is None or p.dropout_rate or p.mask.has_dense_mask or p.q_len != p.kv_len:
    return None
  for name, (roles, outs) in _PASSES.items():
    if list(layouts) == [l for _, l in roles] and list(out_layouts) == outs:
      names = [r for r, _ in roles]
      return None if args[names.index("bias")] is not None else (name, names)
  return None


def _layout(p: Problem, n: int, t: int) -> str:
  """The ring layout for ``n`` devices sharing a sequence of ``t`` (global) tokens."""
  m = p.mask
  plain_causal = m.causal and m.window_left is None and m.window_right is None
  return "zigzag" if plain_causal and n > 1 and t % (2 * n) == 0 else "contiguous"


def _ring(p: Problem, axis, layout: str) -> ring_lib.Ring:
  m = p.mask
  return ring_lib.Ring(axis_name=axis, layout=layout, causal=m.causal,
                       window_left=m.window_left, window_right=m.window_right, scale=p.scale,
                       softcap=p.softcap, has_segment_ids=m.has_segment_ids,
                       implementation=p.implementation, interpret=p.interpret)


def _one_axis(axes):
  """A single mesh axis name, or None for none or several."""
  if isinstance(axes, tuple):
    return axes[0] if len(axes) == 1 else None
  return axes


def _ring_axis(p: Problem, mesh, arg_shapes, taken) -> str | None:
  """The mesh axis to run the ring over: q's T, k's S and v's S all split over it."""
  axis = _one_axis(_axes(arg_shapes[0].sharding, 1))
  if axis is None or any(_one_axis(_axes(x.sharding, 1)) != axis for x in arg_shapes[1:3]):
    return None
  if any(axis in (a if isinstance(a, tuple) else (a,)) for a in taken if a is not None):
    return None
  n, q, k = mesh.shape[axis], arg_shapes[0], arg_shapes[1]
  if n == 1 or q.shape[1] % n:
    return None
  local = lambda x: jax.ShapeDtypeStruct((x.shape[0], x.shape[1] // n) + x.shape[2:], x.dtype)
  r = _ring(p, axis, _layout(p, n, q.shape[1]))
  try:  # every chunk pair's mask on the local chunk sizes
    for spec in ring_lib.pair_specs(r, n, q.shape[1] // n, k.shape[1] // n):
      registry.get(p.implementation).supports(r.problem(spec), local(q), local(k),
                                              local(arg_shapes[2]), None)
  except NotImplementedError:
    return None
  return axis


def _chunk_forward(p: Problem, q, k, v, bias, arrays):
  return registry.get(p.implementation).forward(p, q, k, v, bias, arrays)


def _chunk_backward(p: Problem, q, k, v, bias, arrays, lse, dout, delta, want_dbias):
  return registry.get(p.implementation).backward(p, q, k, v, bias, arrays, lse, dout, delta,
                                                 want_dbias)


def _run_ring(p: Problem, axis, pass_name: str, roles, xs):
  """One device's part of the forward or backward pass, as a ring over ``axis``.
  ``xs``: the present arguments, named by ``roles``."""
  a = dict(zip(roles, xs))
  n = jax.lax.axis_size(axis)
  r = _ring(p, axis, _layout(p, n, a["q"].shape[1] * n))
  # The sequence axis of each role that has one; lengths stay global (ring.py localises).
  seq_axis = {"q": 1, "k": 1, "v": 1, "dout": 1, "q_ids": 1, "kv_ids": 1, "lse": 2,
              "delta": 2}
  if r.zigzag:
    a = {role: x if x is None or role not in seq_axis
         else zigzag.shard_to_zigzag(x, axis, seq_axis[role]) for role, x in a.items()}
  ids = (a["q_ids"], a["kv_ids"]) if r.has_segment_ids else None
  lengths = (a["q_valid"], a["kv_valid"])
  if pass_name == "forward":
    outs = ring_lib.forward(r, _chunk_forward, a["q"], a["k"], a["v"], ids, lengths)
    out_axes = (1, 2)  # out, lse
  else:
    outs = ring_lib.backward(r, _chunk_backward, a["q"], a["k"], a["v"], ids, a["lse"],
                             a["dout"], a["delta"], lengths)
    out_axes = (1, 1, 1)  # dq, dk, dv
  if r.zigzag:
    outs = tuple(zigzag.shard_from_zigzag(o, axis, ax) for o, ax in zip(outs, out_axes))
  return outs


def run_partitioned(fn, args, layouts, out_layouts, groups: int, problem: Problem | None = None):
  """``fn(*args)`` with batch/head partitioning. ``args`` may hold None (absent inputs).

  Outputs are a tuple matching ``out_layouts`` (None entries pass through as None).
  ``problem``: the Problem of ``fn``, which is what lets a sequence-sharded call run as a
  ring (None: never a ring; the sequence is gathered).
  """
  ring_pass = _ring_pass(problem, args, layouts, out_layouts)
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
  res_dtypes = [out_avals[i].dtype for i in out_present]
  k_heads = args[present[1]].shape[2]  # k is always present, second

  def shardings(mesh, arg_shapes):
    """``(seq axis or None, arg shardings, result shardings)``."""
    q_sharding = arg_shapes[0].sharding
    batch, heads = _axes(q_sharding, 0), _axes(q_sharding, 2)
    if in_shapes[0][0] % _axis_size(mesh, batch):
      batch = None
    if heads is not None and (k_heads % _axis_size(mesh, heads) or heads == batch):
      heads = None
    seq = None if ring_pass is None else _ring_axis(problem, mesh, arg_shapes, (batch, heads))

    def spec(shape, layout):
      return NamedSharding(mesh, PartitionSpec(*(
          batch if d in "bB" and size > 1 else heads if d in "nkN" and size > 1
          else seq if d in "ts" else None
          for size, d in zip(shape, layout))))

    return (seq, [spec(s, l) for s, l in zip(in_shapes, in_layouts)],
            [spec(s, l) for s, l in zip(res_shapes, res_layouts)])

  def partition(mesh, arg_shapes, result_shape):
    seq, arg_shardings, out_shardings = shardings(mesh, arg_shapes)
    batch, heads = (_axes(arg_shardings[0], d) for d in (0, 2))

    if seq is not None:
      roles = [ring_pass[1][i] for i in present]

      def ring_local(*xs):
        outs = _run_ring(problem, seq, ring_pass[0], roles, xs)
        return tuple(o.astype(dt) for o, dt in zip(outs, res_dtypes))

      return mesh, ring_local, tuple(out_shardings), tuple(arg_shardings)

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
    return tuple(shardings(mesh, arg_shapes)[2])

  fresh = (f"o{i}" for i in itertools.count())
  rule = (_rule(in_shapes, in_layouts, groups, k_heads, fresh) + " -> "
          + _rule(res_shapes, res_layouts, groups, k_heads, fresh))
  # Shardy wants the special factors in the order the rule first mentions them.
  tokens = rule.replace("(", " ").replace(")", " ").replace(",", " ").split()
  # A call the ring can run keeps its sequence factors free, so that a sequence-sharded
  # input reaches ``partition`` still sharded (it may still choose to gather).
  need = [f for f in _REPLICATED if not (ring_pass and f in "ts")]
  replicated = sorted((f for f in need if f in tokens), key=tokens.index)
  call = custom_partitioning(flat)
  call.def_partition(
      partition=partition,
      infer_sharding_from_operands=infer,
      sharding_rule=rule,
      need_replication_factors=tuple(replicated),
      **({"g": groups} if groups > 1 and k_heads > 1 else {}))
  call = _fold_vmap(call, in_layouts, res_layouts, in_shapes[0][0])
  res = call(*(args[i] for i in present))
  out = [None] * len(out_avals)
  for i, r in zip(out_present, res):
    out[i] = r
  return tuple(out)
