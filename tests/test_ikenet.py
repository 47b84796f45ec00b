"""IKENet (``kfjax.models.ikenet``): IKE's invertible downscaler, exactly invertible."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfjax.models import ikenet


def test_space_to_depth_matches_numpy_and_inverts():
  x = np.random.default_rng(0).normal(size=(2, 6, 8, 3)).astype(np.float32)
  y = np.asarray(ikenet.space_to_depth(jnp.asarray(x)))
  assert y.shape == (2, 3, 4, 12)
  for i in range(2):
    for j in range(2):
      np.testing.assert_array_equal(y[..., (2 * i + j) * 3:(2 * i + j + 1) * 3], x[:, i::2, j::2])
  np.testing.assert_array_equal(np.asarray(ikenet.depth_to_space(jnp.asarray(y))), x)


def _random_params(net, x, seed):
  """Initialised parameters with every weight randomised (the last layers of φ, σ, ρ start
  at zero, which would make the inverse trivially exact)."""
  params = net.init(jax.random.key(seed), x)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [l + 0.2 * jax.random.normal(k, l.shape)
                                   for l, k in zip(leaves, keys)])


@pytest.mark.parametrize("scale", [2, 4])
def test_inverse_undoes_forward(scale):
  """In float64, to rounding (random weights make the couplings' values large, up to ~10³,
  so float32 rounding alone leaves ~1e-2 here, float64 ~1e-8 at ×4)."""
  with jax.enable_x64(True):
    _check_inverse(scale)


def _check_inverse(scale):
  x = jax.random.normal(jax.random.key(scale), (2, 16, 24, 3), jnp.float64)
  net = ikenet.IKENet(channels=3, scale=scale, couplings=4, hidden=8)
  params = jax.tree.map(lambda a: a.astype(jnp.float64), _random_params(net, x, scale))
  down, zs = net.apply(params, x, method=net.forward)
  assert down.shape == (2, 16 // scale, 24 // scale, 3)
  assert len(zs) == {2: 1, 4: 2}[scale] and zs[-1].shape == down.shape[:3] + (12,)
  back = net.apply(params, down, zs, method=net.inverse)
  np.testing.assert_allclose(np.asarray(back), np.asarray(x), atol=1e-6)
  # The couplings do act: the downscaled output is not a plain subsample.
  assert float(jnp.abs(down - x[:, ::scale, ::scale]).max()) > 0.1


def test_untrained_net_is_the_pixel_shuffle():
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 3))
  net = ikenet.IKENet(channels=3, scale=2, hidden=8)
  params = net.init(jax.random.key(1), x)
  down, (z,) = net.apply(params, x, method=net.forward)
  np.testing.assert_array_equal(np.asarray(down), np.asarray(x[:, ::2, ::2]))
  np.testing.assert_array_equal(np.asarray(z[..., 9:]), np.asarray(x[:, ::2, ::2]))
