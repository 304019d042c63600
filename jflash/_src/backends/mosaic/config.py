"""Tuning for the Mosaic GPU (Hopper) kernels: tiles and pipeline depth. Never meaning."""

from __future__ import annotations

import dataclasses

# One consumer warpgroup owns 64 query rows: the M of one wgmma instruction.
WG_ROWS = 64
# Two consumer warpgroups per CTA (FA3): they share one K/V ring and take turns on the
# tensor cores (ping-pong), so one's softmax hides behind the other's matmuls.
CONSUMER_WGS = 2
# Bytes of shared memory a CTA may use on sm90 (227 KiB), less a margin for barriers.
SMEM_BYTES = 227 * 1024 - 1024


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """``block_q``: query rows per consumer warpgroup (a CTA holds ``2 * block_q``);
  ``block_kv``: keys per pipeline step; ``stages``: K/V tiles in flight in the SMEM ring;
  ``pingpong``: serialise the two warpgroups' matmuls with a schedule barrier."""

  block_q: int = 64
  block_kv: int = 128
  stages: int = 2
  pingpong: bool = True

  def __post_init__(self):
    if self.block_q != WG_ROWS:
      raise ValueError(f"block_q={self.block_q} must be {WG_ROWS} (one wgmma M per warpgroup)")
    if self.block_kv % 64 or not 64 <= self.block_kv <= 256:
      raise ValueError(f"block_kv={self.block_kv} must be 64, 128, 192 or 256")
    if self.stages < 2:
      raise ValueError(f"stages={self.stages} must be >= 2 (a ring of one tile cannot overlap)")

  @classmethod
  def for_problem(cls, q_len: int, kv_len: int, head_dim: int, itemsize: int = 2) -> "MosaicConfig":
    """A heuristic default per (padded) head dim, shrunk to fit shared memory."""
    del q_len
    # Not yet measured on an H100/H200 (benchmarks/mosaic_probe.py --sweep does it):
    # FA3's choices. Large key tiles for small heads; d=256 needs 64-key tiles to keep the
    # 64x256 f32 accumulator, the scores and the ring within registers and SMEM.
    block_kv, stages = {64: (128, 3), 128: (128, 2), 256: (64, 2)}[head_dim]
    block_kv = min(block_kv, max(64, -(-kv_len // 64) * 64))
    cfg = cls(block_kv=block_kv, stages=stages)
    while cfg.stages > 2 and cfg.smem_bytes(head_dim, itemsize) > SMEM_BYTES:
      cfg = dataclasses.replace(cfg, stages=cfg.stages - 1)
    return cfg

  def smem_bytes(self, head_dim: int, itemsize: int = 2) -> int:
    """Q (reused for O) of both warpgroups + the K and V rings + lse staging."""
    q = CONSUMER_WGS * self.block_q * head_dim * itemsize
    ring = 2 * self.stages * self.block_kv * head_dim * itemsize
    return q + ring + CONSUMER_WGS * self.block_q * 4

  @property
  def q_multiple(self) -> int:
    return CONSUMER_WGS * self.block_q

  @property
  def k_multiple(self) -> int:
    return self.block_kv
