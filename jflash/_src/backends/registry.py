"""Name -> backend module. A backend offers ``supports(p, q, k, v, bias)`` (raises
NotImplementedError naming what it lacks), ``forward`` and ``backward``."""

from __future__ import annotations

import importlib

# The first interpret-mode Pallas call imports Pallas's fuser, which registers a config
# option; that changes the cache key of every enclosing jit, so a user's jitted step would
# compile twice. Importing it with jflash keeps the key stable from the start.
try:
  import jax._src.pallas.fuser.jaxpr_fusion  # noqa: F401
except ImportError:  # a JAX without it has nothing to register
  pass

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
