"""Tests for ``kfjax.ops``: the custom-VJP convolution against the plain XLA op."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfjax import ops
from kfjax.errors import KfjaxError

_DN = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(scope="module")
def x64():
  with jax.enable_x64(True):
    yield


def _plain(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=_DN)


def _vjps(fn, x, w, g):
  out, pull = jax.vjp(fn, x, w)
  return out, pull(g)


# (kh, kw, H, W, N, Ci, Co): kernel sizes 1, 2, 3, 5 (and one non-square kernel),
# non-square images, Ci != Co, batch > 1; Ci <= 4 with k > 1 takes the col2im input gradient.
CASES = [
    (1, 1, 6, 9, 2, 3, 5),
    (2, 2, 7, 5, 1, 4, 2),
    (3, 3, 9, 6, 3, 2, 7),
    (5, 5, 8, 11, 2, 3, 4),
    (3, 2, 6, 7, 2, 5, 1),
    (3, 3, 10, 12, 1, 3, 32),  # a first layer: few input channels (dx by col2im)
    (5, 3, 9, 8, 2, 1, 6),
]


@pytest.mark.parametrize("kh,kw,h,w,n,ci,co", CASES)
def test_conv2d_forward_and_vjp(x64, kh, kw, h, w, n, ci, co):
  rng = np.random.default_rng(kh * 10 + kw + h)
  x = jnp.asarray(rng.normal(size=(n, h, w, ci)))
  wt = jnp.asarray(rng.normal(size=(kh, kw, ci, co)))
  g = jnp.asarray(rng.normal(size=(n, h - kh + 1, w - kw + 1, co)))
  out, (dx, dw) = jax.jit(lambda a, b, c: _vjps(ops.conv2d, a, b, c))(x, wt, g)
  ref, (dx_ref, dw_ref) = jax.jit(lambda a, b, c: _vjps(_plain, a, b, c))(x, wt, g)
  assert out.dtype == jnp.float64
  assert dx.shape == x.shape and dw.shape == wt.shape
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-12)
  np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=0, atol=1e-11)
  np.testing.assert_allclose(np.asarray(dw), np.asarray(dw_ref), rtol=0, atol=1e-11)


def test_conv2d_grad_of_scalar_loss(x64):
  """Through ``jax.grad`` (not just ``vjp``) and with a nonlinearity after the conv."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 7, 6, 3)))
  wt = jnp.asarray(rng.normal(size=(3, 3, 3, 4)))
  loss = lambda f: jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.tanh(f(a, b)) ** 2), (0, 1)))
  got = loss(ops.conv2d)(x, wt)
  ref = loss(_plain)(x, wt)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-11)


def test_conv2d_float32_dtypes():
  x = jnp.ones((1, 5, 5, 2), jnp.float32)
  wt = jnp.ones((3, 3, 2, 3), jnp.float32)
  dx, dw = jax.grad(lambda a, b: jnp.sum(ops.conv2d(a, b)), (0, 1))(x, wt)
  assert dx.dtype == jnp.float32 and dw.dtype == jnp.float32


@pytest.mark.parametrize("k,padding", [(2, "SAME"), (3, "SAME"), (4, "SAME"),
                                       (3, ((1, 2), (0, 1)))])
def test_conv_module_matches_flax(x64, k, padding):
  rng = np.random.default_rng(k)
  x = jnp.asarray(rng.normal(size=(2, 7, 10, 3)))
  ours = ops.Conv(5, (k, k), padding=padding, param_dtype=jnp.float64, dtype=jnp.float64)
  theirs = nn.Conv(5, (k, k), padding=padding, param_dtype=jnp.float64, dtype=jnp.float64)
  # Same parameter tree for both (checked by shape only: running ``init`` eagerly is slow),
  # random bias too so that the bias gradient is not trivially the same.
  shapes = jax.eval_shape(ours.init, jax.random.PRNGKey(0), x)
  assert jax.tree.structure(shapes) == jax.tree.structure(
      jax.eval_shape(theirs.init, jax.random.PRNGKey(0), x))
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), shapes)
  out_shape = jax.eval_shape(theirs.apply, params, x).shape
  wts = jnp.asarray(rng.normal(size=out_shape))

  def value_and_grads(model, p, a):
    f = lambda pp, aa: jnp.sum(jnp.sin(model.apply(pp, aa)) * wts)
    return model.apply(p, a), jax.grad(f, (0, 1))(p, a)

  both = jax.jit(lambda p, a: (value_and_grads(ours, p, a), value_and_grads(theirs, p, a)))
  (out, (gp, gx)), (ref, (gp_ref, gx_ref)) = both(params, x)
  assert out.shape == ref.shape
  if padding == "SAME":
    assert out.shape == (2, 7, 10, 5)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-12)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(gx_ref), rtol=0, atol=1e-11)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0,
                                                       atol=1e-11), gp, gp_ref)


@pytest.mark.parametrize("kwargs", [dict(strides=(2, 2)), dict(kernel_dilation=(2, 2)),
                                    dict(feature_group_count=2)])
def test_conv_module_rejects_unsupported(kwargs):
  x = jnp.ones((1, 8, 8, 4))
  with pytest.raises(NotImplementedError):
    jax.eval_shape(ops.Conv(4, (3, 3), **kwargs).init, jax.random.PRNGKey(0), x)


# -- which gradients: the custom VJP on CPU, XLA's own elsewhere ------------------------------

def _has_custom_vjp(fn, *args):
  # A new function object each time: tracing is cached per function, not per mode.
  return "custom_vjp_call" in str(jax.make_jaxpr(lambda *a: fn(*a))(*args))


def test_conv_backward_choice(monkeypatch):
  x, wt = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 2))
  monkeypatch.delenv(ops.BACKWARD_ENV, raising=False)
  assert jax.default_backend() == "cpu" and ops.conv_backward() == "custom"
  assert _has_custom_vjp(ops.conv2d, x, wt)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert ops.conv_backward() == "native"
  assert not _has_custom_vjp(ops.conv2d, x, wt)
  monkeypatch.setenv(ops.BACKWARD_ENV, "custom")  # the override wins on any backend
  assert ops.conv_backward() == "custom" and _has_custom_vjp(ops.conv2d, x, wt)
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  monkeypatch.setenv(ops.BACKWARD_ENV, "native")
  assert ops.conv_backward() == "native" and not _has_custom_vjp(ops.conv2d, x, wt)
  monkeypatch.setenv(ops.BACKWARD_ENV, "auto")
  assert ops.conv_backward() == "custom"
  monkeypatch.setenv(ops.BACKWARD_ENV, "cudnn")
  with pytest.raises(KfjaxError, match="KFJAX_CONV_BACKWARD"):
    ops.conv2d(x, wt)


def test_networks_same_with_native_gradients(x64, monkeypatch):
  """The U-Net and PD (what an accelerator runs, with XLA's gradients) compute the same
  values and gradients as with the custom VJP (what the CPU runs), in float64."""
  from kfjax.models import pd as pd_lib
  from kfjax.models import unet as unet_lib
  rng = np.random.default_rng(7)
  unet = unet_lib.UNet(out_channels=3, base_channels=4, levels=2, max_channels=8,
                       dtype=jnp.float64)
  pd = pd_lib.PatchDiffusion(channels=6, num_blocks=2, emb_dim=8, dtype=jnp.float64)
  x = jnp.asarray(rng.uniform(-1, 1, (1, 10, 12, 3)))
  xp = pd_lib.pad_halo(x)
  t = jnp.full((1,), 300.0)
  f64 = lambda tree: jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), tree)
  unet_p = f64(jax.eval_shape(unet.init, jax.random.PRNGKey(0), x))
  pd_p = f64(jax.eval_shape(pd.init, jax.random.PRNGKey(0), xp, t))

  def value_and_grads():
    u = lambda p, a: jnp.sum(jnp.sin(3 * unet.apply(p, a, mutable=["batch_stats"])[0]))
    v = lambda p, a: jnp.sum(jnp.sin(pd.apply(p, a, t)))
    # A new function object per call, so that jit traces again under the current mode.
    return jax.jit(lambda up, pp, a, b: (jax.value_and_grad(u, (0, 1))(up, a),
                                         jax.value_and_grad(v, (0, 1))(pp, b)))(
                                             unet_p, pd_p, x, xp)

  monkeypatch.setenv(ops.BACKWARD_ENV, "custom")
  custom = value_and_grads()
  monkeypatch.setenv(ops.BACKWARD_ENV, "native")
  native = value_and_grads()
  leaves_c, leaves_n = jax.tree.leaves(custom), jax.tree.leaves(native)
  assert len(leaves_c) == len(leaves_n) > 10
  for a, b in zip(leaves_c, leaves_n):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-10)
