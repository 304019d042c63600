"""Markdown tables and the TFLOP/s plot, from the results dict of bench.py."""

from __future__ import annotations

from _features import PAIRS_DEF

LABELS = {"jflash-mosaic": "mosaic", "jflash-triton": "triton", "jflash-xla": "jflash-xla",
          "cudnn": "cudnn", "xla": "xla", "torch-flash": "torch"}
MODES = {"fwd": "fwd", "fwdbwd": "f+b"}
# (column title, numerator impl, denominator impl, mode); > 1 means the numerator is faster.
RATIOS = (("mosaic/cudnn fwd", "jflash-mosaic", "cudnn", "fwd"),
          ("mosaic/cudnn f+b", "jflash-mosaic", "cudnn", "fwdbwd"),
          ("triton/torch f+b", "jflash-triton", "torch-flash", "fwdbwd"),
          ("triton/cudnn f+b", "jflash-triton", "cudnn", "fwdbwd"))


def tflops(cell, impl, mode):
  r = cell["results"].get(impl, {}).get(mode, {})
  return r.get("tflops")


def _columns(results):
  cols = []
  for impl in results["impls"]:
    for mode in results["modes"][impl]:
      cols.append((impl, mode))
  return cols


def _fmt(x, digits=1):
  if x is None:
    return "n/a"
  # CPU smoke numbers are tiny; keep them readable without widening GPU ones.
  return f"{x:.{digits}f}" if abs(x) >= 1 or x == 0 else f"{x:.2g}"


def speed_table(results):
  cols = _columns(results)
  head = ["d", "s", "causal", "b x N"] + [f"{LABELS.get(i, i)} {MODES[m]}" for i, m in cols]
  head += [r[0] for r in RATIOS]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for c in results["cells"]:
    row = [str(c["d"]), str(c["s"]), "yes" if c["causal"] else "no", f"{c['b']} x {c['n']}"]
    row += [_fmt(tflops(c, i, m)) for i, m in cols]
    for _, num, den, mode in RATIOS:
      a, b = tflops(c, num, mode), tflops(c, den, mode)
      row.append(_fmt(a / b, 2) if a and b else "n/a")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def memory_table(mem):
  head = ["impl", "s", "b x N x d", "peak MiB", "XLA estimate MiB", "ideal MiB", "peak / ideal", "note"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  mib = lambda x: None if x is None else x / 2**20
  for r in mem:
    peak, ideal = r.get("peak_bytes"), r.get("ideal_bytes")
    ratio = peak / ideal if peak and ideal else None
    note = r.get("error") or r.get("allocator", "")
    lines.append("| " + " | ".join([
        LABELS.get(r["impl"], r["impl"]), str(r["s"]), f"{r.get('b')} x {r.get('n')} x {r.get('d')}",
        _fmt(mib(peak)), _fmt(mib(r.get("xla_estimate_bytes"))), _fmt(mib(ideal)),
        _fmt(ratio, 2), note.replace("|", "/")]) + " |")
  return "\n".join(lines)


def features_table(feat):
  """The "Feature cases" table: useful TFLOP/s per (case, impl) and each row's ratio."""
  head = ["case", "impl", "b x s", "fwd TFLOP/s", "f+b TFLOP/s", "useful fwd GFLOP",
          "visible pairs per head", "ratio fwd", "ratio f+b", "ratio ="]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in feat["rows"]:
    impl = LABELS.get(r["impl"], r["impl"]) + (f" ({r['note']})" if r["note"] else "")
    tf = lambda mode: r["results"].get(mode, {}).get("tflops")
    ratio = r.get("ratio") or {}
    useful = 4 * r["d"] * r["n"] * r["b"] * r["pairs"] / 1e9
    lines.append("| " + " | ".join([
        r["title"], impl, f"{r['b']} x {r['s']}", _fmt(tf("fwd")), _fmt(tf("fwdbwd")),
        _fmt(useful), PAIRS_DEF.get(r["pairs_kind"], r["pairs_kind"]),
        _fmt(ratio.get("fwd"), 2) if r["ratio_to"] else "-",
        _fmt(ratio.get("fwdbwd"), 2) if r["ratio_to"] else "-",
        r["ratio_label"] or "-"]) + " |")
  return "\n".join(lines)


def _features_intro(feat):
  c = feat["config"]
  lengths = next((r["lengths"] for r in feat["rows"] if r["s"] == c["s"] and r["lengths"]), None)
  return [f"d={c['d']}, N={c['n']}, dtype {c['dtype']}; every row runs b={c['b']}, s={c['s']} "
          f"except the dense-mask `xla` baseline (b={c['dense_b']}, s={c['dense_s']}: it "
          f"materialises the logits) and the unpacked documents (a batch of {c['docs']} "
          f"equal ones, b x s in the table). Window W={c['window']}; "
          f"{c['docs']} documents of lengths {lengths} (seed {c['seed']}, same proportions "
          "at the smaller s).",
          "TFLOP/s of *useful* work: fwd = 4 d N b x (visible (query, key) pairs per head, "
          "counted exactly), fwd+bwd = 3.5 x fwd; masked-out pairs are not credited. "
          "`ratio` = this row's useful TFLOP/s / that of the row named in `ratio =` "
          "(same impl, or cuDNN on the same case); cuDNN gets the packed documents as a "
          "dense mask (jax.nn turns it into a bias) since jax.nn passes it no segment ids."]


def markdown(results):
  m = results["meta"]
  parts = [f"# Attention benchmark: {m['device']}", ""]
  if results["cells"]:
    parts += [f"jax {m['jax']}, {m['date']}, dtype {m['dtype']}, {m['tokens']} tokens per step "
              f"(b = tokens / s), hidden {m['hidden']} (N = hidden / d).",
              "TFLOP/s with the FlashAttention count: fwd = 4 b N s^2 d (halved when causal), "
              "fwd+bwd = 3.5 x fwd. Ratios compare TFLOP/s; > 1 means the first is faster.",
              "",
              speed_table(results)]
  else:
    parts += [f"jax {m['jax']}, {m['date']}."]
  feat = results.get("features")
  if feat:
    parts += ["", "## Feature cases", ""] + _features_intro(feat) + ["", features_table(feat)]
  if results.get("memory"):
    parts += ["", "## Peak GPU memory, one jitted fwd+bwd (causal=False)", "",
              "ideal = q, k, v + out + dq, dk, dv; the peak also holds the cotangent `do` "
              "and the logsumexp, so ~1.15 is the floor.", "",
              memory_table(results["memory"])]
  return "\n".join(parts) + "\n"


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if not results["cells"]:
    return _plot_features(results, path, plt)
  cells = results["cells"]
  ds = sorted({c["d"] for c in cells})
  causals = sorted({c["causal"] for c in cells})
  seqs = sorted({c["s"] for c in cells})
  panels = [(d, causal) for d in ds for causal in causals]
  # One colour per impl across all panels, so a single legend serves them all.
  colors = {impl: f"C{i}" for i, impl in enumerate(results["impls"])}
  fig, axes = plt.subplots(2, len(panels), figsize=(4 * len(panels), 7.5), squeeze=False)
  handles = {}
  for row, mode in enumerate(("fwdbwd", "fwd")):
    for col, (d, causal) in enumerate(panels):
      ax = axes[row][col]
      sub = sorted((c for c in cells if c["d"] == d and c["causal"] == causal), key=lambda c: c["s"])
      for impl in results["impls"]:
        pts = [(c["s"], tflops(c, impl, mode)) for c in sub]
        pts = [(s, t) for s, t in pts if t is not None]
        if pts:
          (line,) = ax.plot(*zip(*pts), marker="o", color=colors[impl], label=LABELS.get(impl, impl))
          handles.setdefault(impl, line)
      ax.set_xscale("log", base=2)
      ax.set_xticks(seqs, [str(s) for s in seqs])
      ax.minorticks_off()
      ax.set_title(f"{MODES[mode]}, d={d}, {'causal' if causal else 'non-causal'}", fontsize=10)
      ax.set_xlabel("seq len")
      ax.set_ylim(bottom=0)
      if col == 0:
        ax.set_ylabel("TFLOP/s")
      ax.grid(alpha=0.3)
  impls = [i for i in results["impls"] if i in handles]
  fig.legend([handles[i] for i in impls], [LABELS.get(i, i) for i in impls],
             loc="lower center", ncol=max(1, len(impls)), fontsize=9, frameon=False)
  fig.suptitle(f"{results['meta']['device']}, jax {results['meta']['jax']}, "
               f"{results['meta']['dtype']}", fontsize=11)
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_features(results, path, plt):
  """--features-only: horizontal bars of useful TFLOP/s per feature row, fwd and f+b."""
  rows = results["features"]["rows"]
  names = [f"{r['title']} | {LABELS.get(r['impl'], r['impl'])}" + (f" ({r['note']})" if r["note"] else "")
           for r in rows]
  fig, axes = plt.subplots(1, 2, figsize=(13, 0.32 * len(rows) + 1.6), sharey=True, squeeze=False)
  for ax, mode in zip(axes[0], ("fwd", "fwdbwd")):
    vals = [r["results"].get(mode, {}).get("tflops") or 0.0 for r in rows]
    ax.barh(range(len(rows)), vals, color=[f"C{sorted(set(r['impl'] for r in rows)).index(r['impl'])}"
                                           for r in rows])
    for y, (v, r) in enumerate(zip(vals, rows)):
      if not r["results"].get(mode, {}).get("tflops"):
        ax.text(0, y, " n/a", va="center", fontsize=7)
    ax.set_title(f"{MODES[mode]}, useful TFLOP/s", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
  axes[0][0].set_yticks(range(len(rows)), names, fontsize=7)
  axes[0][0].invert_yaxis()
  m, c = results["meta"], results["features"]["config"]
  fig.suptitle(f"Feature cases: {m['device']}, jax {m['jax']}, {c['dtype']}, d={c['d']} "
               f"N={c['n']} s={c['s']}", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
