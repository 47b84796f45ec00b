"""The degradation operator ``(x * k)↓s`` shared by the model and the benchmark.

Convention (pinned by ``tests/test_degrade.py``):

* ``*`` is a true 2-D convolution (the kernel is flipped), applied to every channel
  with the same K×K kernel, as a physical point-spread function acts.
* Borders are extended symmetrically (edge pixel repeated: NumPy ``mode="symmetric"``,
  SciPy ``ndimage`` ``mode="reflect"``, MATLAB ``imresize``'s padding).
* ``↓s`` keeps one pixel in ``s``. LR pixel ``i`` is centred on HR coordinate
  ``s*i + (s-1)/2``, exactly as in MATLAB ``imresize``; a kernel's geometric centre is
  ``(K-1)/2``. When ``K`` and ``s`` have the same parity those two centres coincide, so
  a centred kernel introduces no shift. In index form (with the flipped kernel
  ``kf[u] = k[K-1-u]``)::

      y[i, j] = sum_{u,v} kf[u, v] * x_pad[s*i + o + u, s*j + o + v],   o = (s - K) // 2

  where ``x_pad`` is ``x`` extended symmetrically (index -1 means 0, H means H-1).

The output of an ``H×W`` image is ``ceil(H/s) × ceil(W/s)``.
"""

import jax.numpy as jnp
import numpy as np

from kfjax import ops


def _pads(size, scale, ksize):
  off = (scale - ksize) // 2
  out = -(-size // scale)
  lo = max(0, -off)
  hi = max(0, scale * (out - 1) + off + ksize - size)
  # If the offset is positive the first rows are skipped instead of padded.
  skip = max(0, off)
  return lo, hi, skip, out


def downscale(x, kernel, scale):
  """Blur ``x`` with ``kernel`` and keep one pixel in ``scale``.

  Args:
    x: images ``(..., H, W, C)``, any float dtype; leading axes are batch axes.
    kernel: ``(K, K)`` kernel, shared by all images and channels.
    scale: integer factor ``s >= 1``.

  Returns:
    ``(..., ceil(H/s), ceil(W/s), C)``, differentiable in ``x`` and ``kernel``.
  """
  x = jnp.asarray(x)
  kernel = jnp.asarray(kernel, x.dtype)
  *lead, h, w, c = x.shape
  ksize = kernel.shape[0]
  if kernel.shape != (ksize, ksize):
    raise ValueError(f"kernel must be square 2-D, got {kernel.shape}")
  lo_h, hi_h, skip_h, out_h = _pads(h, scale, ksize)
  lo_w, hi_w, skip_w, out_w = _pads(w, scale, ksize)
  # Channels (and batch axes) become the conv batch axis: one filter serves all.
  planes = jnp.moveaxis(x.reshape((-1, h, w, c)), -1, 1).reshape((-1, h, w))
  planes = jnp.pad(planes, ((0, 0), (lo_h, hi_h), (lo_w, hi_w)), mode="symmetric")
  planes = planes[:, skip_h:, skip_w:]
  # Polyphase form: the s² pixel phases of the padded planes become s² input features of
  # a stride-1 convolution with ceil(K/s)² taps (the kernel zero-padded to a multiple of
  # s and split by phase). Same sums as the strided K×K convolution, but XLA:CPU runs a
  # stride-1 convolution with several input features about twice as fast, forward and
  # backward (BENCHMARKS.md, "XLA:CPU implementation notes").
  taps = -(-ksize // scale)
  kflip = jnp.pad(kernel[::-1, ::-1], ((0, taps * scale - ksize),) * 2)
  rhs = kflip.reshape(taps, scale, taps, scale).transpose(0, 2, 1, 3)
  rhs = rhs.reshape(taps, taps, scale * scale, 1)
  phases = _phases(planes, out_h + taps - 1, out_w + taps - 1, scale)
  # ops.conv2d: its gradients beat XLA's own here too.
  y = ops.conv2d(phases, rhs)[..., 0]
  y = jnp.moveaxis(y.reshape((-1, c, out_h, out_w)), 1, -1)
  return y.reshape((*lead, out_h, out_w, c))


def _phases(planes, rows, cols, scale):
  """``(N, H, W) → (N, rows, cols, s²)`` with ``[n, i, j, p·s + q] = planes[n, s·i + p, s·j + q]``.

  Planes are cropped or zero-extended to ``s·rows × s·cols`` first: the rows and columns
  this adds or drops meet only the zero taps of the padded kernel (or no tap at all).
  """
  planes = planes[:, :scale * rows, :scale * cols]
  planes = jnp.pad(planes, ((0, 0), (0, scale * rows - planes.shape[1]),
                            (0, scale * cols - planes.shape[2])))
  n = planes.shape[0]
  planes = planes.reshape(n, rows, scale, cols, scale).transpose(0, 1, 3, 2, 4)
  return planes.reshape(n, rows, cols, scale * scale)


def downscale_np(x, kernel, scale):
  """Float64 NumPy version of :func:`downscale` (loops over kernel taps; slow, exact)."""
  x = np.asarray(x, np.float64)
  kernel = np.asarray(kernel, np.float64)
  *lead, h, w, c = x.shape
  ksize = kernel.shape[0]
  lo_h, hi_h, skip_h, out_h = _pads(h, scale, ksize)
  lo_w, hi_w, skip_w, out_w = _pads(w, scale, ksize)
  pad = [(0, 0)] * len(lead) + [(lo_h, hi_h), (lo_w, hi_w), (0, 0)]
  xp = np.pad(x, pad, mode="symmetric")[..., skip_h:, skip_w:, :]
  kf = kernel[::-1, ::-1]
  y = np.zeros((*lead, out_h, out_w, c))
  for u in range(ksize):
    for v in range(ksize):
      y += kf[u, v] * xp[..., u:u + scale * out_h:scale, v:v + scale * out_w:scale, :][
          ..., :out_h, :out_w, :]
  return y
