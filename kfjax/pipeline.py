"""KernelFusion end to end: one LR image in, kernel + SR image out.

:func:`run` is what ``python -m kfjax.main`` calls and what a notebook calls::

    from kfjax import config, pipeline
    cfg = config.preset("cpu")                   # configs/cpu.py (installed as kfjax.configs)
    summary = pipeline.run("photo.png", cfg, workdir="out/photo")
    print(summary["sr_path"], summary["kernel_path"])

The pipeline only orchestrates; each phase owns its loop: :func:`kfjax.phase1.train`
(returns trained PD parameters), :func:`kfjax.phase2.run` (returns the HR image and
kernel as arrays), :func:`kfjax.kernelgan.estimate_kernel` and
:func:`kfjax.ddm4ip.estimate_kernel`.
"""

import json
import os
import time
import warnings
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kfjax import config as config_lib
from kfjax import ddm4ip
from kfjax import ike
from kfjax import io as kio
from kfjax import kernelgan
from kfjax import phase1
from kfjax import phase2
from kfjax import resize
from kfjax import restore
from kfjax.errors import KfjaxError
from kfjax.loop import log
from kfjax.models import kernel_net

MIN_LR_SIZE = 16
METHODS = ("kernelfusion", "kernelgan", "ddm4ip", "ike")
# Methods whose kernel comes from another estimator before the SR step.
TWO_STEP = {"kernelgan": "KernelGAN", "ddm4ip": "DDM4IP"}
# Methods that estimate the kernel themselves (a given --kernel makes no sense with them).
ESTIMATORS = {**TWO_STEP, "ike": "IKE"}


def device_description():
  d = jax.devices()[0]
  kind = getattr(d, "device_kind", d.platform)
  return f"{d.platform}:{kind} x{jax.device_count()}"


def load_kernel(path):
  """A user-given kernel ``.npy``: square 2-D, finite, non-negative; normalised to sum 1."""
  try:
    k = np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise KfjaxError(f"{path}: no such kernel file") from None
  except (OSError, ValueError) as e:
    raise KfjaxError(f"{path}: not a readable .npy kernel ({e})") from None
  k = np.squeeze(k)
  if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] < 1:
    raise KfjaxError(f"{path}: kernel must be a square 2-D array, got shape {k.shape}")
  if not np.issubdtype(k.dtype, np.number) or not np.all(np.isfinite(k)):
    raise KfjaxError(f"{path}: kernel must hold finite numbers")
  k = k.astype(np.float64)
  if k.min() < 0 or k.sum() <= 0:
    raise KfjaxError(f"{path}: kernel must be non-negative with a positive sum")
  return (k / k.sum()).astype(np.float32)


def validate_config(cfg):
  """Raise KfjaxError on config values that cannot work. Each component checks the fields
  it owns (``checks(cfg)`` of Phase 1, Phase 2, the kernel network and KernelGAN)."""
  checks = [
      (int(cfg.scale) == cfg.scale and cfg.scale >= 2, f"scale must be an integer >= 2, got {cfg.scale}"),
      (cfg.precision in config_lib.DTYPES,
       f"precision must be one of {', '.join(config_lib.DTYPES)}, got {cfg.get('precision')!r}"),
  ]
  checks += phase1.checks(cfg)
  checks += phase2.checks(cfg)
  checks += kernel_net.checks(cfg.kernel, phase2.kernel_size(cfg), int(cfg.scale))
  checks += kernelgan.checks(cfg.kernelgan)
  checks += ddm4ip.checks(cfg.ddm4ip)
  checks += ike.checks(cfg.ike)
  for ok, msg in checks:
    if not ok:
      raise KfjaxError(msg)


class Prepared(NamedTuple):
  """One image loaded and checked, its workdir ready (:func:`prepare`)."""
  image_path: str
  workdir: str
  image: np.ndarray        # (h, w, C) in [0, 1]
  info: Any                # kfjax.io's ImageInfo
  lr: np.ndarray           # the image in [−1, 1], what both phases see
  fixed: Optional[np.ndarray]  # the kernel of a non-blind run (given or KernelGAN's)
  estimator: Optional[dict]   # the kernel estimator's info (KernelGAN, DDM4IP)
  started: float


def prepare(image_path, cfg, workdir, kernel_path=None, show_progress=True,
            method="kernelfusion"):
  """Everything of :func:`run` before the phases: load and check the image (and kernel),
  make the workdir, write ``config.json`` and ``bicubic.png``, estimate KernelGAN's kernel
  for ``method="kernelgan"``. ``cfg`` must be validated (:func:`validate_config`)."""
  started = time.time()
  if method not in METHODS:
    raise KfjaxError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
  if method in ESTIMATORS and kernel_path:
    raise KfjaxError(f"--kernel and --method {method} exclude each other "
                     f"({ESTIMATORS[method]} estimates it)")
  scale = int(cfg.scale)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    img, info = kio.load_image(image_path, min_size=MIN_LR_SIZE)
  for w in caught:
    log(f"warning: {w.message}")
  fixed = load_kernel(kernel_path) if kernel_path else None
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise KfjaxError(f"{workdir}: cannot create the workdir ({e.strerror or e})") from None
  if not os.access(workdir, os.W_OK):
    raise KfjaxError(f"{workdir}: workdir is not writable")
  log(f"preset '{cfg.name}' on {device_description()}; image {info.width}x{info.height}x"
      f"{info.channels} ({info.bit_depth}-bit {info.format}), scale x{scale}, "
      f"{'non-blind (kernel given)' if fixed is not None else 'blind'}"
      f"{', KernelGAN kernel + non-blind phase 2' if method == 'kernelgan' else ''}"
      f"{', DDM4IP kernel + TV restoration' if method == 'ddm4ip' else ''}"
      f"{', IKE (kernel and SR image)' if method == 'ike' else ''}")
  kio.save_text_atomic(os.path.join(workdir, "config.json"), cfg.to_json_best_effort(indent=2))

  bicubic = np.clip(np.asarray(resize.upscale(jnp.asarray(img), scale)), 0.0, 1.0)
  kio.save_image(os.path.join(workdir, "bicubic.png"), bicubic, bit_depth=info.bit_depth)

  est_info = None
  if method == "kernelgan":
    log(f"estimating the kernel with KernelGAN ({cfg.kernelgan.iterations} iterations)")
    fixed, est_info = kernelgan.estimate_kernel(img, scale, cfg, show_progress, workdir)
  elif method == "ddm4ip":
    dc = cfg.ddm4ip
    log(f"estimating the kernel with DDM4IP ({dc.flow_steps} flow-matching steps, "
        f"{dc.match_steps} distribution-matching steps)")
    fixed, est_info = ddm4ip.estimate_kernel(img, scale, cfg, show_progress, workdir=workdir)
  return Prepared(image_path, workdir, img, info, img * 2.0 - 1.0, fixed, est_info, started)


def write_outputs(prep, cfg, hr, kernel, p1, p2, method="kernelfusion", group=None):
  """Everything of :func:`run` after the phases: ``sr.png``, ``kernel.npy``,
  ``kernel.png`` and ``summary.json`` (written last: its presence marks a finished run).
  ``p1``/``p2`` are the phases' infos with their ``seconds``; ``group`` describes the
  images this one ran with (:mod:`kfjax.batch`). Returns the summary dict."""
  workdir, info = prep.workdir, prep.info
  sr = np.clip((hr + 1.0) / 2.0, 0.0, 1.0)
  kernel = kernel_net.export_kernel(kernel)
  paths = {name: os.path.join(workdir, name) for name in
           ("sr.png", "kernel.npy", "kernel.png", "summary.json")}
  kio.save_image(paths["sr.png"], sr, bit_depth=info.bit_depth)
  kio.save_array_atomic(paths["kernel.npy"], kernel)
  kio.save_kernel_png(paths["kernel.png"], kernel)
  summary = {
      "image": os.path.abspath(prep.image_path),
      "preset": cfg.name,
      "method": method,
      "device": device_description(),
      "mode": p2["mode"],
      "scale": int(cfg.scale),
      "lr_size": [info.height, info.width, info.channels],
      "sr_size": list(sr.shape),
      "bit_depth": info.bit_depth,
      "kernel_size": int(kernel.shape[0]),
      "phase1": p1,
      "phase2": p2,
      "total_seconds": round(time.time() - prep.started, 2),
      "sr_path": os.path.abspath(paths["sr.png"]),
      "kernel_path": os.path.abspath(paths["kernel.npy"]),
  }
  if prep.estimator is not None:
    summary[method] = prep.estimator
  if group is not None:
    summary["group"] = group
  kio.save_text_atomic(paths["summary.json"], json.dumps(summary, indent=2))
  if method == "ddm4ip":
    parts = f"DDM4IP {prep.estimator['seconds']:.1f} s, restoration {p2['seconds']:.1f} s"
  elif method == "ike":
    parts = "IKE"
  elif "skipped" in p2:
    parts = (f"{TWO_STEP[method]} {prep.estimator['seconds']:.1f} s, " if method in TWO_STEP
             else "") + f"restoration {p2['seconds']:.1f} s"
  else:
    parts = f"phase 1 {p1['seconds']:.1f} s, phase 2 {p2['seconds']:.1f} s"
  log(f"done in {summary['total_seconds']:.1f} s ({parts}); outputs in {os.path.abspath(workdir)}")
  return summary


def run(image_path, cfg, workdir, kernel_path=None, show_progress=True, method="kernelfusion"):
  """Run KernelFusion on one image file and write every output into ``workdir``.

  Outputs: ``sr.png``, ``kernel.npy``, ``kernel.png``, ``bicubic.png``,
  ``config.json``, ``summary.json``. Returns the summary dict.

  ``method="kernelgan"`` estimates the kernel with KernelGAN (``kfjax.kernelgan``,
  ``cfg.kernelgan``) and then runs the non-blind Phase 2 with it (Phase 1 still trains
  PD, which Phase 2 needs). A non-blind run (a given kernel, or KernelGAN's) whose
  ``restore.final`` starts from the bicubic upscale skips both phases: its output is that
  TV restoration, which reads nothing of them (:func:`kfjax.phase2.reads_phase2`).
  ``method="ddm4ip"`` estimates it with DDM4IP (``kfjax.ddm4ip``, ``cfg.ddm4ip``) and
  restores with the TV solver (``cfg.restore``);
  ``method="ike"`` runs IKE (``kfjax.ike``, ``cfg.ike``), which gives both. With ``sample.prior = "dip"`` Phase 1 is skipped (no PD).
  """
  validate_config(cfg)
  prep = prepare(image_path, cfg, workdir, kernel_path, show_progress, method)
  lr_m = prep.lr
  t0 = time.time()
  if method == "ike":
    log(f"IKE ({cfg.ike.iterations} iterations)")
    sr, k, info = ike.run(prep.image, int(cfg.scale), cfg, show_progress, workdir)
    p1 = {**phase1.skipped_info("method ike"), "seconds": 0.0}
    p2 = {"mode": "ike", "seconds": round(time.time() - t0, 2)}
    return write_outputs(prep._replace(estimator=info), cfg, sr * 2.0 - 1.0, k, p1, p2, method)
  if method == "ddm4ip":
    # Two-step: DDM4IP's kernel (estimated in prepare) and the TV restoration; no PD.
    x, values = restore.solve_cfg(prep.image, prep.fixed, int(cfg.scale), cfg.restore)
    p1 = {**phase1.skipped_info("method ddm4ip"), "seconds": 0.0}
    p2 = {"mode": "ddm4ip", "restore_steps": int(cfg.restore.steps),
          "final_loss": float(values[-1]), "seconds": round(time.time() - t0, 2)}
    return write_outputs(prep, cfg, np.asarray(x) * 2.0 - 1.0, prep.fixed, p1, p2, method)
  if prep.fixed is not None and not phase2.reads_phase2(cfg, blind=False):
    log("restore.final from the bicubic start with a given kernel: the output is the TV "
        "restoration alone, so Phase 1 and Phase 2 (which would not change it) are skipped")
    hr, kernel, p2 = phase2.restore_only(cfg, lr_m, prep.fixed)
    p1 = {**phase1.skipped_info("non-blind with restore.init=bicubic"), "seconds": 0.0}
    return write_outputs(prep, cfg, hr, kernel, p1,
                         {**p2, "seconds": round(time.time() - t0, 2)}, method)
  if cfg.sample.prior == "dip":
    pd_model = pd_params = None
    p1 = phase1.skipped_info("sample.prior=dip")
  else:
    pd_model, pd_params, p1 = phase1.train(cfg, lr_m, workdir, show_progress)
  t1 = time.time()
  hr, kernel, p2 = phase2.run(cfg, pd_model, pd_params, lr_m, prep.fixed, workdir,
                              fingerprint_parts=(phase1.fingerprint(cfg, lr_m),),
                              show_progress=show_progress)
  t2 = time.time()
  return write_outputs(prep, cfg, hr, kernel, {**p1, "seconds": round(t1 - t0, 2)},
                       {**p2, "seconds": round(t2 - t1, 2)}, method)
