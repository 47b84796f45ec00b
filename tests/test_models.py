"""Tests for ``kfjax.models``: PD receptive field and tiling, U-Net, SIREN kernel, COM."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfjax import config as config_lib
from kfjax.models import kernel_net
from kfjax.models import pd as pd_lib
from kfjax.models import unet as unet_lib

C = 3


# -- patch diffusion -----------------------------------------------------------------------

def _key(seed):
  # Parameter initialisation with the default threefry PRNG takes seconds to compile on
  # XLA:CPU; the counter-based "unsafe_rbg" keys compile in a fraction of that.
  return jax.random.key(seed, impl="unsafe_rbg")


def _random_params(shapes, seed):
  """NumPy-filled parameters with the tree of ``shapes`` (skips the slow ``init``):
  kernels ~ N(0, 1/fan_in), biases ~ N(0, 0.1²) (nonzero, so nothing is symmetric)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)
    return jnp.asarray(0.1 * rng.normal(size=leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def pd_model_params():
  model = pd_lib.PatchDiffusion(channels=8, out_channels=C, num_blocks=5, emb_dim=8)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 17, 17, C)),
                          jnp.ones((1,)))
  return model, _random_params(shapes, 0)


def test_pd_shapes(pd_model_params):
  model, params = pd_model_params
  assert model.receptive_field == 15
  assert pd_lib.HALO == (model.receptive_field - 1) // 2
  for h, w in [(31, 31), (15, 15), (20, 33)]:
    out = jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct((2, h, w, C), jnp.float32),
                         jax.ShapeDtypeStruct((2,), jnp.float32))
    assert out.shape == (2, h - 14, w - 14, C)


@pytest.fixture(scope="module")
def pd_input_grads(pd_model_params):
  """|d out[0, r, c, :].sum() / d x| summed over input channels, for three output pixels."""
  model, params = pd_model_params
  x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (1, 31, 31, C)), jnp.float32)
  t = jnp.asarray([37.0])

  @jax.jit
  def grads(x):
    def one(rc):
      f = lambda xx: model.apply(params, xx, t)[0, rc[0], rc[1], :].sum()
      return jnp.abs(jax.grad(f)(x)[0]).sum(-1)
    return jax.vmap(one)(jnp.asarray([[8, 8], [0, 0], [16, 3]]))

  return np.asarray(grads(x))


@pytest.mark.parametrize("which,r,c", [(0, 8, 8), (1, 0, 0), (2, 16, 3)])
def test_pd_receptive_field_exactly_15(pd_input_grads, which, r, c):
  g = pd_input_grads[which]
  nz = g != 0
  assert nz.sum() == 15 * 15
  rows, cols = np.nonzero(nz)
  # Output pixel (r, c) of the VALID network sees input rows r..r+14, cols c..c+14.
  assert (rows.min(), rows.max(), cols.min(), cols.max()) == (r, r + 14, c, c + 14)
  assert nz[r:r + 15, c:c + 15].all()


@pytest.fixture(scope="module")
def pd_whole_and_tiled(pd_model_params):
  model, params = pd_model_params
  x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (37, 29, C)), jnp.float32)
  t = 123

  @jax.jit
  def run(x):
    whole = pd_lib.apply_whole(model, params, x[None], jnp.full((1,), t))[0]
    tiled3 = pd_lib.apply_tiled(model, params, x, t, 8, 3)
    tiled_all = pd_lib.apply_tiled(model, params, x, t, 8, None)
    return whole, tiled3, tiled_all

  return [np.asarray(a) for a in run(x)]


def test_pd_tiled_equals_whole(pd_whole_and_tiled):
  whole, tiled3, tiled_all = pd_whole_and_tiled
  assert whole.shape == tiled3.shape == tiled_all.shape == (37, 29, C)
  assert np.abs(whole).max() > 1e-3  # not trivially zero
  np.testing.assert_allclose(tiled3, whole, rtol=0, atol=1e-5)
  np.testing.assert_allclose(tiled_all, whole, rtol=0, atol=1e-5)


def test_pad_halo_symmetric():
  x = jnp.arange(12.0).reshape(3, 4, 1)
  p = np.asarray(pd_lib.pad_halo(x, halo=2))[..., 0]
  ref = np.pad(np.arange(12.0).reshape(3, 4), 2, mode="symmetric")
  np.testing.assert_array_equal(p, ref)


def test_timestep_embedding():
  e = np.asarray(pd_lib.timestep_embedding(jnp.asarray([0.0, 5.0]), 8))
  assert e.shape == (2, 8)
  np.testing.assert_allclose(e[0], [1, 1, 1, 1, 0, 0, 0, 0], atol=1e-7)
  freqs = np.exp(-np.log(10_000.0) * np.arange(4) / 4)
  np.testing.assert_allclose(e[1], np.concatenate([np.cos(5 * freqs), np.sin(5 * freqs)]),
                             atol=1e-5)


# -- U-Net -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unet_outputs():
  """Residual and plain U-Nets (3 levels: sides padded to multiples of 4) on 13×11 images.

  One compiled program: the residual net is initialised for real (its ``out_conv`` must
  start at zero); the plain net (same parameter tree) gets those parameters with a
  random ``out_conv``.
  """
  x = np.random.default_rng(4).uniform(-0.99, 0.99, (2, 13, 11, C)).astype(np.float32)
  x[0, 0, 0, :] = [1.0, -1.0, 0.9995]  # saturated pixels
  x = jnp.asarray(x)
  kw = dict(out_channels=C, base_channels=4, levels=3, max_channels=8)
  res_net = unet_lib.UNet(residual=True, **kw)
  plain_net = unet_lib.UNet(residual=False, **kw)

  @jax.jit
  def run(key, x):
    params = res_net.init(key, x)
    k = params["params"]["out_conv"]["kernel"]
    plain = jax.tree.map(lambda p: p, params)
    plain["params"]["out_conv"]["kernel"] = jax.random.normal(key, k.shape) * 0.5
    res_out, _ = res_net.apply(params, x, mutable=["batch_stats"])
    plain_out, _ = plain_net.apply(plain, x, mutable=["batch_stats"])
    return params["params"]["out_conv"], res_out, plain_out

  out_conv, res_out, plain_out = run(_key(5), x)
  return np.asarray(x), out_conv, {True: np.asarray(res_out), False: np.asarray(plain_out)}


def test_unet_shape_and_range(unet_outputs):
  x, _, outs = unet_outputs
  for out in outs.values():
    assert out.shape == x.shape
    assert np.all(np.isfinite(out))
    assert np.all(np.abs(out) <= 1.0)
  assert np.std(outs[False]) > 1e-3  # not constant


def test_unet_residual_identity_at_init(unet_outputs):
  x, out_conv, outs = unet_outputs
  assert not np.any(np.asarray(out_conv["kernel"])) and not np.any(np.asarray(out_conv["bias"]))
  np.testing.assert_allclose(outs[True], np.clip(x, -0.999, 0.999), rtol=0, atol=1e-5)


def test_upsample_is_transposed_conv():
  """1×1 conv to 4·C then depth-to-space == 2×2 stride-2 ``nn.ConvTranspose``.

  Derivation: with ``lax.conv_transpose`` (flax's default ``transpose_kernel=False``) and
  VALID padding, ``out[2i + a] = W_t[1 - a] · h[i]``; ``_upsample`` takes output
  ``(2i + a, 2j + b, c)`` from 1×1-conv channel ``(2a + b)·C + c``. So
  ``W_1[ci, (2a + b)·C + c] = W_t[1 - a, 1 - b, ci, c]`` and the bias is tiled 4×.
  """
  cin, cout = 3, 2
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(2, 3, 4, cin)), jnp.float32)
  wt = rng.normal(size=(2, 2, cin, cout)).astype(np.float32)
  bt = rng.normal(size=(cout,)).astype(np.float32)
  w1 = np.zeros((cin, 4 * cout), np.float32)
  for a in range(2):
    for b in range(2):
      w1[:, (2 * a + b) * cout:(2 * a + b + 1) * cout] = wt[1 - a, 1 - b]
  b1 = np.tile(bt, 4)
  ref = nn.ConvTranspose(cout, (2, 2), strides=(2, 2), padding="VALID").apply(
      {"params": {"kernel": wt, "bias": bt}}, h)
  lin = jnp.einsum("bhwi,io->bhwo", h, w1) + b1
  got = unet_lib._upsample(lin)
  assert got.shape == ref.shape == (2, 6, 8, cout)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


# -- SIREN kernel and centre of mass ----------------------------------------------------------

@pytest.fixture(scope="module", params=[12])
def siren_kernel(request):
  net = kernel_net.SirenKernel(size=request.param, width=16, depth=3, omega=5.0)

  @jax.jit
  def run(key):
    return net.apply(net.init(key))

  return request.param, np.asarray(run(_key(6)))


def test_siren_kernel(siren_kernel):
  size, k = siren_kernel
  assert k.shape == (size, size) and k.dtype == np.float32
  assert abs(k.sum() - 1.0) < 1e-5
  assert k.min() >= -1e-4
  e = kernel_net.export_kernel(k)
  assert e.dtype == np.float32 and e.shape == (size, size)
  assert e.min() >= 0.0
  assert abs(float(e.astype(np.float64).sum()) - 1.0) < 1e-6


def test_siren_init_is_not_point_symmetric():
  # With zero biases (Flax's default) every layer is odd in the coordinates, so the
  # initial kernel had k(g) + k(−g) = const exactly; SIREN/PyTorch draw the biases.
  for seed in range(3):
    net = kernel_net.SirenKernel(size=12, width=32, depth=5, omega=5.0)
    params = net.init(_key(20 + seed))
    k = np.asarray(jax.jit(net.apply)(params), np.float64)
    pair = k + k[::-1, ::-1]
    assert pair.std() / pair.mean() > 1e-3
    for name, layer in params["params"].items():
      fan_in = layer["kernel"].shape[0]
      b = np.asarray(layer["bias"])
      assert np.abs(b).max() <= 1.0 / np.sqrt(fan_in) and np.abs(b).max() > 0.2 / np.sqrt(fan_in)
  # The zero-bias net really is point-symmetric (so the check above can fail).
  zeroed = jax.tree.map(lambda a: a, params)
  for layer in zeroed["params"].values():
    layer["bias"] = jnp.zeros_like(layer["bias"])
  k0 = np.asarray(jax.jit(net.apply)(zeroed), np.float64)
  pair0 = k0 + k0[::-1, ::-1]
  assert pair0.std() / pair0.mean() < 1e-5


def test_export_kernel_clips_negative():
  k = np.array([[0.5, -1e-4], [0.3, 0.2001]])
  e = kernel_net.export_kernel(k)
  np.testing.assert_allclose(e, np.array([[0.5, 0], [0.3, 0.2001]]) / 1.0001, rtol=1e-6)


def test_leaky_sigmoid_range():
  leak = kernel_net.LEAK
  z = jnp.asarray([-1e4, 0.0, 1e4])
  np.testing.assert_allclose(np.asarray(kernel_net.leaky_sigmoid(z)),
                             [-leak, 0.5 * (1 + leak) - leak, 1.0], rtol=0, atol=1e-7)


def test_coordinate_grid():
  g = np.asarray(kernel_net.coordinate_grid(3))
  assert g.shape == (9, 2)
  np.testing.assert_allclose(g[0], [-1, -1])
  np.testing.assert_allclose(g[1], [-1, 0])  # row-major: second coordinate varies fastest
  np.testing.assert_allclose(g[-1], [1, 1])


def _gauss(size, cy, cx, sigma=1.2):
  yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  k = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
  return (k / k.sum()).astype(np.float32)


@pytest.mark.parametrize("size", [8, 9, 12, 13])
def test_com_centred_kernel(size):
  c = (size - 1) / 2
  k = _gauss(size, c, c)
  cy, cx = map(float, kernel_net.center_of_mass(jnp.asarray(k)))
  assert abs(cy) < 1e-6 and abs(cx) < 1e-6
  assert float(kernel_net.center_of_mass_loss(jnp.asarray(k))) < 1e-6


@pytest.mark.parametrize("size,r,c", [(8, 0, 0), (8, 5, 2), (9, 4, 4), (13, 12, 3)])
def test_com_delta(size, r, c):
  k = np.zeros((size, size), np.float32)
  k[r, c] = 1.0
  cy, cx = map(float, kernel_net.center_of_mass(jnp.asarray(k)))
  assert cy == pytest.approx(r - (size - 1) / 2, abs=1e-6)
  assert cx == pytest.approx(c - (size - 1) / 2, abs=1e-6)
  loss = float(kernel_net.center_of_mass_loss(jnp.asarray(k)))
  assert loss == pytest.approx(cy ** 2 + cx ** 2, rel=1e-6)


def test_com_unnormalised_kernel():
  """COM divides by the total, so scaling the kernel does not move it."""
  k = _gauss(9, 3.0, 5.0)
  a = np.asarray(kernel_net.center_of_mass(jnp.asarray(k)))
  b = np.asarray(kernel_net.center_of_mass(jnp.asarray(3.7 * k)))
  np.testing.assert_allclose(a, b, rtol=1e-6)
  idx = np.arange(9) - 4.0
  ref = [(k.sum(1) * idx).sum() / k.sum(), (k.sum(0) * idx).sum() / k.sum()]
  np.testing.assert_allclose(a, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [12, 13])
def test_com_loss_grows_with_shift(size):
  c = (size - 1) / 2
  k = _gauss(size, c, c, sigma=1.0)
  losses = [float(kernel_net.center_of_mass_loss(jnp.asarray(np.roll(k, n, axis=(0, 1)))))
            for n in range(4)]
  assert losses[0] < 1e-6
  assert all(a < b for a, b in zip(losses, losses[1:]))
  # Shifting by n along both axes moves the COM by ~(n, n): loss ~ 2 n² (a little less
  # once the Gaussian's tail is cut by the border).
  np.testing.assert_allclose(losses[1:], [2.0, 8.0, 18.0], rtol=2e-2)


def test_com_loss_gradient_points_back():
  """One gradient step on a shifted kernel reduces the COM loss."""
  k = jnp.asarray(np.roll(_gauss(9, 4.0, 4.0), 2, axis=1))
  loss0, loss1 = jax.jit(lambda kk: (
      kernel_net.center_of_mass_loss(kk),
      kernel_net.center_of_mass_loss(kk - 1e-3 * jax.grad(kernel_net.center_of_mass_loss)(kk))))(k)
  assert float(loss1) < float(loss0)


def test_unet_bilinear_upsampling_matches_scikit_image():
  """The U-Net's ×2 bilinear step equals skimage's order-1 resize with edge mode."""
  import skimage.transform
  from kfjax.models import unet as unet_mod
  x = np.random.default_rng(0).random((1, 5, 7, 3)).astype(np.float32)
  got = np.asarray(unet_mod._bilinear2x(jnp.asarray(x)))[0]
  want = skimage.transform.resize(x[0].astype(np.float64), (10, 14, 3), order=1, mode="edge",
                                  anti_aliasing=False)
  np.testing.assert_allclose(got, want, atol=1e-6)


# -- kernel.init = "gaussian": the INR starts from a Gaussian ---------------------------------

def _kernel_config(**fields):
  """``cfg.kernel`` of the base config with ``fields`` changed."""
  kcfg = config_lib.base_config().kernel
  kcfg.update(fields)
  return kcfg


@pytest.fixture(scope="module")
def inr_inits():
  """A default-initialised SIREN and the same one fitted to a Gaussian (K = 12, ×2)."""
  kcfg = _kernel_config(net="inr", width=32, depth=3, omega=5.0, init="gaussian",
                        init_sigma=0.5, init_steps=800)
  net = kernel_net.make(kcfg, 12, 2)
  fitted = jax.jit(lambda k: net.apply(kernel_net.initial_params(net, kcfg, 2, k)))(_key(3))
  default = jax.jit(lambda k: net.apply(net.init(k)))(_key(3))
  return np.asarray(default, np.float64), np.asarray(fitted, np.float64)


def test_default_siren_starts_almost_uniform(inr_inits):
  default, _ = inr_inits
  # Why the option exists: the paper's INR starts as a near-uniform K×K box.
  assert default.max() / default.min() < 2.0


def test_gaussian_init_fits_the_gaussian(inr_inits):
  _, k = inr_inits
  # Independent target: a normalised isotropic Gaussian of std 0.5 × 2 = 1 HR pixel,
  # centred on the grid centre 5.5.
  g = _gauss(12, 5.5, 5.5, sigma=1.0).astype(np.float64)
  assert abs(k.sum() - 1.0) < 1e-5
  ncc = (k * g).sum() / np.sqrt((k * k).sum() * (g * g).sum())
  assert ncc > 0.999
  assert np.abs(k - g).max() < 0.05 * g.max()
  cy, cx = map(float, kernel_net.center_of_mass(jnp.asarray(k)))
  assert abs(cy) < 0.05 and abs(cx) < 0.05


def test_fit_kernel_reaches_an_off_centre_target():
  net = kernel_net.SirenKernel(size=8, width=32, depth=3, omega=5.0)
  target = _gauss(8, 2.0, 5.0, sigma=0.9)
  k = np.asarray(jax.jit(lambda p: net.apply(kernel_net.fit_kernel(net, p, target * 7.0, 800)))(
      net.init(_key(4))))
  ncc = (k * target).sum() / np.sqrt((k * k).sum() * (target * target).sum())
  assert ncc > 0.995  # target rescaled by 7: fit_kernel normalises it
  cy, cx = map(float, kernel_net.center_of_mass(jnp.asarray(k)))
  r = np.arange(8) - 3.5  # the (truncated) target's own centre of mass, by NumPy
  ty, tx = (target.sum(1) * r).sum() / target.sum(), (target.sum(0) * r).sum() / target.sum()
  assert abs(cy - ty) < 0.1 and abs(cx - tx) < 0.1


def test_kernel_init_only_changes_the_inr():
  for net_name in ("direct_relu", "linear_cnn"):
    kcfg = _kernel_config(net=net_name, width=8, depth=2, omega=5.0, cnn_sizes=(),
                          cnn_channels=4, init="gaussian", init_sigma=0.5, init_steps=10)
    net = kernel_net.make(kcfg, 12, 2)
    a = kernel_net.initial_params(net, kcfg, 2, _key(5))
    b = net.init(_key(5))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  kcfg = _kernel_config(net="inr", width=8, depth=2, omega=5.0, init="box")
  with pytest.raises(ValueError, match="kernel.init"):
    kernel_net.initial_params(kernel_net.make(kcfg, 12, 2), kcfg, 2, _key(5))


def test_sparsity_loss_matches_numpy_and_prefers_sparse_kernels():
  rng = np.random.default_rng(0)
  k = rng.random((12, 12))
  k /= k.sum()
  got = float(kernel_net.sparsity_loss(jnp.asarray(k, jnp.float32)))
  np.testing.assert_allclose(got, np.mean((np.abs(k) + 1e-8) ** 0.2), rtol=1e-5)
  delta = np.zeros((12, 12))
  delta[5, 5] = 1.0
  uniform = np.full((12, 12), 1 / 144)
  s = [float(kernel_net.sparsity_loss(jnp.asarray(x, jnp.float32))) for x in (delta, k, uniform)]
  assert s[0] < s[1] < s[2]
