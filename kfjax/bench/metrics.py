"""Image and kernel quality metrics (NumPy float64; images in [0, 1]).

Images are ``(H, W)`` or ``(H, W, C)``; ``crop`` removes that many pixels from every
border before measuring (the usual ``scale``-pixel SR border crop).
"""

import numpy as np
from skimage.metrics import structural_similarity

from kfjax.models import kernel_net


def _pair(a, b, crop=0):
  """Both images as float64, same shape, cropped by ``crop`` on every border."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
  if a.ndim not in (2, 3):
    raise ValueError(f"images must be (H, W) or (H, W, C), got {a.shape}")
  if crop:
    if 2 * crop >= min(a.shape[:2]):
      raise ValueError(f"crop {crop} leaves nothing of a {a.shape[:2]} image")
    a, b = a[crop:-crop, crop:-crop], b[crop:-crop, crop:-crop]
  return a, b


def _psnr_from_mse(mse, data_range):
  return float("inf") if mse == 0 else float(10.0 * np.log10(data_range ** 2 / mse))


def psnr(a, b, crop=0, data_range=1.0):
  """PSNR in dB over all pixels and channels (``inf`` for identical images)."""
  a, b = _pair(a, b, crop)
  return _psnr_from_mse(np.mean((a - b) ** 2), data_range)


def rgb_to_y(img):
  """BT.601 luma of RGB in [0, 1], as MATLAB ``rgb2ycbcr`` / SR papers:
  ``Y = 16/255 + (65.481 R + 128.553 G + 24.966 B) / 255`` (in [16/255, 235/255]).
  ``(H, W)`` and single-channel images are returned as they are (squeezed)."""
  img = np.asarray(img, np.float64)
  if img.ndim == 2:
    return img
  if img.shape[-1] == 1:
    return img[..., 0]
  if img.shape[-1] != 3:
    raise ValueError(f"expected 1 or 3 channels, got {img.shape}")
  return 16.0 / 255 + img @ np.array([65.481, 128.553, 24.966]) / 255.0


def y_psnr(a, b, crop=0):
  """PSNR of the BT.601 luma (:func:`rgb_to_y`), data range 1."""
  return psnr(rgb_to_y(a), rgb_to_y(b), crop)


def ssim(a, b, crop=0):
  """SSIM by ``skimage.metrics.structural_similarity`` (its defaults: 7x7 uniform
  window), ``data_range=1``, channels averaged for colour images."""
  a, b = _pair(a, b, crop)
  if a.ndim == 3 and a.shape[-1] == 1:
    a, b = a[..., 0], b[..., 0]
  axis = -1 if a.ndim == 3 else None
  return float(structural_similarity(a, b, channel_axis=axis, data_range=1.0))


def shift_psnr(a, b, max_shift=3, crop=0, data_range=1.0, return_shift=False):
  """Best PSNR over integer translations of ``b`` within ``±max_shift`` pixels.

  After the ``crop``, ``a`` loses ``max_shift`` more pixels on every border and is
  compared with the same-sized window of ``b`` displaced by ``(dy, dx)``, so every
  candidate uses the same pixels of ``a``: ``a[i, j]`` vs ``b[i + dy, j + dx]``. At
  ``(0, 0)`` this is ``psnr(a, b, crop + max_shift)``. With ``return_shift`` returns
  ``(psnr, (dy, dx))``.
  """
  a, b = _pair(a, b, crop)
  m = int(max_shift)
  h, w = a.shape[:2]
  if 2 * m >= min(h, w):
    raise ValueError(f"max_shift {m} leaves nothing of a {(h, w)} image")
  ref = a[m:h - m, m:w - m]
  best, arg = -np.inf, (0, 0)
  for dy in range(-m, m + 1):
    for dx in range(-m, m + 1):
      win = b[m + dy:h - m + dy, m + dx:w - m + dx]
      val = _psnr_from_mse(np.mean((ref - win) ** 2), data_range)
      # Ties (e.g. several exact matches) go to the smallest displacement.
      if val > best or (val == best and abs(dy) + abs(dx) < abs(arg[0]) + abs(arg[1])):
        best, arg = val, (dy, dx)
  return (best, arg) if return_shift else best


def subpixel_psnr(a, b, max_shift=2.0, step=0.125, crop=0, data_range=1.0,
                  return_shift=False):
  """Best PSNR over sub-pixel translations of ``b`` within ``±max_shift`` pixels.

  Blind SR cannot identify a global sub-pixel shift of its output (a kernel displaced by
  a fraction of a pixel explains the LR image as well), so a fair comparison aligns the
  SR image first. ``b`` is resampled at ``(i + dy, j + dx)`` by cubic-spline
  interpolation (``scipy.ndimage.shift``, order 3), for ``(dy, dx)`` first on a 0.5-px
  grid over the whole range, then refined around the best by halving the step down to
  ``step``. After the ``crop``, both lose ``ceil(max_shift) + 1`` more pixels on every
  border so every candidate is compared on the same pixels of ``a``. At ``(0, 0)`` this is
  ``psnr(a, b, crop + ceil(max_shift) + 1)``. With ``return_shift`` returns ``(psnr,
  (dy, dx))``, the displacement as in :func:`shift_psnr` (``a[i, j]`` ≈ ``b[i+dy, j+dx]``).
  """
  from scipy import ndimage  # noqa: PLC0415 (only this metric needs it)
  a, b = _pair(a, b, crop)
  m = int(np.ceil(max_shift)) + 1
  h, w = a.shape[:2]
  if 2 * m >= min(h, w):
    raise ValueError(f"max_shift {max_shift} leaves nothing of a {(h, w)} image")
  ref = a[m:h - m, m:w - m]
  # Each channel's spline coefficients once; the shifts then interpolate them directly.
  planes = [b] if b.ndim == 2 else [b[..., c] for c in range(b.shape[-1])]
  coeffs = [ndimage.spline_filter(p, order=3, mode="nearest") for p in planes]
  cache = {}

  def value(dy, dx):
    key = (round(dy, 9), round(dx, 9))
    if key not in cache:
      moved = [ndimage.shift(c, (-dy, -dx), order=3, mode="nearest", prefilter=False)
               for c in coeffs]
      moved = moved[0] if b.ndim == 2 else np.stack(moved, axis=-1)
      cache[key] = _psnr_from_mse(np.mean((ref - moved[m:h - m, m:w - m]) ** 2), data_range)
    return cache[key]

  def better(c, best):
    # Ties go to the smaller displacement.
    vc, vb = value(*c), value(*best)
    return vc > vb or (vc == vb and abs(c[0]) + abs(c[1]) < abs(best[0]) + abs(best[1]))

  h0 = 0.5
  grid = np.arange(-np.floor(max_shift / h0), np.floor(max_shift / h0) + 1) * h0
  best = (0.0, 0.0)
  for dy in grid:
    for dx in grid:
      if better((float(dy), float(dx)), best):
        best = (float(dy), float(dx))
  hstep = h0
  while hstep / 2 >= step - 1e-12:
    hstep /= 2
    centre = best
    for dy in (-hstep, 0.0, hstep):
      for dx in (-hstep, 0.0, hstep):
        c = (centre[0] + dy, centre[1] + dx)
        if max(abs(c[0]), abs(c[1])) <= max_shift + 1e-12 and better(c, best):
          best = c
  return (value(*best), best) if return_shift else value(*best)


kernel_covariance = kernel_net.kernel_covariance


def kernel_width_ratio(k_est, k_true):
  """How wide the estimate is against the truth: ``sqrt(tr Σ_est / tr Σ_true)`` of their
  second-moment matrices (:func:`kernel_covariance`); 1 is right, 2 twice as wide (RMS
  radius). Unlike NCC, it does not forgive a blob of the wrong size."""
  return kernel_net.rms_radius(k_est) / kernel_net.rms_radius(k_true)


def _pad_to(k, size):
  """Zero-pad a square kernel to ``size``: equal on both sides, any extra at the end."""
  d = size - k.shape[0]
  return np.pad(k, ((d // 2, d - d // 2), (d // 2, d - d // 2)))


def _kernels(k_est, k_true):
  k_est = np.asarray(k_est, np.float64)
  k_true = np.asarray(k_true, np.float64)
  for k in (k_est, k_true):
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
      raise ValueError(f"kernels must be square 2-D, got {k.shape}")
  n = max(k_est.shape[0], k_true.shape[0])
  return _pad_to(k_est, n), _pad_to(k_true, n)


def _translate(k, dy, dx):
  """Integer translation with zero fill (mass leaving the grid is dropped)."""
  out = np.zeros_like(k)
  h, w = k.shape
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
      k[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
  return out


def kernel_ncc(k_est, k_true, max_shift=3):
  """Normalised cross-correlation of two kernels, best over integer shifts.

  Both are zero-padded (centred) to the larger size ``N``; ``k_est`` is translated by
  every ``(dy, dx)`` within ``±max_shift`` (zero fill) and the Pearson correlation
  (zero-mean NCC) with ``k_true`` is taken over the ``N x N`` support. Returns the
  maximum, in [-1, 1]. It is invariant to scaling either kernel and to integer shifts
  within ``max_shift`` (for kernels whose mass stays inside the grid). The mean is
  taken over the common support, so padding that enlarges ``N`` changes the value
  slightly (not for identical kernels: still 1).
  """
  a, b = _kernels(k_est, k_true)
  b = b - b.mean()
  nb = np.sqrt((b * b).sum())
  best = -1.0
  m = int(max_shift)
  for dy in range(-m, m + 1):
    for dx in range(-m, m + 1):
      t = _translate(a, dy, dx)
      t = t - t.mean()
      den = np.sqrt((t * t).sum()) * nb
      if den > 0:
        best = max(best, float((t * b).sum() / den))
  return float(np.clip(best, -1.0, 1.0))


def _com(k):
  k = np.asarray(k, np.float64)
  total = k.sum()
  i = np.arange(k.shape[0])
  return (k.sum(1) @ i) / total, (k.sum(0) @ i) / total


def kernel_psnr(k_est, k_true, data_range=None):
  """PSNR of an estimated kernel against the true one, after aligning their mass.

  Both kernels are normalised to unit sum and zero-padded (centred) to a common size,
  with a margin so nothing is lost when ``k_est`` is translated by the integer shift
  that best matches its centre of mass to ``k_true``'s (rounded difference). Then
  ``PSNR = 10 log10(data_range^2 / MSE)`` where ``MSE`` is the sum of squared errors
  divided by the pixel count of ``k_true``'s own grid, so the value does not depend on
  how either kernel is padded (beyond that grid, the error of ``k_est`` still counts).
  ``data_range`` defaults to ``max(k_true)``, which makes the score comparable between
  narrow and wide kernels; ``data_range=1.0`` gives the FKP / DIP-FKP convention
  (``20 log10(1 / RMSE)`` on the true kernel's grid), whose values are much higher.
  """
  a = np.asarray(k_est, np.float64)
  b = np.asarray(k_true, np.float64)
  if not (a.sum() > 0 and b.sum() > 0):
    raise ValueError("kernels must have positive sums")
  a, b = a / a.sum(), b / b.sum()
  count = b.size
  a, b = _kernels(a, b)
  margin = a.shape[0]
  a, b = np.pad(a, margin), np.pad(b, margin)
  (ay, ax), (by, bx) = _com(a), _com(b)
  a = _translate(a, int(np.round(by - ay)), int(np.round(bx - ax)))
  rng = float(b.max()) if data_range is None else float(data_range)
  return _psnr_from_mse(((a - b) ** 2).sum() / count, rng)
