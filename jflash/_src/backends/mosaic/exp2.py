"""exp2 on the FMA units: a polynomial for part of a score tile (FlashAttention-4's trick).

An SM issues MUFU ``ex2`` for 16 lanes a cycle and FP32 FMAs for 128. Where the softmax's
exps take as long as the tile's matmuls (d=64: a 64 x 256 tile's 16K exps against two
64 x 256 x 64 wgmmas), moving some columns of each tile onto the FMA pipe shortens the
softmax. ``exp2_split`` does the last ``cols`` columns that way (MosaicConfig.exp2_poly_cols).

``exp2_poly(x)`` for ``x <= 0`` (scores less their row max, in base 2):
``2^x = 2^j * 2^f`` with ``j = round(x)``, ``f = x - j`` in [-0.5, 0.5]. Adding
``1.5 * 2^23 + 127`` rounds ``x`` to an integer held in the low bits of the sum's
mantissa (plain f32 adds, no conversion instruction, which would run at MUFU's rate);
those bits, ``j + 127``, shifted into the exponent field are the f32 ``2^j``, and 0.0
where ``x`` is clamped at -127 (-inf included): masked scores give exact zeros, as
``exp2`` does. ``2^f`` is a cubic (POLY) whose relative error is under 7.5e-5 on
[-0.5, 0.5] (a weighted least-squares fit reweighted to the minimax, evaluated in f32):
a fiftieth of a bfloat16 ulp and a sixth of a float16 one, the roundings P gets before
its matmul; the row sums (lse) take it in f32. Results below 2^-126 are flushed or
inexact (they are < 1.2e-38 of the row's largest term).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# 2^f on [-0.5, 0.5], lowest order first. Fit by reweighted least squares on the relative
# error (Lawson's iteration, 20001 points, numpy float64), rounded to float32; the f32
# Horner evaluation's max relative error is 7.49e-5 (tests/test_mosaic.py checks 8e-5).
POLY = (0.9999281167984009, 0.6932609677314758, 0.24261054396629333, 0.05517132207751274)
# Adding this to x in [-127, 0] leaves round(x) + 127 in the low bits of the mantissa.
_ROUNDER = 1.5 * 2**23 + 127.0
_LOWEST = -127.0
# _ROUNDER's bits with the 9 low ones clear (its low 23 are 127), and those 9.
_ROUNDER_BITS = 0x4B400000
_LOW_BITS = 0x1FF


def exp2_poly(x: jax.Array) -> jax.Array:
  """``2^x`` of an f32 array with ``x <= 0`` (or -inf), on FMA/ALU instructions only."""
  x = jnp.maximum(x, _LOWEST)
  bits = lax.bitcast_convert_type(x + _ROUNDER, jnp.int32)  # _ROUNDER's bits + round(x) + 127
  # round(x) as a float: the sum again, rebuilt from its bits. Subtracting _ROUNDER from
  # the sum itself would be right too, but XLA (interpret mode) folds (x + c) - c to x.
  j = lax.bitcast_convert_type((bits & _LOW_BITS) | _ROUNDER_BITS, jnp.float32) - _ROUNDER
  f = x - j
  p = POLY[-1]
  for c in POLY[-2::-1]:
    p = p * f + c
  two_j = lax.bitcast_convert_type(lax.shift_left(bits, jnp.int32(23)), jnp.float32)
  return p * two_j


def exp2_split(x: jax.Array, cols: int) -> jax.Array:
  """``2^x`` of a ``[rows, n]`` tile: MUFU exp2 for the first ``n - cols`` columns,
  exp2_poly for the last ``cols`` (``x <= 0`` there)."""
  if not cols:
    return jnp.exp2(x)
  rows, n = x.shape
  # lax.slice with no strides: Mosaic GPU's lowering refuses any.
  head = jnp.exp2(lax.slice(x, (0, 0), (rows, n - cols)))
  tail = exp2_poly(lax.slice(x, (0, n - cols), (rows, n)))
  return lax.concatenate([head, tail], 1)
