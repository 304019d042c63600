"""Sequence parallelism: one attention forward+backward step with the sequence split over
all devices (``jflash.ring_attention`` inside ``jax.shard_map``), checked against the
same step on one device, and its speed.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
        python examples/sequence_parallel.py                      # 4 fake CPU devices
    python examples/sequence_parallel.py --seq 65536 --dtype bfloat16   # all local GPUs

The sequence is reordered into the zigzag layout (``jflash.to_zigzag``) before it is
sharded, so that every device gets as much causal work as the others; results come back
in the natural order with ``jflash.from_zigzag``.
"""

import argparse
import os
import time

# NVLink multicast stays off (shared machines): set before JAX starts NCCL.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import jflash  # noqa: E402


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seq", type=int, default=None, help="total sequence length (default: 256 "
                 "on CPU, 32768 on GPU)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=2, help="GQA: key/value heads")
  p.add_argument("--head-dim", type=int, default=None, help="default: 32 on CPU, 128 on GPU")
  p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
  p.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
  p.add_argument("--docs", type=int, default=3, help="packed documents (segment ids); 0: none")
  p.add_argument("--steps", type=int, default=5, help="timed steps")
  return p.parse_args()


def main():
  a = parse_args()
  on_gpu = jax.default_backend() == "gpu"
  s = a.seq or (32768 if on_gpu else 256)
  h = a.head_dim or (128 if on_gpu else 32)
  dtype = jnp.dtype(a.dtype or ("bfloat16" if on_gpu else "float32"))
  devices = jax.devices()
  n_dev = len(devices)
  mesh = jax.make_mesh((n_dev,), ("seq",), axis_types=(AxisType.Auto,))
  print(f"jax {jax.__version__}: {n_dev} x {devices[0].device_kind}; b={a.batch} s={s} "
        f"heads={a.heads}/{a.kv_heads} d={h} {dtype.name}, layout={a.layout}")

  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(ks[0], (a.batch, s, a.heads, h)).astype(dtype)
  k = jax.random.normal(ks[1], (a.batch, s, a.kv_heads, h)).astype(dtype)
  v = jax.random.normal(ks[2], (a.batch, s, a.kv_heads, h)).astype(dtype)
  do = jax.random.normal(ks[3], q.shape).astype(dtype)
  # Packed documents: random cut points, ids 0, 1, 2, ... along the sequence.
  cuts = np.sort(np.random.default_rng(0).integers(1, s, size=max(a.docs - 1, 0)))
  ids = jnp.asarray(np.broadcast_to((np.arange(s)[:, None] >= cuts).sum(-1), (a.batch, s)),
                    jnp.int32) if a.docs else None

  # Device d holds tokens [d*s/P, (d+1)*s/P) of the (zigzag-ordered) sequence.
  zig = a.layout == "zigzag"
  order = (lambda x: jflash.to_zigzag(x, n_dev)) if zig else (lambda x: x)
  unorder = (lambda x: jflash.from_zigzag(x, n_dev)) if zig else (lambda x: x)
  shard = NamedSharding(mesh, P(None, "seq"))
  q_s, k_s, v_s, do_s = (jax.device_put(order(x), shard) for x in (q, k, v, do))
  ids_s = None if ids is None else jax.device_put(order(ids), shard)

  def local(q, k, v, ids):  # runs on each device, on its chunk
    return jflash.ring_attention(q, k, v, axis_name="seq", is_causal=True, segment_ids=ids,
                                 layout=a.layout)

  attention = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "seq"),) * 4,
                            out_specs=P(None, "seq"), check_vma=False)

  @jax.jit
  def sp_step(q, k, v, ids, do):
    out, pullback = jax.vjp(lambda q, k, v: attention(q, k, v, ids), q, k, v)
    return out, pullback(do)

  @jax.jit
  def one_device_step(q, k, v, ids, do):
    f = lambda q, k, v: jflash.dot_product_attention(q, k, v, is_causal=True, segment_ids=ids)
    out, pullback = jax.vjp(f, q, k, v)
    return out, pullback(do)

  t0 = time.perf_counter()
  out, grads = jax.block_until_ready(sp_step(q_s, k_s, v_s, ids_s, do_s))
  print(f"compiled and ran the sequence-parallel step in {time.perf_counter() - t0:.1f} s")
  ref_out, ref_grads = one_device_step(q, k, v, ids, do)
  for name, x, r in zip(("out", "dq", "dk", "dv"), (out,) + grads, (ref_out,) + ref_grads):
    x, r = np.asarray(unorder(x), np.float32), np.asarray(r, np.float32)
    err = np.abs(x - r).max() / max(1.0, np.abs(r).max())
    print(f"  {name}: max relative difference to one device = {err:.2e}")

  t0 = time.perf_counter()
  for _ in range(a.steps):
    res = sp_step(q_s, k_s, v_s, ids_s, do_s)
  jax.block_until_ready(res)
  dt = (time.perf_counter() - t0) / a.steps
  print(f"sequence-parallel fwd+bwd: {dt * 1e3:.2f} ms/step, "
        f"{a.batch * s / dt:,.0f} tokens/s on {n_dev} devices")


if __name__ == "__main__":
  main()
