"""Block ranges vs brute force: every tile with a visible pair is visited, and every tile
the kernels run without the predicate is visible in full.

The visibility matrix here is built from the definitions in numpy (band, lengths,
segment ids), independently of ``mask.visible``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from jflash._src import mask as mask_lib


def _dense_visibility(t, s, causal, window, q_valid, kv_valid, q_seg, kv_seg):
  i, j = np.arange(t)[:, None], np.arange(s)[None, :]
  ok = (i < q_valid) & (j < kv_valid)
  if causal:
    ok &= j <= i
  if window is not None:
    ok &= (j >= i - window[0]) & (j <= i + window[1])
  if q_seg is not None:
    ok &= q_seg[:, None] == kv_seg[None, :]
  return ok


def _segments(rng, n, kind):
  if kind == "packed":  # ascending documents of random lengths
    cuts = np.sort(rng.choice(np.arange(1, n), size=rng.integers(1, 5), replace=False))
    return np.searchsorted(cuts, np.arange(n), side="right").astype(np.int32)
  return rng.integers(0, 3, size=n).astype(np.int32)  # ids in any order


def _check(vis, ranges_of, n_tiles, tile_of, other_tile, by_rows, q_valid):
  """ranges_of(i) -> (lo, full_lo, full_hi, hi) for tile i along the tiled axis.

  Query rows past ``q_valid`` are don't-care in an unmasked tile: the kernels zero their
  output and give them an lse of +inf, so the backward pass recomputes p = 0 there.
  """
  valid_rows = np.arange(vis.shape[0] if by_rows else vis.shape[1]) < q_valid
  full_vis = vis | (valid_rows[:, None] == 0 if by_rows else valid_rows[None, :] == 0)
  for i in range(n_tiles):
    lo, full_lo, full_hi, hi = (int(x) for x in ranges_of(i))
    assert lo <= full_lo <= full_hi <= hi, (i, lo, full_lo, full_hi, hi)
    for j in range(vis.shape[1] // other_tile):
      blk = vis[i * tile_of:(i + 1) * tile_of, j * other_tile:(j + 1) * other_tile]
      if blk.any():
        assert lo <= j < hi, (by_rows, i, j, (lo, full_lo, full_hi, hi))
      if full_lo <= j < full_hi:
        blk = full_vis[i * tile_of:(i + 1) * tile_of, j * other_tile:(j + 1) * other_tile]
        assert blk.all(), (by_rows, i, j, (lo, full_lo, full_hi, hi))


@pytest.mark.parametrize("seg_kind", [None, "packed", "random"])
@pytest.mark.parametrize("band", ["none", "causal", "window"])
def test_block_ranges_cover_visible_tiles_and_full_tiles_are_full(seg_kind, band):
  rng = np.random.default_rng(len(band) * 7 + len(seg_kind or ""))
  bq, bk = 8, 4
  for t, s in [(32, 32), (24, 40), (40, 24)]:
    causal = band == "causal"
    window = (5, 3) if band == "window" else None
    for q_valid, kv_valid in [(t, s), (t - 5, s - 3), (3, s)]:
      q_seg = kv_seg = None
      if seg_kind:
        q_seg = _segments(rng, t, seg_kind)
        kv_seg = q_seg[:s] if s <= t else np.concatenate([q_seg, _segments(rng, s - t, seg_kind) + 9])
      spec = mask_lib.MaskSpec(
          q_len=t, kv_len=s, causal=causal,
          window_left=None if window is None else window[0],
          window_right=None if window is None else window[1],
          has_segment_ids=seg_kind is not None)
      vis = _dense_visibility(t, s, causal, window, q_valid, kv_valid, q_seg, kv_seg)
      rows = cols = None
      if seg_kind:
        rows = np.asarray(mask_lib.segment_tile_ranges(q_seg[None], kv_seg[None], bq, bk,
                                                       by_rows=True))[0]
        cols = np.asarray(mask_lib.segment_tile_ranges(q_seg[None], kv_seg[None], bq, bk,
                                                       by_rows=False))[0]
      _check(vis, lambda i: mask_lib.kv_block_range(
          spec, i * bq, bq, bk, s // bk, q_valid, kv_valid,
          None if rows is None else tuple(int(x) for x in rows[i])), t // bq, bq, bk, True, q_valid)
      _check(vis.T, lambda j: mask_lib.q_block_range(
          spec, j * bk, bk, bq, t // bq, q_valid, kv_valid,
          None if cols is None else tuple(int(x) for x in cols[j])), s // bk, bk, bq, False, q_valid)


@pytest.mark.parametrize("seg_kind", [None, "packed"])
@pytest.mark.parametrize("band", ["none", "causal", "window"])
def test_tail_keys_against_brute_force(seg_kind, band):
  """``tail_keys`` covers every key the rows see in their last masked key block; without
  segment ids it is the least multiple of the chunk that does. The geometry of the
  Mosaic forward scaled down: query tiles of 4 rows, key blocks of 8 in chunks of 2
  (64 rows, 256 keys, 64-key swizzle tiles), so a causal diagonal takes every width."""
  rng = np.random.default_rng(len(band) * 3 + len(seg_kind or ""))
  bq, bk, chunk = 4, 8, 2
  seen = set()
  for t, s in [(32, 32), (28, 40), (40, 24)]:
    window = (5, 3) if band == "window" else None
    for q_valid, kv_valid in [(t, s), (t - 5, s - 3), (3, s), (2, s), (t, 13), (t, 11), (t, 9)]:
      q_seg = kv_seg = None
      if seg_kind:
        q_seg = _segments(rng, t, seg_kind)
        kv_seg = q_seg[:s] if s <= t else np.concatenate(
            [q_seg, _segments(rng, s - t, seg_kind) + 9])
      spec = mask_lib.MaskSpec(
          q_len=t, kv_len=s, causal=band == "causal",
          window_left=None if window is None else window[0],
          window_right=None if window is None else window[1],
          has_segment_ids=seg_kind is not None)
      vis = _dense_visibility(t, s, band == "causal", window, q_valid, kv_valid, q_seg, kv_seg)
      rows = None
      if seg_kind:
        rows = np.asarray(mask_lib.segment_tile_ranges(q_seg[None], kv_seg[None], bq, bk,
                                                       by_rows=True))[0]
      for i in range(t // bq):
        ranges = mask_lib.kv_block_range(
            spec, i * bq, bq, bk, s // bk, q_valid, kv_valid,
            None if rows is None else tuple(int(x) for x in rows[i]))
        _, _, full_hi, hi = (int(x) for x in ranges)
        keys = int(mask_lib.tail_keys(spec, i * bq, bq, bk, full_hi, hi, q_valid, kv_valid,
                                      chunk))
        assert keys % chunk == 0 and chunk <= keys <= bk, keys
        seen.add(keys)
        if hi - 1 < full_hi:
          assert keys == bk, (t, s, q_valid, kv_valid, i)
          continue
        blk = vis[i * bq:(i + 1) * bq, (hi - 1) * bk:hi * bk]
        assert not blk[:, keys:].any(), (t, s, q_valid, kv_valid, i, keys)
        if seg_kind is None:
          assert blk[:, keys - chunk:keys].any(), (t, s, q_valid, kv_valid, i, keys)
  assert seen == set(range(chunk, bk + 1, chunk))


def test_packed_documents_skip_tiles_of_other_documents():
  """Two documents of 16 tokens, tiles of 4: a query tile of document 0 visits only the
  key tiles of document 0, all of them without the predicate."""
  seg = np.repeat(np.array([0, 1], np.int32), 16)[None]
  rows = np.asarray(mask_lib.segment_tile_ranges(seg, seg, 4, 4, by_rows=True))[0]
  assert rows[0].tolist() == [0, 0, 4, 4]
  assert rows[5].tolist() == [4, 4, 8, 8]
  spec = mask_lib.MaskSpec(q_len=32, kv_len=32, causal=True, has_segment_ids=True)
  lo, full_lo, full_hi, hi = mask_lib.kv_block_range(spec, 5 * 4, 4, 4, 8, 32, 32,
                                                     tuple(int(x) for x in rows[5]))
  assert (lo, hi) == (4, 6)  # document 1 starts at tile 4; causal stops at the diagonal
  assert (full_lo, full_hi) == (4, 5)


def test_intersect_ranges_keeps_order():
  for a, b in itertools.product([(0, 1, 3, 5), (2, 2, 2, 4), (0, 0, 0, 0)], repeat=2):
    lo, flo, fhi, hi = mask_lib.intersect_ranges(a, b)
    assert lo <= flo <= fhi <= hi
    assert lo >= max(a[0], b[0]) and hi <= max(min(a[3], b[3]), lo)
    if fhi > flo:
      assert flo >= max(a[1], b[1]) and fhi <= min(a[2], b[2])


def test_visible_matches_the_definitions():
  """``mask.visible`` (per-row key bounds) against the numpy definitions: causal, windows
  of any sign and width (the ring's shifted bands have ``lo > 0`` or ``hi < 0``; wider
  than the lengths they bound nothing), lengths (0 and full), padded rows and keys past
  T and S, segment ids; both orientations."""
  rng = np.random.default_rng(3)
  for trial in range(60):
    t, s = (int(x) for x in rng.integers(1, 40, size=2))
    tp, sp = t + int(rng.integers(0, 9)), s + int(rng.integers(0, 9))
    causal = bool(rng.integers(2))
    window = None
    if trial % 3:
      left, right = (int(x) for x in rng.integers(-12, 50, size=2))
      window = (max(left, -right), right)  # a non-empty band: lo <= hi
    q_valid, kv_valid = int(rng.integers(0, t + 1)), int(rng.integers(0, s + 1))
    seg = trial % 2 == 1
    q_seg = rng.integers(0, 3, size=tp).astype(np.int32) if seg else None
    kv_seg = rng.integers(0, 3, size=sp).astype(np.int32) if seg else None
    spec = mask_lib.MaskSpec(q_len=t, kv_len=s, causal=causal,
                             window_left=None if window is None else window[0],
                             window_right=None if window is None else window[1],
                             has_segment_ids=seg)
    want = _dense_visibility(tp, sp, causal, window, q_valid, kv_valid, q_seg, kv_seg)
    q_pos, k_pos = np.arange(tp, dtype=np.int32), np.arange(sp, dtype=np.int32)
    got = np.asarray(mask_lib.visible(spec, q_pos, k_pos, q_valid, kv_valid, q_seg, kv_seg))
    np.testing.assert_array_equal(got, want, err_msg=str((spec, q_valid, kv_valid)))
    got_t = np.asarray(mask_lib.visible(spec, q_pos, k_pos, q_valid, kv_valid, q_seg,
                                        kv_seg, transpose=True))
    np.testing.assert_array_equal(got_t, want.T, err_msg=str((spec, q_valid, kv_valid)))
