"""IKENet: IKE's invertible downscaler (seed ``002_…``, §2 "Detailed Architecture").

The forward pass downscales (the kernel's role), the inverse upscales (super-resolution),
with the same weights. One downscaling block per factor 2 (×2: one, ×4: two), each a
space-to-depth permutation (pixel shuffle, ``C → 4C`` channels at half the size) and ``K``
invertible *tri-channel coupling* layers (Table 1). With the 4C channels split into
``x_a`` (the first C: the downscaled signal), ``x_b`` (the other 3C) and ``x_res`` (a copy
of ``x_a`` taken at the block's entry):

    forward:  y_a = x_a + φ(x_b);  y_b = x_b + σ(y_a);  y_a ← y_a + ρ(x_res);  y_res = x_res
    inverse:  y_a ← y_a − ρ(y_res);  x_b = y_b − σ(y_a);  x_a = y_a − φ(x_b);  x_res = y_res

After the K layers ``x_a`` goes on to the next block (or is the output), and
``Z = [x_b, x_res]`` (4C channels) is the block's high-frequency latent, which the inverse
needs back. φ, σ, ρ are small CNNs (3×3 conv, ReLU, 3×3 conv) whose last layer starts at
zero, so an untrained block is the pixel shuffle with ``x_a`` its first phase. Exact
invertibility does not depend on φ, σ, ρ (pinned by tests).
"""

import flax.linen as nn
import jax.numpy as jnp

from kfjax import ops


def space_to_depth(x):
  """``(B, H, W, C) → (B, H/2, W/2, 4C)``; channel ``(2i + j)·C + c`` is phase (i, j)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // 2, w // 2, 4 * c)


def depth_to_space(x):
  """The inverse of :func:`space_to_depth`."""
  b, h, w, c4 = x.shape
  c = c4 // 4
  x = x.reshape(b, h, w, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, 2 * h, 2 * w, c)


class _Sub(nn.Module):
  """φ, σ or ρ: 3×3 conv, ReLU, 3×3 conv (the last one zero at the start)."""
  features: int
  hidden: int

  @nn.compact
  def __call__(self, x):
    h = nn.relu(ops.Conv(self.hidden, (3, 3))(x))
    return ops.Conv(self.features, (3, 3), kernel_init=nn.initializers.zeros)(h)


class _Coupling(nn.Module):
  """One tri-channel coupling layer on ``(x_a, x_b, x_res)``."""
  channels: int      # C (x_a and x_res); x_b has 3C
  hidden: int

  def setup(self):
    self.phi = _Sub(self.channels, self.hidden)
    self.sigma = _Sub(3 * self.channels, self.hidden)
    self.rho = _Sub(self.channels, self.hidden)

  def __call__(self, xa, xb, xres):
    ya = xa + self.phi(xb)
    yb = xb + self.sigma(ya)
    return ya + self.rho(xres), yb, xres

  def inverse(self, ya, yb, yres):
    ya = ya - self.rho(yres)
    xb = yb - self.sigma(ya)
    return ya - self.phi(xb), xb, yres


class IKENet(nn.Module):
  """``forward(x) → (x↓, [Z per block])``; ``inverse(x↓, [Z per block]) → x``.

  ``x`` is (B, H, W, C) with H, W divisible by ``scale``; ``scale`` 2 or 4.
  """
  channels: int = 3
  scale: int = 2
  couplings: int = 4   # K, the paper's
  hidden: int = 32

  def setup(self):
    n = {2: 1, 4: 2}[int(self.scale)]
    self.blocks = [[_Coupling(self.channels, self.hidden, name=f"block{i}_coupling{j}")
                    for j in range(self.couplings)] for i in range(n)]

  def __call__(self, x):
    return self.forward(x)

  def forward(self, x):
    c, zs = self.channels, []
    for block in self.blocks:
      h = space_to_depth(x)
      xa, xb = h[..., :c], h[..., c:]
      xres = xa
      for layer in block:
        xa, xb, xres = layer(xa, xb, xres)
      zs.append(jnp.concatenate([xb, xres], -1))
      x = xa
    return x, zs

  def inverse(self, x, zs):
    c = self.channels
    for block, z in zip(reversed(self.blocks), reversed(zs)):
      xa, xb, xres = x, z[..., :3 * c], z[..., 3 * c:]
      for layer in reversed(block):
        xa, xb, xres = layer.inverse(xa, xb, xres)
      x = depth_to_space(jnp.concatenate([xa, xb], -1))
    return x
