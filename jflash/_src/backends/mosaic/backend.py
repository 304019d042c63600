"""The "mosaic" implementation: Pallas Mosaic GPU kernels for Hopper (sm90).

The forward pass is the FA3-style kernel of fwd.py. The backward pass is the Triton dK/dV
and dQ kernels (backends/triton), or with ``MosaicConfig.mosaic_backward`` the Mosaic ones
of bwd.py where they support the call (no bias): both need nothing from the
forward but the natural-log lse, which this forward writes with the same contract.

``supports`` refuses (NotImplementedError, naming what is missing) anything the forward
kernel does not do, so that ``implementation=None`` falls back to "triton".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jflash._src import tuning
from jflash._src.backends.mosaic import bwd as bwd_lib
from jflash._src.backends.mosaic import fwd as fwd_lib
from jflash._src.backends.mosaic.config import MosaicBwdConfig, MosaicConfig
from jflash._src.backends.triton import backend as triton_backend
from jflash._src.layout import pad_axis, round_up
from jflash._src.problem import Problem

# wgmma needs the head dim in whole 64-element (128-byte) swizzle tiles; other head
# dims are zero-padded up to the next of these (zeros change no dot product).
HEAD_DIMS = (64, 128, 256)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _refuse(what: str):
  raise NotImplementedError(f"implementation='mosaic' {what}; use implementation='triton' or None")


def _check_device():
  dev = jax.devices()[0]
  cc = getattr(dev, "compute_capability", None)
  if dev.platform != "gpu" or cc is None:
    _refuse(f"needs an sm90 (Hopper) NVIDIA GPU; found {dev.device_kind!r} "
            f"(platform {dev.platform!r})")
  if str(cc) != "9.0":
    _refuse(f"needs an sm90 (Hopper) GPU (wgmma, TMA); found {dev.device_kind!r}, sm{cc}")


def supports(p: Problem, q, k, v, bias) -> None:
  """Raises NotImplementedError naming the first thing the mosaic kernels lack.
  """
  if not p.interpret:
    _check_device()
  if jnp.dtype(q.dtype) not in DTYPES:
    _refuse(f"supports bfloat16 and float16 only; got dtype={q.dtype}")
  if q.shape[-1] > HEAD_DIMS[-1]:
    _refuse(f"supports head_dim <= {HEAD_DIMS[-1]}; got {q.shape[-1]}")
  missing = [name for name, used in (
      ("bias", bias is not None),
      ("a dense mask", p.mask.has_dense_mask),
      ("dropout", p.dropout_rate > 0),
  ) if used]
  if missing:
    _refuse(f"does not support {', '.join(missing)} yet")
  bcfg = override_bwd_config.value
  if bcfg is not None and bcfg.dq_mode == "ordered" and p.mask.has_segment_ids:
    _refuse("with MosaicBwdConfig.dq_mode='ordered' does not support segment_ids yet "
            "(dq_mode='atomic' or 'separate' does)")


override_config = tuning.Override[MosaicConfig]()  # for tuning scripts and tests
override_bwd_config = tuning.Override[MosaicBwdConfig]()


def padded_head_dim(h: int) -> int:
  return next(d for d in HEAD_DIMS if d >= h)


def tma_length(n: int) -> int:
  """The sequence length the kernels take an array of ``n`` rows at: as it is where
  Mosaic's TMA can tile it, which needs 8 rows or fewer, or a multiple of 8 (its
  swizzled tiles are 8 rows high); else rounded up to a multiple of 8, by a padded copy.
  The kernels' loads zero-fill the rows past it up to whole tiles (fwd.forward)."""
  return n if n <= 8 or n % 8 == 0 else round_up(n, 8)


def _seq_pad(x, h: int, d: int):
  """``x [B, L, N, h]`` as the kernels take it: the head dim zero-padded to ``d`` and the
  length to ``tma_length`` (both no-ops, so no copy, where they already fit)."""
  return pad_axis(pad_axis(x, 1, tma_length(x.shape[1])), 3, d)


def sm_count(interpret: bool = False) -> int:
  """The SMs of the GPU the kernels run on (MosaicConfig.for_problem's persistent grid);
  0 in interpret mode or where the device does not say."""
  if interpret:
    return 0
  return int(getattr(jax.devices()[0], "core_count", 0) or 0)


def forward(p: Problem, q, k, v, bias, arrays):
  supports(p, q, k, v, bias)
  h = q.shape[-1]
  d = padded_head_dim(h)
  cfg = override_config.value or MosaicConfig.for_problem(
      p.q_len, p.kv_len, d, jnp.dtype(q.dtype).itemsize, segments=p.mask.has_segment_ids,
      causal=p.mask.causal, sm_count=sm_count(p.interpret),
      batch_heads=q.shape[0] * q.shape[2])
  tp, sp = round_up(p.q_len, cfg.q_multiple), round_up(p.kv_len, cfg.k_multiple)
  # Q, K and V go in unpadded along the sequence where TMA can tile them (tma_length):
  # the kernels' loads fill the tail tiles with zeros, past q_valid / kv_valid <= T, S,
  # so masked. Padding ids differ on the two sides (as in the Triton backend): they
  # never match.
  q_seg = pad_axis(arrays.q_segment_ids, 1, tp, -1)
  kv_seg = pad_axis(arrays.kv_segment_ids, 1, sp, -2)
  out, lse = fwd_lib.forward(p, cfg, _seq_pad(q, h, d), _seq_pad(k, h, d), _seq_pad(v, h, d),
                             arrays.q_valid, arrays.kv_valid, q_seg, kv_seg)
  return out[:, :p.q_len, :, :h], lse[:, :, :p.q_len]


def backward(p: Problem, q, k, v, bias, arrays, lse, dout, delta, want_dbias: bool):
  h = q.shape[-1]
  d = padded_head_dim(h)
  itemsize = jnp.dtype(q.dtype).itemsize
  cfg = override_config.value or MosaicConfig.for_problem(
      p.q_len, p.kv_len, d, itemsize, segments=p.mask.has_segment_ids, causal=p.mask.causal)
  if not (cfg.mosaic_backward and d in bwd_lib.HEAD_DIMS and bias is None):
    # The Triton kernels only need the lse, which the forward above writes with the
    # same contract (natural log, +inf on empty rows).
    return triton_backend.backward(p, q, k, v, bias, arrays, lse, dout, delta, want_dbias)
  bcfg = override_bwd_config.value or MosaicBwdConfig.for_problem(
      p.q_len, p.kv_len, d, itemsize, deterministic=p.deterministic,
      segments=p.mask.has_segment_ids, causal=p.mask.causal)
  tp, sp = round_up(p.q_len, bcfg.q_multiple), round_up(p.kv_len, bcfg.k_multiple)
  # As in the forward, Q, K, V and dO go in unpadded along the sequence where TMA can
  # tile them. The rows of the tail tiles get lse = +inf (p = 0) and delta = 0; the keys
  # lie past kv_valid.
  pad = lambda x: _seq_pad(x, h, d)
  rows = lambda x, fill: pad_axis(x, 2, tp, fill)
  dq, dk, dv = bwd_lib.backward(p, bcfg, pad(q), pad(k), pad(v), pad(dout),
                                rows(lse, jnp.inf), rows(delta, 0.0), arrays.q_valid,
                                arrays.kv_valid, pad_axis(arrays.q_segment_ids, 1, tp, -1),
                                pad_axis(arrays.kv_segment_ids, 1, sp, -2))
  s = p.kv_len
  return dq[:, :p.q_len, :, :h], dk[:, :s, :, :h], dv[:, :s, :, :h], None
