"""Tests for the image and kernel metrics, against independent references."""

import numpy as np
import pytest
from scipy import ndimage
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from kfjax.bench import kernels, metrics


def _image(shape, seed=0, smooth=1.5):
  """A smooth random image in [0, 1]."""
  rng = np.random.default_rng(seed)
  sigma = (smooth, smooth) + (0,) * (len(shape) - 2)
  x = ndimage.gaussian_filter(rng.random(shape), sigma)
  return (x - x.min()) / (x.max() - x.min())


def _noisy(a, sigma, seed=1):
  rng = np.random.default_rng(seed)
  return np.clip(a + sigma * rng.standard_normal(a.shape), 0, 1)


def _embed(k, size, oy, ox):
  """``k`` placed at ``(oy, ox)`` in a zero ``size x size`` grid."""
  out = np.zeros((size, size))
  out[oy:oy + k.shape[0], ox:ox + k.shape[1]] = k
  return out


@pytest.mark.parametrize("shape", [(40, 36, 3), (40, 36)])
def test_psnr_references(shape):
  a = _image(shape)
  b = _noisy(a, 0.05)
  ref = peak_signal_noise_ratio(a, b, data_range=1.0)
  assert metrics.psnr(a, b) == pytest.approx(ref, abs=1e-10)
  hand = 20 * np.log10(1.0 / np.sqrt(((a - b) ** 2).mean()))
  assert metrics.psnr(a, b) == pytest.approx(hand, abs=1e-10)
  c = peak_signal_noise_ratio(a[4:-4, 4:-4], b[4:-4, 4:-4], data_range=1.0)
  assert metrics.psnr(a, b, crop=4) == pytest.approx(c, abs=1e-10)
  assert metrics.psnr(255 * a, 255 * b, data_range=255) == pytest.approx(ref, abs=1e-9)
  assert metrics.psnr(a, a) == np.inf
  with pytest.raises(ValueError):
    metrics.psnr(a, b[:-1])


def test_y_psnr_references():
  a = _image((32, 30, 3), 2)
  b = _noisy(a, 0.04)
  ya, yb = rgb2ycbcr(a)[..., 0] / 255, rgb2ycbcr(b)[..., 0] / 255
  ref = 10 * np.log10(1 / ((ya[3:-3, 3:-3] - yb[3:-3, 3:-3]) ** 2).mean())
  assert metrics.y_psnr(a, b, crop=3) == pytest.approx(ref, abs=1e-9)
  np.testing.assert_allclose(metrics.rgb_to_y(a), ya, atol=1e-12)
  g = a[..., 0]
  assert metrics.y_psnr(g, b[..., 0]) == metrics.psnr(g, b[..., 0])
  assert metrics.y_psnr(g[..., None], b[..., :1]) == metrics.psnr(g, b[..., 0])


@pytest.mark.parametrize("shape", [(48, 44, 3), (48, 44)])
def test_ssim(shape):
  a = _image(shape)
  assert metrics.ssim(a, a) == pytest.approx(1.0)
  s1, s2 = metrics.ssim(a, _noisy(a, 0.02)), metrics.ssim(a, _noisy(a, 0.1))
  assert 1.0 > s1 > s2
  b = _noisy(a, 0.05)
  axis = -1 if len(shape) == 3 else None
  ref = structural_similarity(a[2:-2, 2:-2], b[2:-2, 2:-2], channel_axis=axis,
                              data_range=1.0)
  assert metrics.ssim(a, b, crop=2) == pytest.approx(ref)


def test_shift_psnr_finds_known_shift():
  x = _image((60, 60, 3), 3)
  a = x[5:-5, 5:-5]
  b = x[7:-3, 4:-6]  # a[i, j] = b[i - 2, j + 1]
  val, (dy, dx) = metrics.shift_psnr(a, b, max_shift=3, return_shift=True)
  assert val == np.inf and (dy, dx) == (-2, 1)
  assert metrics.shift_psnr(a, b, max_shift=1) < 40
  # With a crop too, the shift is still found.
  assert metrics.shift_psnr(a, b, max_shift=2, crop=3, return_shift=True)[1] == (-2, 1)


def test_shift_psnr_zero_shift_is_psnr():
  a = _image((50, 46, 3), 4, smooth=1.0)
  b = _noisy(a, 0.03)
  assert metrics.shift_psnr(a, b, max_shift=0) == pytest.approx(metrics.psnr(a, b))
  val, shift = metrics.shift_psnr(a, b, max_shift=2, crop=1, return_shift=True)
  assert shift == (0, 0)
  assert val == pytest.approx(metrics.psnr(a, b, crop=3))


def test_kernel_ncc_invariances():
  k = kernels.motion(12, 2, 0)
  other = kernels.lshape(12, 2, 0)
  assert metrics.kernel_ncc(k, k) == pytest.approx(1.0)
  # Integer shift (exact copies at different places of a larger grid).
  k1, k2 = _embed(k, 20, 4, 4), _embed(k, 20, 6, 3)
  assert metrics.kernel_ncc(k1, k2) == pytest.approx(1.0)
  assert metrics.kernel_ncc(k1, k2, max_shift=1) < 0.99
  # Zero-padding, either side, either parity.
  assert metrics.kernel_ncc(np.pad(k, 3), k) == pytest.approx(1.0)
  assert metrics.kernel_ncc(k, np.pad(k, ((1, 2), (2, 1)))) == pytest.approx(1.0)
  base = metrics.kernel_ncc(other, k)
  padded = np.pad(other, ((0, 1), (1, 0)))
  assert metrics.kernel_ncc(padded, k) == pytest.approx(base, abs=0.02)
  # Scaling.
  assert metrics.kernel_ncc(5 * other, 0.1 * k) == pytest.approx(base)
  # Different kernels.
  assert -1 <= base < 0.9
  assert metrics.kernel_ncc(kernels.disk(12, 2, 0, radius=1.0),
                            kernels.aniso_gaussian(12, 2, 0, 2.0, 0.5, 0.0)) < 0.9


def test_kernel_ncc_is_pearson():
  a = kernels.gaussian(12, 2, 1)
  b = kernels.div2krk(12, 2, 1)
  ref = np.corrcoef(a.ravel(), b.ravel())[0, 1]
  # Same size, no shift: plain Pearson over the grid; shifts can only raise it.
  assert metrics.kernel_ncc(a, b, max_shift=0) == pytest.approx(ref)
  assert metrics.kernel_ncc(a, b) >= ref - 1e-12


def test_kernel_psnr():
  k = kernels.multilobe(12, 2, 0)
  est = kernels.gaussian(12, 2, 0)
  assert metrics.kernel_psnr(k, k) == np.inf
  base = metrics.kernel_psnr(est, k)
  hand = 10 * np.log10(k.max() ** 2 / ((est - k) ** 2).mean())
  assert base == pytest.approx(hand)
  # Padding the estimate (any parity) and shifting either kernel change nothing.
  assert metrics.kernel_psnr(np.pad(est, ((2, 5), (3, 4))), k) == pytest.approx(base)
  assert metrics.kernel_psnr(_embed(est, 16, 3, 1), k) == pytest.approx(base)
  rolled = np.roll(k, (1, -2), (0, 1))
  assert metrics.kernel_psnr(est, rolled) == pytest.approx(base, abs=1e-6)
  assert metrics.kernel_psnr(3 * est, k) == pytest.approx(base)
  # Closer estimates score higher; data_range=1 is the FKP convention.
  assert metrics.kernel_psnr(0.5 * (est + k), k) > base
  fkp = 20 * np.log10(1 / np.sqrt(((est - k) ** 2).mean()))
  assert metrics.kernel_psnr(est, k, data_range=1.0) == pytest.approx(fkp)


# -- sub-pixel aligned PSNR and kernel width ---------------------------------------------------

def _smooth_field(dy=0.0, dx=0.0, n=64):
  """An analytic, band-limited colour image sampled at ``(i − dy, j − dx)``."""
  i, j = np.mgrid[0:n, 0:n].astype(np.float64)
  i, j = i - dy, j - dx
  return np.stack([0.5 + 0.3 * np.sin(0.31 * i + 0.17 * j), 0.5 + 0.25 * np.cos(0.23 * j - 0.11 * i),
                   0.5 + 0.2 * np.sin(0.19 * (i + j))], -1)


@pytest.mark.parametrize("dy,dx", [(0.375, -0.25), (-1.125, 0.5), (0.0, 0.875)])
def test_subpixel_psnr_finds_a_known_fractional_shift(dy, dx):
  a = _smooth_field()
  b = _smooth_field(dy, dx)   # b[i + dy, j + dx] = f(i, j) = a[i, j]
  value, shift = metrics.subpixel_psnr(a, b, crop=2, return_shift=True)
  assert shift == pytest.approx((dy, dx), abs=1e-9)
  assert value > 45.0
  # Unaligned, the same pair is far worse; the integer search cannot fix a fraction.
  assert metrics.psnr(a, b, crop=4) < value - 15
  assert metrics.shift_psnr(a, b, crop=2) < value - 10


def test_subpixel_psnr_at_zero_shift_is_plain_psnr_on_the_same_pixels():
  rng = np.random.default_rng(0)
  a = rng.uniform(size=(40, 40, 3))
  b = np.clip(a + 0.01 * rng.normal(size=a.shape), 0, 1)
  value, shift = metrics.subpixel_psnr(a, b, max_shift=1.0, crop=3, return_shift=True)
  assert shift == (0.0, 0.0)     # white noise: any displacement decorrelates
  assert value == pytest.approx(metrics.psnr(a, b, crop=3 + 2), abs=1e-9)


def test_kernel_covariance_of_a_gaussian():
  # A fine-grid anisotropic Gaussian: its discrete second moments are the covariance used
  # to draw it (numerical check with NumPy's own weighted covariance).
  cov = np.array([[4.0, 1.2], [1.2, 2.5]])
  r = np.arange(41) - 20.0
  yy, xx = np.meshgrid(r, r, indexing="ij")
  pts = np.stack([yy.ravel(), xx.ravel()], -1)
  k = np.exp(-0.5 * np.einsum("ni,ij,nj->n", pts, np.linalg.inv(cov), pts)).reshape(41, 41)
  np.testing.assert_allclose(metrics.kernel_covariance(k), cov, rtol=1e-6)
  np.testing.assert_allclose(metrics.kernel_covariance(k),
                             np.cov(pts.T, aweights=k.ravel(), bias=True), rtol=1e-12)


def test_kernel_width_ratio():
  k1 = kernels.gaussian(24, 4, sigma=1.5)
  k2 = kernels.gaussian(24, 4, sigma=3.0)
  assert metrics.kernel_width_ratio(k1, k1) == pytest.approx(1.0)
  assert metrics.kernel_width_ratio(k2, k1) == pytest.approx(2.0, rel=0.02)
  assert metrics.kernel_width_ratio(k1, k2) == pytest.approx(0.5, rel=0.02)
  # A shifted copy has the same width.
  assert metrics.kernel_width_ratio(np.roll(k1, 2, axis=1), k1) == pytest.approx(1.0, rel=1e-6)
