"""Tests for the kernel zoo and ``degrade_image``."""

import numpy as np
import pytest
from scipy import ndimage

from kfjax import degrade
from kfjax.bench import kernels
from kfjax.errors import KfjaxError

NAMES = sorted(kernels.KERNELS)


def _ring(k):
  """Mass in the outer one-pixel ring."""
  return k.sum() - k[1:-1, 1:-1].sum()


def _moments(k):
  """Covariance ``[[yy, yx], [xy, xx]]`` of a kernel about its mass centre."""
  c = np.arange(k.shape[0]) - (k.shape[0] - 1) / 2
  y, x = np.meshgrid(c, c, indexing="ij")
  my, mx = (k * y).sum(), (k * x).sum()
  dy, dx = y - my, x - mx
  return np.array([[(k * dy * dy).sum(), (k * dy * dx).sum()],
                   [(k * dy * dx).sum(), (k * dx * dx).sum()]])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scale", [2, 4])
def test_valid_centred_and_inside(name, scale):
  size = 6 * scale
  for seed in range(10):
    k = kernels.make_kernel(name, size, scale, seed)
    assert k.shape == (size, size) and k.dtype == np.float64
    assert k.min() >= 0 and abs(k.sum() - 1) < 1e-12
    assert np.abs(kernels.kernel_center_of_mass(k)).max() < 1e-6
    # DIV2KRK's own width range reaches the border of a 12-px grid at x2 (documented).
    limit = 0.04 if (name == "div2krk" and scale == 2) else 0.01
    assert _ring(k) < limit, (seed, _ring(k))


def test_div2krk_narrower_range_fits_at_x2():
  for seed in range(10):
    assert _ring(kernels.div2krk(12, 2, seed, var_range=(0.35, 3.0))) < 0.01


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_and_seeded(name):
  f = kernels.KERNELS[name]
  a = f(16, 3, 5)
  np.testing.assert_array_equal(a, f(16, 3, 5))
  np.testing.assert_array_equal(a, f(16, 3, np.random.default_rng(5)))
  assert not np.allclose(a, f(16, 3, 6))


def test_fixing_one_param_keeps_other_draws():
  a = kernels.aniso_gaussian(16, 2, 3)
  b = kernels.aniso_gaussian(16, 2, 3, sigma1=1.7)
  c = kernels.aniso_gaussian(16, 2, 3, sigma1=1.7, sigma2=0.6)
  assert not np.allclose(a, b)
  # Same theta and sigma2 draws: equal to the fully specified kernel with them.
  rng = np.random.default_rng(3)
  rng.uniform(), rng.uniform()
  theta = rng.uniform(0, np.pi)
  np.testing.assert_allclose(c, kernels.aniso_gaussian(16, 2, 0, 1.7, 0.6, theta))


def test_gaussian_width():
  k = kernels.gaussian(24, 4, 0, sigma=2.0)
  np.testing.assert_allclose(_moments(k), 4.0 * np.eye(2), atol=2e-3)


def test_aniso_gaussian_orientation():
  along_x = _moments(kernels.aniso_gaussian(24, 4, 0, sigma1=2.5, sigma2=1.0, theta=0.0))
  np.testing.assert_allclose(along_x, np.diag([1.0, 6.25]), atol=2e-2)
  diag = _moments(kernels.aniso_gaussian(24, 4, 0, sigma1=2.5, sigma2=1.0,
                                         theta=np.pi / 4))
  assert diag[0, 1] > 2.0  # elongated along y = x (y down): positive correlation


def test_div2krk_lambdas_are_variances():
  k = kernels.div2krk(24, 4, 0, lambda1=5.0, lambda2=1.0, theta=np.pi / 2, noise=0.0)
  np.testing.assert_allclose(_moments(k), np.diag([5.0, 1.0]), atol=2e-2)
  noisy = kernels.div2krk(24, 4, 0, lambda1=5.0, lambda2=1.0, theta=np.pi / 2)
  assert not np.allclose(noisy, k)


def test_solid_and_hollow_square_exact():
  k = kernels.solid_square(12, 2, 0, side=4.0)
  ref = np.zeros((12, 12))
  ref[4:8, 4:8] = 1 / 16
  np.testing.assert_allclose(k, ref, atol=1e-15)
  k = kernels.hollow_square(12, 2, 0, side=6.0, thickness=1.0)
  ref = np.zeros((12, 12))
  ref[3:9, 3:9] = 1 / 20
  ref[4:8, 4:8] = 0
  np.testing.assert_allclose(k, ref, atol=1e-15)


def test_lshape_rotations_and_asymmetry():
  ks = [kernels.lshape(16, 2, 1, rotation=r) for r in range(4)]
  for r in range(4):
    np.testing.assert_allclose(ks[r], np.rot90(ks[0], r), atol=1e-15)
  assert not np.allclose(ks[0], ks[2])  # not point-symmetric
  # Second moments match the continuous L (bar [0,4]x[0,1] + foot [3,4]x[1,4]) plus
  # the box filter's 1/12 per axis (on average over sub-pixel placements; hence atol).
  k = kernels.lshape(16, 2, 0, height=4.0, width=4.0, thickness=1.0, rotation=0)
  t = (np.arange(2000) + 0.5) / 500
  y, x = np.meshgrid(t, t, indexing="ij")
  inside = (x <= 1) | (y >= 3)
  y, x = y[inside], x[inside]
  cov = np.cov(np.stack([y, x]), bias=True) + np.eye(2) / 12
  np.testing.assert_allclose(_moments(k), cov, atol=0.1)


def test_disk_radius():
  k = kernels.disk(24, 4, 0, radius=4.0)
  # Uniform disk: E[r^2] = R^2 / 2 (+ a pixel's 1/6 from the box, roughly).
  assert abs(np.trace(_moments(k)) - 8.0) < 0.3
  assert np.allclose(k, k.T) and np.allclose(k, k[::-1])


def test_motion_length():
  short = [np.trace(_moments(kernels.motion(24, 4, s, length=4.0))) for s in range(5)]
  long = [np.trace(_moments(kernels.motion(24, 4, s, length=14.0))) for s in range(5)]
  assert min(long) > max(short)
  # A straight-ish trail of length L has variance about L^2 / 12 along it.
  k = kernels.motion(48, 8, 0, length=20.0, turn=0.0, speed=0.0, blur=0.0)
  assert abs(np.linalg.eigvalsh(_moments(k))[-1] - 400 / 12) < 1.0


def test_multilobe_peaks():
  for lobes in (2, 3):
    k = kernels.multilobe(24, 4, 0, lobes=lobes, sigma=1.0, spread=4.0)
    peaks = (k == ndimage.maximum_filter(k, 3)) & (k > 1e-3)
    assert peaks.sum() == lobes


def test_make_kernel():
  k = kernels.make_kernel("gaussian", None, 3, 1, sigma=1.5)
  np.testing.assert_array_equal(k, kernels.gaussian(18, 3, 1, sigma=1.5))
  with pytest.raises(KfjaxError, match="unknown kernel"):
    kernels.make_kernel("nope", 12, 2)
  with pytest.raises(ValueError):
    kernels.gaussian(0, 2)


def test_center_of_mass():
  k = np.zeros((7, 7))
  k[0, 6] = 2.0
  assert kernels.kernel_center_of_mass(k) == (-3.0, 3.0)
  k = np.zeros((6, 6))
  k[2:4, 3] = 1.0
  assert kernels.kernel_center_of_mass(k) == (0.0, 0.5)


@pytest.mark.parametrize("scale,name", [(2, "motion"), (3, "lshape"), (4, "div2krk")])
def test_degrade_image_matches_jax_operator(scale, name):
  rng = np.random.default_rng(0)
  hr = rng.random((29, 34, 3))
  k = kernels.make_kernel(name, None, scale, 2)
  lr = kernels.degrade_image(hr, k, scale)
  ref = np.asarray(degrade.downscale(hr.astype(np.float32), k, scale))
  assert lr.dtype == np.float64 and lr.shape == ref.shape
  np.testing.assert_allclose(lr, ref, atol=1e-5)


def test_degrade_image_noise_and_clip():
  hr = np.full((64, 64, 1), 0.5)
  k = kernels.gaussian(12, 2, 0)
  clean = kernels.degrade_image(hr, k, 2)
  noisy = kernels.degrade_image(hr, k, 2, noise_sigma=0.05, seed=3)
  np.testing.assert_array_equal(noisy, kernels.degrade_image(hr, k, 2, 0.05, 3))
  assert abs((noisy - clean).std() - 0.05) < 0.005
  loud = kernels.degrade_image(hr, k, 2, noise_sigma=1.0)
  assert loud.min() == 0.0 and loud.max() == 1.0
  gray = kernels.degrade_image(hr[..., 0], k, 2)
  np.testing.assert_array_equal(gray, clean[..., 0])


# -- non-linear degradations --------------------------------------------------------------

def _photo(size=48, seed=0):
  rng = np.random.default_rng(seed)
  img = ndimage.gaussian_filter(rng.random((size, size, 3)), (2, 2, 0))
  img[:, size // 2:] += 0.3          # a vertical edge
  return np.clip(img, 0, 1)


def test_median_filter_matches_direct_window_median():
  img = _photo()
  out = kernels.median_filter(img, 5)
  for y, x in [(10, 10), (20, 31), (5, 40)]:
    for c in range(3):
      assert out[y, x, c] == np.median(img[y - 2:y + 3, x - 2:x + 3, c])


def test_bilateral_matches_direct_formula_at_interior_pixels():
  img = _photo()
  ss, sc = 1.5, 0.1
  out = kernels.bilateral_filter(img, ss, sc)
  r = int(np.ceil(2 * ss))
  yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
  for y, x in [(12, 12), (20, 23), (30, 25)]:
    win = img[y - r:y + r + 1, x - r:x + r + 1]
    dist = np.sqrt(((win - img[y, x]) ** 2).sum(-1))
    w = np.exp(-(yy ** 2 + xx ** 2) / (2 * ss ** 2)) * np.exp(-dist ** 2 / (2 * sc ** 2))
    ref = (w[..., None] * win).sum((0, 1)) / w.sum()
    np.testing.assert_allclose(out[y, x], ref, atol=1e-12)
  # Constant image unchanged; a large colour sigma turns it into a Gaussian blur.
  np.testing.assert_allclose(kernels.bilateral_filter(np.full((9, 9, 1), 0.3), 1.0, 0.1), 0.3)
  blur = kernels.bilateral_filter(img, ss, 1e6)
  g = np.exp(-(yy ** 2 + xx ** 2) / (2 * ss ** 2))
  ref = ndimage.convolve(img[..., 0], g / g.sum(), mode="mirror")
  np.testing.assert_allclose(blur[..., 0], ref, atol=1e-9)


def test_anisotropic_diffusion_large_kappa_is_heat_equation():
  img = _photo()
  out = kernels.anisotropic_diffusion(img, iterations=5, kappa=1e6, step=0.2)
  ref = img.copy()
  lap = np.array([[0, 0.2, 0], [0.2, 0.2, 0.2], [0, 0.2, 0]])
  for _ in range(5):
    ref = np.stack([ndimage.convolve(ref[..., c], lap, mode="nearest") for c in range(3)], -1)
  np.testing.assert_allclose(out, ref, atol=1e-10)


def test_anisotropic_diffusion_keeps_edges_and_mean():
  img = np.zeros((32, 32, 1))
  img[:, 16:] = 1.0
  rng = np.random.default_rng(0)
  noisy = img + 0.02 * rng.standard_normal(img.shape)
  pm = kernels.anisotropic_diffusion(noisy, iterations=20, kappa=0.1)
  heat = kernels.anisotropic_diffusion(noisy, iterations=20, kappa=1e6)
  assert abs(pm.mean() - noisy.mean()) < 1e-12       # zero-flux borders conserve mass
  assert pm[:, 15:17].std() > 0.45      # Perona-Malik keeps the edge sharp ...
  assert heat[:, 15:17].std() < 0.2      # ... where linear diffusion blurs it
  assert np.std(pm[:, :12] - 0) < np.std(noisy[:, :12])            # flat part smoothed
  with pytest.raises(ValueError):
    kernels.anisotropic_diffusion(img, 1, 0.1, step=0.3)


@pytest.mark.parametrize("name", sorted(kernels.NONLINEAR))
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_degrade_nonlinear_shape_seed_and_decimation(name, scale):
  hr = _photo(12 * scale)
  lr, params = kernels.degrade_nonlinear(hr, name, scale, seed=3)
  assert lr.shape == (12, 12, 3) and lr.min() >= 0 and lr.max() <= 1
  lr2, params2 = kernels.degrade_nonlinear(hr, name, scale, seed=3)
  np.testing.assert_array_equal(lr, lr2)
  assert params == params2
  assert kernels.degrade_nonlinear(hr, name, scale, seed=4)[1] != params
  gray, _ = kernels.degrade_nonlinear(hr[..., 0], name, scale, seed=3)
  assert gray.shape == (12, 12)


@pytest.mark.parametrize("scale", [2, 3])
def test_nonlinear_decimation_samples_the_operator_centre(scale):
  # A constant-gradient image is unchanged by every filter in the interior; the LR pixel
  # must then equal the ramp at s*i + (s-1)/2, the centre used by kfjax.degrade.
  n = 16 * scale
  ramp = np.tile(np.linspace(0, 1, n)[None, :, None], (n, 1, 1))
  filtered = kernels.median_filter(ramp, 3)
  lr = kernels._decimate(filtered, scale)
  centre = scale * np.arange(16) + (scale - 1) / 2
  np.testing.assert_allclose(lr[5, 2:-2, 0], np.interp(centre, np.arange(n),
                                                       np.linspace(0, 1, n))[2:-2], atol=1e-12)


def test_degrade_nonlinear_unknown_name():
  with pytest.raises(KfjaxError, match="unknown non-linear"):
    kernels.degrade_nonlinear(np.zeros((8, 8)), "sharpen", 2)
