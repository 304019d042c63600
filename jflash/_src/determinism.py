"""Whether the caller asked for run-to-run identical results: XLA's own switch.

jflash follows what XLA does for its GPU ops (cuDNN attention, scatters): fast by default,
bitwise reproducible under ``--xla_gpu_deterministic_ops`` (or the older
``--xla_gpu_exclude_nondeterministic_ops``) in ``XLA_FLAGS``. Where a backend has a faster
kernel that adds with atomics (the Mosaic backward's fused dQ), it uses it only when this
says reproducibility is not required.
"""

from __future__ import annotations

import os

FLAGS = ("xla_gpu_deterministic_ops", "xla_gpu_exclude_nondeterministic_ops")
_TRUE, _FALSE = ("", "true", "1"), ("false", "0")


def required(xla_flags: str | None = None) -> bool:
  """True if ``xla_flags`` (default: the ``XLA_FLAGS`` environment variable) turns on
  either of ``FLAGS``: ``--flag``, ``--flag=true`` or ``--flag=1``; the last setting of
  either wins, as in XLA's parser. An unreadable value raises ``ValueError``."""
  if xla_flags is None:
    xla_flags = os.environ.get("XLA_FLAGS", "")
  on = False
  for token in xla_flags.split():
    name, _, value = token.lstrip("-").partition("=")
    if name not in FLAGS:
      continue
    value = value.strip().lower()
    if value not in _TRUE + _FALSE:
      raise ValueError(f"XLA_FLAGS: --{name}={value!r} is neither true nor false")
    on = value in _TRUE
  return on
