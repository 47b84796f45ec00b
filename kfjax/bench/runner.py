"""Runs methods over a suite's cases; one CSV row per case × method, resumable.

Layout of ``workdir``::

    cases/<case>/            cached LR, HR and true kernel (:func:`suites.load_case`)
    runs/<case>/pd-<fp>/     PD trained on the case's LR image, shared by its methods
    runs/<case>/<method>/    sr.png, kernel.npy (if any) and info.json (the method's own
                             record: phase seconds, DDM4IP's fallbacks, ...) of that method
                             (with ``seeds``, of the config's own seed ``cfg.seed``;
                             the others in ``<method>-seed<N>/``, so that runs of one
                             workdir split over several ``--seeds`` never overwrite
                             each other's outputs)
    results.csv              every finished row (rewritten atomically after each row)
    errors.log               tracebacks of failed rows
    report.md, figures/      written by :mod:`kfjax.bench.report`

A row is keyed by (case, method, config fingerprint): re-running skips rows that finished
(``ok`` or ``n/a``), retries failed ones, and computes rows for a changed config anew. The
fingerprint is of the part of the config the method reads (:func:`methods.fingerprint_of`):
a changed DDM4IP setting re-runs the ``ddm4ip`` rows, not KernelFusion's.
``seeds`` repeats every row with ``cfg.seed`` set to each seed (the seed is part of the
fingerprint, and is recorded in its own column), so a method's spread over seeds can be
reported beside its mean.
"""

import csv
import datetime
import io
import json
import os
import time
import traceback

import numpy as np
import tqdm

from kfjax import io as kio
from kfjax.bench import metrics
from kfjax import pipeline
from kfjax.bench import methods as methods_lib
from kfjax.bench import suites

FIELDS = ["case", "photo", "family", "scale", "method", "preset", "config", "status",
          "kernel_ncc", "kernel_psnr", "psnr", "y_psnr", "ssim", "shift_psnr", "seconds",
          "device", "date", "error", "seed", "subpixel_psnr", "kernel_width"]
DONE = ("ok", "n/a")


def read_rows(path):
  if not os.path.exists(path):
    return []
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def write_rows(path, rows):
  buf = io.StringIO()
  w = csv.DictWriter(buf, FIELDS, extrasaction="ignore")
  w.writeheader()
  w.writerows(rows)
  kio.save_text_atomic(path, buf.getvalue())


def row_key(row):
  return (row["case"], row["method"], row["config"])


def score(case, result, border):
  """Metrics of one result against the case's truth."""
  hr = case.hr
  sr = np.asarray(result.sr, np.float64).reshape(hr.shape)
  out = {"psnr": metrics.psnr(sr, hr, crop=border),
         "y_psnr": metrics.y_psnr(sr, hr, crop=border) if hr.shape[-1] == 3
         else metrics.psnr(sr, hr, crop=border),
         "ssim": metrics.ssim(sr, hr, crop=border),
         "shift_psnr": metrics.shift_psnr(sr, hr, crop=border),
         "subpixel_psnr": metrics.subpixel_psnr(sr, hr, crop=border),
         "kernel_ncc": float("nan"), "kernel_psnr": float("nan"), "kernel_width": float("nan")}
  if result.kernel is not None and case.kernel is not None:
    out["kernel_ncc"] = metrics.kernel_ncc(result.kernel, case.kernel)
    out["kernel_psnr"] = metrics.kernel_psnr(result.kernel, case.kernel)
    out["kernel_width"] = metrics.kernel_width_ratio(result.kernel, case.kernel)
  return out


def _fmt(v):
  return f"{v:.6g}" if isinstance(v, float) else v


def _plain(v):
  """``json.dumps``'s fallback for what methods put in ``Result.info``: NumPy scalars and
  arrays as numbers and lists, anything else by its text."""
  if isinstance(v, (np.generic, np.ndarray)):
    return v.tolist()
  return str(v)


def method_dir(method, seed=None, own_seed=None):
  """Folder name of a method's outputs under ``runs/<case>/``: ``<method>`` for the
  config's own seed ``own_seed`` (or when either is None), ``<method>-seed<N>`` for
  another seed."""
  if seed is None or own_seed is None or int(seed) == int(own_seed):
    return method
  return f"{method}-seed{int(seed)}"


def run_one(spec, method, cfg, workdir, border, out_name=None):
  """Run ``method`` on case ``spec``; returns the row (never raises, except on Ctrl-C)."""
  row = {"case": spec.name, "photo": spec.photo, "family": spec.family, "scale": spec.scale,
         "method": method, "preset": cfg.name, "config": methods_lib.fingerprint_of(cfg, method),
         "device": pipeline.device_description(),
         "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
         "error": "", "seed": int(cfg.seed)}
  out_dir = os.path.join(workdir, "runs", spec.name, out_name or method)
  try:
    case = suites.load_case(spec, os.path.join(workdir, "cases"))
    fn = methods_lib.get(method)
    t0 = time.time()
    result = fn(case, cfg, out_dir)
    wall = time.time() - t0
    os.makedirs(out_dir, exist_ok=True)
    kio.save_image(os.path.join(out_dir, "sr.png"), result.sr)
    if result.kernel is not None:
      kio.save_array_atomic(os.path.join(out_dir, "kernel.npy"),
                            np.asarray(result.kernel, np.float32))
    kio.save_text_atomic(os.path.join(out_dir, "info.json"), json.dumps(
        {"config": row["config"], "seed": row["seed"], "seconds": result.seconds,
         "info": result.info}, default=_plain, indent=1))
    row.update({k: _fmt(v) for k, v in score(case, result, border).items()})
    row.update(status="ok", seconds=_fmt(result.seconds if result.seconds is not None else wall))
  except methods_lib.NotApplicable as e:
    row.update(status="n/a", error=str(e))
  except Exception as e:  # one failing case must not stop the run
    msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    row.update(status="error", error=msg)
    with open(os.path.join(workdir, "errors.log"), "a") as f:
      f.write(f"== {spec.name} / {method} ({row['date']})\n{traceback.format_exc()}\n")
  return {k: str(row.get(k, "")) for k in FIELDS}  # as read back from the CSV


def run(specs, method_names, cfg, workdir, border=8, show_progress=True, log=print,
        seeds=None):
  """Run every method on every case (for every seed of ``seeds``; default: ``cfg.seed``
  alone), skipping finished rows; returns this run's rows."""
  for m in method_names:
    methods_lib.get(m)          # unknown names fail before any work
  os.makedirs(workdir, exist_ok=True)
  csv_path = os.path.join(workdir, "results.csv")
  rows = read_rows(csv_path)
  seeds = [int(cfg.seed)] if not seeds else list(dict.fromkeys(int(s) for s in seeds))
  base = int(cfg.seed)          # its outputs go to runs/<case>/<method>/, whichever run
  cfgs = {s: cfg if s == int(cfg.seed) else methods_lib.with_overrides(cfg, {"seed": s})
          for s in seeds}
  fps = {(s, m): methods_lib.fingerprint_of(c, m) for s, c in cfgs.items()
         for m in method_names}
  todo = [(sd, s, m) for sd in seeds for s in specs for m in method_names]
  index = {row_key(r): i for i, r in enumerate(rows)}
  bar = tqdm.tqdm(total=len(todo), desc="bench", unit="run", disable=not show_progress,
                  dynamic_ncols=True)
  mine = []
  for seed, spec, m in todo:
    key = (spec.name, m, fps[(seed, m)])
    if key in index and rows[index[key]]["status"] in DONE:
      if not rows[index[key]].get("seed"):   # a row written before the seed column
        rows[index[key]]["seed"] = str(seed)
      mine.append(rows[index[key]])
      bar.update(1)
      continue
    bar.set_postfix_str(f"{spec.name} / {m}" + (f" / seed {seed}" if len(seeds) > 1 else ""))
    row = run_one(spec, m, cfgs[seed], workdir, border,
                  method_dir(m, seed, base))
    if key in index:
      rows[index[key]] = row
    else:
      index[key] = len(rows)
      rows.append(row)
    write_rows(csv_path, rows)
    mine.append(row)
    if row["status"] == "error":
      log(f"kfjax: {spec.name} / {m} failed: {row['error']} (traceback in errors.log)")
    bar.update(1)
  bar.close()
  return mine
