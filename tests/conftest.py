"""Test set-up: 8 fake CPU devices for the sharding tests, the `gpu` marker, and
failures written out as they happen (JFLASH_FAILURE_LOG)."""

import os

# Must be set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402


def _has_gpu() -> bool:
  try:
    return any(d.platform == "gpu" for d in jax.devices())
  except RuntimeError:
    return False


HAS_GPU = _has_gpu()


def pytest_collection_modifyitems(config, items):
  if HAS_GPU:
    return
  skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run benchmarks/gpu_check.sh on the GPU machine)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


def pytest_runtest_logreport(report):
  """With JFLASH_FAILURE_LOG set, append each failure's full report to that file the
  moment it happens. benchmarks/gpu_check.sh kills a shard at its time limit, and with
  it the report pytest prints at the end; pytest's fd-level capture swallows stderr too
  (a FUZZ FAILURE line printed to sys.__stderr__ never reached the log, H100 2026-11-26)."""
  path = os.environ.get("JFLASH_FAILURE_LOG")
  if path and report.failed:
    with open(path, "a") as f:
      f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
