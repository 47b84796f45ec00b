"""MATLAB-compatible bicubic ``imresize``, the baseline of the super-resolution literature.

Convention (pinned by ``tests/test_resize.py``), per axis of input length ``n``,
output length ``m`` and scale ``s`` (``m / n`` unless given explicitly):

* Keys cubic kernel with ``a = -0.5``::

      cubic(x) = 1.5|x|^3 - 2.5|x|^2 + 1            for |x| <= 1
                 -0.5|x|^3 + 2.5|x|^2 - 4|x| + 2    for 1 < |x| <= 2
                 0                                  otherwise

* Output pixel ``j`` (1-based) sits at input coordinate ``u = j/s + 0.5*(1 - 1/s)``
  (1-based), i.e. pixel centres are aligned, not corners.
* When downscaling (``s < 1``) the kernel is stretched to antialias:
  ``h(x) = s*cubic(s*x)``, support ``4/s``; otherwise ``h = cubic``.
* Taps are input indices ``floor(u - width/2) + (0 .. ceil(width) + 1)`` with weights
  ``h(u - k)``, normalised to sum 1. Out-of-range taps are mirrored with the edge pixel
  repeated (1-based ``0 -> 1``, ``-1 -> 2``, ``n+1 -> n``; NumPy ``mode="symmetric"``)
  and their weights added to the mirrored pixel.
* The two axes are resized separately, the axis with the smaller scale first (as
  MATLAB does); on a tie the height goes first. Resizing is linear, so the order only
  changes rounding.
* Given a ``scale``, the output size is ``ceil(n * scale)`` and ``scale`` itself (not
  ``m / n``) sets the coordinate mapping and the antialiasing, as in MATLAB.

Nothing is clipped or rounded: callers working with ``uint8`` images do that themselves.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _cubic(x):
  ax = np.abs(x)
  ax2, ax3 = ax * ax, ax * ax * ax
  return ((1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
          + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def resize_matrix(in_size: int, out_size: int, scale: float | None = None) -> np.ndarray:
  """The ``(out_size, in_size)`` float64 matrix resizing one axis; rows sum to 1.

  ``y = resize_matrix(n, m) @ x`` resizes ``x`` along its first axis. Border mirroring
  is folded into the matrix. ``scale`` defaults to ``out_size / in_size``.
  """
  scale = out_size / in_size if scale is None else float(scale)
  if scale < 1:
    width = 4.0 / scale
    kernel = lambda x: scale * _cubic(scale * x)
  else:
    width = 4.0
    kernel = _cubic
  u = np.arange(1, out_size + 1) / scale + 0.5 * (1 - 1 / scale)
  left = np.floor(u - width / 2)
  taps = left[:, None] + np.arange(math.ceil(width) + 2)  # 1-based input indices
  weights = kernel(u[:, None] - taps)
  weights /= weights.sum(axis=1, keepdims=True)
  # Symmetric extension has period 2n: 1..n, n..1, 1..n, ...
  k = np.mod(taps.astype(np.int64) - 1, 2 * in_size)
  k = np.where(k < in_size, k, 2 * in_size - 1 - k)  # 0-based
  mat = np.zeros((out_size, in_size))
  np.add.at(mat, (np.repeat(np.arange(out_size), taps.shape[1]), k.ravel()), weights.ravel())
  return mat


@functools.lru_cache(maxsize=None)
def _cached_matrix(in_size, out_size, scale):
  mat = resize_matrix(in_size, out_size, scale)
  mat.flags.writeable = False
  return mat


def _plan(in_shape, scale, output_shape):
  """Output shape, per-axis scales for the mapping, and whether height goes first."""
  if (scale is None) == (output_shape is None):
    raise ValueError("give exactly one of scale and output_shape")
  if scale is not None:
    output_shape = tuple(math.ceil(n * scale) for n in in_shape)
    scales = (float(scale), float(scale))
  else:
    output_shape = tuple(int(m) for m in output_shape)
    scales = (None, None)
  eff = [m / n if s is None else s for n, m, s in zip(in_shape, output_shape, scales)]
  return output_shape, scales, eff[0] <= eff[1]


def imresize_np(img, scale=None, output_shape=None) -> np.ndarray:
  """Float64 MATLAB ``imresize(img, scale | output_shape, 'bicubic')``.

  Args:
    img: ``(H, W)`` or ``(H, W, C)`` array.
    scale: a number; the output is ``ceil(H*scale) × ceil(W*scale)``.
    output_shape: ``(h, w)``. Exactly one of ``scale`` and ``output_shape`` is given.
  """
  img = np.asarray(img, np.float64)
  (h, w), (sh, sw), height_first = _plan(img.shape[:2], scale, output_shape)
  mh = _cached_matrix(img.shape[0], h, sh)
  mw = _cached_matrix(img.shape[1], w, sw)
  if height_first:
    return np.einsum("pw,hw...->hp...", mw, np.einsum("oh,h...->o...", mh, img))
  return np.einsum("oh,h...->o...", mh, np.einsum("pw,hw...->hp...", mw, img))


def imresize(x, output_shape, scale=None):
  """MATLAB bicubic ``imresize`` of ``x`` ``(..., H, W, C)`` to ``output_shape = (h, w)``.

  The weight matrices are built in NumPy at trace time and applied with ``einsum`` in
  ``x``'s dtype at full (``HIGHEST``) precision, so this jits, vmaps and differentiates.
  ``scale`` (a number), if given, replaces ``h/H`` and ``w/W`` in the coordinate mapping.
  """
  x = jnp.asarray(x)
  in_h, in_w = x.shape[-3], x.shape[-2]
  if scale is None:
    _, (sh, sw), height_first = _plan((in_h, in_w), None, output_shape)
  else:
    sh = sw = float(scale)
    height_first = True
  h, w = output_shape
  mh = jnp.asarray(_cached_matrix(in_h, int(h), sh), x.dtype)
  mw = jnp.asarray(_cached_matrix(in_w, int(w), sw), x.dtype)
  hi = jax.lax.Precision.HIGHEST
  resize_h = lambda y: jnp.einsum("oh,...hwc->...owc", mh, y, precision=hi)
  resize_w = lambda y: jnp.einsum("pw,...hwc->...hpc", mw, y, precision=hi)
  return resize_w(resize_h(x)) if height_first else resize_h(resize_w(x))


def upscale(x, s: int):
  """Bicubic ×``s`` upscaling of ``(..., H, W, C)`` to ``(..., H*s, W*s, C)``."""
  return imresize(x, (x.shape[-3] * s, x.shape[-2] * s), scale=s)


def downscale_bicubic(x, s: int):
  """Antialiased bicubic ÷``s`` of ``(..., H, W, C)`` to ``(..., ceil(H/s), ceil(W/s), C)``."""
  return imresize(x, (-(-x.shape[-3] // s), -(-x.shape[-2] // s)), scale=1 / s)
