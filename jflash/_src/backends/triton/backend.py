"""The "triton" implementation: runs the Pallas Triton kernels.

Any NVIDIA GPU of sm80 or newer; without a GPU the same kernels run in Pallas interpret
mode (``Problem.interpret``), which is how CI exercises them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jflash._src import mask as mask_lib
from jflash._src import tuning
from jflash._src.backends.triton import bwd as bwd_lib
from jflash._src.backends.triton import decode as decode_lib
from jflash._src.backends.triton import fwd as fwd_lib
from jflash._src.backends.triton.config import TritonConfig
from jflash._src.layout import next_pow2, pad_axis, reduce_to_shape, round_up
from jflash._src.problem import Problem

MAX_HEAD_DIM = 256


def supports(p: Problem, q, k, v, bias) -> None:
  h = q.shape[-1]
  if h > MAX_HEAD_DIM:
    raise NotImplementedError(f"implementation='triton' supports head_dim <= {MAX_HEAD_DIM}; got {h}")
  if not p.interpret:
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    if cc is not None and float(cc) < 8.0:
      raise NotImplementedError(f"implementation='triton' needs an sm80+ GPU; this one is sm{cc}")


override_config = tuning.Override[TritonConfig]()  # for tuning scripts and tests


def _config(p: Problem, head_dim: int, dtype, bias) -> TritonConfig:
  tile_bytes = (0 if bias is None else jnp.dtype(bias.dtype).itemsize) + p.mask.has_dense_mask
  return override_config.value or TritonConfig.for_problem(
      p.q_len, p.kv_len, head_dim, itemsize=jnp.dtype(dtype).itemsize, tile_bytes=tile_bytes)


class _Padded:
  """Pads H to a power of two (>= 16), and the bias, dense mask and segment ids to tile
  multiples of T and S, and undoes it. Q, K, V and dO keep their lengths: the kernels
  read the rows past them as zeros and write none (tiles.load, tiles.store), so no
  padded copy of them is made."""

  def __init__(self, p: Problem, q, k, v, bias, arrays: mask_lib.MaskArrays):
    self.h = q.shape[-1]
    self.d = max(16, next_pow2(self.h))
    self.cfg = _config(p, self.d, q.dtype, bias)
    self.tp = round_up(p.q_len, self.cfg.q_multiple)
    self.sp = round_up(p.kv_len, self.cfg.k_multiple)
    self.t = p.q_len
    dense = None if arrays.dense is None else self.bcast(arrays.dense.astype(jnp.int8))
    self.arrays = mask_lib.MaskArrays(
        q_valid=arrays.q_valid, kv_valid=arrays.kv_valid,
        q_segment_ids=pad_axis(arrays.q_segment_ids, 1, self.tp, -1),
        kv_segment_ids=pad_axis(arrays.kv_segment_ids, 1, self.sp, -2),
        dense=dense, dropout_seed=arrays.dropout_seed)

  def bcast(self, x):
    """Pads the full T and S dims of a broadcastable [B', N', T', S'] bias or mask."""
    if x is None:
      return None
    x = pad_axis(x, 2, self.tp) if x.shape[2] > 1 else x
    return pad_axis(x, 3, self.sp) if x.shape[3] > 1 else x

  def head(self, x):
    """Q, K, V or dO with the head dim padded (their lengths as they are)."""
    return pad_axis(x, 3, self.d)

  def rows(self, x, fill):
    return pad_axis(x, 2, self.tp, fill)


def forward(p: Problem, q, k, v, bias, arrays: mask_lib.MaskArrays):
  if decode_lib.applies(p, q, k, bias, arrays):  # a few query tokens: split the keys instead
    return decode_lib.forward(p, q, k, v, arrays)
  pad = _Padded(p, q, k, v, bias, arrays)
  out, lse = fwd_lib.forward(p, pad.cfg, pad.head(q), pad.head(k), pad.head(v), pad.bcast(bias),
                             pad.arrays)
  return out[..., :pad.h], lse[:, :, :pad.t]


def backward(p: Problem, q, k, v, bias, arrays, lse, dout, delta, want_dbias: bool):
  pad = _Padded(p, q, k, v, bias, arrays)
  want_dbias = want_dbias and bias is not None
  dq, dk, dv, ds = bwd_lib.backward(
      p, pad.cfg, pad.head(q), pad.head(k), pad.head(v), pad.bcast(bias), pad.arrays,
      pad.head(dout), pad.rows(lse, jnp.inf), pad.rows(delta, 0.0), want_dbias)
  s = p.kv_len
  dbias = reduce_to_shape(ds[:, :, :pad.t, :s], bias.shape, bias.dtype) if want_dbias else None
  return dq[..., :pad.h], dk[..., :pad.h], dv[..., :pad.h], dbias
