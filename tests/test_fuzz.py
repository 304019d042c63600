"""Property-based fuzzing: random attention problems against the independent reference.

hypothesis draws a `Case` (shapes, dtype and a random mix of every masking feature) and
`check_case` compares out, lse and dq/dk/dv with the reference, as in test_attention.py.
On CPU the examples are tiny (Pallas interpret mode is slow), so the CPU tests also draw
small tile sizes: without them T, S <= 40 fit in one tile of either implementation and
the multi-tile paths (block skipping, partial tiles, the backward's tile loops) would go
unexercised.

Profiles, picked by the environment variable JFLASH_HYPOTHESIS_PROFILE (default "ci"):

* ``ci``: derandomized (the same examples on every run, so CI is reproducible), about
  25 "xla" and 8 "triton" examples, no example database.
* ``gpu``: more examples; the ``gpu``-marked test always uses it, fuzzing "triton"
  compiled on the GPU at T, S up to 600 and head dims up to 128.
* ``explore``: random (not derandomized) and many examples, for hunting bugs locally:
  ``JFLASH_HYPOTHESIS_PROFILE=explore pytest tests/test_fuzz.py``.

Every failure found becomes an explicit case in ``REGRESSIONS`` below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from unittest import mock

import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from helpers import Case
from test_attention import check_case

# --------------------------------------------------------------------------- profiles

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=25, derandomize=True, database=None, **_COMMON)
settings.register_profile("gpu", max_examples=60, derandomize=True, database=None, **_COMMON)
settings.register_profile("explore", max_examples=200, derandomize=False, **_COMMON)

PROFILE = os.environ.get("JFLASH_HYPOTHESIS_PROFILE", "ci")
# Examples per implementation and profile (interpret-mode "triton" costs ~3x "xla" on CPU).
EXAMPLES = {
    "ci": {"xla": 25, "triton": 8},
    "gpu": {"xla": 60, "triton": 60},
    "explore": {"xla": 200, "triton": 60},
}


def _settings(profile: str, impl: str):
  base = settings.get_profile(profile)
  return settings(base, max_examples=EXAMPLES.get(profile, {}).get(impl, base.max_examples))


# --------------------------------------------------------------------------- strategies

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
CPU_HEAD_DIMS = (8, 16, 24, 32, 40)
GPU_HEAD_DIMS = (8, 16, 24, 32, 40, 64, 80, 96, 128)


@st.composite
def cases(draw, max_len: int = 40, head_dims=CPU_HEAD_DIMS) -> Case:
  """A random `Case`: shapes, dtype, and any combination of the masking features."""
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
  seed = draw(st.integers(0, 2**16 - 1))
  return dataclasses.replace(
      Case(), b=b, t=t, s=s, n=n, k=k, h=h, dtype=dtype, is_causal=is_causal, window=window,
      q_lengths=q_lengths, kv_lengths=kv_lengths, segments=segments, softcap=softcap,
      scale=scale, seed=seed)


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


def fuzz_check(case: Case, impl: str, blocks: dict | None = None):
  with contextlib.suppress(InvalidArgument):  # outside @given (the regressions): no notes
    note(f"repro: fuzz_check({case_repr(case)}, {impl!r}, {blocks!r})")
  with _tiles(impl, case, blocks):
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


@pytest.mark.gpu
@_settings("gpu", "triton")
@given(case=cases(max_len=600, head_dims=GPU_HEAD_DIMS))
def test_fuzz_triton_gpu(case):
  """"triton" compiled on the GPU, default tiles, shapes that span several of them."""
  fuzz_check(case, "triton")


# Failures hypothesis found, minimised, kept as fixed cases: (impl, case, tiles).
REGRESSIONS = [
]


@pytest.mark.parametrize("impl,case,blocks", REGRESSIONS)
def test_fuzz_regression(impl, case, blocks):
  fuzz_check(case, impl, blocks)
