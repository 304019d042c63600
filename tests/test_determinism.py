"""jflash._src.determinism: XLA's reproducibility switch, read from XLA_FLAGS."""

from __future__ import annotations

import pytest

from jflash._src import determinism
from jflash._src.mask import MaskSpec
from jflash._src.problem import Problem


@pytest.mark.parametrize("flags, want", [
    ("", False),
    ("--xla_force_host_platform_device_count=8", False),
    ("--xla_gpu_deterministic_ops", True),
    ("--xla_gpu_deterministic_ops=true", True),
    ("--xla_gpu_deterministic_ops=True", True),
    ("--xla_gpu_deterministic_ops=1", True),
    ("--xla_gpu_deterministic_ops=false", False),
    ("--xla_gpu_deterministic_ops=0", False),
    ("--xla_gpu_exclude_nondeterministic_ops=true", True),
    # The last setting wins, as in XLA's own parser.
    ("--xla_gpu_deterministic_ops=true --xla_gpu_deterministic_ops=false", False),
    ("--xla_gpu_deterministic_ops=false --xla_gpu_exclude_nondeterministic_ops", True),
    # A flag whose name only starts with one of ours is another flag.
    ("--xla_gpu_deterministic_ops_extra=true", False),
    ("  --xla_dump_to=/tmp/x   --xla_gpu_deterministic_ops  ", True),
])
def test_required_parses_xla_flags(flags, want):
  assert determinism.required(flags) is want


def test_required_refuses_an_unreadable_value():
  with pytest.raises(ValueError, match="xla_gpu_deterministic_ops"):
    determinism.required("--xla_gpu_deterministic_ops=maybe")


def test_problem_reads_xla_flags_when_made(monkeypatch):
  spec = MaskSpec(q_len=8, kv_len=8)
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
  on = Problem(mask=spec, scale=1.0)
  monkeypatch.setenv("XLA_FLAGS", "")
  off = Problem(mask=spec, scale=1.0)
  monkeypatch.delenv("XLA_FLAGS")
  unset = Problem(mask=spec, scale=1.0)
  assert on.deterministic and not off.deterministic and not unset.deterministic
  # The two are different static arguments: jit traces them apart.
  assert on != off and hash(on) != hash(off)
