"""How fast can CTAs add f32 tiles into HBM with TMA reduce-adds? A diagnostic for the
fused dQ of the Mosaic backward (MosaicBwdConfig.dq_mode "atomic"), not a benchmark.

  PYTHONPATH=. python3 benchmarks/tma_reduce_probe.py

Each of ``--ctas`` CTAs (one warpgroup) stages a ``rows x d`` f32 tile in SMEM once, then
issues ``--steps`` TMA copies of it into rows of a ``[T, N, d]`` f32 buffer (as the dQ
partials land in ``dq_acc[b, rows, h]``), with ``--inflight`` copies outstanding, either
as reduce-adds or as plain stores. The tile a CTA targets moves on each step, so that
like the dK/dV kernel's CTAs, the CTAs of a wave hit the same query tiles of one head.
Prints the bytes moved per second.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# benchmarks/ is on sys.path when this runs as a script.
from mosaic_probe import median_seconds

from jflash._src.backends.mosaic.common import smem_tile


def make(ctas, steps, rows, d, t, n, inflight, reduce):
  tiles = t // rows

  def body(out_ref, tile_smem):
    c = lax.axis_index("c")
    tile_smem[...] = plgpu.layout_cast(jnp.full((rows, d), 1.0, jnp.float32),
                                       plgpu.Layout.WGMMA)
    plgpu.commit_smem()
    h = lax.rem(lax.div(c, jnp.int32(tiles)), jnp.int32(n))

    @pl.loop(0, steps)
    def _(i):
      r = lax.rem(i + c, jnp.int32(tiles))
      plgpu.wait_smem_to_gmem(inflight - 1, wait_read_only=True)
      plgpu.copy_smem_to_gmem(tile_smem, out_ref.at[pl.ds(r * rows, rows), h],
                              reduction_op="add" if reduce else None)

    plgpu.wait_smem_to_gmem(0)

  return jax.jit(plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((t, n, d), jnp.float32),
      scratch_types=[smem_tile((rows, d), jnp.float32)],
      grid=(ctas,), grid_names=("c",), kernel_name="tma_reduce_probe"))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--ctas", type=int, nargs="+", default=[132, 264])
  ap.add_argument("--steps", type=int, default=2048)
  ap.add_argument("--rows", type=int, nargs="+", default=[64])
  ap.add_argument("--d", type=int, nargs="+", default=[128, 64])
  ap.add_argument("--t", type=int, default=16384)
  ap.add_argument("--n", type=int, default=16)
  ap.add_argument("--inflight", type=int, nargs="+", default=[1, 2, 4])
  args = ap.parse_args()
  print(f"# {jax.devices()[0].device_kind} jax {jax.__version__}", flush=True)
  for ctas, rows, d, inflight, reduce in [
      (c, r, d, f, red) for c in args.ctas for r in args.rows for d in args.d
      for f in args.inflight for red in (True, False)]:
    fn = make(ctas, args.steps, rows, d, args.t, args.n, inflight, reduce)
    try:
      sec = median_seconds(fn, (), warmup=2, reps=5, loops=3)
    except Exception as e:  # a shape Mosaic refuses
      print(f"ctas={ctas} rows={rows} d={d} inflight={inflight} reduce={reduce}: FAILED "
            f"{type(e).__name__}: {str(e)[:200]}", flush=True)
      continue
    nbytes = ctas * args.steps * rows * d * 4
    print(f"ctas={ctas:4d} rows={rows} d={d:3d} inflight={inflight} "
          f"{'reduce-add' if reduce else 'store     '}: {sec * 1e3:8.3f} ms "
          f"{nbytes / sec / 1e12:6.2f} TB/s", flush=True)


if __name__ == "__main__":
  main()
