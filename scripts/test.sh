#!/usr/bin/env bash
# Runs the CPU test suite (Pallas kernels in interpret mode, 8 fake devices).
set -uo pipefail
cd "$(dirname "$0")/.."
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
.venv/bin/python -m pytest -q -m "not gpu" "$@"
