"""Building blocks of the Mosaic backward kernels (bwd.py): wgmma helpers, the TMA ring a
producer fills and consumers step through, and the pieces of ``split_head_dim`` (the two
consumers sharing one tile, each with half of the head dim)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jflash._src.backends.mosaic.config import MosaicBwdConfig


def matmuls(shape, *operands):
  """``[a @ b for a, b in operands]``, SMEM operands, into fresh f32 accumulators: all
  issued back to back, then one wait."""
  def f(*accs):
    for acc, (a, b) in zip(accs, operands):
      plgpu.wgmma(acc, a, b)
    return tuple(acc[...] for acc in accs)
  return pl.run_scoped(f, *[plgpu.ACC(shape, jnp.float32) for _ in operands])


def mmas(accs, operands, stage):
  """``[acc + lhs @ rhs]`` for ``(lhs, rhs)`` in ``operands``: ``lhs`` a 16-bit register
  tile, ``rhs`` an SMEM ref. One wgmma group, one wait. ``stage`` (interpret mode only,
  else None): SMEM tiles, one per operand, that carry ``lhs`` instead."""
  if stage is not None:
    for i, (lhs, _) in enumerate(operands):
      stage.at[i][...] = lhs
    plgpu.commit_smem()
    prods = matmuls(accs[0].shape, *[(stage.at[i], rhs) for i, (_, rhs) in enumerate(operands)])
    return tuple(acc + x for acc, x in zip(accs, prods))

  def f(refs):
    for ref, (lhs, rhs) in zip(refs, operands):
      plgpu.wgmma(ref, lhs, rhs)

  return pl.run_state(f)(tuple(plgpu.ACC.init(x) for x in accs))


def acc_smem(accs, operands, interpret: bool):
  """``[acc + sum(a @ b for a, b in pairs)]`` for ``pairs`` of SMEM refs in ``operands``
  (one list per accumulator): one wgmma group, one wait (in the interpreter, which has
  no pre-initialised accumulators, fresh ones added)."""
  if interpret:
    out = []
    for acc, pairs in zip(accs, operands):
      out.append(acc + sum(matmuls(acc.shape, *pairs)))
    return tuple(out)

  def f(refs):
    for ref, pairs in zip(refs, operands):
      for a, b in pairs:
        plgpu.wgmma(ref, a, b)

  return pl.run_state(f)(tuple(plgpu.ACC.init(x) for x in accs))


class Exchange:
  """``split_head_dim``: the step's score tiles, which one consumer writes into SMEM for
  the other (bwd.py's ``role_step``; one SMEM copy of each, rewritten every step).
  ``done``: both consumers' matmuls of the last step, which read the tiles, have
  completed; the writer waits for it before it rewrites them."""

  def __init__(self, ring: Ring, done):
    self.ring, self.done = ring, done

  def finish(self, c):
    """After this step's matmuls have completed: the tiles may be rewritten. (No arrival
    after the last step: a phase nobody waits for would be left dangling.)"""
    @pl.when(c + 1 < self.ring.total)
    def _():
      plgpu.barrier_arrive(self.done)


class Ring:
  """Step ``c`` (0, 1, ...) of a CTA's stream lives in slot ``c % stages``."""

  def __init__(self, stages: int, total, full, consumed):
    self.stages, self.total, self.full, self.consumed = stages, total, full, consumed

  def slot(self, c):
    return lax.rem(c, self.stages)

  def produce(self, load):
    """``load(c, slot)`` issues the TMA copies of step ``c`` onto ``full[slot]``."""
    first = jnp.minimum(self.stages, self.total)
    pl.loop(0, first)(lambda c: load(c, self.slot(c)))

    @pl.loop(first, self.total)
    def _steady(c):
      plgpu.barrier_wait(self.consumed.at[self.slot(c)])
      load(c, self.slot(c))

  def acquire(self, c):
    slot = self.slot(c)
    plgpu.barrier_wait(self.full.at[slot])
    return slot

  def release(self, c):
    # Arrive only where the producer will wait for this slot again: a barrier phase
    # nobody waits for would be left dangling (the interpreter checks this).
    @pl.when(c + self.stages < self.total)
    def _():
      plgpu.barrier_arrive(self.consumed.at[self.slot(c)])


def visit(ring: Ring, base, u_lo, u_hi, ranges, step, carry, skipped=None):
  """Steps through ``[u_lo, u_hi)`` (ring steps ``base + i``): ``step(c, slot, i, carry,
  masked)`` inside this consumer's ``(lo, full_lo, full_hi, hi)``, a skip outside (which
  runs ``skipped(c, i)`` if given: work the other consumers wait for)."""
  lo, full_lo, full_hi, hi = ranges

  def skip(i, carry):
    ring.acquire(base + i)  # keeps this warpgroup's barrier phases in step
    if skipped is not None:
      skipped(base + i, i)
    ring.release(base + i)
    return carry

  def one(i, carry, masked):
    c = base + i
    carry = step(c, ring.acquire(c), i, carry, masked)
    ring.release(c)
    return carry

  carry = lax.fori_loop(u_lo, lo, skip, carry)
  carry = lax.fori_loop(lo, full_lo, functools.partial(one, masked=True), carry)
  carry = lax.fori_loop(full_lo, full_hi, functools.partial(one, masked=False), carry)
  carry = lax.fori_loop(full_hi, hi, functools.partial(one, masked=True), carry)
  return lax.fori_loop(hi, u_hi, skip, carry)


def own_tile(cfg: MosaicBwdConfig, wg, d: int):
  """Which of the CTA's 64-row tiles consumer ``wg`` works on (keys in dK/dV, query rows
  in dQ), and which columns of the head dim its gradients cover: a tile and all columns
  of its own, or with ``split_head_dim`` the CTA's one tile, shared, and its half."""
  if not cfg.split_head_dim:
    return wg, None
  half = cfg.head_cols(d)
  return 0, pl.ds(wg * half, half)


def by_first(cfg: MosaicBwdConfig, wg, own):
  """Decorator: runs the function now, in the consumer ``wg`` whose tile is ``own``
  (the loads of that tile), or with ``split_head_dim`` only in its first consumer."""
  def run(f):
    if cfg.split_head_dim:
      pl.when(wg == own)(f)
    else:
      f()
  return run


def cols_of(ref, cols):
  """``ref``'s columns ``cols`` (None: all of them, the ref itself)."""
  return ref if cols is None else ref.at[:, cols]


def store_tile(cfg: MosaicBwdConfig, met, first, copies):
  """TMA-stores the staged ``(smem, gmem)`` tiles (written and committed by this
  consumer) and waits. With ``split_head_dim`` each consumer wrote its half of a shared
  tile; a TMA store needs its SMEM contiguous, so the consumers meet on ``met`` and the
  tile's ``first`` consumer stores the whole of it."""
  def store():
    for src, dst in copies:
      plgpu.copy_smem_to_gmem(src, dst)
    plgpu.wait_smem_to_gmem(0)

  if not cfg.split_head_dim:
    store()
    return
  plgpu.barrier_arrive(met)
  plgpu.barrier_wait(met)
  pl.when(first)(store)
