"""Refinement U-Net ``R_θ`` (KernelFusion appendix A.3).

``levels`` resolution levels, ``base_channels`` filters at the top doubling down to the
bottom (paper: 5 levels, 32 → 512), two 3×3 conv + BatchNorm + ReLU per block, ×2
max-pool down and bilinear up (``upsample="transpose"``: a 2×2 stride-2 transposed conv,
written as 1×1 conv + depth-to-space, which leaves checkerboard artefacts here), skip connections, tanh output in [−1, 1].

BatchNorm always uses the statistics of the batch it is given (Phase 2 only ever
trains the U-Net, and its output at every iteration is used), so there is no running
average state. Inputs whose sides are not multiples of ``2**(levels-1)`` are padded
symmetrically and the output is cropped back.

``residual=True`` (a kfjax option, not in the paper) adds the input's pre-tanh value
to the last layer, whose weights then start at zero, so the network starts as the
identity instead of having to learn it within the first timestep's iterations.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kfjax import ops


def _upsample(h):
  """Depth-to-space ×2: a 1×1 conv to 4·C channels followed by this is exactly a
  2×2, stride-2 transposed convolution (and differentiates fast on XLA:CPU)."""
  b, hh, ww, c4 = h.shape
  c = c4 // 4
  h = h.reshape(b, hh, ww, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return h.reshape(b, 2 * hh, 2 * ww, c)


def _bilinear2x(h):
  """×2 bilinear upsampling (half-pixel centres, edge clamped), as separable averages.

  Neighbours are shifted slices, not gathers: their gradients are slices too, where a
  gather's is a scatter-add (3× slower on XLA:CPU).
  """
  def up(x, axis):
    n = x.shape[axis]
    part = lambda a, b: jax.lax.slice_in_dim(x, a, b, axis=axis)
    prev = jnp.concatenate([part(0, 1), part(0, n - 1)], axis=axis)
    nxt = jnp.concatenate([part(1, n), part(n - 1, n)], axis=axis)
    even, odd = 0.25 * prev + 0.75 * x, 0.75 * x + 0.25 * nxt
    out = jnp.stack([even, odd], axis=axis + 1)
    return out.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1:])
  return up(up(h, 1), 2)


def max_pool2(h):
  """2×2, stride-2 max pooling of (B, H, W, C) with even H, W.

  The same values as ``flax.linen.max_pool(h, (2, 2), (2, 2))``, written as a reshape and
  two pairwise ``maximum`` s: JAX differentiates a ``reduce_window`` max by tracking argmax
  indices through a variadic ``reduce_window`` (index tensors of the input's size), which
  costs more than the convolution before it on XLA:CPU. Not a ``max`` reduction either:
  its gradient divides by the number of tied entries, and gave NaNs under
  ``--xla_backend_optimization_level=0``. The gradient goes to the maximum; ties share it
  (they only tie at ReLU's zeros here, whose gradient is zero anyway).
  """
  b, hh, ww, c = h.shape
  x = h.reshape(b, hh // 2, 2, ww // 2, 2, c)
  rows = jnp.maximum(x[:, :, 0], x[:, :, 1])  # (b, hh/2, ww/2, 2, c)
  return jnp.maximum(rows[:, :, :, 0], rows[:, :, :, 1])


class _Block(nn.Module):
  features: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    for _ in range(2):
      x = ops.Conv(self.features, (3, 3), dtype=self.dtype)(x)
      x = nn.BatchNorm(use_running_average=False, dtype=self.dtype)(x)
      x = nn.relu(x)
    return x


class UNet(nn.Module):
  """``(B, H, W, C) → (B, H, W, C)`` in [−1, 1]."""
  out_channels: int = 3
  base_channels: int = 32
  levels: int = 5
  max_channels: int = 512
  residual: bool = False
  upsample: str = "bilinear"  # or "transpose" (2×2 stride-2 transposed conv)
  dtype: jnp.dtype = jnp.float32

  def _features(self) -> Sequence[int]:
    return [min(self.base_channels * 2 ** i, self.max_channels) for i in range(self.levels)]

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    m = 2 ** (self.levels - 1)
    ph, pw = (-h) % m, (-w) % m
    x_in = x
    if ph or pw:
      x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="symmetric")
    feats = self._features()
    hcur = x.astype(self.dtype)
    skips = []
    for f in feats[:-1]:
      hcur = _Block(f, self.dtype)(hcur)
      skips.append(hcur)
      hcur = max_pool2(hcur)
    hcur = _Block(feats[-1], self.dtype)(hcur)
    for f, skip in zip(reversed(feats[:-1]), reversed(skips)):
      if self.upsample == "bilinear":
        # Bilinear upsampling then a 1×1 conv, computed in the other order: the upsampling
        # acts on each channel with weights summing to 1, so it commutes with the conv
        # (bias included), which then runs on a quarter of the pixels.
        hcur = _bilinear2x(ops.Conv(f, (1, 1), dtype=self.dtype)(hcur))
      else:
        hcur = _upsample(ops.Conv(4 * f, (1, 1), dtype=self.dtype)(hcur))
      hcur = _Block(f, self.dtype)(jnp.concatenate([hcur, skip], axis=-1))
    init = nn.initializers.zeros if self.residual else nn.initializers.lecun_normal()
    out = ops.Conv(self.out_channels, (1, 1), kernel_init=init, dtype=self.dtype,
                  name="out_conv")(hcur).astype(jnp.float32)
    out = out[:, :h, :w, :]
    if self.residual:
      out = out + jnp.arctanh(jnp.clip(x_in, -0.999, 0.999))
    return jnp.tanh(out)
