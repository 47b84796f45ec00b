"""What post-processing a blind run's kernel would give, without re-running Phase 2.

    python -m kfjax.bench.postprocess --workdir bench_out/photos3x3 --thresholds 0,0.2,0.4
    python -m kfjax.bench.postprocess --workdir bench_out/photos3x3 --method ddm4ip

For every stored blind KernelFusion run of a benchmark workdir (``runs/<case>/kf-<config
fingerprint>/``, written by the ``kernelfusion`` and ``tv_blind`` methods) this scores, by
sub-pixel aligned PSNR against the case's HR image (8-px border):

The run's Phase 2 image and kernel are ``sr_phase2.npy`` / ``kernel_phase2.npy`` (before
any post-processing of the config; runs stored before those files existed hold Phase 2's
own in ``sr.npy`` / ``kernel.npy``).

* ``bicubic``; ``phase2``: the run's Phase 2 image (Algorithm 1's output);
* ``tv_true``: the TV solver (:mod:`kfjax.restore`) with the TRUE kernel (``tv_nonblind``);
* ``thr<T>``: the TV solver from the bicubic start with the run's kernel after
  :func:`kfjax.models.kernel_net.threshold_kernel` at ``T`` (``thr0`` = ``tv_blind``),
  i.e. what ``kernel.threshold=T restore.final=True restore.init=bicubic`` outputs;
  ``p2init<T>``: the same from Phase 2's image (``restore.init=phase2``);
* ``thr<T>_w<W>``: ``thr<T>`` with the TV weight ``W`` instead of the config's (``--weights``);
* ``thr<T>_b<B>``: ``thr<T>`` with the thresholded kernel then blended with the Gaussian
  of ``kernel.blend_sigma`` at weight ``B`` (``--blends``): ``kernel.threshold=T
  kernel.blend=B``; ``thr<T>_b<B>_s<σ>``: the same with the Gaussian's std ``σ·s`` instead
  (``--blend_sigmas``: ``kernel.blend_sigma=σ``);
* ``gauss<σ>``: the TV solver with a fixed isotropic Gaussian of std ``σ·s`` in place of an
  estimate (what knowing nothing about the kernel buys).

A case without a true kernel (the ``nonlinear`` degradations) is scored too, without the
columns that need one (``tv_true``, ``kernel_ncc``, ``width<T>``); its ``gauss<σ>`` lie on
the estimate's grid. The summary's means are over the runs that have the column.

With ``--method ddm4ip`` the runs are the ``ddm4ip`` rows' folders (``runs/<case>/ddm4ip``,
``ddm4ip-seed<N>``) and the kernel is the one kept before the preset's post-processing
(``kernel_raw.npy``); DDM4IP has no Phase 2 image, so ``phase2`` and ``p2init<T>`` are left
out, and ``thr<T>_b<B>`` is exactly its row with ``ddm4ip.threshold=T ddm4ip.blend=B``
(and ``--max_radius R`` with ``ddm4ip.max_radius=R``: a spread kernel is scored as the
generic Gaussian, ``spread`` 1; ``--on_diverge generic`` with ``ddm4ip.on_diverge=generic``:
a run whose matching diverged, by the ``info.json`` the benchmark keeps beside it, is
scored as the generic Gaussian, ``diverged`` 1; empty for runs stored without one). A folder
holds its latest run only, so a workdir with DDM4IP rows of several configs holds the last
one's kernels.

With ``--method kernelgan`` the runs are the ``kernelgan`` rows' folders and the kernel is
KernelGAN's own (``kernel.npy``: a non-blind run leaves it as it is). Where the config's
output reads nothing of Phase 2 (``restore.final`` from the bicubic start, the ``cpu``
preset: :func:`kfjax.phase2.reads_phase2`), ``thr0`` is exactly the row's image and
``thr<T>_b<B>`` what KernelGAN's kernel would give after the blind runs' repair
(``kernel.threshold=T kernel.blend=B``, which non-blind runs do not apply).

It prints one line per run and the mean / minimum gain over bicubic per column, and
writes ``postprocess.csv`` (``postprocess_ddm4ip.csv``) in the workdir. The Phase 2 path
being the same, ``thr<T>`` is exactly what a run with those settings would have produced.
The TV solver's other settings are the base config's ``restore`` block.
"""

import argparse
import csv
import glob
import io
import json
import os
import sys

import jax.numpy as jnp
import numpy as np

from kfjax import ddm4ip
from kfjax import io as kio
from kfjax.bench import kernels
from kfjax.bench import metrics
from kfjax import resize
from kfjax import restore
from kfjax.bench import suites
from kfjax.models import kernel_net


def runs(workdir, fingerprints=None, method="kernelfusion"):
  """``(case spec, run folder, label)`` of every stored blind run of ``method`` (the label:
  KernelFusion's config fingerprint, DDM4IP's or KernelGAN's folder name), sorted."""
  pattern = {"kernelfusion": "kf-*", "ddm4ip": "ddm4ip*", "kernelgan": "kernelgan*"}[method]
  out = []
  for d in sorted(glob.glob(os.path.join(workdir, "runs", "*", pattern))):
    label = os.path.basename(d)[3:] if method == "kernelfusion" else os.path.basename(d)
    if fingerprints and label not in fingerprints:
      continue
    case = os.path.basename(os.path.dirname(d))
    meta = os.path.join(workdir, "cases", case, "case.json")
    if not os.path.exists(_kernel_file(d)) or not os.path.exists(meta):
      continue
    out.append((suites.CaseSpec(**json.load(open(meta))["spec"]), d, label))
  return out


def _kernel_file(run_dir):
  """The run's kernel before post-processing: DDM4IP's ``kernel_raw.npy``, else Phase 2's."""
  raw = os.path.join(run_dir, "kernel_raw.npy")
  return raw if os.path.exists(raw) else _file(run_dir, "kernel")


def _file(run_dir, what):
  """``<what>_phase2.npy`` (Phase 2's own) where the run has it, else ``<what>.npy``."""
  p = os.path.join(run_dir, f"{what}_phase2.npy")
  return p if os.path.exists(p) else os.path.join(run_dir, f"{what}.npy")


def diverged(run_dir):
  """Whether the DDM4IP run in ``run_dir`` diverged (its ``info.json``), or None when the
  run was stored without one."""
  path = os.path.join(run_dir, "info.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return bool(json.load(f)["info"].get("diverged"))


def score_run(spec, run_dir, cases_dir, thresholds, sigmas, rcfg, border=8, weights=(),
              blends=(), blend_sigma=0.35, max_radius=0.0, on_diverge="last_healthy",
              blend_sigmas=()):
  """The row of one run: every column of the module docstring. ``blend_sigmas``: the
  other blend Gaussians' stds (× the scale) to score beside ``blend_sigma``; the spread /
  diverged fallback stays the ``blend_sigma`` Gaussian. ``max_radius`` > 0: a
  kernel whose RMS radius passes ``max_radius × scale`` is scored, in every ``thr``
  column, as the generic Gaussian it would become (:func:`kfjax.ddm4ip.finish_kernel`);
  the row's ``spread`` is then 1. ``on_diverge="generic"``: the same for a run whose
  matching diverged (:func:`diverged`)."""
  case = suites.load_case(spec, cases_dir)
  s = spec.scale
  known = case.kernel is not None
  aligned = lambda x: metrics.subpixel_psnr(np.asarray(x, np.float64), case.hr, crop=border)
  tv = lambda k, x_init=None: restore.solve_cfg(case.lr, k, s, rcfg, x_init)[0]
  k_est = np.load(_kernel_file(run_dir))
  name = os.path.basename(run_dir)
  sr = np.load(_file(run_dir, "sr")) if name.startswith("kf-") else None   # DDM4IP: none
  row = {"case": spec.name, "config": name[3:] if name.startswith("kf-") else name,
         "bicubic": aligned(np.clip(np.asarray(resize.upscale(jnp.asarray(case.lr), s)), 0, 1))}
  if sr is not None:
    row["phase2"] = aligned(sr)
  if known:
    row.update(tv_true=aligned(tv(case.kernel)),
               kernel_ncc=metrics.kernel_ncc(k_est, case.kernel))
  spread = ddm4ip.too_spread(k_est, max_radius, s)
  row["spread"] = int(spread)
  gone = diverged(run_dir) if not name.startswith("kf-") else False
  row["diverged"] = "" if gone is None else int(gone)
  generic = kernel_net.gaussian_kernel(k_est.shape[0], blend_sigma * s)
  to_generic = spread or (on_diverge == "generic" and bool(gone))
  post = (lambda k: generic) if to_generic else (lambda k: k)
  for t in thresholds:
    k = post(kernel_net.threshold_kernel(k_est, t))
    row[f"thr{t:g}"] = aligned(tv(k))
    if sr is not None:
      row[f"p2init{t:g}"] = aligned(tv(k, sr))
    if known:
      row[f"width{t:g}"] = metrics.kernel_width_ratio(k, case.kernel)
    for w in weights:
      other = rcfg.copy_and_resolve_references()
      other.weight = w
      row[f"thr{t:g}_w{w:g}"] = aligned(restore.solve_cfg(case.lr, k, s, other)[0])
    for b in blends:
      row[f"thr{t:g}_b{b:g}"] = aligned(tv(post(kernel_net.blend_kernel(k, b, blend_sigma * s))))
      for bs in blend_sigmas:
        row[f"thr{t:g}_b{b:g}_s{bs:g}"] = aligned(
            tv(post(kernel_net.blend_kernel(k, b, bs * s))))
  grid = (case.kernel if known else k_est).shape[0]
  for sg in sigmas:
    row[f"gauss{sg:g}"] = aligned(tv(kernels.gaussian(grid, s, sigma=sg * s)))
  return row


def columns(rows):
  """Every column of ``rows`` once, in first-seen order (rows of cases without a true
  kernel lack some)."""
  return list(dict.fromkeys(c for r in rows for c in r))


def summary(rows):
  """Per PSNR column: (mean, min, runs) of the gain over bicubic, over the rows that have
  it."""
  out = {}
  for c in columns(rows):
    if (c in ("case", "config", "bicubic", "kernel_ncc", "spread", "diverged")
        or c.startswith("width")):
      continue
    gains = [r[c] - r["bicubic"] for r in rows if c in r]
    out[c] = (float(np.mean(gains)), float(np.min(gains)), len(gains))
  return out


def main(argv=None):
  from kfjax import config as config_lib  # noqa: PLC0415
  ap = argparse.ArgumentParser(prog="kfjax.bench.postprocess", description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--thresholds", default="0,0.2,0.4", help="kernel.threshold values")
  ap.add_argument("--sigmas", default="0.35,0.5", help="fixed Gaussians' std, × the scale")
  ap.add_argument("--method", default="kernelfusion",
                  choices=("kernelfusion", "ddm4ip", "kernelgan"),
                  help="whose stored kernels: KernelFusion's Phase 2, DDM4IP's raw ones or "
                  "KernelGAN's")
  ap.add_argument("--configs", default="", help="only these config fingerprints (comma "
                  "list; with --method ddm4ip, run folder names such as ddm4ip-seed1)")
  ap.add_argument("--border", type=int, default=8)
  ap.add_argument("--max_radius", type=float, default=0.0, help="score kernels whose RMS "
                  "radius passes this × the scale as the generic Gaussian (ddm4ip.max_radius)")
  ap.add_argument("--on_diverge", default="last_healthy", choices=ddm4ip.ON_DIVERGE,
                  help="score DDM4IP runs whose matching diverged as the generic Gaussian "
                  "(ddm4ip.on_diverge=generic; needs the runs' info.json)")
  ap.add_argument("--weights", default="", help="also these restore.weight values (at x2), "
                  "with the estimated kernel thresholded (columns thr<T>_w<W>)")
  ap.add_argument("--blends", default="", help="also these kernel.blend weights after each "
                  "threshold (columns thr<T>_b<B>)")
  ap.add_argument("--blend_sigmas", default="", help="with --blends, also blend toward "
                  "Gaussians of these stds × the scale instead of kernel.blend_sigma "
                  "(columns thr<T>_b<B>_s<σ>)")
  args = ap.parse_args(argv)
  try:
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    sigmas = [float(t) for t in args.sigmas.split(",") if t]
    weights = [float(t) for t in args.weights.split(",") if t]
    blends = [float(t) for t in args.blends.split(",") if t]
    blend_sigmas = [float(t) for t in args.blend_sigmas.split(",") if t]
  except ValueError:
    sys.exit("kfjax.bench.postprocess: error: --thresholds, --sigmas, --weights, --blends and "
             "--blend_sigmas take numbers")
  if blend_sigmas and not blends:
    sys.exit("kfjax.bench.postprocess: error: --blend_sigmas needs --blends")
  found = runs(args.workdir, [c for c in args.configs.split(",") if c], args.method)
  if not found:
    sys.exit(f"kfjax.bench.postprocess: error: no stored {args.method} run under "
             f"{args.workdir}/runs")
  base = config_lib.base_config()
  rcfg = base.restore
  rows = []
  for spec, d, _ in found:
    row = score_run(spec, d, os.path.join(args.workdir, "cases"), thresholds, sigmas, rcfg,
                    args.border, weights, blends, base.kernel.blend_sigma, args.max_radius,
                    args.on_diverge, blend_sigmas)
    rows.append(row)
    print(f"{row['case']} [{row['config']}] " + " ".join(
        f"{k} {v:.2f}" for k, v in row.items() if k not in ("case", "config")), flush=True)
  for c, (mean, low, n) in summary(rows).items():
    print(f"{c:>12s}: {mean:+.2f} dB over bicubic on average, worst {low:+.2f} ({n} runs)")
  path = os.path.join(args.workdir, "postprocess.csv" if args.method == "kernelfusion"
                      else f"postprocess_{args.method}.csv")
  text = io.StringIO(newline="")
  w = csv.DictWriter(text, columns(rows), restval="")
  w.writeheader()
  w.writerows(rows)
  kio.save_text_atomic(path, text.getvalue())
  print(f"rows: {path}")


if __name__ == "__main__":
  main()
