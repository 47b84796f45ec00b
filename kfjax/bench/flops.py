"""The analytic FLOP model of the throughput benchmark.

A convolution producing an ``H_out × W_out × C_out`` map from ``C_in`` channels with a
``K × K`` kernel costs ``2·H_out·W_out·K²·C_in·C_out`` FLOPs forward, and forward + backward
(input and weight gradients) three times that; biases, activations and the optimiser are not
counted. The counts live apart from the timings so that the JAX and the PyTorch timings are
rated against the same numbers, and so that tests check them against hand sums without
compiling anything.
"""

from kfjax import phase2
from kfjax.models import pd as pd_lib

# Colour channels of the benchmark's images (RGB), the default of every count.
CHANNELS = 3


def conv_flops(h_out, w_out, k, c_in, c_out):
  """Forward FLOPs of one convolution: 2·H_out·W_out·K²·C_in·C_out."""
  return 2 * h_out * w_out * k * k * c_in * c_out


def pd_flops(cfg, crop, channels=CHANNELS):
  """Forward convolution FLOPs of PD on one ``crop × crop`` output (input crop + 14)."""
  c = cfg.pd.channels
  size = crop + 2 * pd_lib.HALO
  total = conv_flops(size - 2, size - 2, 3, channels, c)
  size -= 2
  total += conv_flops(size - 2, size - 2, 3, c, c)
  size -= 2
  for _ in range(cfg.pd.num_blocks):
    size -= 2
    total += conv_flops(size, size, 3, c, c) + conv_flops(size, size, 1, c, c)
  return total + conv_flops(size, size, 1, c, channels)


def unet_flops(cfg, h, w, channels=CHANNELS):
  """Forward convolution FLOPs of the U-Net on an ``h × w`` image, and of its first
  convolution alone (sides padded to multiples of ``2**(levels-1)`` as the model pads)."""
  u = cfg.unet
  levels = int(u.levels)
  m = 2 ** (levels - 1)
  h, w = -(-h // m) * m, -(-w // m) * m
  feats = [min(int(u.base_channels) * 2 ** i, int(u.max_channels)) for i in range(levels)]
  first = conv_flops(h, w, 3, channels, feats[0])
  total, c_in = 0, channels
  for lvl, f in enumerate(feats):  # down path and bottom: two 3×3 convolutions per level
    total += conv_flops(h >> lvl, w >> lvl, 3, c_in, f) + conv_flops(h >> lvl, w >> lvl, 3, f, f)
    c_in = f
  # Up path: a 1×1 conv at the coarser level (kfjax runs it before the ×2 bilinear step; the
  # "transpose" upsampling's 1×1 to 4·f channels costs the same), then a block.
  for lvl in reversed(range(levels - 1)):
    hh, ww, f = h >> lvl, w >> lvl, feats[lvl]
    total += (conv_flops(hh // 2, ww // 2, 1, feats[lvl + 1], f) + conv_flops(hh, ww, 3, 2 * f, f)
              + conv_flops(hh, ww, 3, f, f))
  return total + conv_flops(h, w, 1, feats[0], channels), first


def downscale_flops(cfg, hr_size, channels=CHANNELS):
  """Forward FLOPs of one ``(x*k)↓s`` of an ``hr_size``² image (one filter per channel)."""
  scale = int(cfg.scale)
  out = -(-hr_size // scale)
  return conv_flops(out, out, phase2.kernel_size(cfg), 1, 1) * channels


def phase2_flops(cfg, hr_size, channels=CHANNELS):
  """Convolution FLOPs of one Phase 2 iteration at ``hr_size``² (forward + backward).

  Two U-Net applications, each forward + weight gradient + input gradient, except the
  input gradient of the first application's first convolution (its input ``x0`` is a
  constant); PD forward + input gradient (its weights are frozen); the two
  ``(·*k)↓s`` of the losses with their image and kernel gradients. The kernel network
  (a few MFLOP) and elementwise work are not counted.
  """
  unet, first = unet_flops(cfg, hr_size, hr_size, channels)
  return (2 * 3 * unet - first + 2 * pd_flops(cfg, hr_size, channels)
          + 2 * 3 * downscale_flops(cfg, hr_size, channels))
