"""Tuning-only overrides of a backend's config heuristic, for sweeps and tests. Never public.

A config changes speed, never a result. The jitted dispatch caches traces by the Problem
and the shapes alone, so an override clears JAX's caches on the way in and out: an
earlier trace would otherwise ignore it.
"""

from __future__ import annotations

import contextlib
from typing import Generic, TypeVar

import jax

C = TypeVar("C")


class Override(Generic[C]):
  """``with override(cfg):`` traces the calls inside with ``cfg``; ``override.value`` is
  the config in force (None: the heuristic's)."""

  def __init__(self):
    self.value: C | None = None

  @contextlib.contextmanager
  def __call__(self, cfg: C):
    prev, self.value = self.value, cfg
    jax.clear_caches()
    try:
      yield
    finally:
      self.value = prev
      jax.clear_caches()
