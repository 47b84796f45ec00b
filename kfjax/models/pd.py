"""Patch-diffusion (PD) denoiser: fully convolutional, 15×15 receptive field.

Architecture (KernelFusion appendix A.2): one block of two 3×3 convolutions, then five
blocks of a 3×3 and a 1×1 convolution, every block conditioned on the timestep. All
convolutions are VALID, so the network maps an ``(H+14)×(W+14)`` input to an ``H×W``
output and every output pixel sees exactly a 15×15 window. Images are padded once,
symmetrically, by ``HALO = 7`` (:func:`pad_halo`); because no layer pads, whole-image
and tiled application (:func:`apply_tiled`) compute the same function.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from kfjax import ops

HALO = 7


def timestep_embedding(t, dim, max_period=10_000.0):
  """Sinusoidal embedding of (possibly fractional) timesteps ``t`` of shape ``(B,)``."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _crop(h, n):
  return h[:, n:-n, n:-n, :]


class PatchDiffusion(nn.Module):
  """Velocity predictor ``v(x_t, t)``; input ``(B, H+14, W+14, C)``, output ``(B, H, W, C)``."""
  channels: int = 128
  out_channels: int = 3
  num_blocks: int = 5
  emb_dim: int = 128
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, t):
    # ``ops.Conv``: gradients as forward convolutions (XLA:CPU's own convolutions under
    # ``runtime.jit``; the grouped-product weight gradient, ``weight_grad="dots"``, is slower
    # there: BENCHMARKS.md, "XLA:CPU implementation notes").
    conv = lambda f, k, name: ops.Conv(f, (k, k), padding="VALID", dtype=self.dtype, name=name)
    emb = timestep_embedding(t, self.emb_dim)
    emb = nn.Dense(self.emb_dim, dtype=self.dtype, name="emb0")(emb)
    emb = nn.Dense(self.emb_dim, dtype=self.dtype, name="emb1")(nn.silu(emb))
    emb = nn.silu(emb)
    cond = lambda i: nn.Dense(self.channels, dtype=self.dtype, name=f"cond{i}")(emb)[:, None, None, :]

    h = x.astype(self.dtype)
    h = nn.silu(conv(self.channels, 3, "in_conv0")(h) + cond(0))
    h = nn.silu(conv(self.channels, 3, "in_conv1")(h))
    for i in range(self.num_blocks):
      r = conv(self.channels, 3, f"block{i}_conv3")(h)
      r = nn.silu(r + cond(i + 1))
      r = conv(self.channels, 1, f"block{i}_conv1")(r)
      h = nn.silu(_crop(h, 1) + r)
    out = conv(self.out_channels, 1, "out_conv")(h)
    return out.astype(jnp.float32)

  @property
  def receptive_field(self):
    return 2 * (2 + self.num_blocks) + 1


def pad_halo(x, halo=HALO):
  """Symmetric padding of ``(..., H, W, C)`` by ``halo`` pixels on each side."""
  pad = [(0, 0)] * (x.ndim - 3) + [(halo, halo), (halo, halo), (0, 0)]
  return jnp.pad(x, pad, mode="symmetric")


def apply_whole(model, params, x, t):
  """PD on whole images ``x`` (B, H, W, C) at integer timesteps ``t`` (B,)."""
  return model.apply(params, pad_halo(x), t)


def apply_tiled(model, params, x, t, tile, tile_batch=None):
  """PD on overlapping ``(tile+14)²`` tiles, ``tile_batch`` tiles at a time.

  Equals :func:`apply_whole` (the halo makes tiling exact) while memory grows with the
  tile batch, not with the image. ``x`` is (H, W, C) with a scalar ``t``.
  """
  h, w, c = x.shape
  nh, nw = -(-h // tile), -(-w // tile)
  xp = pad_halo(x)
  # Extra symmetric padding so the last row/column of tiles is full; cropped after.
  xp = jnp.pad(xp, ((0, nh * tile - h), (0, nw * tile - w), (0, 0)), mode="symmetric")
  starts = jnp.stack(jnp.meshgrid(jnp.arange(nh) * tile, jnp.arange(nw) * tile, indexing="ij"), -1)
  starts = starts.reshape(-1, 2)
  size = tile + 2 * HALO
  tiles = jax.vmap(lambda s: jax.lax.dynamic_slice(xp, (s[0], s[1], 0), (size, size, c)))(starts)
  tb = jnp.full((1,), t)
  # Rematerialised per tile batch: differentiating through PD (Phase 2) then keeps only
  # the tiles' inputs, not every layer's activations, so PD's memory stays bounded.
  apply = jax.checkpoint(lambda p: model.apply(params, p[None], tb)[0])
  out = jax.lax.map(apply, tiles, batch_size=tile_batch or tiles.shape[0])
  out = out.reshape(nh, nw, tile, tile, c).transpose(0, 2, 1, 3, 4).reshape(nh * tile, nw * tile, c)
  return out[:h, :w]
