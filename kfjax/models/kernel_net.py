"""Kernel network: a SIREN INR evaluated on a fixed K×K grid (appendix A.4, F).

``k = normalise(leaky_sigmoid(INR_ψ(g)))`` where ``g`` is the K×K grid of coordinates in
[−1, 1]², the INR is ``depth`` fully connected layers of ``width`` units (paper: 5 of
256) with sine activations at frequency ``omega`` (paper: 5, in every layer), and
``leaky_sigmoid(z) = (1 + 1e-4)·σ(z) − 1e-4``. The kernel is normalised to sum 1.

The leaky sigmoid lets single taps go very slightly negative during optimisation (as
in the paper); :func:`export_kernel` clips those at zero and renormalises, so kernels
handed to users are non-negative and sum to 1.

``center_of_mass_loss`` is the squared distance (in HR pixels) of the kernel's centre
of mass from the grid centre ``(K−1)/2``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LEAK = 1e-4


def leaky_sigmoid(z, leak=LEAK):
  return (1.0 + leak) * nn.sigmoid(z) - leak


def coordinate_grid(size):
  """``(K*K, 2)`` coordinates in [−1, 1]², row-major."""
  lin = jnp.linspace(-1.0, 1.0, size)
  yy, xx = jnp.meshgrid(lin, lin, indexing="ij")
  return jnp.stack([yy.ravel(), xx.ravel()], axis=-1)


def _siren_init(omega, fan_in, first):
  bound = 1.0 / fan_in if first else np.sqrt(6.0 / fan_in) / omega

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class SirenKernel(nn.Module):
  """Returns the ``(K, K)`` kernel (no inputs: the grid is fixed)."""
  size: int
  width: int = 256
  depth: int = 5
  omega: float = 5.0

  @nn.compact
  def __call__(self):
    h = coordinate_grid(self.size)
    fan_in = 2
    for i in range(self.depth - 1):
      h = nn.Dense(self.width, kernel_init=_siren_init(self.omega, fan_in, i == 0),
                   name=f"sine{i}")(h)
      h = jnp.sin(self.omega * h)
      fan_in = self.width
    z = nn.Dense(1, kernel_init=_siren_init(self.omega, fan_in, False), name="out")(h)
    k = leaky_sigmoid(z[:, 0]).reshape(self.size, self.size)
    return k / jnp.sum(k)


def center_of_mass(kernel):
  """Centre of mass ``(cy, cx)`` relative to the grid centre, in pixels."""
  size = kernel.shape[0]
  idx = jnp.arange(size, dtype=kernel.dtype) - (size - 1) / 2.0
  total = jnp.sum(kernel)
  return jnp.sum(kernel.sum(1) * idx) / total, jnp.sum(kernel.sum(0) * idx) / total


def center_of_mass_loss(kernel):
  cy, cx = center_of_mass(kernel)
  return cy ** 2 + cx ** 2


def export_kernel(kernel):
  """Clip to non-negative, renormalise, float32 NumPy."""
  k = np.clip(np.asarray(kernel, np.float64), 0.0, None)
  return (k / k.sum()).astype(np.float32)
