"""JAX side of the benchmark: the attention callables, timing and peak memory.

Imported only after the torch worker has run, so that JAX (which grabs most of
the GPU memory when it initialises) never competes with PyTorch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jflash

FWD, FWDBWD = "fwd", "fwdbwd"


def _jflash(implementation):
  def f(q, k, v, causal):
    return jflash.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
  return f


def _jax_nn(implementation):
  def f(q, k, v, causal):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
  return f


# impl name -> (attention(q, k, v, causal), modes it is timed in)
IMPLS = {
    "jflash-mosaic": (_jflash("mosaic"), (FWD, FWDBWD)),
    "jflash-triton": (_jflash("triton"), (FWD, FWDBWD)),
    "jflash-xla": (_jflash("xla"), (FWD, FWDBWD)),
    "cudnn": (_jax_nn("cudnn"), (FWD, FWDBWD)),
    # Materialises the [b, N, s, s] logits: a reference point, forward only.
    "xla": (_jax_nn("xla"), (FWD,)),
}


def make_fn(impl, mode, causal):
  attn = IMPLS[impl][0]
  if mode == FWD:
    return jax.jit(lambda q, k, v, do: attn(q, k, v, causal))

  def fwdbwd(q, k, v, do):
    # Returning the gradients (and out) keeps XLA from dropping the backward.
    out, pullback = jax.vjp(lambda q, k, v: attn(q, k, v, causal), q, k, v)
    return out, pullback(do)
  return jax.jit(fwdbwd)


def dense_attention(q, k, v, *, is_causal, implementation, logits_soft_cap=None):
  """Attention as written in plain XLA: the [B, N, T, S] logits in f32, soft-capped
  (``cap * tanh(logits / cap)``), softmaxed, P in the input dtype. The baseline of the
  feature cases jax.nn cannot run (``implementation`` is "xla", for the row's label)."""
  assert implementation == "xla", implementation
  logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
  logits = logits * (q.shape[-1] ** -0.5)
  if logits_soft_cap is not None:
    logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
  if is_causal:
    t, s = logits.shape[-2:]
    logits = jnp.where(jnp.tril(jnp.ones((t, s), bool)), logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  return jnp.einsum("bnts,bsnh->btnh", probs, v, preferred_element_type=jnp.float32
                    ).astype(q.dtype)


def make_feature_fn(call, mode):
  """A jitted ``fn(q, k, v, do, *extras)`` for one feature row's ``call`` (see _features.py).

  ``extras`` are the row's segment ids and/or dense mask, passed as arguments so
  that they are not baked into the program as constants.
  """
  kw = {"is_causal": call["is_causal"], "implementation": call["implementation"]}
  if call.get("local_window_size") is not None:
    kw["local_window_size"] = tuple(call["local_window_size"])
  if call.get("logits_soft_cap") is not None:
    kw["logits_soft_cap"] = call["logits_soft_cap"]
  names = [name for name in ("segment_ids", "mask") if call.get(name)]
  f = {"jflash": jflash.dot_product_attention, "jax.nn": jax.nn.dot_product_attention,
       "dense": dense_attention}[call["api"]]

  def attn(q, k, v, extras):
    return f(q, k, v, **kw, **dict(zip(names, extras)))

  if mode == FWD:
    return jax.jit(lambda q, k, v, do, *extras: attn(q, k, v, extras))

  def fwdbwd(q, k, v, do, *extras):
    out, pullback = jax.vjp(lambda q, k, v: attn(q, k, v, extras), q, k, v)
    return out, pullback(do)
  return jax.jit(fwdbwd)


def feature_extras(call, b, lengths):
  """The segment ids ``[b, s]`` and/or dense block-diagonal mask ``[1, 1, s, s]`` of a call."""
  extras = []
  if not (call.get("segment_ids") or call.get("mask")):
    return extras
  ids = np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), lengths)
  if call.get("segment_ids"):
    extras.append(jnp.asarray(np.broadcast_to(ids, (b, ids.size))))
  if call.get("mask"):
    dev_ids = jnp.asarray(ids)
    extras.append((dev_ids[:, None] == dev_ids[None, :])[None, None])
  jax.block_until_ready(extras)
  return extras


def make_inputs(b, s, n, d, dtype, sets=2, seed=0):
  """``sets`` independent (q, k, v, do) tuples, [b, s, n, d], standard normal."""
  keys = jax.random.split(jax.random.key(seed), 4 * sets)
  arrs = [jax.random.normal(kk, (b, s, n, d), jnp.float32).astype(dtype) for kk in keys]
  jax.block_until_ready(arrs)
  return [tuple(arrs[4 * i:4 * i + 4]) for i in range(sets)]


def time_fn(fn, input_sets, *, target_s, loops, min_reps, max_reps):
  """Median seconds per call, over ``loops`` loops of back-to-back calls, the reps per
  loop and the first call's seconds (compile).

  Calls are queued asynchronously and only the last one is waited on, so the
  host dispatch overlaps the GPU work as it does in a training step.
  """
  t = time_interleaved({"fn": fn}, input_sets, target_s=target_s, loops=loops,
                       min_reps=min_reps, max_reps=max_reps)["fn"]
  if isinstance(t, Exception):
    raise t
  return t


def time_interleaved(fns, input_sets, *, target_s, loops, min_reps, max_reps):
  """``time_fn`` for several callables side by side: ``{name: (median s, reps,
  compile s) or exception}`` for ``fns`` ``{name: fn}``.

  After each one's compile and estimate, the ``loops`` rounds take one loop of every
  callable in turn, so a drift of the GPU's clocks (power, heat) over the cell reaches
  all of them alike rather than whichever ran last."""
  out, reps = {}, {}
  for name, fn in fns.items():
    try:
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*input_sets[0]))
      compile_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      for i in range(2):
        jax.block_until_ready(fn(*input_sets[i % len(input_sets)]))
      estimate = (time.perf_counter() - t0) / 2
    except Exception as e:  # one impl's failure leaves the others' timings
      out[name] = e
      continue
    reps[name] = int(min(max_reps, max(min_reps, target_s / max(estimate, 1e-9))))
    out[name] = ([], reps[name], compile_s)
  for _ in range(loops):
    for name, n in reps.items():
      if isinstance(out[name], Exception):
        continue
      try:
        t0 = time.perf_counter()
        for i in range(n):
          res = fns[name](*input_sets[i % len(input_sets)])
        jax.block_until_ready(res)
        out[name][0].append((time.perf_counter() - t0) / n)
        del res
      except Exception as e:
        out[name] = e
  return {k: v if isinstance(v, Exception) else (statistics.median(v[0]), v[1], v[2])
          for k, v in out.items()}


# ---------------------------------------------------------------------------
# Peak memory of one fwd+bwd, run in a fresh process per measurement.


# Memory only (a fresh process each, so no trace cache is shared): an impl of IMPLS
# with its backend's backward config changed while it compiles (None: its default),
# and shape arguments of memory_worker (the d=64 grid's 32 heads of 64).
MEMORY_VARIANTS = {
    "jflash-mosaic-atomic": ("jflash-mosaic", dict(dq_mode="atomic"), {}),
    "jflash-mosaic-d64": ("jflash-mosaic", None, dict(n=32, d=64)),
    "cudnn-d64": ("cudnn", None, dict(n=32, d=64)),
}


def _variant(impl, s, shape):
  """The context that a MEMORY_VARIANTS impl compiles under, its base impl and its
  memory_worker shape arguments (over ``shape``)."""
  if impl not in MEMORY_VARIANTS:
    return contextlib.nullcontext(), impl, shape
  base, fields, kw = MEMORY_VARIANTS[impl]
  shape = {**shape, **kw}
  if fields is None:
    return contextlib.nullcontext(), base, shape
  from jflash._src.backends.mosaic import backend as mosaic_backend
  from jflash._src.backends.mosaic.config import MosaicBwdConfig
  cfg = dataclasses.replace(MosaicBwdConfig.for_problem(s, s, shape["d"]), **fields)
  return mosaic_backend.override_bwd_config(cfg), base, shape


def memory_worker(impl, s, *, dtype=jnp.bfloat16, **shape):
  """``shape``: b, n, d (default 1, 16, 128)."""
  ctx, base, shape = _variant(impl, s, {"b": 1, "n": 16, "d": 128, **shape})
  b, n, d = shape["b"], shape["n"], shape["d"]
  fn = make_fn(base, FWDBWD, causal=False)
  shape = (b, s, n, d)
  spec = jax.ShapeDtypeStruct(shape, dtype)
  # Compile before any input exists: compile-time scratch (autotuning) then
  # cannot push the peak above what the step itself needs.
  with ctx:
    compiled = fn.lower(spec, spec, spec, spec).compile()
  est = None
  try:
    ma = compiled.memory_analysis()
    est = int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
              - ma.alias_size_in_bytes)
  except Exception:  # memory_analysis is best effort on some backends
    pass
  # Host-side randoms: on-device generation would leave f32 temporaries in the peak.
  rng = np.random.default_rng(0)
  args = [jax.device_put(rng.standard_normal(shape, dtype=np.float32).astype(dtype))
          for _ in range(4)]
  jax.block_until_ready(args)
  dev = jax.devices()[0]
  before = (dev.memory_stats() or {}).get("peak_bytes_in_use")
  jax.block_until_ready(compiled(*args))
  stats = dev.memory_stats() or {}
  tensor = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
  return {
      "impl": impl, "s": s, "b": b, "n": n, "d": d, "dtype": jnp.dtype(dtype).name,
      "peak_bytes": stats.get("peak_bytes_in_use"),
      "peak_before_run": before,
      "xla_estimate_bytes": est,
      # q, k, v + out + dq, dk, dv.
      "ideal_bytes": 7 * tensor,
      "device": dev.device_kind,
  }


def device_info():
  dev = jax.devices()[0]
  return {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__}
