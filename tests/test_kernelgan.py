"""KernelGAN (``kfjax.kernelgan``) and ``--method kernelgan`` (issue 5), smoke-sized."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from kfjax import config as config_lib
from kfjax import degrade
from kfjax import io as kio
from kfjax import kernelgan
from kfjax.models import kernel_net

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _gaussian(size, sigma):
  r = np.arange(size) - (size - 1) / 2
  k = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2))
  return k / k.sum()


@pytest.fixture(scope="module")
def trained(lr_image):
  cfg = config_lib.preset("smoke")
  raw, info, (model, chunk, state) = kernelgan.train(cfg, lr_image, 2, show_progress=False)
  return dict(cfg=cfg, raw=raw, info=info, model=model, chunk=chunk, state=state)


def test_training_traces_once_and_runs_every_iteration(trained):
  cfg = trained["cfg"]
  assert cfg.kernelgan.iterations // cfg.kernelgan.steps_per_chunk >= 2  # chunk called twice
  assert trained["chunk"]._cache_size() == 1
  assert int(trained["state"].it) == cfg.kernelgan.iterations
  info = trained["info"]
  assert info["iterations"] == cfg.kernelgan.iterations and info["scale_trained"] == 2
  assert all(np.isfinite(v) for v in info["final"].values())


def test_generator_kernel_is_what_it_does_to_images(trained, lr_image):
  """G's explicit kernel (trained parameters) equals G applied to images under the
  project's degradation convention."""
  model, params = trained["model"], trained["state"].g_params
  k = model.kernel(params)
  assert k.shape == (model.gen.ksize,) * 2 == (6, 6)  # smoke G: field 5, even K at x2
  np.testing.assert_allclose(np.asarray(k), trained["raw"], atol=1e-6)
  x = jnp.asarray(lr_image)[None]
  y_g = model.gen.apply(params, x, method=model.gen.downscale_layers)
  np.testing.assert_allclose(np.asarray(y_g), np.asarray(degrade.downscale(x, k, 2)),
                             atol=2e-5)


def test_estimate_kernel_is_valid(trained, lr_image, monkeypatch):
  """The exported kernel of the trained G (training itself is the fixture's)."""
  out = (trained["raw"], dict(trained["info"]), None)
  monkeypatch.setattr(kernelgan, "train", lambda *a, **kw: out)
  k, info = kernelgan.estimate_kernel(lr_image, 2, trained["cfg"], show_progress=False)
  assert k.dtype == np.float32 and k.shape == (6, 6)
  assert np.all(np.isfinite(k)) and k.min() >= 0 and abs(float(k.sum()) - 1.0) < 1e-5
  assert info["kernel_size"] == 6 and info["seconds"] >= 0


def test_x4_kernel_is_the_x2_kernel_composed(monkeypatch, lr_image):
  """At ×4, G is trained at ×2 and its kernel composed with itself (no retraining here)."""
  k2 = np.random.default_rng(0).random((6, 6)).astype(np.float32)
  k2[0, :] = k2[:, 0] = 0   # outside smoke G's 5-px field in its 6-px grid (pads before it)
  seen = {}

  def fake_train(cfg, image, scale_g, show_progress=True, workdir=None):
    seen["scale_g"] = scale_g
    return k2, {"iterations": 0}, None
  monkeypatch.setattr(kernelgan, "train", fake_train)
  cfg = config_lib.preset("smoke")
  k4, info = kernelgan.estimate_kernel(lr_image, 4, cfg, False)
  assert seen["scale_g"] == 2 and k4.shape == (16, 16) and info["kernel_size"] == 16
  # Pixel-centred G (the default): composed first, then moved 1.5 px to the ×4 grid's
  # centre, with one half-pixel blur (variance +1/4 per axis, not +5/4).
  k2n = k2 / k2.sum()
  composed = kernelgan.compose_x2(k2n)
  expect = kernelgan.recentre(np.pad(composed[1:, 1:], ((0, 1), (0, 1))))
  np.testing.assert_allclose(k4, expect / expect.sum(), atol=1e-6)
  r2, r4 = np.arange(6), np.arange(16)
  mean2 = (k2n.sum(1) * r2).sum()
  mean4 = (k4.sum(1) * r4).sum()
  assert mean4 == pytest.approx(3 * mean2 - 1.5, abs=1e-5)      # centred as the ×4 grid wants
  var2 = (k2n.sum(1) * (r2 - mean2) ** 2).sum()
  var4 = (k4.sum(1) * (r4 - mean4) ** 2).sum()
  assert var4 == pytest.approx(5 * var2 + 0.25, abs=1e-4)
  cfg.kernelgan.centre = "grid"
  k4, _ = kernelgan.estimate_kernel(lr_image, 4, cfg, False)
  expect = kernelgan.compose_x2(k2 / k2.sum())
  np.testing.assert_allclose(k4, expect / expect.sum(), atol=1e-6)


def test_bicubic_kernel_is_matlab_bicubic_centred_on_a_pixel():
  """MATLAB's ÷2 bicubic (``cubic(d/2)``, |d| < 4) sampled at whole-pixel distances:
  −1, 0, 9, 16, 9, 0, −1 (/32) around index K/2, so that output pixel i of
  ``degrade.downscale`` is centred on input pixel 2i, as a pixel-centred G's is."""
  w = np.zeros(14)
  w[4:11] = np.array([-1, 0, 9, 16, 9, 0, -1]) / 32.0
  kb = kernelgan.bicubic_kernel(14, 2)
  np.testing.assert_allclose(kb, np.outer(w, w), atol=1e-7)
  x = np.random.default_rng(3).normal(size=(40, 44, 2))
  y = degrade.downscale_np(x, kb, 2)
  taps = np.array([-1, 0, 9, 16, 9, 0, -1]) / 32.0
  ref = np.zeros((12, 14, 2))
  for i in range(12):
    for j in range(14):
      patch = x[2 * (i + 2) - 3:2 * (i + 2) + 4, 2 * (j + 2) - 3:2 * (j + 2) + 4]
      ref[i, j] = np.einsum("a,b,abc->c", taps, taps, patch)
  np.testing.assert_allclose(y[2:14, 2:16], ref, atol=1e-12)


def test_recentre_moves_a_field_centred_kernel_half_a_pixel_to_the_grid_centre():
  k = np.zeros((14, 14))
  k[1:, 1:] = _gaussian(13, 1.7) * np.linspace(1, 2, 13)[:, None]   # field rows/cols 1-13
  out = kernelgan.recentre(k)
  assert out.shape == (14, 14) and abs(out.sum() - k.sum()) < 1e-12
  centroid = lambda a: np.array([(np.arange(14)[:, None] * a).sum(), (np.arange(14) * a).sum()]) / a.sum()
  np.testing.assert_allclose(centroid(out), centroid(k) - 0.5, atol=1e-12)
  sym = np.zeros((14, 14))
  sym[1:, 1:] = _gaussian(13, 1.3)              # symmetric about the field centre (7, 7)
  out = kernelgan.recentre(sym)
  np.testing.assert_allclose(out, out[::-1, ::-1], atol=1e-15)   # … now about (6.5, 6.5)


def test_pixel_centred_g_is_regularised_around_its_field_centre():
  """A G that is a delta at its field's centre (its start) pays no centring cost when
  trained pixel-centred, and half a pixel's worth in both axes when centred on the grid."""
  cfg = config_lib.preset("smoke")
  assert kernelgan.pixel_centred(cfg.kernelgan, 2)
  assert not kernelgan.pixel_centred(cfg.kernelgan, 3)      # odd grid: the field's own centre
  pixel = kernelgan.KernelGAN(cfg, (20, 24, 3), 2)
  cfg.kernelgan.centre = "grid"
  grid = kernelgan.KernelGAN(cfg, (20, 24, 3), 2)
  assert pixel.pixel and not grid.pixel
  delta = jnp.zeros((6, 6)).at[3, 3].set(1.0)   # smoke G's 5-px field occupies rows/cols 1-5
  regs_p = kernelgan.regularisers(pixel.regularised(delta), pixel.mask)
  regs_g = kernelgan.regularisers(grid.regularised(delta), grid.mask)
  assert float(regs_p["centralized"]) < 1e-12 and float(regs_p["boundaries"]) == 0
  assert float(regs_g["centralized"]) == pytest.approx(0.25)
  # A grid too small for the 7 taps keeps the symmetric part: smoke's 6 px hold d = −2 … 2.
  np.testing.assert_allclose(pixel.bic_kernel[3, 1:], np.array([0, 9, 16, 9, 0]) / 34 * 16 / 34,
                             atol=1e-7)
  assert float(pixel.bic_kernel[0].sum()) == 0


@pytest.mark.parametrize("size", [6, 12])
def test_compose_x2_equals_downscaling_twice(size):
  """``downscale(x, compose_x2(k), 4) == downscale(downscale(x, k, 2), k, 2)`` on the
  interior (borders differ: the intermediate image's symmetric padding is not the
  downscaled padding of ``x``)."""
  rng = np.random.default_rng(size)
  k = rng.random((size, size)) * _gaussian(size, size / 4)
  k /= k.sum()
  x = rng.normal(size=(72, 80, 2))
  twice = degrade.downscale_np(degrade.downscale_np(x, k, 2), k, 2)
  k4 = kernelgan.compose_x2(k)
  assert k4.shape == (3 * size - 2,) * 2 and abs(k4.sum() - 1) < 1e-12
  once = degrade.downscale_np(x, k4, 4)
  assert once.shape == twice.shape == (18, 20, 2)
  m = -(-size // 2)  # LR4 pixels whose footprint reaches the border
  np.testing.assert_allclose(once[m:-m, m:-m], twice[m:-m, m:-m], atol=1e-10)
  assert np.abs(once - twice).max() > 1e-6  # the borders do differ


def test_regularisers_and_schedule():
  mask = kernelgan.boundary_mask(14)
  assert mask.shape == (14, 14) and mask.min() == 0 and np.all(mask[5:9, 5:9] == 0)
  assert mask[0, 0] > mask[0, 7] > 0
  delta = jnp.zeros((14, 14)).at[6:8, 6:8].set(0.25)
  regs = kernelgan.regularisers(delta, jnp.asarray(mask))
  assert float(regs["sum2one"]) < 1e-6 and float(regs["boundaries"]) == 0
  assert float(regs["centralized"]) < 1e-10
  kc = config_lib.base_config().kernelgan
  early, late = kernelgan.lambdas(kc, jnp.asarray(0)), kernelgan.lambdas(kc, jnp.asarray(450))
  assert float(early["bicubic"]) == 5 and float(early["sparse"]) == 0
  assert float(late["sparse"]) == 5 and float(late["centralized"]) == 1
  assert float(late["bicubic"]) == pytest.approx(5e-4)  # /100 at 200, again at 400


def test_image_too_small_is_a_clear_error():
  from kfjax.errors import KfjaxError
  cfg = config_lib.preset("smoke")
  cfg.kernelgan.d_kernel = 9
  with pytest.raises(KfjaxError, match="too small for KernelGAN"):
    kernelgan.KernelGAN(cfg, (16, 16, 3), 2)


# -- command line -----------------------------------------------------------------------------

def _cli(*args):
  return subprocess.run([sys.executable, "-m", "kfjax.main", *args], capture_output=True,
                        text=True, env=ENV, timeout=600)


@pytest.fixture(scope="module")
def lr_png(tmp_path_factory, lr_image):
  path = str(tmp_path_factory.mktemp("img") / "lr.png")
  kio.save_image(path, lr_image[:20, :24])
  return path


def test_cli_method_kernelgan_writes_every_output(lr_png, tmp_path):
  wd = str(tmp_path / "out")
  res = _cli("--image", lr_png, "--config", "smoke", "--workdir", wd, "--quiet",
             "--method", "kernelgan")
  assert res.returncode == 0, res.stderr[-3000:]
  for name in ("sr.png", "kernel.npy", "kernel.png", "bicubic.png", "config.json",
               "summary.json"):
    assert os.path.exists(os.path.join(wd, name)), name
  sr, _ = kio.load_image(os.path.join(wd, "sr.png"))
  assert sr.shape == (40, 48, 3)
  k = np.load(os.path.join(wd, "kernel.npy"))
  assert k.shape == (6, 6) and k.min() >= 0 and abs(float(k.sum()) - 1) < 1e-5
  summary = json.load(open(os.path.join(wd, "summary.json")))
  assert summary["method"] == "kernelgan" and summary["mode"] == "nonblind"
  assert summary["kernelgan"]["seconds"] > 0 and summary["kernelgan"]["iterations"] == 4
  assert summary["kernel_size"] == 6
  assert kernel_net.export_kernel(k).shape == (6, 6)


@pytest.mark.parametrize("args,needle", [
    (["--config.kernel.net=foo"], "kernel.net must be one of"),
    (["--method", "kernelgan", "--kernel", "{k}"], "exclude each other"),
    (["--config.sample.prior=gan"], "sample.prior"),
])
def test_cli_bad_option_is_one_line_exit_2(lr_png, tmp_path, args, needle):
  k = str(tmp_path / "k.npy")
  np.save(k, _gaussian(12, 1.0))
  args = [a.format(k=k) for a in args]
  res = _cli("--image", lr_png, "--config", "smoke", "--workdir", str(tmp_path / "wd"),
             "--quiet", *args)
  assert res.returncode == 2, res.stderr[-2000:]
  assert "Traceback" not in res.stderr
  lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and needle in lines[0], res.stderr
