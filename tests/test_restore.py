"""The TV-regularised non-blind solver (kfjax.restore) against direct NumPy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfjax import degrade
from kfjax.bench import kernels
from kfjax.bench import metrics
from kfjax import resize
from kfjax import restore


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _pads_np(size, scale, ksize):
  """Padding of degrade's convention, recomputed: offset o = (s − K)//2 of the first tap."""
  off = (scale - ksize) // 2
  out = -(-size // scale)
  return max(0, -off), max(0, scale * (out - 1) + off + ksize - size), max(0, off), out


def _numpy_loss_and_grad(x, y, k, s, lam, eps):
  """``mean(((x*k)↓s − y)²) + λ·mean(sqrt(|∇x|² + ε²))`` and its gradient, by hand."""
  h, w, c = x.shape
  ksize = k.shape[0]
  lo_h, hi_h, skip_h, oh = _pads_np(h, s, ksize)
  lo_w, hi_w, skip_w, ow = _pads_np(w, s, ksize)
  rows = np.pad(np.arange(h), (lo_h, hi_h), mode="symmetric")[skip_h:]
  cols = np.pad(np.arange(w), (lo_w, hi_w), mode="symmetric")[skip_w:]
  xp = x[rows][:, cols]
  kf = k[::-1, ::-1]
  pred = np.zeros((oh, ow, c))
  for u in range(ksize):
    for v in range(ksize):
      pred += kf[u, v] * xp[u:u + s * oh:s, v:v + s * ow:s][:oh, :ow]
  r = pred - y
  data = np.mean(r ** 2)
  # Adjoint: scatter the residual back through the taps, then fold the padding.
  g_res = 2.0 * r / r.size
  gxp = np.zeros_like(xp)
  for u in range(ksize):
    for v in range(ksize):
      gxp[u:u + s * oh:s, v:v + s * ow:s][:oh, :ow] += kf[u, v] * g_res
  gx = np.zeros_like(x)
  np.add.at(gx, (rows[:, None], cols[None, :]), gxp)
  # TV: forward differences, zero past the last row/column, channels coupled.
  dh = np.zeros_like(x)
  dw = np.zeros_like(x)
  dh[:-1] = x[1:] - x[:-1]
  dw[:, :-1] = x[:, 1:] - x[:, :-1]
  mag = np.sqrt((dh ** 2 + dw ** 2).sum(-1) + eps ** 2)
  tv = mag.mean()
  gh = lam * dh / mag[..., None] / mag.size
  gw = lam * dw / mag[..., None] / mag.size
  gtv = np.zeros_like(x)
  gtv[:-1] -= gh[:-1]
  gtv[1:] += gh[:-1]
  gtv[:, :-1] -= gw[:, :-1]
  gtv[:, 1:] += gw[:, :-1]
  return data + lam * tv, gx + gtv


@pytest.mark.parametrize("s,ksize,h,w", [(2, 12, 14, 10), (3, 7, 12, 13), (4, 24, 16, 20)])
def test_loss_and_gradient_match_numpy(x64, s, ksize, h, w):
  rng = np.random.default_rng(ksize)
  x = rng.uniform(0, 1, (h, w, 3))
  k = kernels.make_kernel("aniso_gaussian", ksize, s, seed=1).astype(np.float64)
  y = rng.uniform(0, 1, (-(-h // s), -(-w // s), 3))
  lam, eps = 0.3, 0.05
  want, want_g = _numpy_loss_and_grad(x, y, k, s, lam, eps)
  got, got_g = jax.value_and_grad(restore.loss)(jnp.asarray(x), jnp.asarray(y), jnp.asarray(k),
                                                s, lam, eps)
  np.testing.assert_allclose(float(got), want, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(got_g), want_g, rtol=1e-10, atol=1e-15)


def test_solver_recovers_an_image_the_data_determines():
  # A smooth image degraded by a small blur: minimising the loss must bring the estimate
  # far closer to the truth than its bicubic start, and lower the loss monotonically on
  # average (Adam, cosine schedule).
  yy, xx = np.mgrid[0:48, 0:48] / 48.0
  hr = np.stack([0.5 + 0.4 * np.sin(3 * xx + 2 * yy), 0.5 + 0.3 * np.cos(4 * yy),
                 0.4 + 0.3 * xx], -1)
  k = kernels.make_kernel("gaussian", 12, 2, seed=0)
  lr = degrade.downscale_np(hr, k, 2).astype(np.float32)
  start = np.asarray(resize.upscale(jnp.asarray(lr), 2))
  x, values = restore.solve(lr, k, 2, weight=1e-5, steps=300)
  values = np.asarray(values)
  assert values[-1] < 0.2 * values[0]
  assert values[-50:].mean() < values[:50].mean()
  psnr_start = metrics.psnr(start, hr, crop=4)
  psnr_end = metrics.psnr(np.asarray(x), hr, crop=4)
  assert psnr_end > psnr_start + 3.0, (psnr_start, psnr_end)
  assert np.asarray(x).min() >= 0.0 and np.asarray(x).max() <= 1.0


def test_weight_scales_with_the_square_of_the_factor():
  assert restore.weight_at(1e-4, 2) == pytest.approx(1e-4)
  assert restore.weight_at(1e-4, 4) == pytest.approx(4e-4)
  assert restore.weight_at(1e-4, 3) == pytest.approx(2.25e-4)


def test_x_init_must_match_the_scale():
  lr = np.zeros((8, 8, 3), np.float32)
  with pytest.raises(ValueError, match="not 2x"):
    restore.solve(lr, np.ones((4, 4)) / 16, 2, 1e-4, steps=2, x_init=np.zeros((15, 16, 3)))
