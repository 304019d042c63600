"""GPT training-step benchmark: jflash vs Flax's default attention vs cuDNN.

  python benchmarks/train_step.py                          # full run on one GPU (see README.md)
  python benchmarks/train_step.py --s 1024 4096 --attention jflash cudnn
  python benchmarks/train_step.py --cpu-smoke              # tiny f32 run on CPU (interpret mode)

The model, loss, optimizer and jitted step are those of ``examples/train_gpt.py``
(``GPT``, ``make_optimizer``, ``train_step``: forward, backward and AdamW update in one
``nnx.jit``), at a realistic width and bf16 compute (f32 parameters). Tokens per step are
fixed (``batch = max(1, tokens // s)``); the batch is random tokens from a fixed seed.

Every (attention, s) runs in a fresh subprocess, so that each peak-memory number comes
from its own allocator and an out-of-memory error is reported as OOM instead of ending
the run. This process never imports JAX: it would hold GPU memory while the workers run.
Results are written to ``--out`` after every worker, so a run cut short keeps what it did.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
ATTENTIONS = ("jflash", "flax", "cudnn")
REFERENCE = "flax"  # speedups and loss differences are relative to Flax's default attention
# First-step losses of different attentions (same init, same batch) agree to this
# relative difference; bf16 rounds logits and probabilities to 8 bits of mantissa.
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 2e-2}
_OOM_MARKERS = ("resource_exhausted", "out of memory")  # matched in lower case
# --cpu-smoke: a model small enough for Pallas interpret mode on a CPU (cuDNN needs a GPU).
CPU_SMOKE = {"s": [32, 64], "tokens": 64, "d_model": 32, "heads": 2, "layers": 1, "vocab": 64,
             "dtype": "float32", "warmup": 1, "steps": 2, "attention": ["jflash", "flax"],
             "jflash_implementation": "triton"}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--s", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536],
                 help="sequence lengths")
  p.add_argument("--attention", nargs="+", choices=ATTENTIONS, default=list(ATTENTIONS))
  p.add_argument("--jflash-implementation", choices=("triton", "mosaic", "xla"), default=None,
                 help="jflash backend (default: None, the best one for the platform)")
  p.add_argument("--tokens", type=int, default=16384, help="tokens per step (batch * s)")
  p.add_argument("--d-model", type=int, default=2048)
  p.add_argument("--heads", type=int, default=16, help="head_dim = d_model / heads")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--vocab", type=int, default=32768)
  p.add_argument("--dtype", choices=tuple(LOSS_RTOL), default="bfloat16",
                 help="compute dtype (parameters and optimizer state stay f32)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after the compiling one")
  p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--worker-timeout", type=int, default=300, help="seconds per (attention, s)")
  p.add_argument("--keep-going-after-oom", action="store_true",
                 help="still run an attention at longer s after it ran out of memory")
  p.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
  p.add_argument("--cpu-smoke", action="store_true",
                 help="tiny f32 model, s=32/64, jflash in interpret mode (triton) vs flax, on CPU")
  p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON spec of one run
  p.add_argument("--result", help=argparse.SUPPRESS)  # internal: where the worker writes
  args = p.parse_args(argv)
  if args.cpu_smoke:  # new defaults; options given on the command line still win
    os.environ["JAX_PLATFORMS"] = "cpu"  # inherited by the workers
    p.set_defaults(**CPU_SMOKE)
    args = p.parse_args(argv)
  return args


# ---------------------------------------------------------------------------------------
# Worker: one (attention, s) in a fresh process.


def _is_oom(e: BaseException) -> bool:
  return any(m in str(e).lower() for m in _OOM_MARKERS)


def _short(e: BaseException) -> str:
  lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
  return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def worker(spec: dict) -> dict:
  """Builds the example's GPT, runs its jitted train step; returns timings, losses, peak."""
  sys.path[:0] = [_ROOT, os.path.join(_ROOT, "examples")]
  import jax
  import jax.numpy as jnp
  import numpy as np
  import train_gpt
  from flax import nnx

  dev = jax.local_devices()[0]
  out = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__}
  try:
    # Initialised in one jitted call: no per-op dispatch, no eager temporaries on the GPU.
    model = nnx.jit(lambda: train_gpt.GPT(
        vocab_size=spec["vocab"], max_len=spec["s"], d_model=spec["d_model"],
        layers=spec["layers"], heads=spec["heads"], attention=spec["attention"],
        dtype=jnp.dtype(spec["dtype"]), implementation=spec["implementation"],
        rngs=nnx.Rngs(spec["seed"])))()
    total = 1 + spec["warmup"] + spec["steps"]
    optimizer = train_gpt.make_optimizer(model, argparse.Namespace(lr=3e-4, steps=total))
    params = nnx.state(model, nnx.Param)
    # Same seed, same parameters whatever the attention; the parent checks this number.
    out["init_fingerprint"] = float(jax.jit(lambda p: sum(
        jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(p)))(params))
    out["params"] = int(sum(x.size for x in jax.tree.leaves(params)))
    out["state_bytes"] = int(sum(x.nbytes for x in jax.tree.leaves(
        (nnx.state(model), nnx.state(optimizer)))))
    # Host-side tokens: identical for every attention at this s.
    rng = np.random.default_rng(spec["seed"])
    batch = jnp.asarray(rng.integers(0, spec["vocab"], (spec["batch"], spec["s"] + 1),
                                     dtype=np.int32))

    losses, times = [], []
    for step in range(total):
      t0 = time.perf_counter()
      loss = jax.block_until_ready(train_gpt.train_step(model, optimizer, batch))
      dt = time.perf_counter() - t0
      losses.append(float(loss))
      if step == 0:
        out["compile_and_first_step_s"] = round(dt, 2)
      elif step > spec["warmup"]:
        times.append(dt)
    stats = dev.memory_stats() or {}  # None on some platforms (CPU)
    out.update(
        status="ok", losses=losses, step_times_s=times,
        step_ms=1e3 * statistics.median(times), mean_step_ms=1e3 * statistics.fmean(times),
        tokens_per_s=spec["batch"] * spec["s"] / statistics.median(times),
        peak_bytes=stats.get("peak_bytes_in_use"), bytes_limit=stats.get("bytes_limit"))
  except Exception as e:  # noqa: BLE001  (reported, never fatal: the next run is a new process)
    out.update(status="OOM" if _is_oom(e) else "error", error=_short(e))
  return out


# ---------------------------------------------------------------------------------------
# Parent: one worker per (s, attention), then the table.


def _env():
  env = dict(os.environ)
  # Allocate on demand (so the peak is what the step used) up to most of the GPU.
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  env["PYTHONUNBUFFERED"] = "1"
  return env


def run_worker(spec: dict, timeout: int) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "result.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec), "--result", path]
    t0 = time.perf_counter()
    try:
      rc = subprocess.run(cmd, check=False, env=_env(), timeout=timeout).returncode
    except subprocess.TimeoutExpired:
      return {"status": "error", "error": f"worker timed out after {timeout} s"}
    if not os.path.exists(path):
      return {"status": "error", "error": f"worker exited with status {rc} and no result"}
    with open(path) as f:
      res = json.load(f)
    res["worker_s"] = round(time.perf_counter() - t0, 1)
    return res


def _spec(args, attention: str, s: int) -> dict:
  return {"attention": attention, "s": s, "batch": max(1, args.tokens // s),
          "implementation": args.jflash_implementation if attention == "jflash" else None,
          "d_model": args.d_model, "heads": args.heads, "layers": args.layers,
          "vocab": args.vocab, "dtype": args.dtype, "warmup": args.warmup,
          "steps": args.steps, "seed": args.seed}


def _gib(x):
  return "–" if x is None else f"{x / 2**30:.2f}"


def table(rows) -> str:
  ref = {r["s"]: r for r in rows if r["attention"] == REFERENCE and r["status"] == "ok"}
  lines = ["| s | batch | attention | step ms | tokens/s | speedup vs flax | peak GiB |",
           "|---:|---:|---|---:|---:|---:|---:|"]
  for r in rows:
    name = r["attention"] + (f" ({r['implementation']})" if r.get("implementation") else "")
    if r["status"] != "ok":
      lines.append(f"| {r['s']} | {r['batch']} | {name} | {r['status']} | – | – | – |")
      continue
    speedup = f"{ref[r['s']]['step_ms'] / r['step_ms']:.2f}x" if r["s"] in ref else "–"
    lines.append(f"| {r['s']} | {r['batch']} | {name} | {r['step_ms']:.1f} | "
                 f"{r['tokens_per_s']:,.0f} | {speedup} | {_gib(r.get('peak_bytes'))} |")
  return "\n".join(lines)


def loss_check(rows, dtype: str) -> tuple[bool, str]:
  """First-step losses (same init, same batch) of every attention at each s agree."""
  tol, ok, lines, compared = LOSS_RTOL[dtype], True, [], 0
  for s in sorted({r["s"] for r in rows}):
    done = [r for r in rows if r["s"] == s and r["status"] == "ok"]
    if len(done) < 2:
      lines.append(f"s={s}: fewer than two attentions ran; nothing to compare")
      continue
    base = next((r for r in done if r["attention"] == REFERENCE), done[0])
    same_init = len({r["init_fingerprint"] for r in done}) == 1
    parts = []
    for r in done:
      if r is base:
        continue
      rel = abs(r["losses"][0] - base["losses"][0]) / abs(base["losses"][0])
      ok &= rel <= tol
      compared += 1
      parts.append(f"{r['attention']} {r['losses'][0]:.6f} (rel {rel:.1e})")
    ok &= same_init
    lines.append(f"s={s}: {base['attention']} {base['losses'][0]:.6f} vs " + ", ".join(parts)
                 + ("" if same_init else "  [initial parameters DIFFER]"))
  verdict = "agree" if ok else "DISAGREE"
  lines.append(f"first-step losses {verdict} (relative tolerance {tol}, {dtype})" if compared
               else "no two attentions ran at the same s: no first-step losses compared")
  return ok, "\n".join(lines)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.worker:
    res = worker(json.loads(args.worker))
    with open(args.result, "w") as f:
      json.dump(res, f)
    return 0

  os.makedirs(args.out, exist_ok=True)
  config = {k: getattr(args, k) for k in ("tokens", "d_model", "heads", "layers", "vocab", "dtype",
                                          "warmup", "steps", "seed", "jflash_implementation")}
  print(f"== GPT train step: {config}", flush=True)
  meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "config": config,
          "cpu_smoke": args.cpu_smoke}
  rows, oom_at = [], {}
  for s in args.s:
    for attention in args.attention:
      spec = _spec(args, attention, s)
      if attention in oom_at and not args.keep_going_after_oom:
        res = {"status": "OOM", "error": f"skipped: out of memory at s={oom_at[attention]}"}
      else:
        print(f"-- {attention} s={s} batch={spec['batch']}", flush=True)
        res = run_worker(spec, args.worker_timeout)
      row = {**spec, **res}
      if row["status"] == "OOM":
        oom_at.setdefault(attention, s)
      msg = (f"{row['step_ms']:.1f} ms/step, {row['tokens_per_s']:,.0f} tokens/s, "
             f"peak {_gib(row.get('peak_bytes'))} GiB, loss[0] {row['losses'][0]:.6f}, "
             f"compile+first {row['compile_and_first_step_s']} s"
             if row["status"] == "ok" else f"{row['status']}: {row.get('error', '')}")
      print(f"   {attention} s={s}: {msg}", flush=True)
      rows.append(row)
      with open(os.path.join(args.out, "train_step.json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)

  device = next((r["device"] for r in rows if "device" in r), "unknown device")
  md = table(rows)
  ok, check = loss_check(rows, args.dtype)
  counts = sorted({r["params"] for r in rows if "params" in r}) or [0]
  header = (f"GPT train step on {device}: d_model {args.d_model}, {args.heads} heads of "
            f"{args.d_model // args.heads}, layers {args.layers}, vocab {args.vocab}, "
            f"{args.dtype} compute, {args.tokens} tokens/step (batch = max(1, tokens // s)), "
            f"{counts[0]:,} to {counts[-1]:,} parameters (the position embedding grows with s)")
  print(f"\n{header}\n\n{md}\n\n{check}", flush=True)
  with open(os.path.join(args.out, "train_step.md"), "w") as f:
    f.write(f"{header}\n\n{md}\n\n```\n{check}\n```\n")
  with open(os.path.join(args.out, "train_step.json"), "w") as f:
    json.dump({**meta, "rows": rows, "losses_agree": ok}, f, indent=1)
  jflash_failed = any(r["attention"] == "jflash" and r["status"] == "error" for r in rows)
  return 0 if ok and not jflash_failed else 1


if __name__ == "__main__":
  sys.exit(main())
