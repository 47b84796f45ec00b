"""The benchmark report: a Markdown table of means and figures, from the rows of a run.

* ``report.md``: per scale and degradation family, the mean of every metric per method
  (and the number of cases), then an overall mean per method, then each method's aligned
  PSNR gain over bicubic per seed (paired by case, with the count of runs above bicubic),
  then (when the rows hold more than one seed) each method's mean per seed and the spread
  over seeds, then one line per case.
* ``figures/kernels.png``: for every case with a true kernel, the true kernel beside each
  method's estimate (with its NCC).
* ``figures/crops.png``: for the first few cases, the same crop of HR, LR (nearest
  upscaled) and every method's SR image (with its PSNR).

``python -m kfjax.bench.report --workdirs A,B,... --out DIR`` writes one ``report.md`` for
the rows of several benchmark workdirs together (e.g. seeds or methods run as separate
commands), without figures.
"""

import argparse
import os
import sys

import numpy as np

from kfjax import io as kio
from kfjax.bench import runner

METRICS = (("kernel_ncc", "kernel NCC", "{:.3f}"), ("kernel_psnr", "kernel PSNR", "{:.2f}"),
           ("kernel_width", "kernel width", "{:.2f}"),
           ("psnr", "PSNR", "{:.2f}"), ("subpixel_psnr", "aligned PSNR", "{:.2f}"),
           ("y_psnr", "Y-PSNR", "{:.2f}"),
           ("ssim", "SSIM", "{:.4f}"), ("seconds", "s / case", "{:.0f}"))

# The gap split (issue "quality"): each line is a difference of two methods' aligned PSNR,
# paired over the (case, seed) rows both finished.
SPLIT = (("restoration: nonblind − tv_nonblind", "nonblind", "tv_nonblind"),
         ("kernel's cost: tv_nonblind − tv_blind", "tv_nonblind", "tv_blind"),
         ("blind − bicubic", "kernelfusion", "bicubic"),
         ("tv_blind − bicubic", "tv_blind", "bicubic"))


def _num(v):
  try:
    return float(v)
  except (TypeError, ValueError):
    return float("nan")


def _mean(rows, key):
  vals = [_num(r.get(key)) for r in rows if r["status"] == "ok"]
  vals = [v for v in vals if np.isfinite(v)]
  return float(np.mean(vals)) if vals else float("nan")


def _cell(v, fmt):
  return "–" if not np.isfinite(v) else fmt.format(v)


def _methods(rows):
  return list(dict.fromkeys(r["method"] for r in rows))


def summary_table(rows, group=("scale", "family")):
  """Markdown table of means grouped by ``group`` and method."""
  head = "| " + " | ".join(group) + " | method | n | " + " | ".join(m[1] for m in METRICS) + " |"
  lines = [head, "|" + "---|" * (len(group) + 2 + len(METRICS))]
  keys = list(dict.fromkeys(tuple(r[g] for g in group) for r in rows))
  for key in keys:
    sel = [r for r in rows if tuple(r[g] for g in group) == key]
    for m in _methods(sel):
      rs = [r for r in sel if r["method"] == m]
      ok = [r for r in rs if r["status"] == "ok"]
      if not ok:
        continue
      cells = [_cell(_mean(rs, k), f) for k, _, f in METRICS]
      lines.append("| " + " | ".join(key) + f" | {m} | {len(ok)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def case_table(rows):
  head = ("| case | method | status | kernel NCC | kernel width | PSNR | aligned PSNR | "
          "Y-PSNR | SSIM | s |")
  lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    cells = [_cell(_num(r.get(k)), f) for k, f in (
        ("kernel_ncc", "{:.3f}"), ("kernel_width", "{:.2f}"), ("psnr", "{:.2f}"),
        ("subpixel_psnr", "{:.2f}"), ("y_psnr", "{:.2f}"), ("ssim", "{:.4f}"),
        ("seconds", "{:.0f}"))]
    status = r["status"] if r["status"] != "error" else f"error: {r['error'][:80]}"
    lines.append(f"| {r['case']} | {r['method']} | {status} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _seed(r):
  return str(r.get("seed") or "")


def seed_table(rows):
  """Per scale and method: the mean PSNR and kernel NCC over cases for each seed, and
  their mean and sample standard deviation over seeds (cases every seed finished only)."""
  head = ("| scale | method | seeds | cases | PSNR per seed | PSNR mean ± sd | "
          "kernel NCC per seed | NCC mean ± sd |")
  lines = [head, "|---|---|---|---|---|---|---|---|"]
  for scale in dict.fromkeys(r["scale"] for r in rows):
    sel = [r for r in rows if r["scale"] == scale and r["status"] == "ok"]
    for m in _methods(sel):
      rs = [r for r in sel if r["method"] == m]
      seeds = sorted(dict.fromkeys(_seed(r) for r in rs), key=lambda x: (len(x), x))
      cases = [c for c in dict.fromkeys(r["case"] for r in rs)
               if all(any(r["case"] == c and _seed(r) == sd for r in rs) for sd in seeds)]
      if len(seeds) < 2 or not cases:
        continue
      cells = []
      for key, fmt in (("psnr", "{:.2f}"), ("kernel_ncc", "{:.3f}")):
        per = [_mean([r for r in rs if _seed(r) == sd and r["case"] in cases], key)
               for sd in seeds]
        per_f = [v for v in per if np.isfinite(v)]
        spread = (_cell(float(np.mean(per_f)), fmt) + " ± "
                  + _cell(float(np.std(per_f, ddof=1)), fmt)) if len(per_f) > 1 else "–"
        cells += [", ".join(_cell(v, fmt) for v in per), spread]
      lines.append(f"| {scale} | {m} | {', '.join(seeds)} | {len(cases)} | "
                   + " | ".join(cells) + " |")
  return "\n".join(lines) if len(lines) > 2 else None


def gain_table(rows, key="subpixel_psnr", base="bicubic"):
  """Per scale and method, the gain in ``key`` over ``base``'s row of the same case (base
  is deterministic: any seed's row), per seed and over seeds: the mean over cases at each
  seed, the mean ± sample sd of those, the runs above ``base`` and the worst and best run.
  None when the rows hold no ``base``."""
  lines = ["| scale | method | seeds | runs | gain per seed (dB) | mean ± sd over seeds | "
           f"above {base} | worst | best |", "|---|---|---|---|---|---|---|---|---|"]
  for scale in dict.fromkeys(r["scale"] for r in rows):
    sel = [r for r in rows if r["scale"] == scale and r["status"] == "ok"
           and np.isfinite(_num(r.get(key)))]
    ref = {r["case"]: _num(r[key]) for r in sel if r["method"] == base}
    for m in _methods(sel):
      if m == base:
        continue
      gains = {}
      for r in sel:
        if r["method"] == m and r["case"] in ref:
          gains.setdefault(_seed(r), []).append(_num(r[key]) - ref[r["case"]])
      if not gains:
        continue
      seeds = sorted(gains, key=lambda x: (len(x), x))
      per = [float(np.mean(gains[sd])) for sd in seeds]
      every = [g for sd in seeds for g in gains[sd]]
      spread = (f"{np.mean(per):+.2f} ± {np.std(per, ddof=1):.2f}" if len(per) > 1
                else f"{per[0]:+.2f}")
      lines.append(
          f"| {scale} | {m} | {', '.join(sd or '–' for sd in seeds)} | {len(every)} | "
          + ", ".join(f"{v:+.2f}" for v in per) + f" | {spread} | "
          f"{sum(g > 0 for g in every)} / {len(every)} | {min(every):+.2f} | {max(every):+.2f} |")
  return "\n".join(lines) if len(lines) > 2 else None


def split_table(rows, key="subpixel_psnr"):
  """Per scale, the mean (and min, count) of each :data:`SPLIT` difference, or None."""
  lines = ["| scale | difference (aligned PSNR, dB) | pairs | mean | min | max |",
           "|---|---|---|---|---|---|"]
  for scale in dict.fromkeys(r["scale"] for r in rows):
    by = {}
    for r in rows:
      if r["scale"] == scale and r["status"] == "ok" and np.isfinite(_num(r.get(key))):
        by[(r["case"], _seed(r), r["method"])] = _num(r.get(key))
    for label, m1, m2 in SPLIT:
      d = [v - by[(c, sd, m2)] for (c, sd, m), v in by.items() if m == m1 and (c, sd, m2) in by]
      if d:
        lines.append(f"| {scale} | {label} | {len(d)} | {np.mean(d):+.2f} | {np.min(d):+.2f} | "
                     f"{np.max(d):+.2f} |")
  return "\n".join(lines) if len(lines) > 2 else None


def markdown(rows, title, command=None):
  parts = [f"# {title}", ""]
  if command:
    parts += ["```", command, "```", ""]
  if rows:
    devices = sorted({r["device"] for r in rows})
    presets = sorted({r["preset"] for r in rows})
    fps = {}
    for r in rows:       # each method's rows carry the fingerprint of the blocks it reads
      fps.setdefault(r["method"], set()).add(r["config"])
    per_method = "; ".join(f"{m} {', '.join(sorted(f))}" for m, f in sorted(fps.items()))
    parts += [f"Device: {', '.join(devices)}. Preset: {', '.join(presets)}. Config "
              f"fingerprints: {per_method}.", ""]
  overall = [dict(r, all="all") for r in rows]
  parts += ["## Means per scale and degradation", "", summary_table(rows), "",
            "## Means per scale", "", summary_table(overall, ("scale",)), ""]
  gains = gain_table(rows)
  if gains:
    parts += ["## Aligned PSNR gain over bicubic", "", gains, ""]
  split = split_table(rows)
  if split:
    parts += ["## Where the gap is", "", split, ""]
  seeds = seed_table(rows)
  if seeds:
    parts += ["## Spread over seeds", "", seeds, ""]
  parts += ["## Every case", "", case_table(rows), ""]
  return "\n".join(parts)


def _kernel_img(k):
  k = np.asarray(k, np.float64)
  return k / k.max() if k.max() > 0 else k


def _load(path):
  return kio.load_image(path)[0] if os.path.exists(path) else None


def kernels_figure(rows, workdir, path, folder=lambda m: m):
  """True vs estimated kernels, one row per case with a true kernel; a method's kernel
  from ``runs/<case>/<folder(method)>/``."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cases = list(dict.fromkeys(r["case"] for r in rows))
  cases = [c for c in cases
           if os.path.exists(os.path.join(workdir, "cases", c, "kernel.npy"))]
  est = [m for m in _methods(rows)
         if any(os.path.exists(os.path.join(workdir, "runs", c, folder(m), "kernel.npy")) for c in cases)]
  if not cases or not est:
    return None
  ncols = 1 + len(est)
  fig, axes = plt.subplots(len(cases), ncols, figsize=(1.9 * ncols, 2.0 * len(cases)),
                           squeeze=False)
  for i, c in enumerate(cases):
    k_true = np.load(os.path.join(workdir, "cases", c, "kernel.npy"))
    axes[i, 0].imshow(_kernel_img(k_true), cmap="magma")
    axes[i, 0].set_title("true", fontsize=8)
    axes[i, 0].set_ylabel(c.replace("_", "\n", 2), fontsize=6)
    for j, m in enumerate(est, 1):
      p = os.path.join(workdir, "runs", c, folder(m), "kernel.npy")
      r = next((r for r in rows if r["case"] == c and r["method"] == m), None)
      if os.path.exists(p):
        axes[i, j].imshow(_kernel_img(np.load(p)), cmap="magma")
        ncc = _num(r["kernel_ncc"]) if r else float("nan")
        axes[i, j].set_title(f"{m}\nNCC {_cell(ncc, '{:.2f}')}", fontsize=7)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  _savefig(fig, path)
  plt.close(fig)
  return path


def crops_figure(rows, workdir, path, max_cases=4, crop=64, folder=lambda m: m):
  """Same crop of HR, LR and each method's SR for the first ``max_cases`` cases (a
  method's from ``runs/<case>/<folder(method)>/``)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cases = list(dict.fromkeys(r["case"] for r in rows if r["status"] == "ok"))[:max_cases]
  meths = [m for m in _methods(rows) if any(r["method"] == m and r["status"] == "ok"
                                            for r in rows)]
  if not cases:
    return None
  ncols = 2 + len(meths)
  fig, axes = plt.subplots(len(cases), ncols, figsize=(2.0 * ncols, 2.1 * len(cases)),
                           squeeze=False)
  for i, c in enumerate(cases):
    hr = _load(os.path.join(workdir, "cases", c, "hr.png"))
    lr = _load(os.path.join(workdir, "cases", c, "lr.png"))
    s = hr.shape[0] // lr.shape[0]
    size = min(crop, hr.shape[0], hr.shape[1])
    y0, x0 = (hr.shape[0] - size) // 2 // s * s, (hr.shape[1] - size) // 2 // s * s
    box = lambda im: im[y0:y0 + size, x0:x0 + size]
    lr_up = np.repeat(np.repeat(lr, s, 0), s, 1)
    panels = [("HR", box(hr)), ("LR", box(lr_up))]
    for m in meths:
      sr = _load(os.path.join(workdir, "runs", c, folder(m), "sr.png"))
      r = next((r for r in rows if r["case"] == c and r["method"] == m), None)
      if sr is not None and r is not None:
        panels.append((f"{m}\n{_cell(_num(r['psnr']), '{:.2f}')} dB", box(sr)))
      else:
        panels.append((m, None))
    for j, (name, im) in enumerate(panels):
      ax = axes[i, j]
      if im is not None:
        ax.imshow(np.clip(im[..., 0] if im.shape[-1] == 1 else im, 0, 1),
                  cmap="gray" if im.shape[-1] == 1 else None, vmin=0, vmax=1,
                  interpolation="nearest")
      ax.set_title(name, fontsize=7)
      ax.set_xticks([])
      ax.set_yticks([])
    axes[i, 0].set_ylabel(c.replace("_", "\n", 2), fontsize=6)
  fig.tight_layout()
  _savefig(fig, path)
  plt.close(fig)
  return path


def _savefig(fig, path):
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  os.replace(tmp, path)


def write(rows, workdir, title="kfjax benchmark", command=None, figure_seed=None,
          base_seed=None):
  """Write ``report.md`` and the figures; returns their paths. The figures show the rows
  of ``figure_seed`` (default: every row) from their folders: ``runs/<case>/<method>/``
  for the config's own seed ``base_seed`` (or when either is None), ``<method>-seed<N>/``
  for another (:func:`kfjax.bench.runner.method_dir`)."""
  md = os.path.join(workdir, "report.md")
  kio.save_text_atomic(md, markdown(rows, title, command))
  fig_rows = rows if figure_seed is None else [r for r in rows
                                               if _seed(r) in ("", str(figure_seed))]
  folder = lambda m: runner.method_dir(m, figure_seed, base_seed)
  figs = [kernels_figure(fig_rows, workdir, os.path.join(workdir, "figures", "kernels.png"),
                         folder=folder),
          crops_figure(fig_rows, workdir, os.path.join(workdir, "figures", "crops.png"),
                       folder=folder)]
  return [md] + [f for f in figs if f]



def merged_rows(workdirs):
  """The finished rows of every ``<workdir>/results.csv``, one per (case, method, seed): a
  workdir keeps the rows of every config it ran, so of two for the same case, method and
  seed the later one (by its date; on a tie, the later workdir's) is the one kept. Returns
  ``(rows, left_out)``, the number of rows that gave way."""
  rows, left_out = {}, 0
  for w in workdirs:
    path = os.path.join(w, "results.csv")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no benchmark results there")
    for r in runner.read_rows(path):
      if r["status"] not in runner.DONE:
        continue
      key = (r["case"], r["method"], _seed(r))
      if key in rows:
        left_out += 1
        if rows[key]["date"] > r["date"]:
          continue
      rows[key] = r
  return list(rows.values()), left_out


def main(argv=None):
  ap = argparse.ArgumentParser(prog="kfjax.bench.report",
                               description="One report.md for several benchmark workdirs.")
  ap.add_argument("--workdirs", required=True, help="comma list of benchmark workdirs")
  ap.add_argument("--out", required=True, help="folder for report.md")
  ap.add_argument("--title", default="kfjax benchmark")
  args = ap.parse_args(argv)
  workdirs = [w for w in args.workdirs.split(",") if w]
  try:
    rows, left_out = merged_rows(workdirs)
    os.makedirs(args.out, exist_ok=True)
  except OSError as e:
    sys.exit(f"kfjax.bench.report: error: {e}")
  command = "python -m kfjax.bench.report " + " ".join(
      f"--{k} {v}" for k, v in (("workdirs", ",".join(workdirs)), ("out", args.out)))
  path = os.path.join(args.out, "report.md")
  kio.save_text_atomic(path, markdown(rows, args.title, command))
  print(f"{len(rows)} rows from {len(workdirs)} workdir(s) ({left_out} older rows of the "
        f"same case, method and seed left out): {path}")


if __name__ == "__main__":
  main()
