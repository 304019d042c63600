"""The "mosaic" implementation: Pallas Mosaic GPU kernels for Hopper (sm90).

Not built yet: every call is refused with NotImplementedError, so that
``implementation=None`` falls back to "triton" and an explicit request fails loudly.
"""

from __future__ import annotations


def supports(p, q, k, v) -> None:
  raise NotImplementedError(
      "implementation='mosaic' has no kernels yet (Hopper Mosaic GPU work is open); "
      "use implementation='triton' or None")


def forward(p, q, k, v, bias, arrays):
  supports(p, q, k, v)


def backward(p, q, k, v, bias, arrays, lse, dout, delta, want_dbias):
  supports(p, q, k, v)
