"""IKE (``kfjax.ike``) and ``--method ike``, smoke-sized; IKENet's invertibility is in
``test_ikenet.py``."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfjax import config as config_lib
from kfjax import degrade
from kfjax import ike
from kfjax import io as kio
from kfjax.errors import KfjaxError
from kfjax.models import kernel_net

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


@pytest.mark.parametrize("scale,size", [(2, 12), (4, 24), (2, 7)])
def test_impulse_kernel_recovers_a_linear_downscalers_kernel(scale, size):
  """On kfjax's own linear operator the impulse responses give its kernel back exactly."""
  k = np.random.default_rng(size).random((size, size)) * kernel_net.gaussian_blob(size, size / 4)
  k /= k.sum()
  got = ike.impulse_kernel(lambda x: degrade.downscale(x, jnp.asarray(k, jnp.float32), scale),
                           size, scale, 3)
  np.testing.assert_allclose(got, k, atol=1e-6)


def test_sobel_mask_and_tv_against_numpy():
  flat = jnp.full((8, 8, 3), 0.3)
  np.testing.assert_allclose(np.asarray(ike.sobel_mask(flat)), 1.0)
  x = np.random.default_rng(1).normal(size=(1, 6, 7, 2))
  dx, dy = x[:, :-1, 1:] - x[:, :-1, :-1], x[:, 1:, :-1] - x[:, :-1, :-1]
  assert float(ike.tv(jnp.asarray(x), eps=0.0)) == pytest.approx(np.mean(np.sqrt(dx ** 2 + dy ** 2)), rel=1e-5)
  edge = np.zeros((8, 8, 1)); edge[:, 4:] = 1.0
  m = np.asarray(ike.sobel_mask(jnp.asarray(edge)))
  assert m.min() == pytest.approx(0.0) and m[0, 0, 0] == pytest.approx(1.0)
  box = np.asarray(ike.mean_filter(jnp.asarray(x, jnp.float32), 3))
  assert box.shape == (1, 4, 5, 2)
  np.testing.assert_allclose(box[0, 0, 0, 0], x[0, :3, :3, 0].mean(), rtol=1e-5)


def test_training_traces_once_and_gives_an_sr_image_and_kernel(lr_image, monkeypatch):
  chunks, states = [], []
  make_chunk = ike.IKE.make_chunk

  def recording(self, steps, total):
    chunks.append(make_chunk(self, steps, total))

    def chunk(*args):
      state, metrics = chunks[-1](*args)
      states.append(state)
      return state, metrics
    return chunk
  monkeypatch.setattr(ike.IKE, "make_chunk", recording)
  cfg = config_lib.preset("smoke")
  sr, k, info = ike.run(lr_image, 2, cfg, show_progress=False)
  assert len(chunks) == 1 and chunks[0]._cache_size() == 1    # 2 chunks of 2, one trace
  assert len(states) == 2 and int(states[-1].it) == 4
  assert sr.shape == (64, 64, 3) and 0 <= sr.min() and sr.max() <= 1
  assert k.shape == (12, 12) and k.min() >= 0 and abs(k.sum() - 1) < 1e-5
  assert info["iterations"] == cfg.ike.iterations and np.isfinite(list(info["final"].values())).all()
  # Untrained-ish (4 iterations): the SR image is still close to the bicubic one it adds to.
  bic = np.asarray(ike.IKE(cfg, lr_image.shape, 2).maps(jnp.asarray(lr_image))[2])
  assert np.mean(np.abs(sr - np.clip(bic, 0, 1))) < 0.1


def test_backward_adversarial_off_skips_pd2_with_the_same_updates(lr_image):
  """With ``w_bwd`` 0 PD2 is not traced; the network ends where a negligible weight (1e-30,
  below float32 resolution of the other gradients) leaves it, and PD2 is left untouched."""
  ends = {}
  for w in (0.0, 1e-30):
    cfg = config_lib.preset("smoke")
    cfg.ike.w_bwd = w
    y = jnp.asarray(lr_image * 2.0 - 1.0)
    model = ike.IKE(cfg, y.shape, 2)
    state0 = model.init(jax.random.key(3))
    maps = (*model.maps(y), y)
    ends[w] = (state0, *model.make_chunk(4, 4)(state0, maps, jax.random.key(4)))
  (s0, off, m_off), (_, tiny, m_tiny) = ends[0.0], ends[1e-30]
  assert int(off.it) == 4
  for a, b in zip(jax.tree.leaves((off.net, off.d1)), jax.tree.leaves((tiny.net, tiny.d1))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(off.d2), jax.tree.leaves(s0.d2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(tiny.d2), jax.tree.leaves(s0.d2)))
  assert np.all(np.asarray(m_off.bwd_adv) == 0) and np.all(np.asarray(m_off.d2) == 0)
  assert np.all(np.asarray(m_tiny.d2) > 0)


def test_tiles_are_the_row_major_blocks():
  x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
  got = np.asarray(ike.tiles(jnp.asarray(x), 2))
  want = [x[b, i:i + 2, j:j + 2] for b in range(2) for i in (0, 2) for j in (0, 2, 4)]
  np.testing.assert_array_equal(got, np.stack(want))


def test_pd_on_its_own_batch_is_blind_to_gain_and_offset_a_joint_batch_is_not(lr_image):
  """PD's BatchNorm normalises each batch by its own statistics, so with real and fake run
  separately (KernelGAN's way) PD's verdict on the fakes does not change when their gain and
  offset do; run on one joint batch of tiles it does. A joint-batch chunk trains."""
  y = jnp.asarray(lr_image * 2.0 - 1.0)
  cfg = config_lib.preset("smoke")
  model = ike.IKE(cfg, y.shape, 2)
  d1 = model.init(jax.random.key(0)).d1
  rng = np.random.default_rng(0)
  real = jnp.asarray(rng.uniform(-1, 1, (1, model.crop, model.crop, 3)), jnp.float32)
  fake = jnp.asarray(rng.uniform(-1, 1, (1, model.crop // 2, model.crop // 2, 3)), jnp.float32)
  verdicts = {}
  for mode in ("separate", "joint"):
    model.c.d_batch = mode
    verdicts[mode] = [np.asarray(model._d_pair(d1, real, f)[1]) for f in (fake, 3.0 * fake + 0.5)]
  np.testing.assert_allclose(*verdicts["separate"], atol=1e-4)
  assert np.max(np.abs(verdicts["joint"][0] - verdicts["joint"][1])) > 1e-2
  state0 = model.init(jax.random.key(3))
  state, m = model.make_chunk(2, 2)(state0, (*model.maps(y), y), jax.random.key(4))
  assert np.isfinite(np.asarray(m.fwd_adv)).all() and np.isfinite(np.asarray(m.d1)).all()
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state.d1), jax.tree.leaves(state0.d1)))


def test_bad_scales_and_sizes():
  cfg = config_lib.preset("smoke")
  with pytest.raises(KfjaxError, match="x2 and x4"):
    ike.IKE(cfg, (32, 32, 3), 3)
  cfg.ike.d_kernel = 15
  with pytest.raises(KfjaxError, match="too small for IKE"):
    ike.IKE(cfg, (16, 16, 3), 2)


def test_cli_method_ike(tmp_path, lr_image):
  path = str(tmp_path / "lr.png")
  kio.save_image(path, lr_image[:24, :28])      # x4 pads to a multiple of 16, crops back
  out = str(tmp_path / "out")
  run = lambda *extra: subprocess.run(
      [sys.executable, "-m", "kfjax.main", "--image", path, "--config", "smoke", "--method",
       "ike", "--scale", "4", "--workdir", out, "--quiet", *extra], capture_output=True, text=True, env=ENV,
      timeout=600)
  res = run()
  assert res.returncode == 0, res.stderr[-3000:]
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["method"] == "ike" and summary["mode"] == "ike" and summary["sr_size"] == [96, 112, 3]
  assert summary["ike"]["iterations"] == 4 and summary["kernel_size"] == 24
  k = np.load(os.path.join(out, "kernel.npy"))
  assert k.shape == (24, 24) and k.min() >= 0 and abs(k.sum() - 1) < 1e-5
  res = run("--kernel", os.path.join(out, "kernel.npy"))
  assert res.returncode != 0 and "exclude each other" in res.stderr and "Traceback" not in res.stderr


def test_compiles_without_xla_simplifier_errors():
  """The chunk with a 7×7 first discriminator layer on 64-px crops (the ``cpu`` preset's)
  compiles without XLA:CPU logging "algebraic simplifier is likely stuck in a circular
  simplification loop": a col2im input gradient (:func:`kfjax.ops.conv2d`) written as a
  chain of 49 in-place updates triggers it, and users would see it as an error line on every
  ``--method ike`` / ``kernelgan`` run."""
  code = """
import numpy as np, jax, jax.numpy as jnp
from kfjax import config, ike
cfg = config.preset("cpu")
cfg.ike.update(couplings=1, u_layers=1, d_depth=2, hidden=4, u_channels=4, d_channels=4)
y = jnp.asarray(np.random.default_rng(0).random((64, 64, 3), np.float32))
m = ike.IKE(cfg, y.shape, 2)
st = m.init(jax.random.key(0))
jax.block_until_ready(m.make_chunk(1, 10)(st, (*m.maps(y), y), jax.random.key(1)))
print("compiled")
"""
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                     timeout=600)
  assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-2000:]
  assert "simplif" not in r.stderr.lower(), r.stderr[-2000:]
