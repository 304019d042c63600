"""Property-based fuzzing: random attention problems against the independent reference.

hypothesis draws a `Case` (shapes, GQA, dtype, and a random mix of causal, local window,
soft-cap, scale, sequence lengths including 0, segment ids, bias and dense mask) and
`check_case` compares out, lse and the gradients with the reference, as in
test_attention.py (with FA_GRAD_SLACK below on half-precision dq/dk/dbias). On CPU the
examples are tiny, so the CPU tests also draw small tile sizes: without them T, S <= 40
fit in one tile of either implementation and the multi-tile paths (tile skipping, partial
tiles, the backward's tile loops) would go unexercised.

Each CPU example costs ~5 s ("xla") or ~7 s ("triton", Pallas interpret mode), nearly all
of it compilation for the example's new shapes.

Profiles, picked by the environment variable JFLASH_HYPOTHESIS_PROFILE (default "ci"):

* ``ci``: derandomized (the same examples on every run, so CI is reproducible), 16 "xla"
  and 8 "triton" examples (~3 minutes on 2 cores), no example database, no shrinking.
* ``gpu``: more examples; the ``gpu``-marked tests always use it, fuzzing "triton" and (on
  Hopper) "mosaic" compiled on the GPU at T, S up to 600 and head dims up to 128 (256 for
  "mosaic"), in
  ``GPU_PARTS`` parts of their own seeds (reproducible, each short enough for one shard).
* ``explore``: random (not derandomized), many examples, shrinks failures: for hunting
  bugs locally, ``JFLASH_HYPOTHESIS_PROFILE=explore pytest tests/test_fuzz.py -k "xla"``.

``JFLASH_HYPOTHESIS_EXAMPLES=N`` sets the number of examples of every fuzz test.

A failing example prints ``repro: fuzz_check(Case(...), impl, tiles)``; every failure
found becomes an explicit case in ``REGRESSIONS`` below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, note, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import helpers
import test_attention
from helpers import Case
from test_attention import check_case

# --------------------------------------------------------------------------- profiles

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# ci/gpu do not shrink: a failure's exact Case is printed (the "repro:" note), and slow
# interpret-mode examples could keep CI shrinking for 5 minutes; explore shrinks.
_NO_SHRINK = (Phase.explicit, Phase.generate)
settings.register_profile("ci", max_examples=16, derandomize=True, database=None,
                          phases=_NO_SHRINK, **_COMMON)
settings.register_profile("gpu", max_examples=30, derandomize=True, database=None,
                          phases=_NO_SHRINK, **_COMMON)
settings.register_profile("explore", max_examples=200, derandomize=False, **_COMMON)

PROFILE = os.environ.get("JFLASH_HYPOTHESIS_PROFILE", "ci")
# Examples per implementation and profile.
EXAMPLES = {
    "ci": {"xla": 16, "triton": 8},
    # mosaic: each draw compiles four kernels (~20 s on the GPU machine's CPUs).
    "gpu": {"xla": 30, "triton": 30, "mosaic": 10},
    "explore": {"xla": 200, "triton": 60},
}


def _settings(profile: str, impl: str):
  base = settings.get_profile(profile)
  n = EXAMPLES.get(profile, {}).get(impl, base.max_examples)
  # JFLASH_HYPOTHESIS_EXAMPLES=N: N examples per fuzz test, whatever the profile.
  return settings(base, max_examples=int(os.environ.get("JFLASH_HYPOTHESIS_EXAMPLES", n)))


# --------------------------------------------------------------------------- strategies

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
CPU_HEAD_DIMS = (8, 16, 24, 32, 40)
GPU_HEAD_DIMS = (8, 16, 24, 32, 40, 64, 80, 96, 128)
# "mosaic" also draws the head dims of its split-head-dim backward (d=256, and 160 padded
# to 256): the two consumers' halves and their P^T / dS^T exchange.
MOSAIC_GPU_HEAD_DIMS = GPU_HEAD_DIMS + (160, 256)


@st.composite
def cases(draw, max_len: int = 40, head_dims=CPU_HEAD_DIMS) -> Case:
  """A random `Case`: shapes, dtype, and any combination of the features."""
  b = draw(st.integers(1, 2))
  segments = draw(st.sampled_from([None, "packed", "pair"]))
  t = draw(st.integers(1, max_len))
  # "packed" (one ids array) needs self attention; square problems are common anyway.
  square = segments == "packed" or draw(st.booleans())
  s = t if square else draw(st.integers(1, max_len))
  n = draw(st.integers(1, 4))
  k = draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
  h = draw(st.sampled_from(head_dims))
  dtype = draw(st.sampled_from(DTYPES))
  is_causal = draw(st.booleans())
  side = st.integers(0, t + s)
  window = draw(st.one_of(st.none(), side, st.tuples(side, side)))
  softcap = draw(st.one_of(st.none(), st.floats(1.0, 50.0)))
  scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
  q_lengths = draw(st.one_of(st.none(), st.lists(st.integers(0, t), min_size=b, max_size=b)))
  kv_lengths = draw(st.one_of(st.none(), st.lists(st.integers(0, s), min_size=b, max_size=b)))
  # Additive bias and boolean mask: None, or a shape that broadcasts to [B, N, T, S].
  bias = draw(st.one_of(st.none(), _broadcast_shape(b, n, t, s)))
  dense = draw(st.one_of(st.none(), _broadcast_shape(b, n, t, s)))
  seed = draw(st.integers(0, 2**16 - 1))
  return dataclasses.replace(
      Case(), b=b, t=t, s=s, n=n, k=k, h=h, dtype=dtype, is_causal=is_causal, window=window,
      q_lengths=q_lengths, kv_lengths=kv_lengths, segments=segments, softcap=softcap,
      scale=scale, bias=bias, dense=dense, seed=seed)


def _broadcast_shape(*full):
  return st.tuples(*(st.sampled_from([d, 1]) if d > 1 else st.just(1) for d in full))


# Small tiles (None: the implementation's default) so that tiny problems span several.
_TRITON_BLOCKS = ("block_q", "block_k", "dkv_block_q", "dkv_block_k", "dq_block_q", "dq_block_k")
TILES = {
    "xla": st.one_of(st.none(), st.fixed_dictionaries(
        {name: st.sampled_from([8, 16, 24]) for name in ("block_q", "block_k")})),
    "triton": st.one_of(st.none(), st.fixed_dictionaries(
        {name: st.sampled_from([16, 32]) for name in _TRITON_BLOCKS})),
}


# --------------------------------------------------------------------------- running


def case_repr(case: Case) -> str:
  """``Case(...)`` with the non-default fields, pasteable into REGRESSIONS."""
  parts = []
  for f in dataclasses.fields(case):
    value = getattr(case, f.name)
    if value is f.default or (type(value) is type(f.default) and value == f.default):
      continue
    parts.append(f"{f.name}=" + (f"jnp.{jnp.dtype(value).name}" if f.name == "dtype" else repr(value)))
  return f"Case({', '.join(parts)})"


@contextlib.contextmanager
def _tiles(impl: str, case: Case, blocks: dict | None):
  """Trace ``impl`` with ``blocks`` as its tile sizes (tuning only: never changes a result)."""
  if not blocks:
    yield
    return
  if impl == "xla":
    from jflash._src.backends import xla
    cfg = xla.XlaConfig(**blocks)
    patch = mock.patch.object(xla.XlaConfig, "for_problem", classmethod(lambda cls, p: cfg))
  else:
    from jflash._src.backends.triton import backend, config
    from jflash._src.layout import next_pow2
    default = config.TritonConfig.for_problem(case.t, case.s, max(16, next_pow2(case.h)))
    patch = backend.override_config(dataclasses.replace(default, **blocks))
  # Tile sizes are read at trace time, and traces are cached by the (static) Problem and
  # shapes alone: clear around the call so that no trace leaks in or out.
  jax.clear_caches()
  try:
    with patch:
      yield
  finally:
    jax.clear_caches()


# FlashAttention's own half-precision error on dq, dk and dbias: its backward takes
# delta = rowsum(dO * O) from the O stored in the input dtype (and rounds dS to it), so
# where dP - delta cancels (rows with few visible keys) a few ulps show that the naive
# baseline, which differentiates the softmax directly, does not have. jflash's gradients
# equal a float64 emulation of exactly that algorithm, and the emulation itself fails
# helpers' bound on such problems by up to ~2.3 ulps (REGRESSIONS below): 4 ulps of slack
# (at 1.0) there keeps the fuzzing meaningful. Each row's dbias (summed over keys) is off
# by do . (O - rounded O), exactly 0 in exact arithmetic; a bias broadcast over B, N or T
# sums that over its rows, so its slack grows with the square root of their number. That
# term is a dot product over the head dim, so at large head dims it can pass 4 ulps:
# _dbias_rounding_slack bounds it from the case itself (an H100 draw at h=96 was off by
# 0.051 against a bound of 0.033, 2026-11-26). out, lse and dv keep helpers' strict bound.
FA_GRAD_SLACK = {jnp.dtype(jnp.float16): 4 * 2.0**-10, jnp.dtype(jnp.bfloat16): 4 * 2.0**-7}


def _dbias_rounding_slack(case: Case, expected) -> float:
  """Twice the largest dbias error that rounding O to ``case.dtype`` alone can cause,
  relative as helpers.rel_err: each row r adds P_rj * (do_r . (O_r - rounded O_r)) to
  dbias[r, j] (P_rj <= 1; summed over keys, exactly that dot product), summed over the
  rows that one bias entry is broadcast across. O is the float32 reference's."""
  _, _, _, do = case.inputs()
  out, _ = test_attention.run_reference(case, jnp.float32)
  out = np.asarray(out, np.float64)
  rounded = np.asarray(jnp.asarray(out, case.dtype).astype(jnp.float32), np.float64)
  per_row = np.abs(np.einsum("btnh,btnh->bnt", np.asarray(do, np.float64), out - rounded))
  # Sum each row's term into the bias entry it is broadcast from ([B, N, T] of the bias).
  axes = tuple(i for i, size in enumerate(case.bias[:3]) if size == 1 and per_row.shape[i] > 1)
  per_entry = per_row.sum(axis=axes, keepdims=True)
  scale = max(1.0, float(np.abs(np.asarray(expected, np.float64)).max()))
  return 2 * float(per_entry.max()) / scale


def fa_assert_close(case: Case):
  """helpers.assert_close, with FA_GRAD_SLACK on ``case``'s half-precision gradients."""
  rows_per_dbias = 1
  if case.bias is not None:
    rows_per_dbias = case.b * case.n * case.t // math.prod(case.bias[:3])

  def assert_close(name, actual, expected, baseline, dtype):
    dtype = jnp.dtype(dtype)
    slack = {"dq": 1.0, "dk": 1.0, "dbias": math.sqrt(rows_per_dbias)}.get(name, 0.0)
    slack *= FA_GRAD_SLACK.get(dtype, 0.0)
    if name == "dbias" and dtype in FA_GRAD_SLACK:
      slack = max(slack, _dbias_rounding_slack(case, expected))
    atol = {dtype: helpers.ATOL[dtype] + slack}
    with mock.patch.dict(helpers.ATOL, atol):
      helpers.assert_close(name, actual, expected, baseline, dtype)

  return assert_close


def fuzz_check(case: Case, impl: str, blocks: dict | None = None):
  """`check_case`, on ``blocks`` tiles, with FA_GRAD_SLACK on half-precision gradients."""
  with contextlib.suppress(InvalidArgument):  # outside @given (the regressions): no notes
    note(f"repro: fuzz_check({case_repr(case)}, {impl!r}, {blocks!r})")
  with (_tiles(impl, case, blocks),
        mock.patch.object(test_attention, "assert_close", fa_assert_close(case))):
    check_case(case, impl)


# --------------------------------------------------------------------------- tests


@_settings(PROFILE, "xla")
@given(case=cases(), blocks=TILES["xla"])
def test_fuzz_xla(case, blocks):
  fuzz_check(case, "xla", blocks)


@_settings(PROFILE, "triton")
@given(case=cases(), blocks=TILES["triton"])
def test_fuzz_triton(case, blocks):
  fuzz_check(case, "triton", blocks)


# The "gpu" profile's examples run in GPU_PARTS seeded parts, each its own test: one test
# of all 30 "triton" draws took over 570 s on an H100 (each draw compiles its own kernels),
# past benchmarks/gpu_check.sh's shard limit, which then lost pytest's report (the
# slowest part, [1], took 418 s on an H100). A part is reproducible alone
# (``pytest -m gpu "tests/test_fuzz.py::test_fuzz_triton_gpu[3]"``) and draws its own cases.
GPU_PARTS = {"triton": 6, "mosaic": 3}


def _fuzz_gpu_part(impl: str, strategy, part: int):
  """Part ``part`` of ``impl``'s "gpu"-profile fuzzing: its share of the examples, drawn
  from seed ``part``."""
  base = _settings("gpu", impl)
  n = -(-base.max_examples // GPU_PARTS[impl])

  @seed(part)
  @settings(base, max_examples=n, derandomize=False)
  @given(case=strategy)
  def run(case):
    fuzz_check(case, impl)

  run()


@pytest.mark.gpu
@pytest.mark.parametrize("part", range(GPU_PARTS["triton"]))
def test_fuzz_triton_gpu(part):
  """"triton" compiled on the GPU, default tiles, shapes that span several of them."""
  _fuzz_gpu_part("triton", cases(max_len=600, head_dims=GPU_HEAD_DIMS), part)


def _mosaic_case(case: Case) -> Case:
  """The same draw without what "mosaic" refuses (bias, dense mask, f32): half
  precision, head dims up to 256 (padded to 64/128/256 by the backend). Segment ids stay:
  the Mosaic forward and backward kernels serve them."""
  dtype = case.dtype if case.dtype != jnp.float32 else jnp.bfloat16
  return dataclasses.replace(case, bias=None, dense=None, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("part", range(GPU_PARTS["mosaic"]))
def test_fuzz_mosaic_gpu(part):
  """"mosaic" (Hopper only) on the GPU: its forward and backward kernels, default config."""
  if str(getattr(jax.devices()[0], "compute_capability", "")) != "9.0":
    pytest.skip("mosaic needs an sm90 GPU")
  _fuzz_gpu_part("mosaic", cases(max_len=600, head_dims=MOSAIC_GPU_HEAD_DIMS).map(_mosaic_case),
                 part)


@pytest.mark.gpu
def test_fuzz_mosaic_gpu_wide_heads():
  """"mosaic" at head dims 160 and 256 only (a part of its own, seed ``GPU_PARTS``): the
  backward's split head dim, whose consumers exchange P^T and dS^T (bwd_parts.Exchange),
  which the mixed parts above draw rarely."""
  if str(getattr(jax.devices()[0], "compute_capability", "")) != "9.0":
    pytest.skip("mosaic needs an sm90 GPU")
  _fuzz_gpu_part("mosaic", cases(max_len=600, head_dims=(160, 256)).map(_mosaic_case),
                 GPU_PARTS["mosaic"])


# Failures hypothesis found, minimised, kept as fixed cases: (impl, case, tiles).
REGRESSIONS = [
    # dk off by 3 f16 ulps (error 1.95e-3 > helpers' bound 1.8e-3), the "ci" profile's first
    # find: FlashAttention's inherent f16 error (see FA_GRAD_SLACK), a test-tolerance bug
    # rather than a jflash one. Fails plain check_case; passes with the slack.
    pytest.param("xla", Case(t=15, s=15, n=1, k=1, h=8, dtype=jnp.float16, is_causal=True,
                             kv_lengths=[0, 8], segments="pair", scale=0.8243942287846755,
                             seed=207), None, id="f16_few_keys_dk_tolerance_xla"),
    pytest.param("triton", Case(t=15, s=15, n=1, k=1, h=8, dtype=jnp.float16, is_causal=True,
                                kv_lengths=[0, 8], segments="pair", scale=0.8243942287846755,
                                seed=207), None, id="f16_few_keys_dk_tolerance_triton"),
    # dbias of a per-row bias (broadcast over keys): exactly 0, but jflash gives 1.4e-3 =
    # do . (O - O rounded to f16), beyond helpers' 5e-4 (FA_GRAD_SLACK; tolerance bug).
    pytest.param("triton", Case(t=24, s=24, k=1, h=8, dtype=jnp.float16, segments="packed",
                                bias=(2, 2, 24, 1)), None, id="f16_row_bias_dbias_tolerance"),
    # dbias of a scalar bias: that error summed over 15 rows, 0.038 > 4 bf16 ulps.
    pytest.param("xla", Case(b=1, n=1, k=1, h=32, dtype=jnp.bfloat16, is_causal=True,
                             q_lengths=[15], segments="packed", scale=1.67219042752948,
                             bias=(1, 1, 1, 1), seed=2214), None,
                 id="bf16_scalar_bias_dbias_tolerance"),
    # dbias of a per-row bias at h=96 (GPU fuzz, H100, 2026-11-26): 0.0513 in "xla" and
    # "triton" alike, over 4 ulps; within _dbias_rounding_slack's bound from the case.
    *[pytest.param(impl, Case(b=1, t=397, s=397, k=1, h=96, dtype=jnp.bfloat16,
                              is_causal=True, window=470, q_lengths=[183], kv_lengths=[284],
                              segments="packed", scale=0.99999, bias=(1, 2, 397, 1),
                              seed=10092), None, id=f"bf16_h96_row_bias_dbias_{impl}")
      for impl in ("xla", "triton")],
]


@pytest.mark.parametrize("impl,case,blocks", REGRESSIONS)
def test_fuzz_regression(impl, case, blocks):
  fuzz_check(case, impl, blocks)
