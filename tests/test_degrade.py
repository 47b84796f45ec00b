"""Tests for ``kfjax.degrade`` against SciPy and against hand-derived properties.

Reference derivation (SciPy side). ``scipy.ndimage.convolve(x, k, mode="reflect")``
centres the kernel on tap ``K//2``: with a delta image one finds (1-D form)::

    full[n] = sum_m k[m] * x[n + K//2 - m]

The module's docstring defines the LR pixel ``i`` as the blur centred on HR coordinate
``s*i + (s-1)/2`` with the kernel's centre at ``(K-1)/2``, i.e. (same parity of K, s)::

    y[i] = sum_m k[m] * x[s*i + (s-1)/2 + (K-1)/2 - m] = full[s*i + (s-1)/2 + (K-1)/2 - K//2]

odd K:  full[s*i + (s-1)/2]        even K:  full[s*i + s/2 - 1]

When the parities differ the docstring's index form (``o = (s-K)//2``) rounds the half
pixel down, giving ``full[s*i + (s-K)//2 + K - 1 - K//2]`` (equal to the above when the
parities agree), which is what :func:`_ref_index` returns.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from kfjax import degrade


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _ref_index(s, ksize):
  """HR index (offset at LR 0) of the SciPy full-resolution output kept for LR pixel 0."""
  if (ksize - s) % 2 == 0:
    two_off = (s - 1) + (ksize - 1) - 2 * (ksize // 2)  # twice the offset; always even here
    assert two_off % 2 == 0
    return two_off // 2
  return (s - ksize) // 2 + ksize - 1 - ksize // 2


def _ref_downscale(x, k, s):
  """SciPy reference for one (H, W, C) image, any H, W (pre-pads so no index leaves)."""
  x = np.asarray(x, np.float64)
  h, w, c = x.shape
  ksize = k.shape[0]
  pad = ksize + s
  # Pre-pad symmetrically so that every full-res output we keep lies inside the image
  # SciPy convolves; the pad is wide enough that SciPy's own border never reaches them.
  xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")
  off = _ref_index(s, ksize)
  oh, ow = -(-h // s), -(-w // s)
  out = np.empty((oh, ow, c))
  for ch in range(c):
    full = ndi.convolve(xp[..., ch], k, mode="reflect")
    rows = pad + s * np.arange(oh) + off
    cols = pad + s * np.arange(ow) + off
    out[..., ch] = full[np.ix_(rows, cols)]
  return out


# One compile per (shape, K, s); faster than op-by-op dispatch of the unjitted function.
_down = jax.jit(degrade.downscale, static_argnums=2)


def _rand_kernel(rng, ksize):
  k = rng.random((ksize, ksize)) + 0.1
  return k / k.sum()


@pytest.mark.parametrize("s,ksize", [(2, 4), (2, 8), (3, 3), (3, 9), (4, 4), (4, 6),
                                     (2, 3), (3, 4), (4, 5),
                                     (3, 1), (4, 2), (4, 1)])  # K < s: first rows skipped
def test_matches_scipy_divisible(x64, s, ksize):
  """H, W multiples of s: SciPy's own reflect border is the convention, no pre-pad."""
  rng = np.random.default_rng(100 * s + ksize)
  h, w = 4 * s, 5 * s
  x = rng.normal(size=(h, w, 2))
  k = _rand_kernel(rng, ksize)
  off = _ref_index(s, ksize)
  ref = np.stack([ndi.convolve(x[..., c], k, mode="reflect")[off::s, off::s] for c in range(2)],
                 -1)
  got = np.asarray(_down(x, k, s))
  assert got.dtype == np.float64
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("s,ksize,h,w", [(2, 4, 13, 11), (2, 6, 7, 10), (3, 3, 13, 11),
                                         (3, 9, 7, 10), (4, 8, 13, 11), (2, 5, 7, 10),
                                         (3, 4, 13, 11),
                                         (2, 8, 3, 5)])  # kernel wider than the image
def test_matches_scipy_any_size(x64, s, ksize, h, w):
  rng = np.random.default_rng(7 * s + ksize + h)
  x = rng.normal(size=(h, w, 3))
  k = _rand_kernel(rng, ksize)
  got = np.asarray(_down(x, k, s))
  np.testing.assert_allclose(got, _ref_downscale(x, k, s), rtol=0, atol=1e-12)


@pytest.mark.parametrize("s,ksize", [(3, 5), (2, 3)])
def test_numpy_twin_matches(x64, s, ksize):
  rng = np.random.default_rng(s * ksize)
  x = rng.normal(size=(2, 11, 9, 3))
  k = _rand_kernel(rng, ksize)
  np.testing.assert_allclose(np.asarray(_down(x, k, s)),
                             degrade.downscale_np(x, k, s), rtol=0, atol=1e-12)


@pytest.mark.parametrize("ksize", [1, 5])
def test_delta_identity(x64, ksize):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(9, 7, 3))
  k = np.zeros((ksize, ksize))
  k[ksize // 2, ksize // 2] = 1.0
  got = np.asarray(_down(x, k, 1))
  np.testing.assert_allclose(got, x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("s", [1, 2, 3, 4])
@pytest.mark.parametrize("h,w", [(8, 8), (9, 13), (1, 5), (17, 3)])
def test_output_shape(s, h, w):
  k = jax.ShapeDtypeStruct((2 * s, 2 * s), jnp.float32)
  y = jax.eval_shape(lambda xx, kk: degrade.downscale(xx, kk, s),
                     jax.ShapeDtypeStruct((h, w, 3), jnp.float32), k)
  assert y.shape == (-(-h // s), -(-w // s), 3)


def test_batch_axes(x64):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 3, 10, 9, 3))
  k = _rand_kernel(rng, 6)
  got = np.asarray(_down(x, k, 3))
  assert got.shape == (2, 3, 4, 3, 3)
  for a in range(2):
    for b in range(3):
      one = np.asarray(_down(x[a, b], k, 3))
      np.testing.assert_allclose(got[a, b], one, rtol=0, atol=1e-12)


def test_gradients_finite_differences(x64):
  """Central differences of a scalar loss, for both the image and the kernel."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(6, 5, 1))
  k = _rand_kernel(rng, 3)
  wts = rng.normal(size=(2, 2, 1))
  loss = jax.jit(lambda xx, kk: jnp.sum(degrade.downscale(xx, kk, 3) * wts))
  gx, gk = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(k))
  eps = 1e-6
  for arr, g, argnum in ((x, gx, 0), (k, gk, 1)):
    num = np.zeros_like(arr)
    for idx in np.ndindex(arr.shape):
      hi, lo = arr.copy(), arr.copy()
      hi[idx] += eps
      lo[idx] -= eps
      args_hi = [x, k]
      args_lo = [x, k]
      args_hi[argnum], args_lo[argnum] = hi, lo
      num[idx] = (float(loss(*map(jnp.asarray, args_hi))) -
                  float(loss(*map(jnp.asarray, args_lo)))) / (2 * eps)
    np.testing.assert_allclose(np.asarray(g), num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("s,ksize", [(2, 6), (3, 5), (3, 4)])
def test_constant_preserved(x64, s, ksize):
  yy, xx = np.meshgrid(np.arange(ksize), np.arange(ksize), indexing="ij")
  c = (ksize - 1) / 2
  k = np.exp(-((yy - c) ** 2 + (xx - c) ** 2) / 3.0)
  k /= k.sum()
  x = np.full((11, 10, 3), 0.37)
  y = np.asarray(_down(x, k, s))
  np.testing.assert_allclose(y, 0.37, rtol=0, atol=1e-12)


@pytest.mark.parametrize("s,ksize", [(2, 4), (3, 9), (4, 8)])
def test_centred_kernel_no_shift(x64, s, ksize):
  """Same parity: a centred symmetric kernel on a linear ramp gives the ramp sampled at
  the LR centres ``s*i + (s-1)/2`` (interior pixels, away from the border)."""
  yy, xx = np.meshgrid(np.arange(ksize), np.arange(ksize), indexing="ij")
  c = (ksize - 1) / 2
  k = np.exp(-((yy - c) ** 2 + (xx - c) ** 2) / 4.0)
  k /= k.sum()
  h = 8 * s
  ramp = np.arange(h, dtype=np.float64)
  x = np.broadcast_to((ramp[:, None] + 10 * ramp[None, :])[..., None], (h, h, 1)).copy()
  y = np.asarray(_down(x, k, s))[..., 0]
  centres = s * np.arange(h // s) + (s - 1) / 2
  expect = centres[:, None] + 10 * centres[None, :]
  m = -(-ksize // s)  # LR pixels touched by the border
  np.testing.assert_allclose(y[m:-m, m:-m], expect[m:-m, m:-m], rtol=0, atol=1e-10)


def test_matlab_phase_box_average(x64):
  """s = 2 with a 2×2 box: LR[i, j] is the mean of HR[2i:2i+2, 2j:2j+2]."""
  rng = np.random.default_rng(4)
  x = rng.normal(size=(10, 8, 3))
  k = np.full((2, 2), 0.25)
  y = np.asarray(_down(x, k, 2))
  expect = x.reshape(5, 2, 4, 2, 3).mean(axis=(1, 3))
  np.testing.assert_allclose(y, expect, rtol=0, atol=1e-12)


def test_float32_dtype():
  y = degrade.downscale(jnp.ones((6, 6, 3), jnp.float32), np.full((2, 2), 0.25), 2)
  assert y.dtype == jnp.float32


def test_rejects_non_square_kernel():
  with pytest.raises(ValueError):
    degrade.downscale(jnp.ones((6, 6, 1)), jnp.ones((2, 3)), 2)


def _downscale_strided(x, kernel, scale):
  """The plain formulation: one strided K×K convolution of the padded planes."""
  *lead, h, w, c = x.shape
  ksize = kernel.shape[0]
  lo_h, hi_h, skip_h, out_h = degrade._pads(h, scale, ksize)
  lo_w, hi_w, skip_w, out_w = degrade._pads(w, scale, ksize)
  planes = jnp.moveaxis(x.reshape((-1, h, w, c)), -1, 1).reshape((-1, h, w, 1))
  planes = jnp.pad(planes, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)), mode="symmetric")
  y = jax.lax.conv_general_dilated(
      planes[:, skip_h:, skip_w:], kernel[::-1, ::-1, None, None], (scale, scale), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))[:, :out_h, :out_w, 0]
  return jnp.moveaxis(y.reshape((-1, c, out_h, out_w)), 1, -1).reshape((*lead, out_h, out_w, c))


@pytest.mark.parametrize("s,ksize,h,w", [(2, 12, 20, 18), (4, 24, 23, 17), (3, 5, 10, 13),
                                         (2, 3, 9, 8), (4, 2, 9, 10)])
def test_gradients_match_plain_formulation(x64, s, ksize, h, w):
  """The polyphase convolution's gradients (image and kernel) equal those of the strided one."""
  rng = np.random.default_rng(s + ksize + h)
  x = jnp.asarray(rng.normal(size=(2, h, w, 3)))
  k = jnp.asarray(_rand_kernel(rng, ksize))
  target = jnp.asarray(rng.normal(size=(2, -(-h // s), -(-w // s), 3)))

  def grads(f):
    return jax.jit(jax.grad(lambda xx, kk: jnp.sum((f(xx, kk, s) - target) ** 2),
                            argnums=(0, 1)))(x, k)

  (gx, gk), (rx, rk) = grads(degrade.downscale), grads(_downscale_strided)
  assert float(jnp.abs(rk).max()) > 1e-3
  np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=0, atol=1e-10)
  np.testing.assert_allclose(np.asarray(gk), np.asarray(rk), rtol=0, atol=1e-10)
