"""Tests for ``kfjax.resize`` against a per-pixel reference and hand-derived weights."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfjax import resize


@pytest.fixture
def x64():
  """Float64 JAX for one test, without changing the setting for other test files."""
  with jax.enable_x64(True):
    yield


# Keys cubic (a = -0.5) at the four distances met when upscaling ×2:
#   cubic(0.25) = 1.5/64 - 2.5/16 + 1                  =  0.8671875
#   cubic(0.75) = 1.5*27/64 - 2.5*9/16 + 1             =  0.2265625
#   cubic(1.25) = -0.5*125/64 + 2.5*25/16 - 5 + 2      = -0.0703125
#   cubic(1.75) = -0.5*343/64 + 2.5*49/16 - 7 + 2      = -0.0234375
# They sum to 1, so no renormalisation happens.
C025, C075, C125, C175 = 0.8671875, 0.2265625, -0.0703125, -0.0234375


def _ref_cubic(x):
  x = abs(x)
  if x <= 1:
    return 1.5 * x**3 - 2.5 * x**2 + 1
  if x <= 2:
    return -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2
  return 0.0


def _ref_mirror(k, n):
  """1-based index ``k`` reflected into ``1..n`` with the edge repeated (0 -> 1, n+1 -> n)."""
  while not 1 <= k <= n:
    k = 1 - k if k < 1 else 2 * n + 1 - k
  return k


def _ref_taps(n, j, s):
  """``[(0-based input index, weight)]`` for 1-based output ``j``, straight from MATLAB."""
  u = j / s + 0.5 * (1 - 1 / s)
  width = 4 / s if s < 1 else 4
  h = (lambda x: s * _ref_cubic(s * x)) if s < 1 else _ref_cubic
  ks = range(math.floor(u - width / 2), math.ceil(u + width / 2) + 1)
  ws = [h(u - k) for k in ks]
  total = sum(ws)
  return [(_ref_mirror(k, n) - 1, w / total) for k, w in zip(ks, ws)]


def _ref_imresize(img, out_shape, scales):
  """Every output pixel summed from its own 2-D tap list (``img`` is ``(H, W)``)."""
  (n_h, n_w), (m_h, m_w) = img.shape, out_shape
  out = np.zeros(out_shape)
  for i in range(m_h):
    taps_h = _ref_taps(n_h, i + 1, scales[0])
    for j in range(m_w):
      taps_w = _ref_taps(n_w, j + 1, scales[1])
      out[i, j] = sum(wh * ww * img[p, q] for p, wh in taps_h for q, ww in taps_w)
  return out


@pytest.mark.parametrize("shape,scale", [
    ((5, 7), 2), ((6, 4), 3), ((3, 5), 4),  # up
    ((10, 13), 1 / 2), ((16, 9), 1 / 4), ((20, 17), 0.37),  # down
])
def test_scale_matches_reference(shape, scale):
  img = np.random.default_rng(0).normal(size=shape)
  got = resize.imresize_np(img, scale=scale)
  out_shape = tuple(math.ceil(n * scale) for n in shape)
  assert got.shape == out_shape
  np.testing.assert_allclose(got, _ref_imresize(img, out_shape, (scale, scale)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("in_shape,out_shape", [((15, 30), (7, 11)), ((4, 6), (7, 11)), ((9, 5), (3, 12))])
def test_output_shape_matches_reference(in_shape, out_shape):
  img = np.random.default_rng(1).normal(size=in_shape)
  scales = tuple(m / n for n, m in zip(in_shape, out_shape))
  got = resize.imresize_np(img, output_shape=out_shape)
  np.testing.assert_allclose(got, _ref_imresize(img, out_shape, scales), rtol=0, atol=1e-12)


def test_channels_resized_independently():
  img = np.random.default_rng(2).normal(size=(6, 5, 3))
  got = resize.imresize_np(img, scale=2)
  for c in range(3):
    np.testing.assert_allclose(got[..., c], resize.imresize_np(img[..., c], scale=2), atol=1e-14)


def test_scale_or_shape_exactly_one():
  with pytest.raises(ValueError):
    resize.imresize_np(np.zeros((4, 4)))
  with pytest.raises(ValueError):
    resize.imresize_np(np.zeros((4, 4)), scale=2, output_shape=(8, 8))


def test_up2_weights_by_hand():
  # ×2, 0-based: output i sits at input c = (i + 0.5)/2 - 0.5 = i/2 - 0.25.
  #   i = 2m:   c = m - 0.25, taps m-2..m+1 at distances 1.75, 0.75, 0.25, 1.25
  #   i = 2m+1: c = m + 0.25, taps m-1..m+2 at distances 1.25, 0.25, 0.75, 1.75
  mat = resize.resize_matrix(8, 16)
  even = [C175, C075, C025, C125]
  odd = [C125, C025, C075, C175]
  assert even == [-0.0234375, 0.2265625, 0.8671875, -0.0703125]
  for m in (2, 3, 4, 5):
    np.testing.assert_array_equal(mat[2 * m, m - 2:m + 2], even)
    np.testing.assert_array_equal(mat[2 * m + 1, m - 1:m + 3], odd)
    assert np.count_nonzero(mat[2 * m]) == 4 and np.count_nonzero(mat[2 * m + 1]) == 4
  # Row 0: taps -2, -1, 0, 1; symmetric padding sends -1 -> 0 and -2 -> 1, so
  #   col 0 = 0.2265625 + 0.8671875 = 1.09375,  col 1 = -0.0234375 - 0.0703125 = -0.09375.
  np.testing.assert_array_equal(mat[0, :3], [1.09375, -0.09375, 0])
  np.testing.assert_array_equal(mat[-1, -3:], [0, -0.09375, 1.09375])


def test_up2_two_pixels_by_hand():
  # n = 2, m = 4. Rows 0 and 3 as in test_up2_weights_by_hand. Row 1 (m = 0, odd):
  # taps -1, 0, 1, 2 with [C125, C025, C075, C175]; -1 -> 0 and 2 -> 1, so
  # col 0 = -0.0703125 + 0.8671875 = 0.796875, col 1 = 0.2265625 - 0.0234375 = 0.203125.
  # Row 2 (m = 1, even): taps -1..2 with [C175, C075, C025, C125] -> [0.203125, 0.796875].
  expected = [[1.09375, -0.09375], [0.796875, 0.203125], [0.203125, 0.796875], [-0.09375, 1.09375]]
  np.testing.assert_array_equal(resize.resize_matrix(2, 4), expected)
  # Hence a 1×2 image [0, 1] ×2 gives rows of [-0.09375, 0.203125, 0.796875, 1.09375]
  # (the single row just repeats: with n = 1 every tap mirrors onto it).
  got = resize.imresize_np(np.array([[0.0, 1.0]]), scale=2)
  np.testing.assert_array_equal(got, [[-0.09375, 0.203125, 0.796875, 1.09375]] * 2)


def test_down2_weights_by_hand():
  # ÷2 with antialiasing: h(x) = cubic(x/2)/2, support 8. Output i (0-based) sits at
  # input c = 2i + 0.5; taps 2i-3 .. 2i+4 at distances ±3.5, ±2.5, ±1.5, ±0.5, i.e.
  # cubic(1.75)/2, cubic(1.25)/2, cubic(0.75)/2, cubic(0.25)/2 — summing to 1:
  w35, w25, w15, w05 = C175 / 2, C125 / 2, C075 / 2, C025 / 2
  assert (w35, w25, w15, w05) == (-0.01171875, -0.03515625, 0.11328125, 0.43359375)
  mat = resize.resize_matrix(16, 8)
  interior = [w35, w25, w15, w05, w05, w15, w25, w35]
  for i in (2, 3, 4, 5):
    np.testing.assert_array_equal(mat[i, 2 * i - 3:2 * i + 5], interior)
    assert np.count_nonzero(mat[i]) == 8
  # Row 0: taps -3..4; -1 -> 0, -2 -> 1, -3 -> 2:
  #   col 0 = w05 + w15 = 0.546875     col 1 = w05 + w25 = 0.3984375
  #   col 2 = w15 + w35 = 0.1015625    col 3 = w25 = -0.03515625    col 4 = w35 = -0.01171875
  np.testing.assert_array_equal(
      mat[0, :6], [0.546875, 0.3984375, 0.1015625, -0.03515625, -0.01171875, 0])
  np.testing.assert_array_equal(mat[-1, ::-1][:6], mat[0, :6])


@pytest.mark.parametrize("n,m,scale", [(8, 16, None), (9, 27, None), (16, 8, None), (20, 8, 0.37),
                                       (5, 13, None), (3, 1, None), (1, 4, None)])
def test_rows_sum_to_one(n, m, scale):
  np.testing.assert_allclose(resize.resize_matrix(n, m, scale).sum(axis=1), 1, atol=1e-13)


@pytest.mark.parametrize("scale", [2, 3, 4, 1 / 2, 1 / 3, 0.37])
def test_constant_stays_constant(scale):
  got = resize.imresize_np(np.full((12, 10, 2), 3.25), scale=scale)
  np.testing.assert_allclose(got, 3.25, rtol=0, atol=1e-13)


@pytest.mark.parametrize("s", [2, 3, 4])
def test_ramp_stays_linear_inside(s):
  # Keys' kernel reproduces linear functions: sum_k cubic(u - k) * k = u whenever all four
  # taps are in range. Output j (1-based) maps to u = j/s + 0.5*(1 - 1/s), so a ramp
  # x[k] = a*k + b (1-based k) must become a*u + b away from the borders.
  n = 10
  ramp = 0.7 * np.arange(1, n + 1) - 2.0
  got = resize.imresize_np(np.tile(ramp[:, None], (1, 3)), scale=s)[:, 0]
  u = np.arange(1, n * s + 1) / s + 0.5 * (1 - 1 / s)
  inside = (u - 2 >= 1) & (u + 2 <= n)
  assert inside.sum() >= n * s // 2
  np.testing.assert_allclose(got[inside], 0.7 * u[inside] - 2.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("out_shape,scale", [((20, 28), None), ((3, 4), None), ((7, 11), None),
                                             ((30, 42), 3), ((4, 6), 0.37)])
def test_jax_matches_numpy(out_shape, scale):
  img = np.random.default_rng(3).uniform(size=(10, 14, 3)).astype(np.float32)
  got = resize.imresize(jnp.asarray(img), out_shape, scale=scale)
  assert got.dtype == jnp.float32 and got.shape == (*out_shape, 3)
  if scale is None:
    want = resize.imresize_np(img, output_shape=out_shape)
  else:
    want = resize.imresize_np(img, scale=scale)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_jax_float64_exact(x64):
  img = np.random.default_rng(4).normal(size=(9, 6, 2))
  got = resize.imresize(jnp.asarray(img), (4, 13))
  np.testing.assert_allclose(np.asarray(got), resize.imresize_np(img, output_shape=(4, 13)),
                             rtol=0, atol=1e-13)


def test_jax_batch_jit_vmap_grad():
  x = jnp.asarray(np.random.default_rng(5).uniform(size=(2, 3, 8, 6, 3)), jnp.float32)
  want = np.stack([[resize.imresize_np(np.asarray(xi), output_shape=(5, 9)) for xi in xb]
                   for xb in x])
  f = jax.jit(lambda y: resize.imresize(y, (5, 9)))
  np.testing.assert_allclose(np.asarray(f(x)), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.vmap(f)(x)), want, atol=1e-5)
  g = jax.grad(lambda y: resize.imresize(y, (5, 9)).sum())(x)
  assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g)))
  # d(sum)/dx = column sums of the matrices: sum_o M_h[o, p] * sum_q M_w[q, r].
  mh, mw = resize.resize_matrix(8, 5), resize.resize_matrix(6, 9)
  want_g = np.outer(mh.sum(0), mw.sum(0))[..., None]
  np.testing.assert_allclose(np.asarray(g), np.broadcast_to(want_g, x.shape), atol=1e-5)


@pytest.mark.parametrize("s", [2, 3, 4])
def test_upscale_downscale_wrappers(s, x64):
  img = np.random.default_rng(6).uniform(size=(7, 10, 3))
  up = resize.upscale(jnp.asarray(img)[None], s)
  assert up.shape == (1, 7 * s, 10 * s, 3)
  np.testing.assert_allclose(np.asarray(up[0]), resize.imresize_np(img, scale=s), atol=1e-12)
  down = resize.downscale_bicubic(jnp.asarray(img), s)
  assert down.shape == (-(-7 // s), -(-10 // s), 3)
  np.testing.assert_allclose(np.asarray(down), resize.imresize_np(img, scale=1 / s), atol=1e-12)
