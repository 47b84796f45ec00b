"""The README's quick-start picture and numbers, from a finished run on the shipped example.

    python -m kfjax.main --image examples/chelsea_x2_lr.png --scale 2 --workdir out/chelsea
    python examples/quickstart_figure.py --workdir out/chelsea --out docs/quickstart.png

Draws the same crop of the true HR image, the bicubic upscale and kfjax's SR image, and the
true kernel beside the estimated one; prints PSNR (plain and sub-pixel aligned, 8-px border)
for bicubic and SR, and the kernel's NCC and width ratio against the truth.
"""

import argparse
import os
import sys

import numpy as np

from kfjax import io as kio
from kfjax.bench import metrics

HERE = os.path.dirname(os.path.abspath(__file__))


def numbers(hr, bicubic, sr, k_true, k_est, border=8):
  return {
      "bicubic_psnr": metrics.psnr(bicubic, hr, crop=border),
      "bicubic_aligned_psnr": metrics.subpixel_psnr(bicubic, hr, crop=border),
      "sr_psnr": metrics.psnr(sr, hr, crop=border),
      "sr_aligned_psnr": metrics.subpixel_psnr(sr, hr, crop=border),
      "kernel_ncc": metrics.kernel_ncc(k_est, k_true),
      "kernel_width": metrics.kernel_width_ratio(k_est, k_true),
  }


def figure(hr, bicubic, sr, k_true, k_est, values, path, crop=96):
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  h, w = hr.shape[:2]
  size = min(crop, h, w)
  y0, x0 = (h - size) // 2, (w - size) // 2
  box = lambda im: np.clip(im[y0:y0 + size, x0:x0 + size], 0, 1)
  panels = [("true HR", box(hr)),
            (f"bicubic\n{values['bicubic_psnr']:.2f} dB", box(bicubic)),
            (f"kfjax SR\n{values['sr_psnr']:.2f} dB", box(sr))]
  fig, axes = plt.subplots(1, 5, figsize=(12.5, 2.9),
                           gridspec_kw={"width_ratios": [1, 1, 1, 0.6, 0.6]})
  for ax, (name, im) in zip(axes, panels):
    ax.imshow(im, interpolation="nearest")
    ax.set_title(name, fontsize=9)
  for ax, (name, k) in zip(axes[3:], [("true kernel", k_true),
                                      (f"estimated\nNCC {values['kernel_ncc']:.2f}, "
                                       f"width ×{values['kernel_width']:.2f}", k_est)]):
    ax.imshow(k / k.max(), cmap="magma", interpolation="nearest")
    ax.set_title(name, fontsize=9)
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=100)
  os.replace(tmp, path)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="the run's --workdir")
  ap.add_argument("--out", default="docs/quickstart.png")
  args = ap.parse_args(argv)
  files = {"sr": os.path.join(args.workdir, "sr.png"),
           "bicubic": os.path.join(args.workdir, "bicubic.png"),
           "kernel": os.path.join(args.workdir, "kernel.npy")}
  missing = [p for p in files.values() if not os.path.exists(p)]
  if missing:
    sys.exit(f"quickstart_figure: {missing[0]} not found; run the quick start first")
  hr = kio.load_image(os.path.join(HERE, "chelsea_x2_hr.png"))[0].astype(np.float64)
  k_true = np.load(os.path.join(HERE, "chelsea_x2_kernel.npy")).astype(np.float64)
  sr = kio.load_image(files["sr"])[0].astype(np.float64)
  bicubic = kio.load_image(files["bicubic"])[0].astype(np.float64)
  k_est = np.load(files["kernel"]).astype(np.float64)
  if sr.shape != hr.shape:
    sys.exit(f"quickstart_figure: {files['sr']} is {sr.shape}, not the example's {hr.shape}")
  values = numbers(hr, bicubic, sr, k_true, k_est)
  figure(hr, bicubic, sr, k_true, k_est, values, args.out)
  print(f"bicubic {values['bicubic_psnr']:.2f} dB (aligned {values['bicubic_aligned_psnr']:.2f}); "
        f"SR {values['sr_psnr']:.2f} dB (aligned {values['sr_aligned_psnr']:.2f}); kernel NCC "
        f"{values['kernel_ncc']:.3f}, width x{values['kernel_width']:.2f}; figure: {args.out}")


if __name__ == "__main__":
  main()
