"""Packed documents against the same documents run one by one: the per-length bound.

  PYTHONPATH=. python3 benchmarks/doc_bound.py [--heads 16x128 32x64] [--tokens 16384]

Issue 4 asks packed documents (bench.py's 8 random lengths in 16k, causal) to run at
0.85x or more of plain causal attention's rate at 16k, in TFLOP/s of useful work. This
prints, in useful TFLOP/s (4 d N per visible pair, fwd; 3.5x that for fwd+bwd):
- ``packed``: one sequence of 16k with segment ids (jflash) or cu_seqlens (torch's
  FlashAttention-2 varlen);
- ``one by one``: each document of length L as plain causal attention at its own length,
  in a batch of ``tokens // L`` copies (the GPU as full as with the packed sequence),
  its time divided by the copies; the times summed. No packing at all: what the
  documents cost at their own lengths (the per-length bound). Each is padded to a
  multiple of 128 with its length passed (cuDNN takes multiples of 64 only); jflash's
  ``unpadded`` row passes the length as it is, so its wrapper's padding copies count;
- ``padded``: cuDNN on the documents as a batch padded to the longest (rounded up to
  128: cuDNN takes lengths in multiples of 64 only, as it does one by one), with
  ``query_seq_lengths`` / ``key_value_seq_lengths`` (cuDNN's way to run them at once);
- ``causal 16k``: plain causal attention over the whole 16k, the issue's yardstick;
and each row's ratio to its implementation's causal 16k. Torch runs first, in a process
of its own that never imports JAX.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from _features import doc_lengths


def copies(length, tokens):
  """The batch a document of ``length`` runs in, one by one: as many copies as fill
  the packed sequence's ``tokens``."""
  return max(1, tokens // length)


def useful_tflops(pairs, n, d, seconds, mode):
  flops = 4 * d * n * pairs * (3.5 if mode == "fwdbwd" else 1.0)
  return flops / seconds / 1e12


def torch_worker(lengths, shapes, reps):
  """{(n x d): {row: {mode: seconds}}} from torch's flash kernels (FA2)."""
  import torch
  import torch.nn.functional as F
  from torch.nn.attention import SDPBackend, sdpa_kernel

  def timed(fn):
    fn()
    torch.cuda.synchronize()
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    times = []
    for _ in range(5):
      start.record()
      for _ in range(reps):
        fn()
      end.record()
      end.synchronize()
      times.append(start.elapsed_time(end) / 1e3 / reps)
    return float(np.median(times))

  def sdpa_row(n, d, s, b=1):
    q, k, v, do = (torch.randn(b, n, s, d, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(4))

    def fwd():
      with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwdbwd():
      with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      torch.autograd.grad(o, (q, k, v), do)

    return {"fwd": timed(fwd), "fwdbwd": timed(fwdbwd)}

  def varlen_row(n, d):
    total = sum(lengths)
    q, k, v, do = (torch.randn(total, n, d, device="cuda", dtype=torch.bfloat16)
                   for _ in range(4))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), device="cuda",
                      dtype=torch.int32)
    longest = max(lengths)
    call = lambda: torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, longest, longest, 0.0, True, False)
    out, lse, seed, offset, _ = call()

    def fwdbwd():
      o, lse, seed, offset, _ = call()
      torch.ops.aten._flash_attention_backward(do, q, k, v, o, lse, cu, cu, longest,
                                               longest, 0.0, True, seed, offset)

    return {"fwd": timed(call), "fwdbwd": timed(fwdbwd)}

  res = {}
  for n, d in shapes:
    row = res[f"{n}x{d}"] = {}
    for name, make in (("causal 16k", lambda: sdpa_row(n, d, sum(lengths))),
                       ("packed", lambda: varlen_row(n, d))):
      try:
        row[name] = make()
      except Exception as e:  # report the failure, keep the other rows
        row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    try:
      per = [(sdpa_row(n, d, L, copies(L, sum(lengths))), copies(L, sum(lengths))) for L in lengths]
      row["one by one"] = {m: sum(p[m] / c for p, c in per) for m in ("fwd", "fwdbwd")}
    except Exception as e:
      row["one by one"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
  return res


def jax_rows(lengths, shapes, reps, loops):
  import jax
  import jax.numpy as jnp

  import jflash
  from mosaic_probe import inputs, interleaved_seconds

  def timed(fns, args):
    return interleaved_seconds(fns, args, warmup=2, reps=reps, loops=loops)

  def fns(attn):
    fwd = jax.jit(lambda q, k, v, do: attn(q, k, v))

    def fwdbwd(q, k, v, do):
      out, pullback = jax.vjp(attn, q, k, v)
      return out, pullback(do)
    return {"fwd": fwd, "fwdbwd": jax.jit(fwdbwd)}

  jf = lambda **kw: lambda q, k, v: jflash.dot_product_attention(
      q, k, v, is_causal=True, implementation="mosaic", **kw)
  cudnn = lambda **kw: lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="cudnn", **kw)
  total, longest = sum(lengths), max(lengths)
  ids = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None], jnp.int32)
  lens = jnp.asarray(lengths, jnp.int32)
  pad = lambda L: -(-L // 128) * 128
  res = {}
  for n, d in shapes:
    out = res[f"{n}x{d}"] = {"jflash": {}, "cudnn": {}}
    full = inputs(1, total, n, d)
    for impl, make in (("jflash", jf), ("cudnn", cudnn)):
      f = fns(make())
      out[impl]["causal 16k"] = {m: timed({m: f[m]}, full)[m] for m in f}
    f = fns(jf(segment_ids=ids))
    out["jflash"]["packed"] = {m: timed({m: f[m]}, full)[m] for m in f}
    padded = inputs(len(lengths), pad(longest), n, d)
    f = fns(cudnn(query_seq_lengths=lens, key_value_seq_lengths=lens))
    out["cudnn"]["padded"] = {m: timed({m: f[m]}, padded)[m] for m in f}
    # Each document at its own length: padded to a multiple of 128 with its length given
    # (cuDNN takes multiples of 64 only), and for jflash also as it is (the wrapper pads).
    for impl, row, padded in (("jflash", "one by one", True), ("cudnn", "one by one", True),
                              ("jflash", "one by one, unpadded", False)):
      per = []
      for L in lengths:
        b = copies(L, total)
        x = inputs(b, pad(L) if padded else L, n, d)
        kw = {"query_seq_lengths": jnp.full((b,), L, jnp.int32),
              "key_value_seq_lengths": jnp.full((b,), L, jnp.int32)} if padded else {}
        f = fns((jf if impl == "jflash" else cudnn)(**kw))
        per.append({m: timed({m: f[m]}, x)[m] / b for m in f})
        rate = {m: useful_tflops(L * (L + 1) // 2, n, d, per[-1][m], m) for m in f}
        print(f"  {n}x{d} {impl:6s} {row:21s} L={L:5d} x{b:4d}: fwd {rate['fwd']:6.1f}  "
              f"f+b {rate['fwdbwd']:6.1f} useful TFLOP/s", flush=True)
      out[impl][row] = {m: sum(p[m] for p in per) for m in ("fwd", "fwdbwd")}
  return res


def report(lengths, shapes, results):
  pairs = sum(L * (L + 1) // 2 for L in lengths)
  causal_pairs = sum(lengths) * (sum(lengths) + 1) // 2
  print(f"documents: {lengths}; useful TFLOP/s, fwd / fwd+bwd; x = row / causal 16k "
        "of the same implementation")
  print("| heads | impl | row | fwd | f+b | fwd x | f+b x |")
  print("|---|---|---|---|---|---|---|")
  for n, d in shapes:
    for impl, rows in results.get(f"{n}x{d}", {}).items():
      base = rows.get("causal 16k", {})
      for name, t in rows.items():
        if "error" in t:
          print(f"| {n}x{d} | {impl} | {name} | {t['error']} | | | |")
          continue
        p = causal_pairs if name == "causal 16k" else pairs
        tf = {m: useful_tflops(p, n, d, t[m], m) for m in ("fwd", "fwdbwd")}
        ratio = {m: (tf[m] / useful_tflops(causal_pairs, n, d, base[m], m)
                     if m in base else float("nan")) for m in tf}
        print(f"| {n}x{d} | {impl} | {name} | {tf['fwd']:.1f} | {tf['fwdbwd']:.1f} | "
              f"{ratio['fwd']:.2f} | {ratio['fwdbwd']:.2f} |")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--heads", nargs="+", default=["16x128"], help="N x head_dim")
  ap.add_argument("--tokens", type=int, default=16384)
  ap.add_argument("--docs", type=int, default=8)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--loops", type=int, default=5)
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  lengths = doc_lengths(args.tokens, args.docs)
  shapes = [tuple(int(x) for x in h.split("x")) for h in args.heads]
  if args.torch_worker:
    print(json.dumps(torch_worker(lengths, shapes, args.reps)))
    return
  results = {k: {} for k in args.heads}
  if not args.no_torch:
    cmd = [sys.executable, __file__, "--torch-worker", "--tokens", str(args.tokens),
           "--docs", str(args.docs), "--reps", str(args.reps), "--heads", *args.heads]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    try:
      for key, rows in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        results[key]["torch FA2"] = rows
    except (ValueError, IndexError):
      print(f"torch worker failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
  print("torch:", json.dumps({k: v.get("torch FA2") for k, v in results.items()}), flush=True)
  for key, rows in jax_rows(lengths, shapes, args.reps, args.loops).items():
    results[key].update(rows)
  report(lengths, shapes, results)


if __name__ == "__main__":
  main()
