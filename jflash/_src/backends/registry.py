"""Name -> backend module. A backend offers ``supports``, ``forward`` and ``backward``."""

from __future__ import annotations

import importlib

IMPLEMENTATIONS = ("mosaic", "triton", "xla")

_MODULES = {
    "xla": "jflash._src.backends.xla",
    "triton": "jflash._src.backends.triton.backend",
    "mosaic": "jflash._src.backends.mosaic.backend",
}


def get(name: str):
  if name not in _MODULES:
    raise ValueError(f"implementation={name!r} is not one of {IMPLEMENTATIONS + (None,)}")
  return importlib.import_module(_MODULES[name])
