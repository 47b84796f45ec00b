"""A small time-conditioned U-Net: the velocity field ``v(z, t)`` of a flow-matching model.

DDM4IP (``kfjax.ddm4ip``) models the LR image's patches with conditional flow matching and
needs two such fields (the image's, then an auxiliary one for the current kernel's
outputs). The paper gives only its size (about 4M parameters, 32-px patches); this is the
usual shape at a size set by the config: ``levels`` resolutions with ``channels · 2^i``
filters, one residual block per level on the way down and up, the time ``t ∈ [0, 1]``
embedded sinusoidally (as PD's timesteps, scaled by 1000) and added inside every block,
2×2 average pooling down, nearest-neighbour ×2 up, skip connections. The last
convolution starts at zero, so an untrained field is 0 everywhere.
"""

import flax.linen as nn
import jax.numpy as jnp

from kfjax import ops
from kfjax.models import pd


class _ResBlock(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, emb):
    h = ops.Conv(self.features, (3, 3))(nn.silu(x))
    h = h + nn.Dense(self.features)(emb)[:, None, None, :]
    h = ops.Conv(self.features, (3, 3))(nn.silu(h))
    skip = x if x.shape[-1] == self.features else ops.Conv(self.features, (1, 1))(x)
    return skip + h


def _avg_pool2(h):
  b, hh, ww, c = h.shape
  return h.reshape(b, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))


def _up2(h):
  return jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)


class VelocityUNet(nn.Module):
  """``(z (B, H, W, C), t (B,)) → v (B, H, W, C)``; H and W multiples of ``2^(levels−1)``."""
  out_channels: int = 3
  channels: int = 32
  levels: int = 2
  emb_dim: int = 64

  @nn.compact
  def __call__(self, z, t):
    emb = pd.timestep_embedding(1000.0 * jnp.asarray(t, jnp.float32), self.emb_dim)
    emb = nn.silu(nn.Dense(self.emb_dim)(nn.silu(nn.Dense(self.emb_dim)(emb))))
    h = ops.Conv(self.channels, (3, 3))(z)
    skips = []
    for i in range(self.levels):
      h = _ResBlock(self.channels * 2 ** i)(h, emb)
      if i < self.levels - 1:
        skips.append(h)
        h = _avg_pool2(h)
    for i in reversed(range(self.levels - 1)):
      h = _ResBlock(self.channels * 2 ** i)(jnp.concatenate([_up2(h), skips[i]], -1), emb)
    return ops.Conv(self.out_channels, (3, 3), kernel_init=nn.initializers.zeros,
                    name="out_conv")(nn.silu(h))
