"""A 2-D convolution whose backward pass is fast on XLA:CPU, also inside loops.

XLA:CPU compiles the two backward convolutions of ``lax.conv_general_dilated`` (input
and weight gradients) to much slower code than the forward convolution, and inside
``lax.scan`` / ``fori_loop`` bodies the gap grows several-fold (figures: BENCHMARKS.md,
"XLA:CPU implementation notes"). :func:`conv2d` has a
custom VJP that writes both gradients as plain forward convolutions in NHWC/HWIO form,
which XLA runs at forward speed everywhere:

* input gradient: the output gradient, zero-padded by ``k - 1``, convolved with the
  kernel flipped in space and with its in/out channel axes swapped (for ``C_in <= 4``,
  one matrix product and ``k²`` shifted adds instead: :func:`_input_grad`);
* weight gradient: a convolution over the spatial axes where the batch axis plays the
  role of the channel axis (``lhs = x`` as (C_in, H, W, N), ``rhs = g`` as
  (H', W', N, C_out)), giving (C_in, k, k, C_out), with the roles of ``x`` and ``g``
  swapped when ``g`` has far fewer channels (:func:`_weight_grad_conv`); or (``weight_grad="dots"``) one
  grouped matrix product per kernel tap. The products were faster for batches of crops
  while XLA:CPU ran convolutions through YNNPACK; with :func:`kfjax.runtime.jit`'s options the
  convolution is faster for every network here, so all networks use :data:`Conv`.

Two more XLA:CPU facts shape the code: a YNNPACK convolution with any non-zero padding
runs much faster than the same convolution without padding, so the VALID forward
computes one extra output row and drops it (harmless for XLA's own convolutions); and a
``dot`` contracting a huge axis into a small output (the weight gradient as one matrix
product) runs on one core, so :func:`_weight_grad_dots` splits the contraction into
groups. ``kfjax.bench.throughput`` measures the effects.

All of this is about XLA:CPU: off the CPU backend :func:`conv2d` is the plain convolution
with XLA's own gradients (:func:`conv_backward`; ``KFJAX_CONV_BACKWARD`` overrides).

Only stride 1 and VALID padding; ``Conv`` below pads explicitly for SAME.
``tests/test_ops.py`` and ``tests/test_throughput.py`` check both gradients against
``jax.grad`` of the plain op.

The compiler options and the compilation cache, which matter as much on XLA:CPU, are
runtime settings: :mod:`kfjax.runtime`.
"""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from kfjax.errors import KfjaxError

_DN = ("NHWC", "HWIO", "NHWC")
WEIGHT_GRADS = ("conv", "dots")


def _conv(x, w, padding=((0, 0), (0, 0))):
  return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_DN)


def _conv_valid(x, w):
  """VALID convolution computed as one with an extra, discarded output row.

  XLA:CPU runs a convolution with any non-zero padding much faster than the same
  convolution without padding (the same numbers come out). 1×1 convolutions are fast
  either way and are left alone.
  """
  if w.shape[0] == 1 and w.shape[1] == 1:
    return _conv(x, w)
  return _conv(x, w, ((0, 1), (0, 0)))[:, :-1]


def largest_divisor(n, most):
  """The largest divisor of ``n`` that is at most ``most`` (≥ 1)."""
  return max(d for d in range(1, max(1, most) + 1) if n % d == 0)


def _weight_grad_dots(x, g, kh, kw):
  """``dw`` as one grouped matrix product per kernel tap.

  ``dw[i, j] = x[:, i:i+H', j:j+W']ᵀ · g`` contracted over batch and space. A single
  product with that huge contraction runs on one thread on XLA:CPU; splitting it into
  ≤ 8 groups (summed after) spreads it over all cores.
  """
  n, ho, wo, co = g.shape
  ci = x.shape[-1]
  groups = largest_divisor(n * ho, 8)
  rows = n * ho * wo // groups
  g2 = g.reshape(groups, rows, co)
  taps = [jnp.einsum("gmc,gmo->gco", x[:, i:i + ho, j:j + wo].reshape(groups, rows, ci),
                     g2).sum(0) for i in range(kh) for j in range(kw)]
  return jnp.stack(taps).reshape(kh, kw, ci, co)


def _weight_grad_conv(x, g):
  """``dw`` as a convolution over space with the batch axis as the channel axis.

  One operand is transposed to channels-first: the input ``x`` (as ``lhs``), or, when the
  output gradient ``g`` has far fewer channels, ``g`` zero-padded by ``k - 1`` (as ``lhs``,
  with ``x`` as the window; the result comes out flipped in space): transposing the
  smaller operand is what keeps the transposes' cost below the convolution's on XLA:CPU.
  """
  kh, kw = x.shape[1] - g.shape[1] + 1, x.shape[2] - g.shape[2] + 1
  ci, co = x.shape[-1], g.shape[-1]
  if (kh * kw > 1 and 2 * co <= ci) or (co <= 4 and 4 * co <= ci):
    gp = jnp.pad(g, ((0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)))
    dw = _conv(jnp.transpose(gp, (3, 1, 2, 0)), jnp.transpose(x, (1, 2, 0, 3)))  # (Co, kh, kw, Ci)
    return jnp.transpose(dw[:, ::-1, ::-1], (1, 2, 3, 0))
  dw = _conv(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3)))  # (Ci, kh, kw, Co)
  return jnp.transpose(dw, (1, 2, 0, 3))


BACKWARDS = ("custom", "native")
BACKWARD_ENV = "KFJAX_CONV_BACKWARD"


def conv_backward():
  """How :func:`conv2d` is differentiated: ``"custom"`` (this module's VJP) on the CPU
  backend, ``"native"`` (XLA's own convolution gradients: cuDNN's backward kernels on
  GPU, the TPU's) elsewhere. The VJP exists for XLA:CPU's slow backward convolutions;
  its formulations (a weight gradient whose window is the whole image, col2im) are
  unmeasured on accelerators, where the native gradients are the well-trodden path.
  ``KFJAX_CONV_BACKWARD=custom|native`` overrides the choice (``auto`` or unset: the
  default); it is read when a program is traced, so set it before the first call.
  """
  mode = os.environ.get(BACKWARD_ENV, "auto") or "auto"
  if mode == "auto":
    return "custom" if jax.default_backend() == "cpu" else "native"
  if mode not in BACKWARDS:
    raise KfjaxError(f"{BACKWARD_ENV} must be auto, custom or native, got {mode!r}")
  return mode


def conv2d(x, w, weight_grad="conv"):
  """VALID, stride-1 convolution (cross-correlation) of ``x`` (N,H,W,Ci) with ``w`` (kh,kw,Ci,Co).

  Differentiated per :func:`conv_backward`. With the custom VJP, ``weight_grad`` picks how
  the weight gradient is computed: ``"conv"`` (a convolution, best for few large images,
  e.g. the U-Net) or ``"dots"`` (grouped matrix products, best for batches of
  many-channel crops, e.g. PD training); both give the same numbers.
  """
  if weight_grad not in WEIGHT_GRADS:
    raise ValueError(f"weight_grad must be one of {WEIGHT_GRADS}, got {weight_grad!r}")
  if conv_backward() == "native":
    return _conv(x, w)
  return _conv2d_custom(x, w, weight_grad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv2d_custom(x, w, weight_grad):
  return _fwd(x, w, weight_grad)[0]


def _fwd(x, w, weight_grad):
  return _conv_valid(x, w), (x, w)


def _input_grad(g, w):
  """``dx`` of a VALID convolution: the output gradient, zero-padded by ``k - 1``,
  convolved with the flipped, in/out-swapped kernel; or, for few input channels
  (``C_in <= 4``: the networks' first layers), one matrix product to the ``k·k·C_in``
  tap contributions, scattered back by ``k²`` shifted adds (col2im). XLA:CPU runs a
  convolution with so few output features slowly (figures: BENCHMARKS.md, "XLA:CPU
  implementation notes")."""
  kh, kw, ci, _ = w.shape
  if ci > 4 or kh * kw == 1:
    return _conv(g, jnp.swapaxes(w[::-1, ::-1], 2, 3), ((kh - 1, kh - 1), (kw - 1, kw - 1)))
  n, h, wd, _ = g.shape
  dtype = jnp.result_type(g.dtype, w.dtype)
  acc = jnp.promote_types(dtype, jnp.float32)  # bf16 sums in float32
  taps = jnp.einsum("nhwo,abio->nhwabi", g, w, preferred_element_type=acc)
  # The k² shifted adds as zero-padded tap planes summed in (a, b) order (the same sums,
  # bit for bit, as ``dx.at[:, a:a + h, b:b + wd].add(...)``, whose chain of 49 in-place
  # updates for a 7×7 kernel sends XLA's algebraic simplifier into a loop it logs as an error).
  dx = None
  for a in range(kh):
    for b in range(kw):
      t = jnp.pad(taps[:, :, :, a, b], ((0, 0), (a, kh - 1 - a), (b, kw - 1 - b), (0, 0)))
      dx = t if dx is None else dx + t
  return dx.astype(dtype)


def _bwd(weight_grad, res, g):
  x, w = res
  kh, kw = w.shape[:2]
  dx = _input_grad(g, w)
  if weight_grad == "dots":
    dw = _weight_grad_dots(x, g, kh, kw)
  else:
    dw = _weight_grad_conv(x, g)
  return dx, dw.astype(w.dtype)


_conv2d_custom.defvjp(_fwd, _bwd)


def _general(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, precision=None, *,
             weight_grad="conv", **_):
  """``lax.conv_general_dilated``'s signature, for the cases ``Conv`` produces."""
  del dimension_numbers, precision
  if tuple(window_strides) != (1, 1) or feature_group_count != 1:
    raise NotImplementedError("kfjax.ops.Conv supports stride 1, no groups")
  if (lhs_dilation and tuple(lhs_dilation) != (1, 1)) or (
      rhs_dilation and tuple(rhs_dilation) != (1, 1)):
    raise NotImplementedError("kfjax.ops.Conv supports no dilation")
  if padding == "SAME":
    padding = [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in rhs.shape[:2]]
  if isinstance(padding, str):
    if padding != "VALID":
      raise NotImplementedError(padding)
  else:
    lhs = jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  return conv2d(lhs, rhs, weight_grad)


Conv = functools.partial(nn.Conv, conv_general_dilated=_general)
Conv.__doc__ = "``flax.linen.Conv`` (stride 1) whose gradients use :func:`conv2d`."
