"""Feature cases of `bench.py --features`: sliding window, packed documents (and the same
tokens as a batch of short sequences), soft-cap, dense mask. Each is compared with cuDNN
(jax.nn) where jax.nn offers the case, and with dense XLA where it does not: the packed
documents as a dense mask (jax.nn, "xla"), the soft-cap as dense logits written out
(``api="dense"``, `_jax_bench.dense_attention`), both at a smaller s.

Stdlib + numpy only: the case list and the useful-FLOP counts. Each row is plain
data (JSON-able); `_jax_bench.make_feature_fn` turns its ``call`` into a jitted
function and `_jax_bench.feature_extras` builds its segment ids / dense mask.

Useful FLOPs count the visible (query, key) pairs exactly, per batch row and head:
fwd = 4 d N b * pairs, fwd+bwd = 3.5 x fwd. So TFLOP/s of different masks compare
the rate of *useful* work (skipped tiles are not credited).
"""

from __future__ import annotations

import numpy as np

# How each case counts its visible (query, key) pairs per batch row and head.
PAIRS_DEF = {
    "full": "s^2",
    "causal": "s(s+1)/2",
    "window": "sum_i min(i, W) + 1",
    "docs": "sum_docs L(L+1)/2",
}


def config(args):
  """Shapes of the feature cases (the jflash cells are b=1, s=tokens; the dense-mask
  XLA baseline, which materialises [b, N, s, s] logits, runs b=4, s=tokens/4)."""
  if args.cpu_smoke:
    s, d, n, docs, dtype = 256, 64, 2, 2, "float32"
  else:
    s, d, docs, dtype = args.tokens, 128, 8, "bfloat16"
    n = max(1, args.hidden // d)
  return {"b": 1, "s": s, "d": d, "n": n, "dtype": dtype,
          "window": min(4096, max(1, s // 4)), "docs": docs, "softcap": 50.0, "seed": 0,
          "dense_b": 4, "dense_s": max(docs, s // 4)}


def doc_lengths(s, docs, seed=0):
  """``docs`` random lengths >= 1 summing to ``s``; the same proportions at any ``s``."""
  p = np.random.default_rng(seed).dirichlet(np.ones(docs))
  raw = p * (s - docs)
  lengths = np.floor(raw).astype(np.int64) + 1
  rest = s - int(lengths.sum())  # hand the rounding remainder to the largest fractions
  lengths[np.argsort(raw - np.floor(raw))[::-1][:rest]] += 1
  assert lengths.sum() == s and lengths.min() >= 1, lengths
  return [int(x) for x in lengths]


def visible_pairs(kind, s, window=None, lengths=None):
  if kind == "full":
    return s * s
  if kind == "causal":
    return s * (s + 1) // 2
  if kind == "window":  # causal with key j >= i - window: min(i, window) + 1 keys in row i
    return int(np.minimum(np.arange(s), window).sum()) + s
  if kind == "docs":  # causal inside each document
    return sum(L * (L + 1) // 2 for L in lengths)
  raise ValueError(kind)


def _call(impl, *, causal, window=None, softcap=None, segment_ids=False, mask=False):
  if impl.startswith("jflash-"):
    return {"api": "jflash", "implementation": impl[len("jflash-"):], "is_causal": causal,
            "local_window_size": window, "logits_soft_cap": softcap,
            "segment_ids": segment_ids, "mask": mask}
  assert not segment_ids, impl  # jax.nn has no segment ids
  if softcap is not None:  # nor a soft-cap: the dense logits written out in XLA
    assert impl == "xla" and window is None and not mask, impl
    return {"api": "dense", "implementation": impl, "is_causal": causal,
            "logits_soft_cap": softcap}
  return {"api": "jax.nn", "implementation": impl, "is_causal": causal,
          "local_window_size": window, "mask": mask}


def rows(cfg, impls):
  """The table rows, in order. ``ratio_to`` = (case, impl) of the denominator row."""
  jfl = [i for i in impls if i.startswith("jflash-")]
  cudnn = ["cudnn"] if "cudnn" in impls else []
  b, s, w = cfg["b"], cfg["s"], cfg["window"]
  lengths = doc_lengths(s, cfg["docs"], cfg["seed"])
  out = []

  def add(case, title, impl, call, kind, ratio_to=None, ratio_label="", note="", b=b, s=s,
          lengths=lengths):
    out.append({"case": case, "title": title, "impl": impl, "note": note, "b": b, "s": s,
                "d": cfg["d"], "n": cfg["n"], "call": call, "pairs_kind": kind,
                "lengths": lengths if kind == "docs" or call.get("mask") else None,
                "pairs": visible_pairs(kind, s, w, lengths),
                "ratio_to": ratio_to, "ratio_label": ratio_label if ratio_to else "",
                "results": {}})

  for case, title, causal, kind in (("causal", "causal (reference)", True, "causal"),
                                    ("full", "non-causal (reference)", False, "full")):
    for impl in jfl + cudnn:
      add(case, title, impl, _call(impl, causal=causal), kind,
          None if impl == "cudnn" or not cudnn else (case, "cudnn"), "this / cudnn")

  title = f"causal + sliding window ({w}, 0)"
  for impl in jfl + cudnn:
    add("window", title, impl, _call(impl, causal=True, window=[w, 0]), "window",
        None if impl == "cudnn" or not cudnn else ("window", "cudnn"), "this / cudnn")

  # The packed documents' yardstick: the same tokens as a batch of equal documents, plain
  # causal (what a varlen kernel would run). Packed / this = the cost of packing itself.
  bs = max(1, s // cfg["docs"])
  title = f"causal, batch of {cfg['docs']} x {bs} (docs unpacked)"
  for impl in jfl + cudnn:
    add("batch_docs", title, impl, _call(impl, causal=True), "causal", ("causal", impl),
        "short / long causal", b=b * cfg["docs"], s=bs)

  title = f"{cfg['docs']} packed docs, causal"
  for impl in jfl:
    add("packed", title, impl, _call(impl, causal=True, segment_ids=True), "docs",
        ("causal", impl), "packed / causal", "segment_ids")
  for impl in cudnn:  # jax.nn passes no segment ids to cuDNN: a dense mask, turned into a bias
    add("packed", title, impl, _call(impl, causal=True, mask=True), "docs",
        ("causal", impl), "packed / causal", "dense mask as bias")
  if "xla" in impls:  # materialises the logits: a smaller s (same tokens, same doc proportions)
    ds = cfg["dense_s"]
    add("packed", title, "xla", _call("xla", causal=True, mask=True), "docs", None, "",
        f"dense mask, s={ds}", b=cfg["dense_b"], s=ds,
        lengths=doc_lengths(ds, cfg["docs"], cfg["seed"]))

  title = f"soft-cap {cfg['softcap']:g}, non-causal"
  for impl in jfl:
    add("softcap", title, impl, _call(impl, causal=False, softcap=cfg["softcap"]), "full",
        ("full", impl), "soft-cap / plain")
  if "xla" in impls:  # no cuDNN soft-cap in jax.nn: dense logits in XLA, a smaller s
    add("softcap", title, "xla", _call("xla", causal=False, softcap=cfg["softcap"]), "full",
        None, "", f"dense logits, s={cfg['dense_s']}", b=cfg["dense_b"], s=cfg["dense_s"])

  title = f"dense block-diag mask ({cfg['docs']} docs), causal"
  for impl in jfl:
    add("densemask", title, impl, _call(impl, causal=True, mask=True), "docs",
        ("packed", impl), "mask / segment_ids", "mask [1,1,s,s]")
  return out


def useful_flops(row, mode):
  f = 4 * row["d"] * row["n"] * row["b"] * row["pairs"]
  return f * (3.5 if mode == "fwdbwd" else 1.0)


def add_ratios(rows_):
  """``ratio[mode]`` = useful TFLOP/s of the row / that of its ``ratio_to`` row."""
  by = {(r["case"], r["impl"]): r for r in rows_}
  for r in rows_:
    r["ratio"] = {}
    den = by.get(tuple(r["ratio_to"])) if r["ratio_to"] else None
    for mode in ("fwd", "fwdbwd"):
      a = r["results"].get(mode, {}).get("tflops")
      z = den["results"].get(mode, {}).get("tflops") if den else None
      r["ratio"][mode] = a / z if a and z else None
