"""One jitted attention call (after its compile), for a profiler to wrap: ncu_profile.sh.

  PYTHONPATH=. python3 benchmarks/one_call.py --impl mosaic --mode fwdbwd --s 16384 \
      --heads 16x128 [--causal] [--docs 8] [--variant overlap=1]
"""

from __future__ import annotations

import argparse
import contextlib

import jax

# benchmarks/ is on sys.path when this runs as a script.
from mosaic_probe import fwd_config, inputs, make_fn, packed_ids

from jflash._src.backends.mosaic import backend as mosaic_backend
from jflash._src.backends.mosaic.config import MosaicConfig


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--impl", default="mosaic", help="mosaic, triton, xla or cudnn")
  ap.add_argument("--mode", default="fwdbwd", choices=["fwd", "fwdbwd"])
  ap.add_argument("--s", type=int, default=16384)
  ap.add_argument("--tokens", type=int, default=16384, help="b * s")
  ap.add_argument("--heads", default="16x128", help="N x head_dim")
  ap.add_argument("--causal", action="store_true")
  ap.add_argument("--docs", type=int, default=0, help="packed documents (segment ids)")
  ap.add_argument("--calls", type=int, default=1, help="calls after the compiling one")
  ap.add_argument("--variant", default="",
                  help="mosaic: a forward MosaicConfig over the heuristic default, "
                       "'field=value,...' as in mosaic_probe.py --variants")
  args = ap.parse_args()
  n, d = (int(x) for x in args.heads.split("x"))
  b = max(1, args.tokens // args.s)
  ids = packed_ids(b, args.s, args.docs)[0] if args.docs else None
  fn = make_fn(args.impl, args.mode, args.causal, ids)
  q, k, v, do = inputs(b, args.s, n, d)
  override = contextlib.nullcontext()
  if args.variant:  # read at trace time, so it must wrap the lowering
    base = MosaicConfig.for_problem(args.s, args.s, d, segments=bool(args.docs),
                                    causal=args.causal, sm_count=mosaic_backend.sm_count(),
                                    batch_heads=b * n)
    override = mosaic_backend.override_config(fwd_config(base, args.variant))
  with override:
    compiled = fn.lower(q, k, v, do).compile()  # compiles without launching a kernel
  for _ in range(args.calls):
    jax.block_until_ready(compiled(q, k, v, do))
  print(f"# {jax.devices()[0].device_kind}: {args}", flush=True)


if __name__ == "__main__":
  main()
