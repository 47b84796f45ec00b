"""The README's quick-start figure script (examples/quickstart_figure.py)."""

import os
import subprocess
import sys

import numpy as np

from kfjax import io as kio
from kfjax import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "quickstart_figure.py")


def test_figure_and_numbers_from_a_workdir(tmp_path):
  hr = kio.load_image(os.path.join(ROOT, "examples", "chelsea_x2_hr.png"))[0].astype(np.float64)
  rng = np.random.default_rng(0)
  sr = np.clip(hr + 0.02 * rng.normal(size=hr.shape), 0, 1)
  wd = tmp_path / "run"
  wd.mkdir()
  kio.save_image(str(wd / "sr.png"), sr)
  kio.save_image(str(wd / "bicubic.png"), np.roll(hr, 1, axis=1))
  k_true = np.load(os.path.join(ROOT, "examples", "chelsea_x2_kernel.npy"))
  np.save(wd / "kernel.npy", np.roll(k_true, 1, axis=0))
  out = str(tmp_path / "fig.png")
  res = subprocess.run([sys.executable, SCRIPT, "--workdir", str(wd), "--out", out],
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  assert kio.load_image(out)[0].shape[1] > 1000
  sr8 = kio.load_image(str(wd / "sr.png"))[0]
  want = metrics.psnr(sr8, hr, crop=8)
  assert f"SR {want:.2f} dB" in res.stdout
  assert "kernel NCC 1.000, width x1.00" in res.stdout   # a shifted copy of the truth


def test_missing_run_gives_one_line(tmp_path):
  res = subprocess.run([sys.executable, SCRIPT, "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
  assert res.returncode != 0 and "run the quick start first" in res.stderr
  assert "Traceback" not in res.stderr
