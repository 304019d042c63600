"""Tuning for the Triton kernels: block sizes, warps, pipeline stages. Never meaning."""

from __future__ import annotations

import dataclasses

from jflash._src.layout import next_pow2


# Hopper and Ampere offer 227 KiB of shared memory per block; Triton adds its own scratch
# (layout conversions, reductions) on top of the pipelined tiles estimated below.
SHARED_MEMORY_BUDGET = 176 * 1024

# Per kernel (field prefix): the rows of the tiles a program keeps, and of those its loop
# streams each stage ("q": block_q rows of head_dim, "k": block_k rows).
_KERNEL_TILES = {
    "": ("q", "kk"),  # forward: q kept; k, v streamed
    "dkv_": ("kk", "qq"),  # dK/dV: k, v kept; q, dO streamed
    "dq_": ("qq", "kk"),  # dQ: q, dO kept; k, v streamed
}


@dataclasses.dataclass(frozen=True)
class TritonConfig:
  # Forward: a query tile per program, looping over key tiles.
  block_q: int = 128
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 3
  # dK/dV: a key tile per program, looping over query tiles (of every head in the group).
  dkv_block_q: int = 32
  dkv_block_k: int = 128
  dkv_warps: int = 4
  dkv_stages: int = 3
  # dQ: a query tile per program, looping over key tiles.
  dq_block_q: int = 128
  dq_block_k: int = 32
  dq_warps: int = 4
  dq_stages: int = 3

  @classmethod
  def for_problem(cls, q_len: int, kv_len: int, head_dim: int, *, itemsize: int = 2,
                  tile_bytes: int = 0) -> "TritonConfig":
    """A heuristic default; shrinks the tiles for short sequences (and CPU tests).

    ``itemsize``: bytes per q/k/v element; ``tile_bytes``: bytes per (query, key) pair of
    the per-tile inputs (a bias, a dense int8 mask). Both enter the shared-memory fit.
    """
    # Measured on an H200 (2026-11-21, s=4096, bf16; benchmarks/tune_triton.py):
    # d=64: fwd 64x64/4 warps, dK/dV 64x64/4 warps (128-key tiles with 4 warps spill
    # and run at a third of the speed); d=128: fwd 128x64/4 warps, dK/dV 64x128/8 warps,
    # dQ 128x64/8 warps. d>128 halves the tiles to stay within registers.
    if head_dim <= 64:
      cfg = cls(block_q=64, block_k=64, num_warps=4, num_stages=3,
                dkv_block_q=64, dkv_block_k=64, dkv_warps=4, dkv_stages=3,
                dq_block_q=128, dq_block_k=64, dq_warps=4, dq_stages=3)
    elif head_dim <= 128:
      cfg = cls(block_q=128, block_k=64, num_warps=4, num_stages=3,
                dkv_block_q=64, dkv_block_k=128, dkv_warps=8, dkv_stages=3,
                dq_block_q=128, dq_block_k=64, dq_warps=8, dq_stages=3)
    else:
      cfg = cls(block_q=64, block_k=64, num_warps=8, num_stages=2,
                dkv_block_q=32, dkv_block_k=64, dkv_warps=8, dkv_stages=2,
                dq_block_q=64, dq_block_k=32, dq_warps=8, dq_stages=2)
    # Tiles no longer than the (power-of-two-rounded) sequence, at least 16 for the MMA.
    tq = max(16, next_pow2(q_len))
    tk = max(16, next_pow2(kv_len))
    cfg = dataclasses.replace(
        cfg,
        block_q=min(cfg.block_q, tq), block_k=min(cfg.block_k, tk),
        dkv_block_q=min(cfg.dkv_block_q, tq), dkv_block_k=min(cfg.dkv_block_k, tk),
        dq_block_q=min(cfg.dq_block_q, tq), dq_block_k=min(cfg.dq_block_k, tk))
    return cfg.fit_shared_memory(head_dim, itemsize, tile_bytes)

  def fit_shared_memory(self, head_dim: int, itemsize: int, tile_bytes: int,
                        budget: int = SHARED_MEMORY_BUDGET) -> "TritonConfig":
    """Fewer pipeline stages, then smaller tiles, until each kernel's estimate fits.

    The estimate: the tiles a program keeps (its own q or k/v tile) plus, per stage, the
    tiles its loop streams (k, v or q, dO, and the bias/mask tiles). The tuned bf16
    defaults fit as they are; f32 inputs, head dims above 128 or a bias shrink them.
    """
    cfg = self
    for kernel, (own, streamed) in _KERNEL_TILES.items():
      bq, bk = f"{kernel}block_q", f"{kernel}block_k"
      stages = f"{kernel}stages" if kernel else "num_stages"

      def estimate(c):
        q, k, n = getattr(c, bq), getattr(c, bk), getattr(c, stages)
        rows = {"q": q, "k": k}  # "kk" is k and v, "qq" is q and dO
        kept = sum(rows[x] for x in own) * head_dim * itemsize
        per_stage = sum(rows[x] for x in streamed) * head_dim * itemsize + q * k * tile_bytes
        return kept + n * per_stage

      while estimate(cfg) > budget:
        if getattr(cfg, stages) > 1:
          cfg = dataclasses.replace(cfg, **{stages: getattr(cfg, stages) - 1})
        elif getattr(cfg, bk) > 16:
          cfg = dataclasses.replace(cfg, **{bk: getattr(cfg, bk) // 2})
        elif getattr(cfg, bq) > 16:
          cfg = dataclasses.replace(cfg, **{bq: getattr(cfg, bq) // 2})
        else:
          break
    return cfg

  @property
  def q_multiple(self) -> int:
    return max(self.block_q, self.dkv_block_q, self.dq_block_q)

  @property
  def k_multiple(self) -> int:
    return max(self.block_k, self.dkv_block_k, self.dq_block_k)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Tuning of the split-K decode forward (decode.py): one program per (batch, kv head,
  split), all query rows of the kv head's group at once, ``block_k`` keys per step."""

  block_k: int = 64
  num_splits: int = 1  # programs sharing one (batch, kv head)'s keys
  num_warps: int = 4
  num_stages: int = 3

  # The decode path serves at most this many query tokens, and this many rows (query
  # heads of a GQA group x tokens) per program; longer queries fill 128-row tiles well.
  MAX_Q_LEN = 16
  MAX_ROWS = 64
  # Waves of programs to aim for, and the fewest key tiles per split worth a partial
  # result (each split writes [rows, head_dim] f32 that the merge reads back).
  WAVES = 4
  MIN_TILES_PER_SPLIT = 4

  @classmethod
  def takes(cls, q_len: int, groups: int) -> bool:
    """Whether a query of ``q_len`` tokens with ``groups`` query heads per kv head is short
    enough for the decode path."""
    return q_len <= cls.MAX_Q_LEN and q_len * groups <= cls.MAX_ROWS

  @classmethod
  def for_problem(cls, batch: int, kv_heads: int, kv_len: int, rows: int, head_dim: int,
                  num_sms: int = 132) -> "DecodeConfig":
    """A heuristic default: enough splits that ``batch * kv_heads * splits`` programs fill
    ``num_sms`` a few times over, but never splits of fewer than a few key tiles."""
    # Not yet swept on the GPU (benchmarks/decode_bench.py --sweep): 64-key tiles keep a
    # [rows, head_dim] accumulator plus two [64, head_dim] tiles in registers up to d=128.
    block_k = 128 if head_dim <= 64 else (64 if head_dim <= 128 else 32)
    block_k = min(block_k, max(16, next_pow2(kv_len)))
    tiles = -(-kv_len // block_k)
    want = -(-cls.WAVES * num_sms // (batch * kv_heads))
    splits = max(1, min(want, tiles // cls.MIN_TILES_PER_SPLIT))
    warps = 4 if rows * head_dim <= 64 * 128 else 8
    return cls(block_k=block_k, num_splits=splits, num_warps=warps, num_stages=3)
