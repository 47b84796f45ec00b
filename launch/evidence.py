"""Issue-2 evidence: blind kfjax vs bicubic vs non-blind on real photos and known kernels.

    python launch/evidence.py --out evidence/ [--config cpu] [--photos chelsea,astronaut,coffee]
        [--kernels aniso_gaussian,motion,lshape] [--scale 2] [--hr_size 256]

For every photo (a centred ``hr_size``² crop of a scikit-image photo) and kernel family
(seed 0 of the kfjax kernel zoo, K = 6·s), degrades with kfjax's operator, trains PD once,
runs Phase 2 blind and with the true kernel (non-blind), and reports kernel NCC (max over
±3 px shifts), PSNR of SR / bicubic / non-blind SR against the true HR (8-px border crop).
Rows are appended to ``results.csv`` as cases finish (re-running skips finished cases) and
``results.md`` is rewritten each time.
"""

import csv
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax.numpy as jnp
import numpy as np
import skimage.data

from kfjax import config as config_lib
from kfjax import io as kio
from kfjax import kernels
from kfjax import metrics
from kfjax import pipeline
from kfjax import resize
from kfjax.models import kernel_net

_OUT = flags.DEFINE_string("out", "evidence", "Output folder.")
_CONFIG = flags.DEFINE_string("config", "cpu", "Preset name.")
_PHOTOS = flags.DEFINE_list("photos", ["chelsea", "astronaut", "coffee"], "skimage.data photos.")
_KERNELS = flags.DEFINE_list("kernels", ["aniso_gaussian", "motion", "lshape"], "Kernel families.")
_SCALE = flags.DEFINE_integer("scale", 2, "Scale factor.")
_HR = flags.DEFINE_integer("hr_size", 256, "Side of the HR crop.")
_OVERRIDES = flags.DEFINE_multi_string("set", [], "Config overrides field=value (python literal).")

FIELDS = ["photo", "kernel", "scale", "preset", "ncc", "kernel_psnr", "psnr_sr", "psnr_bicubic",
          "psnr_nonblind", "seconds_phase1", "seconds_blind", "seconds_nonblind"]


def hr_crop(name, size):
  img = getattr(skimage.data, name)()
  if img.ndim == 2:
    img = img[..., None]
  h, w = img.shape[:2]
  y, x = (h - size) // 2, (w - size) // 2
  return img[y:y + size, x:x + size, :3].astype(np.float64) / 255.0


def apply_overrides(cfg, overrides):
  import ast
  for item in overrides:
    key, value = item.split("=", 1)
    node = cfg
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = ast.literal_eval(value)


def write_markdown(rows, path):
  lines = ["| photo | kernel | kernel NCC | SR PSNR | bicubic PSNR | non-blind PSNR | s (P1/blind/non-blind) |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['photo']} | {r['kernel']} | {float(r['ncc']):.3f} | {float(r['psnr_sr']):.2f} | "
                 f"{float(r['psnr_bicubic']):.2f} | {float(r['psnr_nonblind']):.2f} | "
                 f"{float(r['seconds_phase1']):.0f}/{float(r['seconds_blind']):.0f}/"
                 f"{float(r['seconds_nonblind']):.0f} |")
  if rows:
    mean = lambda k: np.mean([float(r[k]) for r in rows])
    lines.append(f"| **mean** | | {mean('ncc'):.3f} | {mean('psnr_sr'):.2f} | "
                 f"{mean('psnr_bicubic'):.2f} | {mean('psnr_nonblind'):.2f} | |")
  kio.save_text_atomic(path, "\n".join(lines) + "\n")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  os.makedirs(_OUT.value, exist_ok=True)
  csv_path = os.path.join(_OUT.value, "results.csv")
  rows = list(csv.DictReader(open(csv_path))) if os.path.exists(csv_path) else []
  done = {(r["photo"], r["kernel"], int(r["scale"]), r["preset"]) for r in rows}
  s = _SCALE.value
  photos, kerns = _PHOTOS.value, _KERNELS.value
  # Diagonal order: the first len(photos) cases already cover every photo and every kernel.
  cases = sorted(((p, k) for p in photos for k in kerns),
                 key=lambda c: ((photos.index(c[0]) - kerns.index(c[1])) % len(kerns),
                                photos.index(c[0])))
  for photo, kname in cases:
    if (photo, kname, s, _CONFIG.value) in done:
      continue
    cfg = config_lib.preset(_CONFIG.value)
    cfg.scale = s
    apply_overrides(cfg, _OVERRIDES.value)
    hr = hr_crop(photo, _HR.value)
    k = kernels.make_kernel(kname, size=6 * s, scale=s, seed=0)
    # Quantised to 8 bits, as the LR photo a user has would be.
    lr = (np.round(kernels.degrade_image(hr, k, s) * 255.0) / 255.0).astype(np.float32)
    case_dir = os.path.join(_OUT.value, f"{photo}_{kname}_x{s}")
    kio.save_image(os.path.join(case_dir, "lr.png"), lr)
    kio.save_image(os.path.join(case_dir, "hr.png"), hr)
    np.save(os.path.join(case_dir, "kernel_true.npy"), k)
    lr_m = lr * 2 - 1
    t0 = time.time()
    model, params, _ = pipeline.train_phase1(cfg, lr_m, os.path.join(case_dir, "work"))
    t1 = time.time()
    hr_b, k_b, _ = pipeline.run_phase2(cfg, model, params, lr_m, s)
    t2 = time.time()
    hr_n, _, _ = pipeline.run_phase2(cfg, model, params, lr_m, s, fixed_kernel=k)
    t3 = time.time()
    sr = np.clip((hr_b + 1) / 2, 0, 1)
    srn = np.clip((hr_n + 1) / 2, 0, 1)
    k_b = kernel_net.export_kernel(k_b)
    bic = np.clip(np.asarray(resize.upscale(jnp.asarray(lr), s)), 0, 1)
    kio.save_image(os.path.join(case_dir, "sr.png"), sr)
    kio.save_image(os.path.join(case_dir, "sr_nonblind.png"), srn)
    kio.save_image(os.path.join(case_dir, "bicubic.png"), bic)
    np.save(os.path.join(case_dir, "kernel_est.npy"), k_b)
    kio.save_image(os.path.join(case_dir, "kernels.png"), np.concatenate(
        [kio.kernel_to_image(k, 192), np.ones((192, 8, 1)), kio.kernel_to_image(k_b, 192)], 1))
    row = dict(photo=photo, kernel=kname, scale=s, preset=cfg.name,
               ncc=metrics.kernel_ncc(k_b, k), kernel_psnr=metrics.kernel_psnr(k_b, k),
               psnr_sr=metrics.psnr(sr, hr, crop=8), psnr_bicubic=metrics.psnr(bic, hr, crop=8),
               psnr_nonblind=metrics.psnr(srn, hr, crop=8), seconds_phase1=t1 - t0,
               seconds_blind=t2 - t1, seconds_nonblind=t3 - t2)
    print({k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
    rows.append({k_: str(v) for k_, v in row.items()})
    new = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as f:
      w = csv.DictWriter(f, FIELDS)
      if new:
        w.writeheader()
      w.writerow(row)
    write_markdown(rows, os.path.join(_OUT.value, "results.md"))


if __name__ == "__main__":
  sys.exit(app.run(main))
