"""The static description of one attention call: one hashable value for custom_vjp and jit."""

from __future__ import annotations

import dataclasses

from jflash._src import determinism
from jflash._src.mask import MaskSpec


@dataclasses.dataclass(frozen=True)
class Problem:
  """Everything about a call that is known at trace time and changes its meaning.

  Tuning (block sizes, warps, stages) is not here: each backend picks it from its own
  config, and a tuning change never changes a result.
  """

  mask: MaskSpec
  scale: float
  softcap: float | None = None
  dropout_rate: float = 0.0  # > 0 needs MaskArrays.dropout_seed
  implementation: str = "xla"
  interpret: bool = False  # run Pallas kernels in interpret mode (no GPU)
  # Bitwise reproducible results asked for (XLA's --xla_gpu_deterministic_ops): no atomic
  # adds. Read when the call is made, so that jit caches keep the two apart.
  deterministic: bool = dataclasses.field(default_factory=determinism.required)

  @property
  def q_len(self) -> int:
    return self.mask.q_len

  @property
  def kv_len(self) -> int:
    return self.mask.kv_len
