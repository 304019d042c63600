"""PyTorch flash SDPA (FlashAttention-2) timings; runs in its own process.

Never imports JAX: the parent starts this worker before JAX initialises, so
each framework has the whole GPU to itself.
"""

from __future__ import annotations

import statistics
import sys


def _log(*a):
  print(*a, file=sys.stderr, flush=True)


def _flash_only():
  import torch
  try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
  except ImportError:  # torch < 2.3
    return torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=False,
                                          enable_mem_efficient=False)


def _time(fn, *, target_s, loops, min_reps, max_reps):
  import torch
  start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
  fn(0)
  torch.cuda.synchronize()
  start.record()
  fn(0)
  fn(1)
  end.record()
  end.synchronize()
  estimate = start.elapsed_time(end) / 2e3
  reps = int(min(max_reps, max(min_reps, target_s / max(estimate, 1e-9))))
  times = []
  for _ in range(loops):
    start.record()
    for i in range(reps):
      fn(i)
    end.record()
    end.synchronize()
    times.append(start.elapsed_time(end) / 1e3 / reps)
  return statistics.median(times), reps


def run(cells, timing):
  """cells: dicts with b, n, s, d, causal -> {"cells": {cell key: {mode: result}}, ...}."""
  try:
    import torch
    import torch.nn.functional as F
  except ImportError as e:
    return {"error": f"torch not importable: {e}"}
  if not torch.cuda.is_available():
    return {"error": "torch sees no CUDA device"}
  _log(f"[torch] {torch.__version__} on {torch.cuda.get_device_name()}")
  out = {}
  info = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "cells": out}
  for c in cells:
    key = cell_key(c)
    res = out[key] = {}
    try:
      sets = []
      for _ in range(2):
        # [b, N, s, d]: the layout SDPA wants, no transposes timed.
        q, k, v, do = (torch.randn(c["b"], c["n"], c["s"], c["d"], device="cuda",
                                   dtype=torch.bfloat16) for _ in range(4))
        sets.append((q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do))
    except Exception as e:
      res["fwd"] = res["fwdbwd"] = {"error": short_error(e)}
      continue

    def fwd(i, causal=c["causal"], sets=sets):
      q, k, v, _ = sets[i % 2]
      with torch.no_grad():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def fwdbwd(i, causal=c["causal"], sets=sets):
      q, k, v, do = sets[i % 2]
      o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
      # autograd.grad rather than backward(): no .grad accumulation adds in the timing.
      return torch.autograd.grad(o, (q, k, v), do)

    for mode, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
      try:
        with _flash_only():
          sec, reps = _time(fn, **timing)
        res[mode] = {"sec": sec, "reps": reps}
        _log(f"[torch] {key} {mode}: {sec * 1e3:.3f} ms ({reps} reps)")
      except Exception as e:
        res[mode] = {"error": short_error(e)}
        _log(f"[torch] {key} {mode}: n/a ({res[mode]['error']})")
    del sets
    torch.cuda.empty_cache()
  return info


def cell_key(c):
  return f"d={c['d']},s={c['s']},causal={int(c['causal'])}"


def short_error(e):
  msg = str(e).strip().splitlines()
  return f"{type(e).__name__}: {msg[0] if msg else ''}"[:200]
