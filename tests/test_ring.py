"""Ring attention inside jax.shard_map, on 8 fake CPU devices (XLA_FLAGS in conftest.py).

Outputs, lse and gradients of the sequence-sharded ring must match the independent
reference on the whole sequence, for every layout; the compiled program moves K/V with
collective-permutes only (no all-gather). The ``gpu`` tests rerun the checks with the
compiled Triton and Mosaic kernels on 2 GPUs (``pytest -m gpu tests/test_ring.py`` on a 2-GPU host).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import jflash
import reference
from jflash._src import ring, zigzag
from jflash._src.mask import MaskSpec
from helpers import Case, assert_close, assert_lse_close


AXIS = "ring"


@dataclasses.dataclass(frozen=True)
class RingCase:
  case: Case  # the global problem (t == s: the whole sequence)
  devices: int = 4
  layout: str = "contiguous"
  impl: str = "xla"
  with_lse: bool = True  # also return the lse and differentiate through it


def _mesh(n: int):
  return jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


@functools.lru_cache(maxsize=None)
def _ring_program(rc: RingCase):
  """A jitted ``(q, k, v, seg, do, dl) -> (out, lse, (dq, dk, dv))`` on the global arrays."""
  c, n = rc.case, rc.devices
  seq = P(None, AXIS)
  zig = rc.layout == "zigzag"
  to = (lambda x: jflash.to_zigzag(x, n)) if zig else (lambda x: x)
  back = (lambda x: jflash.from_zigzag(x, n)) if zig else (lambda x: x)

  def body(q, k, v, seg):
    return jflash.ring_attention(
        q, k, v, axis_name=AXIS, is_causal=c.is_causal, scale=c.scale, segment_ids=seg,
        logits_soft_cap=c.softcap, local_window_size=c.window, layout=rc.layout,
        implementation=rc.impl, return_residual=True)

  ring = jax.shard_map(body, mesh=_mesh(n), in_specs=(seq,) * 4, out_specs=(seq, seq),
                       check_vma=False)

  def program(q, k, v, seg, do, dl):
    def f(q, k, v):
      out, lse = ring(to(q), to(k), to(v), None if seg is None else to(seg))
      return back(out), back(lse)

    if rc.with_lse:
      (out, lse), pullback = jax.vjp(f, q, k, v)
      return out, lse, pullback((do, dl))
    # The lse as an auxiliary output: its cotangent is a symbolic zero.
    out, pullback, lse = jax.vjp(f, q, k, v, has_aux=True)
    return out, lse, pullback(do)

  return jax.jit(program)


def _lse_cotangent(case: Case):
  return jax.random.normal(jax.random.PRNGKey(case.seed + 5), (case.b, case.t, case.n))


def _reference(case: Case, dtype, with_lse: bool):
  q, k, v, do = case.inputs()
  dl = _lse_cotangent(case) if with_lse else jnp.zeros((case.b, case.t, case.n))

  @jax.jit
  def run(mask, q, k, v, do, dl):
    f = lambda q, k, v: reference.attention(q, k, v, mask, scale=case.scale,
                                            softcap=case.softcap, dtype=dtype)
    (out, lse), pullback = jax.vjp(f, q, k, v)
    return out, pullback((do.astype(out.dtype), dl))

  return run(jnp.asarray(case.mask()), q, k, v, do, dl)


def check_ring(rc: RingCase):
  if len(jax.devices()) < rc.devices:
    pytest.skip(f"needs {rc.devices} devices (8 fake CPU devices: see conftest.py)")
  c = rc.case
  q, k, v, do = c.inputs()
  dl = _lse_cotangent(c) if rc.with_lse else None
  program = _ring_program(rc)
  out, lse, grads = program(q, k, v, c.segment_ids(), do, dl)
  ref_out, ref_grads = _reference(c, jnp.float32, rc.with_lse)
  base_out, base_grads = _reference(c, c.dtype, rc.with_lse)
  np_out, np_lse = reference.attention_np64(q, k, v, c.mask(), scale=c.scale, softcap=c.softcap)
  assert out.shape == q.shape and out.dtype == c.dtype
  assert lse.shape == q.shape[:-1] and lse.dtype == jnp.float32
  assert_close("out", out, np_out, base_out, c.dtype)
  assert_lse_close(lse, np_lse, c.dtype)
  for name, g, r, b, x in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads, (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype, name
    assert_close(name, g, r, b, c.dtype)
  # A rerun gives identical bits.
  again = program(q, k, v, c.segment_ids(), do, dl)
  for a, b in zip(jax.tree.leaves((out, lse, grads)), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  return out


SEQ = dict(b=1, t=64, s=64, h=16)
CASES = {
    # Every chunk pair visible; no lse cotangent (the symbolic-zero path).
    "full_gqa": RingCase(Case(n=4, k=2, **SEQ), with_lse=False),
    "causal_contiguous": RingCase(Case(n=2, k=2, is_causal=True, **SEQ)),
    "causal_zigzag_gqa": RingCase(Case(n=4, k=2, is_causal=True, **SEQ), layout="zigzag"),
    # Chunks of 16: the window reaches 2 chunks back, so the ring stops after 2 of 3 steps.
    "packed_softcap_window_contiguous": RingCase(
        Case(n=2, k=1, is_causal=True, window=(20, 0), segments="packed", softcap=3.0,
             scale=0.5, seed=1, **SEQ)),
    # Chunks of 8: distances -2..1 each have their own band, the others are skipped.
    "window_two_sided_8": RingCase(Case(n=2, k=2, window=(5, 11), seed=3, **SEQ), devices=8),
    # 8 devices: half-chunks of 4 tokens, every step of the loop body runs.
    "packed_zigzag_8_bf16": RingCase(
        Case(n=4, k=2, is_causal=True, segments="packed", dtype=jnp.bfloat16, seed=2, **SEQ),
        devices=8, layout="zigzag"),
    "triton_causal_2": RingCase(Case(n=2, k=1, is_causal=True, b=1, t=32, s=32, h=16),
                                devices=2, impl="triton"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_ring_matches_reference(name):
  check_ring(CASES[name])


GPU_SEQ = dict(b=1, t=2048, s=2048, n=8, k=2, h=128, dtype=jnp.bfloat16)
GPU_CASES = {
    "zigzag_packed": RingCase(Case(is_causal=True, segments="packed", **GPU_SEQ), devices=2,
                              layout="zigzag", impl="triton"),
    "contiguous_causal": RingCase(Case(is_causal=True, **GPU_SEQ), devices=2, impl="triton"),
    "contiguous_window": RingCase(Case(is_causal=True, window=(700, 0), **GPU_SEQ), devices=2,
                                  impl="triton", with_lse=False),
    "full_softcap": RingCase(Case(softcap=20.0, **GPU_SEQ), devices=2, impl="triton"),
    # The Hopper kernels per chunk pair (what implementation=None picks on an H100/H200).
    "zigzag_causal_mosaic": RingCase(Case(is_causal=True, **GPU_SEQ), devices=2,
                                     layout="zigzag", impl="mosaic"),
    "contiguous_window_mosaic": RingCase(Case(is_causal=True, window=(700, 0), **GPU_SEQ),
                                         devices=2, impl="mosaic"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_ring_on_gpus(name):
  rc = GPU_CASES[name]
  if rc.impl == "mosaic" and str(getattr(jax.devices()[0], "compute_capability", "")) != "9.0":
    pytest.skip("mosaic needs an sm90 GPU")
  check_ring(rc)


def test_ring_matches_jax_nn():
  rc = CASES["full_gqa"]
  if len(jax.devices()) < rc.devices:
    pytest.skip(f"needs {rc.devices} devices")
  q, k, v, do = rc.case.inputs()
  out, _, _ = _ring_program(rc)(q, k, v, None, do, None)
  expected = jax.nn.dot_product_attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=2e-6, rtol=2e-6)


def test_unbatched_inputs():
  c = Case(b=1, t=32, s=32, n=2, k=1, is_causal=True, segments="packed")
  q, k, v, _ = c.inputs()
  seq = P(AXIS)
  f = jax.jit(jax.shard_map(
      lambda q, k, v, ids: jflash.ring_attention(q, k, v, axis_name=AXIS, is_causal=True,
                                                 segment_ids=ids, implementation="xla"),
      mesh=_mesh(2), in_specs=(seq,) * 4, out_specs=seq, check_vma=False))
  out = f(q[0], k[0], v[0], c.segment_ids()[0])
  expected, _ = reference.attention_np64(q, k, v, c.mask())
  assert out.shape == q.shape[1:]
  np.testing.assert_allclose(np.asarray(out), expected[0], atol=2e-6, rtol=2e-6)


def test_hlo_moves_kv_by_collective_permute_only():
  rc = CASES["full_gqa"]
  if len(jax.devices()) < rc.devices:
    pytest.skip(f"needs {rc.devices} devices")
  q, k, v, do = rc.case.inputs()
  text = _ring_program(rc).lower(q, k, v, None, do, None).compile().as_text()
  assert "collective-permute" in text
  for collective in ("all-gather", "all-to-all", "all-reduce", "reduce-scatter"):
    assert collective not in text, collective


def _ring_spec(causal=False, left=None, right=None):
  return ring.Ring(axis_name=AXIS, layout="contiguous", causal=causal, window_left=left,
                   window_right=right, scale=1.0, softcap=None, has_segment_ids=False,
                   implementation="xla", interpret=False)


def _plan(n, chunk, **kw):
  return ring._Plan.make(_ring_spec(**kw), n, chunk, chunk)


def test_plan_skips_pairs_and_ends_early():
  # Causal: earlier chunks unmasked, later ones skipped, every step has work somewhere.
  plan = _plan(4, 16, causal=True)
  assert plan.specs == (MaskSpec(q_len=16, kv_len=16),) and plan.last == 3
  assert plan.table == (0, 0, 0, 0, 1, 1, 1)  # distances -3 .. 3 (0 unused)
  # A window 20 back over chunks of 16: distance 1 keeps j - i >= -4 locally, distance 2
  # keeps j - i >= 12; nothing later or further back: two steps instead of three.
  plan = _plan(4, 16, causal=True, left=20, right=0)
  assert plan.specs == (MaskSpec(q_len=16, kv_len=16, window_left=4),
                        MaskSpec(q_len=16, kv_len=16, window_left=-12))
  assert plan.table == (0, 0, 0, 0, 1, 2, 0) and plan.last == 2
  # Non-causal, no mask: one case, no skips.
  plan = _plan(4, 16)
  assert set(plan.table) - {0} == {1} and plan.last == 3
  # What the backend's supports() is asked about: the diagonal and every other case.
  r = dataclasses.replace(_ring_spec(causal=True), layout="zigzag")
  assert ring.pair_specs(r, 4, 16, 16) == (
      MaskSpec(q_len=16, kv_len=16, causal=True), MaskSpec(q_len=16, kv_len=8),
      MaskSpec(q_len=8, kv_len=16))


@pytest.mark.parametrize("n", [1, 2, 4])
def test_zigzag_order_round_trip(n):
  x = jnp.arange(2 * 4 * n * 3).reshape(2, 4 * n, 3)
  z = jflash.to_zigzag(x, n)
  halves = z[0, :, 0].reshape(2 * n, 2) // (2 * 3)  # the half-chunk of every token
  expected = [c for d in range(n) for c in (d, 2 * n - 1 - d)]
  np.testing.assert_array_equal(halves[:, 0], expected)
  np.testing.assert_array_equal(jflash.from_zigzag(z, n), x)
  np.testing.assert_array_equal(jflash.from_zigzag(jflash.to_zigzag(x[0], n, axis=0), n, axis=0), x[0])


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_shard_local_zigzag_matches_global(n):
  """Inside shard_map, each device's contiguous chunk moved to the zigzag layout (what
  the sequence-sharded jit path does) equals to_zigzag of the global array, and back."""
  if len(jax.devices()) < n:
    pytest.skip(f"needs {n} devices")
  local = lambda f, axis: jax.jit(jax.shard_map(
      lambda x: f(x, AXIS, axis), mesh=_mesh(n), in_specs=P(*[None] * axis, AXIS),
      out_specs=P(*[None] * axis, AXIS), check_vma=False))
  x = jnp.arange(2 * 4 * n * 3, dtype=jnp.float32).reshape(2, 4 * n, 3)
  z = local(zigzag.shard_to_zigzag, 1)(x)
  np.testing.assert_array_equal(z, jflash.to_zigzag(x, n))
  np.testing.assert_array_equal(local(zigzag.shard_from_zigzag, 1)(z), x)
  lse = x.reshape(2, 3, 4 * n)  # [B, N, T]: the sequence on axis 2
  np.testing.assert_array_equal(local(zigzag.shard_to_zigzag, 2)(lse),
                                jflash.to_zigzag(lse, n, axis=2))


def _trace(body, n=2, t=16, k_heads=2, seg=False, check_vma=False):
  """Traces ``body(q, k, v, seg)`` under shard_map: errors raise, nothing compiles."""
  seq = P(None, AXIS)
  f = jax.shard_map(body, mesh=_mesh(n), in_specs=(seq,) * 4, out_specs=seq,
                    check_vma=check_vma)
  q = jnp.zeros((1, n * t, 2, 16))
  kv = jnp.zeros((1, n * t, k_heads, 16))
  ids = jnp.zeros((1, n * t), jnp.int32) if seg else None
  return jax.eval_shape(f, q, kv, kv, ids)


def _ring(**kw):
  return lambda q, k, v, seg: jflash.ring_attention(q, k, v, segment_ids=seg, **kw)


@pytest.mark.parametrize("kw, error, match", [
    (dict(axis_name=None), ValueError, "axis_name"),
    (dict(axis_name="nope"), ValueError, "axis_name"),
    (dict(axis_name=AXIS, layout="striped"), ValueError, "layout"),
    (dict(axis_name=AXIS, local_window_size=4, layout="zigzag"), NotImplementedError,
     "local_window_size"),
    (dict(axis_name=AXIS, local_window_size=-1), ValueError, "local_window_size"),
    (dict(axis_name=AXIS, implementation="cuda"), ValueError, "implementation"),
    (dict(axis_name=AXIS, implementation="mosaic"), NotImplementedError, "mosaic"),
    (dict(axis_name=AXIS, is_causal=1), TypeError, "is_causal"),
    (dict(axis_name=AXIS, logits_soft_cap=-1.0), ValueError, "logits_soft_cap"),
])
def test_errors_name_the_argument(kw, error, match):
  with pytest.raises(error, match=match):
    _trace(_ring(**kw))


def test_errors_on_shapes():
  with pytest.raises(ValueError, match="multiple of key/value heads"):
    _trace(_ring(axis_name=AXIS), k_heads=3)
  with pytest.raises(ValueError, match="zigzag"):
    _trace(_ring(axis_name=AXIS, is_causal=True, layout="zigzag"), t=5)
  with pytest.raises(ValueError, match="segment_ids"):
    _trace(lambda q, k, v, seg: jflash.ring_attention(q, k, v, axis_name=AXIS,
                                                      segment_ids=(seg, seg)), seg=True)
  for kw, name in ((dict(is_causal=True), "is_causal"),
                   (dict(local_window_size=(3, 0)), "local_window_size")):
    with pytest.raises(ValueError, match=name):
      _trace(lambda q, k, v, seg: jflash.ring_attention(q, k[:, :8], v[:, :8], axis_name=AXIS,
                                                        **kw))
  with pytest.raises(NotImplementedError, match="check_vma"):
    _trace(_ring(axis_name=AXIS), check_vma=True)
  with pytest.raises(ValueError, match="multiple of 2 \\* num_devices"):
    jflash.to_zigzag(jnp.zeros((1, 12)), 4)
  with pytest.raises(ValueError, match="num_devices"):
    jflash.from_zigzag(jnp.zeros((1, 16)), 0)
