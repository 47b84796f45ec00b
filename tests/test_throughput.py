"""The fast paths compute the same numbers as the plain ones; the benchmark CLI runs.

* ``ops.conv2d(..., "dots")`` (grouped-product weight gradient, padded forward) against
  ``jax.grad`` of ``lax.conv_general_dilated``;
* the U-Net's reshape max-pool and sliced bilinear upsampling against ``nn.max_pool`` and
  the gather formulation, its 1×1 conv before the upsampling against after it;
  ``runtime.jit``'s XLA:CPU compiler options (``ops.conv2d``'s col2im input gradient and swapped
  weight gradient are in ``test_ops.py``, the polyphase degradation in ``test_degrade.py``);
* Phase 2 with tiled PD against whole-image PD (loss and gradients of one iteration);
* ``Phase2.make_chunk(steps, batch=N)`` against the images run one by one, tracing once;
* ``sample.num_samples = N``: ``phase2.run``'s samples (vmapped, or one after another)
  against single runs, and their resume;
* the PyTorch reference (``kfjax.bench.torch_ref``) against kfjax with ported parameters
  (skipped without torch);
* ``precision = "bfloat16"``: PD and the U-Net against float32 (bf16 accuracy, float32
  parameters and gradients), and both phases end to end;
* ``kfjax.bench.throughput`` end to end at smoke shapes, and its FLOP formulas
  (``kfjax.bench.flops``).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfjax import config as config_lib
from kfjax import degrade
from kfjax import ops
from kfjax import runtime
from kfjax import pipeline
from kfjax import phase2
from kfjax import schedule as sch
from kfjax import phase1
from kfjax.errors import KfjaxError
from kfjax.models import kernel_net

LR_SIDE = 10
SCALE = 2
C = 3


def _key(seed):
  return jax.random.key(seed, impl="unsafe_rbg")


def _perturb(tree, seed, amount=0.1):
  """Random offsets on every leaf, so zero-initialised biases are tested too."""
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [l + amount * jnp.asarray(rng.normal(size=l.shape), l.dtype)
                                      for l in leaves])


def _smoke():
  cfg = config_lib.preset("smoke")
  cfg.scale = SCALE   # (the preset's own; Phase 2 reads it from the config)
  cfg.sample.num_steps = 2
  return cfg


# -- ops.conv2d with the grouped-product weight gradient -----------------------------------

@pytest.mark.parametrize("kh,kw,n,h,w,ci,co", [(3, 3, 4, 9, 7, 3, 5), (1, 1, 2, 6, 5, 4, 3),
                                               (5, 3, 1, 11, 8, 2, 6), (3, 3, 3, 6, 6, 8, 8)])
def test_conv2d_dots_matches_plain_grad(kh, kw, n, h, w, ci, co):
  with jax.enable_x64(True):
    rng = np.random.default_rng(kh + n)
    x = jnp.asarray(rng.normal(size=(n, h, w, ci)))
    wt = jnp.asarray(rng.normal(size=(kh, kw, ci, co)))
    wts = jnp.asarray(rng.normal(size=(n, h - kh + 1, w - kw + 1, co)))
    plain = lambda a, b: jax.lax.conv_general_dilated(a, b, (1, 1), "VALID",
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
    loss = lambda f: jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(jnp.sin(f(a, b)) * wts), (0, 1)))
    for mode in ("dots", "conv"):
      (val, (dx, dw)) = loss(lambda a, b: ops.conv2d(a, b, mode))(x, wt)
      (ref, (dx_ref, dw_ref)) = loss(plain)(x, wt)
      np.testing.assert_allclose(float(val), float(ref), rtol=1e-12)
      np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=0, atol=1e-10)
      np.testing.assert_allclose(np.asarray(dw), np.asarray(dw_ref), rtol=0, atol=1e-10)


def test_largest_divisor():
  assert ops.largest_divisor(32 * 74, 8) == 8
  assert ops.largest_divisor(7, 8) == 7
  assert ops.largest_divisor(11, 8) == 1
  with pytest.raises(ValueError):
    ops.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), "im2col")


# -- U-Net pooling and upsampling, runtime.jit's compiler options -------------------------------

def _bilinear_gather(h):
  """The plain formulation of the U-Net's ×2 bilinear step: neighbours by gather."""
  def up(x, axis):
    n = x.shape[axis]
    prev = jnp.take(x, jnp.clip(jnp.arange(n) - 1, 0, n - 1), axis=axis)
    nxt = jnp.take(x, jnp.clip(jnp.arange(n) + 1, 0, n - 1), axis=axis)
    out = jnp.stack([0.25 * prev + 0.75 * x, 0.75 * x + 0.25 * nxt], axis=axis + 1)
    return out.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1:])
  return up(up(h, 1), 2)


def test_unet_pool_and_upsample_match_plain_ops():
  """``max_pool2`` and ``_bilinear2x`` against ``flax.linen.max_pool`` and the gather
  formulation: values and gradients (float64; random inputs, so no ties)."""
  import flax.linen as nn
  from kfjax.models import unet as unet_mod
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 8, 6, 3)))
    wts = jnp.asarray(rng.normal(size=(2, 4, 3, 3)))
    pool = lambda f: jax.value_and_grad(lambda a: jnp.sum(jnp.sin(f(a)) * wts))
    val, grad = pool(unet_mod.max_pool2)(x)
    ref, grad_ref = pool(lambda a: nn.max_pool(a, (2, 2), (2, 2)))(x)
    np.testing.assert_allclose(float(val), float(ref), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(grad_ref), atol=1e-12)
    assert np.count_nonzero(np.asarray(grad)) == wts.size  # one winner per window
    wts2 = jnp.asarray(rng.normal(size=(2, 16, 12, 3)))
    up = lambda f: jax.value_and_grad(lambda a: jnp.sum(jnp.sin(f(a)) * wts2))
    val, grad = up(unet_mod._bilinear2x)(x)
    ref, grad_ref = up(_bilinear_gather)(x)
    np.testing.assert_allclose(float(val), float(ref), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(grad_ref), atol=1e-12)


def test_unet_conv_before_upsampling_is_the_same_function():
  """The U-Net applies its 1×1 up-convolution before the bilinear ×2 step instead of after:
  the same values and gradients (input and parameters, bias included; float64). The PyTorch
  reference keeps the paper's order and is compared with the whole U-Net below."""
  from kfjax.models import unet as unet_mod
  with jax.enable_x64(True):
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(1, 6, 5, 8)))
    conv = ops.Conv(4, (1, 1), param_dtype=jnp.float64)
    params = _perturb(conv.init(_key(0), x), 1)
    wts = jnp.asarray(rng.normal(size=(1, 12, 10, 4)))
    loss = lambda f: jax.value_and_grad(lambda p, a: jnp.sum(jnp.sin(f(p, a)) * wts), (0, 1))
    val, grads = loss(lambda p, a: unet_mod._bilinear2x(conv.apply(p, a)))(params, x)
    ref, grads_ref = loss(lambda p, a: conv.apply(p, unet_mod._bilinear2x(a)))(params, x)
    np.testing.assert_allclose(float(val), float(ref), rtol=1e-12)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-12)


def test_ops_jit_compiler_options(monkeypatch):
  """On CPU ``runtime.jit`` keeps convolutions away from YNNPACK, computes what ``jax.jit``
  computes, and leaves the choice to ``XLA_FLAGS`` when the user made one."""
  assert jax.default_backend() == "cpu"
  opts = runtime.compiler_options()
  assert opts == runtime.CPU_COMPILER_OPTIONS
  rng = np.random.default_rng(0)
  # 32 channels: XLA:CPU gives convolutions this size (not tiny ones) to YNNPACK.
  x = jnp.asarray(rng.normal(size=(1, 16, 16, 32)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 32, 32)), jnp.float32)
  f = lambda a, b: jax.lax.conv_general_dilated(a, b, (1, 1), "VALID",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ours, plain = runtime.jit(f), jax.jit(f)
  # The program is one convolution: jax.jit wraps it in a YNNPACK fusion, runtime.jit does not.
  assert plain.lower(x, w).compile().as_text().count("__ynn_fusion") >= 1
  text = ours.lower(x, w).compile().as_text()
  assert "convolution(" in text and "__ynn_fusion" not in text
  # Both against a float64 NumPy reference (the two float32 programs sum the 288 products
  # in different orders, so they differ from each other by float32 rounding).
  xn, wn = np.asarray(x, np.float64), np.asarray(w, np.float64)
  ref = sum(np.einsum("nhwc,co->nhwo", xn[:, i:i + 14, j:j + 14], wn[i, j])
            for i in range(3) for j in range(3))
  for got in (ours(x, w), plain(x, w)):
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=0,
                               atol=1e-5 * np.abs(ref).max())
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
  runtime.compiler_options.cache_clear()
  try:
    assert runtime.compiler_options() is None
  finally:
    monkeypatch.undo()
    runtime.compiler_options.cache_clear()
  assert runtime.compiler_options() == runtime.CPU_COMPILER_OPTIONS


# -- Phase 2: tiled PD, vmapped images -----------------------------------------------------

@pytest.fixture(scope="module")
def pd_setup():
  cfg = _smoke()
  model = phase1.make_model(cfg, C)
  params = _perturb(jax.jit(lambda k: model.init(k, jnp.zeros((1, 16, 16, C)), jnp.ones((1,))))(
      _key(0)), 1)
  return cfg, model, params, sch.from_config(cfg)


def _lr_images(n):
  rng = np.random.default_rng(5)
  return jnp.asarray(rng.uniform(-1, 1, (n, LR_SIDE, LR_SIDE, C)), jnp.float32)


def test_phase2_tiled_pd_matches_whole(pd_setup):
  """Loss and gradients of one Phase 2 iteration with PD on 8-px tiles (HR 20 px:
  partial last tiles) equal those with whole-image PD."""
  cfg, model, params, sched = pd_setup
  lr = _lr_images(1)[0]
  out = []
  for tile in (0, 8):
    cfg_t = _smoke()
    cfg_t.sample.pd_tile, cfg_t.sample.pd_tile_batch = tile, 3
    p2 = phase2.Phase2(cfg_t, model, params, sched, lr.shape)
    state = jax.jit(p2.init)(lr, _key(2))
    xi = jax.random.normal(_key(3), state.x.shape)
    t, s = int(p2.ts[0]), int(p2.ts[1])
    f = jax.jit(jax.value_and_grad(lambda p: p2.forward(p, state.x, state.x0, t, s, xi, lr)[0]))
    out.append(f(state.params))
  (whole, g_whole), (tiled, g_tiled) = out
  np.testing.assert_allclose(float(tiled), float(whole), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                                       atol=1e-6), g_tiled, g_whole)


@pytest.fixture(scope="module")
def batched_run(pd_setup):
  """Two images through the batched chunk (two calls) and one by one (same seeds)."""
  cfg, model, params, sched = pd_setup
  lr = _lr_images(2)
  p2 = phase2.Phase2(cfg, model, params, sched, lr.shape[1:])
  # Threefry keys: with ``rbg`` keys, draws under vmap differ from the same draws alone.
  init_keys = jax.random.split(jax.random.key(10), 2)
  rngs = jax.random.split(jax.random.key(20), 2)
  chunk_b = p2.make_chunk(1, batch=2)
  state_b = jax.jit(p2.init_batch)(lr, init_keys)
  metrics_b = []
  for _ in range(p2.total_iterations):
    state_b, m = chunk_b(state_b, lr, rngs)
    metrics_b.append(m)
  chunk_1 = p2.make_chunk(p2.total_iterations)
  init = jax.jit(p2.init)
  singles = [chunk_1(init(lr[i], init_keys[i]), lr[i], rngs[i]) for i in range(2)]
  return dict(p2=p2, state_b=state_b, metrics_b=metrics_b, singles=singles, chunk_b=chunk_b)


def test_phase2_batched_matches_single(batched_run):
  """Float tolerance: vmapped convolutions round differently, and Adam's normalised
  update turns a rounding difference in a near-zero gradient into up to ``lr`` (1e-3)
  per iteration, 5 iterations here; the images differ by ~1 after the same run."""
  state_b, singles = batched_run["state_b"], batched_run["singles"]
  assert state_b.step.shape == () and int(state_b.step) == batched_run["p2"].num_steps
  loss_b = np.stack([np.asarray(m.loss)[0] for m in batched_run["metrics_b"]])  # (iterations, N)
  for i, (state, metrics) in enumerate(singles):
    np.testing.assert_allclose(np.asarray(state_b.x0[i]), np.asarray(state.x0), rtol=0, atol=1e-3)
    np.testing.assert_allclose(np.asarray(state_b.x[i]), np.asarray(state.x), rtol=0, atol=1e-3)
    np.testing.assert_allclose(loss_b[:, i], np.asarray(metrics.loss), rtol=1e-4)
    # Conv biases before a BatchNorm have a zero gradient up to rounding, which Adam
    # scales to ±lr per iteration: every entry within 5·lr; those biases are ~2 % of
    # the smoke networks' entries, and the others agree to 1e-4.
    diff = np.concatenate([np.abs(np.asarray(a[i]) - np.asarray(b)).ravel() for a, b in zip(
        jax.tree.leaves(state_b.params), jax.tree.leaves(state.params))])
    assert diff.max() <= 5.5e-3 and np.mean(diff < 1e-4) > 0.97, (diff.max(), np.mean(diff < 1e-4))
  # The two images really differ (the test would pass trivially otherwise).
  assert float(jnp.abs(state_b.x0[0] - state_b.x0[1]).max()) > 0.1


def test_phase2_batched_traces_once(batched_run):
  assert batched_run["chunk_b"]._cache_size() == 1
  m = batched_run["metrics_b"][0]
  assert m.t.shape == (1,) and m.loss.shape == (1, 2)


def test_sample_keys():
  init, noise = phase2.sample_keys(7, 1)
  assert jnp.all(init == jax.random.key(8)) and jnp.all(noise == jax.random.key(9))
  init3, noise3 = phase2.sample_keys(7, 3)
  assert init3.shape == noise3.shape == (3,)
  assert jnp.all(init3[0] == init) and jnp.all(noise3[0] == noise)  # sample 0 = the single run
  assert jnp.all(init3[2] == jax.random.fold_in(init, 2))
  assert len({int(jax.random.randint(k, (), 0, 2**30)) for k in init3}) == 3


@pytest.fixture(scope="module")
def two_single_samples(pd_setup):
  """Phase 2 run alone with each of ``sample_keys``' first two keys (one chunk, compiled once)."""
  cfg, model, params, sched = pd_setup
  cfg = cfg.copy_and_resolve_references()
  cfg.sample.iters_per_chunk = 1000  # (the largest divisor of the iterations: one chunk)
  lr = _lr_images(1)[0]
  p2 = phase2.Phase2(cfg, model, params, sched, lr.shape)
  chunk = p2.make_chunk(p2.total_iterations)
  init_keys, rngs = phase2.sample_keys(int(cfg.seed), 2)
  singles = []
  for j in range(2):
    state, _ = chunk(jax.jit(p2.init)(lr, init_keys[j]), lr, rngs[j])
    singles.append([np.asarray(a, np.float64) for a in p2.result(state)])
  return cfg, p2.num_steps, lr, singles


@pytest.mark.parametrize("vmap", [True, False])
def test_phase2_samples_are_averaged(pd_setup, two_single_samples, vmap, tmp_path):
  """``sample.num_samples = 2``: the image and kernel are the means of two runs, each
  equal to a single run with its ``sample_keys`` — up to vmap rounding (see above) when
  vmapped, exactly when run one after another (the same program); the two runs really
  differ, so the mean is not one of them. A re-run restores every sample's checkpoint."""
  _, model, params, _ = pd_setup
  cfg, num_steps, lr, singles = two_single_samples
  cfg = cfg.copy_and_resolve_references()  # (each parameter sets its own sampling options)
  cfg.sample.num_samples, cfg.sample.vmap_samples = 2, vmap
  run = lambda: phase2.run(cfg, model, params, np.asarray(lr), workdir=str(tmp_path),
                           show_progress=False)
  hr, k, info = run()
  (hr0, k0), (hr1, k1) = singles
  assert float(np.abs(hr0 - hr1).max()) > 0.1 and float(np.abs(k0 - k1).max()) > 1e-3
  tol = 1e-3 if vmap else 1e-6
  np.testing.assert_allclose(hr, (np.clip(hr0, -1, 1) + np.clip(hr1, -1, 1)) / 2, rtol=0, atol=tol)
  np.testing.assert_allclose(k, (k0 + k1) / 2, rtol=0, atol=tol / 10)
  assert hr.shape == (LR_SIDE * SCALE, LR_SIDE * SCALE, C) and k.min() >= 0
  np.testing.assert_allclose(float(k.sum()), 1.0, rtol=1e-6)
  assert info["samples"] == 2 and len(info["final_loss_per_sample"]) == 2
  np.testing.assert_allclose(info["final_loss"], np.mean(info["final_loss_per_sample"]), rtol=1e-6)
  hr_again, k_again, info_again = run()  # every sample restored from its finished checkpoint
  assert info_again["restored_step"] == num_steps
  for key in ("final_loss", "final_consistency_a", "final_loss_per_sample"):
    assert info_again[key] == info[key]  # kept with the checkpoints
  np.testing.assert_array_equal(hr_again, hr)
  np.testing.assert_array_equal(k_again, k)


# -- bf16 mixed precision -----------------------------------------------------------------

def _rel_err(a, b):
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _cosine(a, b):
  a = np.concatenate([np.asarray(l, np.float64).ravel() for l in jax.tree.leaves(a)])
  b = np.concatenate([np.asarray(l, np.float64).ravel() for l in jax.tree.leaves(b)])
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _bf16(cfg):
  cfg = cfg.copy_and_resolve_references()
  cfg.precision = "bfloat16"
  pipeline.validate_config(cfg)
  return cfg


def test_bf16_networks_follow_float32(pd_setup):
  """``precision = "bfloat16"``: PD and the U-Net use the same float32 parameters, return
  float32, and agree with float32 to bf16 accuracy — the error is above float32 rounding
  (so bf16 really computes) and about 1e-2 (8 mantissa bits); their parameter gradients
  are float32 and point the same way (cosine 0.988 for the tiny U-Net, whose
  BatchNorm divides by small bf16 variances)."""
  cfg32, pd32, params, _ = pd_setup
  cfg16 = _bf16(cfg32)
  pd16 = phase1.make_model(cfg16, C)
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.uniform(-1, 1, (2, 34, 34, C)), jnp.float32)
  t = jnp.asarray([5, 17])
  nets = [(pd32, pd16, params, lambda m, p: m.apply(p, x, t))]
  un32, un16 = phase2.make_unet(cfg32, C), phase2.make_unet(cfg16, C)
  up = _perturb(jax.jit(un32.init)(_key(4), jnp.zeros((1, 16, 16, C))), 5, 0.05)
  assert jax.tree.structure(jax.eval_shape(un16.init, _key(4), jnp.zeros((1, 16, 16, C)))) == \
      jax.tree.structure(up)
  nets.append((un32, un16, up, lambda m, p: m.apply(p, x[:1, :32, :32], mutable=["batch_stats"])[0]))
  for m32, m16, p, apply in nets:
    # Jitted (op-by-op dispatch of these networks and their gradients is slow on CPU).
    fwd = lambda m: jax.jit(lambda q: apply(m, q))(p)
    y32, y16 = fwd(m32), fwd(m16)
    assert y16.dtype == jnp.float32 and y16.shape == y32.shape
    assert 1e-4 < _rel_err(y16, y32) < 3e-2, (type(m32).__name__, _rel_err(y16, y32))
    grad = lambda m: jax.jit(jax.grad(lambda q: jnp.mean(apply(m, q) ** 2)))(p)
    g32, g16 = grad(m32), grad(m16)
    assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(g16))
    assert _cosine(g16, g32) > 0.97, (type(m32).__name__, _cosine(g16, g32))


def test_bf16_phases_run_and_checkpoints_are_kept_apart(tmp_path):
  """Both phases under ``precision = "bfloat16"``: float32 parameters, a valid kernel, a
  finite image; the checkpoints' fingerprints differ from float32's (a float32 run never
  resumes a bf16 one), while float32's are those of a config without the field."""
  cfg32 = config_lib.preset("smoke")
  cfg32.scale = SCALE   # (the preset's own)
  cfg16 = _bf16(cfg32)
  lr = np.asarray(_lr_images(1)[0])
  model, params, info = phase1.train(cfg16, lr, str(tmp_path / "pd"), show_progress=False)
  assert info["final_loss"] is not None and np.isfinite(info["final_loss"])
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(params))
  hr, k, info2 = phase2.run(cfg16, model, params, lr, show_progress=False)
  assert hr.shape == (LR_SIDE * SCALE, LR_SIDE * SCALE, C) and np.all(np.isfinite(hr))
  assert k.min() >= 0 and abs(float(k.sum()) - 1) < 1e-5 and np.isfinite(info2["final_loss"])
  legacy = cfg32.to_dict()
  legacy.pop("precision")
  import ml_collections
  legacy = ml_collections.ConfigDict(legacy)
  assert phase1.fingerprint(cfg32, lr) == phase1.fingerprint(legacy, lr)
  assert phase1.fingerprint(cfg16, lr) != phase1.fingerprint(cfg32, lr)
  # The float32 run in the same workdir does not restore the bf16 PD.
  with pytest.raises(KfjaxError, match="another image or config"):
    phase1.train(cfg32, lr, str(tmp_path / "pd"), show_progress=False)


# -- the PyTorch reference ---------------------------------------------------------------

def test_torch_reference_matches_kfjax(pd_setup):
  torch = pytest.importorskip("torch")
  from kfjax.bench import torch_ref
  cfg, model, params, sched = pd_setup
  nchw = lambda a: torch.as_tensor(np.asarray(a, np.float32)).permute(0, 3, 1, 2).contiguous()
  nhwc = lambda t: t.detach().permute(0, 2, 3, 1).numpy()
  rng = np.random.default_rng(7)
  # PD.
  x = rng.uniform(-1, 1, (2, 24, 26, C)).astype(np.float32)
  t = np.array([3, 800])
  tpd = torch_ref.load_pd(torch_ref.pd_from_config(cfg, C), params)
  np.testing.assert_allclose(nhwc(tpd(nchw(x), torch.as_tensor(t))),
                             np.asarray(model.apply(params, x, t)), rtol=0, atol=2e-5)
  # U-Net on a size that needs padding (levels = 2: multiples of 2).
  unet = phase2.make_unet(cfg, C)
  xu = rng.uniform(-1, 1, (1, 13, 10, C)).astype(np.float32)
  uparams = _perturb(jax.jit(unet.init)(_key(4), xu), 2)
  tun = torch_ref.load_unet(torch_ref.unet_from_config(cfg, C), uparams)
  ref = unet.apply(uparams, xu, mutable=["batch_stats"])[0]
  np.testing.assert_allclose(nhwc(tun(nchw(xu))), np.asarray(ref), rtol=0, atol=2e-5)
  # SIREN and the downscale operator.
  kn = kernel_net.SirenKernel(size=12, width=cfg.kernel.width, depth=cfg.kernel.depth,
                              omega=cfg.kernel.omega)
  kparams = jax.jit(kn.init)(_key(5))
  tk = torch_ref.load_siren(torch_ref.siren_from_config(cfg, 12), kparams)
  np.testing.assert_allclose(tk().detach().numpy(), np.asarray(kn.apply(kparams)), rtol=1e-5, atol=1e-8)
  # The deep linear CNN kernel net (the cpu preset's), ×2 (sizes 5,3,3,1,1,2) and ×4 (7,7,5,3,1,4).
  cpu = config_lib.preset("cpu")
  for s, k in ((2, 12), (4, 24)):
    lc = kernel_net.make(cpu.kernel, k, s)
    lparams = _perturb(jax.jit(lc.init)(_key(8 + s)), 9, 0.01)
    tl = torch_ref.load_kernel(torch_ref.kernel_from_config(cpu, k, s), lparams)
    assert isinstance(tl, torch_ref.LinearCNNKernel)
    np.testing.assert_allclose(tl().detach().numpy(), np.asarray(lc.apply(lparams)), rtol=0, atol=1e-6)
  for s, k in ((2, 12), (3, 7)):
    kern = rng.uniform(0, 1, (k, k)).astype(np.float32)
    np.testing.assert_allclose(nhwc(torch_ref.downscale(nchw(xu), torch.as_tensor(kern), s)),
                               np.asarray(degrade.downscale(xu, kern, s)), rtol=0, atol=1e-5)
  # Phase 1 loss on a fixed batch.
  batch = rng.uniform(-1, 1, (2, 30, 30, C)).astype(np.float32)
  noise = rng.normal(size=batch.shape).astype(np.float32)
  step = torch_ref.Phase1Step(tpd, sched, batch[0], 2, 16, channels_last=False)
  got = step.loss(nchw(batch), torch.as_tensor(t), nchw(noise)).item()
  ref = float(phase1.loss_fn(model, sched, params, batch, jnp.asarray(t), noise))
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  # The Phase 2 iteration: loss and outputs of the forward.
  lr = _lr_images(1)[0]
  p2 = phase2.Phase2(cfg, model, params, sched, lr.shape)
  state = jax.jit(p2.init)(lr, _key(6))
  p2_params = _perturb(state.params, 3, 0.01)
  xi = np.asarray(jax.random.normal(_key(7), state.x.shape))
  ts, ss = int(p2.ts[0]), int(p2.ts[1])
  loss, (x_s, b, *_) = jax.jit(lambda p: p2.forward(p, state.x, state.x0, ts, ss, xi, lr))(p2_params)
  ksize = phase2.kernel_size(cfg)
  it = torch_ref.Phase2Iteration(
      torch_ref.load_unet(torch_ref.unet_from_config(cfg, C), p2_params["unet"]),
      torch_ref.load_kernel(torch_ref.kernel_from_config(cfg, ksize, SCALE), p2_params["kernel"]),
      torch_ref.load_pd(torch_ref.pd_from_config(cfg, C), params), sched,
      *[np.asarray(a)[None].transpose(0, 3, 1, 2) for a in (state.x, state.x0, xi, lr)],
      ts, ss, SCALE, float(cfg.sample.com_weight), channels_last=False)
  t_loss, (t_xs, t_b, *_) = it.forward()
  np.testing.assert_allclose(nhwc(t_xs)[0], np.asarray(x_s), rtol=0, atol=2e-5)
  np.testing.assert_allclose(nhwc(t_b)[0], np.asarray(b), rtol=0, atol=5e-5)
  np.testing.assert_allclose(t_loss.item(), float(loss), rtol=1e-4)
  assert np.isfinite(float(it()))  # one full torch iteration runs


# -- the benchmark CLI -------------------------------------------------------------------

def test_throughput_cli_smoke(tmp_path, capsys):
  from kfjax.bench import flops
  from kfjax.bench import jax_timing
  from kfjax.bench import throughput
  from kfjax.bench import torch_timing
  # ``scaling`` runs the same function as ``phase2`` at other sizes; left out to save a compile.
  throughput.parse_for_tests(["--preset=smoke", "--steps=2", "--iters=2", "--repeats=1",
                              "--hr_size=24", "--images=2", "--peak_size=128", "--notorch"])
  r = throughput.run_all("smoke", {"phase1", "phase2", "batch", "parts"}, use_torch=False)
  p1 = r["phase1"]
  assert p1["step_s"] > 0 and p1["compile_s"] > 0 and 0 < p1["peak_fraction"]
  # The analytic FLOP count agrees with XLA's count of the same step within 10 %.
  assert p1["xla_flops_per_step"] is None or abs(p1["xla_flops_per_step"] / p1["flops_per_step"] - 1) < 0.1
  assert r["phase2"]["iter_s"] > 0 and r["phase2"]["reverse_iterations"] == 3 + 3 * 2
  # Phase 2's convolution count against XLA's count of the whole iteration, which includes
  # elementwise work (BatchNorm, col2im's adds, ...): ~38 % more at these 4-8-channel shapes,
  # 4 % at the cpu preset's 256². A missing backward pass would be 2-3×.
  p2 = r["phase2"]
  assert p2["xla_flops_per_iter"] is None or 1.0 < p2["xla_flops_per_iter"] / p2["flops_per_iter"] < 1.6
  assert 0 < p2["peak_fraction"] and "| Phase 2 FLOPs |" in throughput.format_tables(r)
  # Parts: every one timed, FLOPs from the same formulas.
  parts = r["parts"]["rows"]
  assert set(parts) == set(jax_timing.PARTS) and all(row["s"] > 0 for row in parts.values())
  cfg = throughput.phase2_config("smoke", 2)
  unet = flops.unet_flops(cfg, 24, 24)[0]
  assert [parts[k]["flops"] for k in ("unet_fwd", "unet_grad_x", "unet_grad_all")] == [unet, 2 * unet, 3 * unet]
  assert parts["pd_grad_x"]["flops"] == 2 * flops.pd_flops(cfg, 24)
  assert "| unet_grad_all |" in throughput.format_tables(r)
  if torch_timing.have_torch():
    torch_parts = torch_timing.bench_parts_torch(cfg, 24, 1, 1)
    assert set(torch_parts) == set(jax_timing.PARTS) and all(v["s"] > 0 for v in torch_parts.values())
  assert r["batch"][0]["images"] == 2 and r["batch"][0]["images_per_hour"] > 0
  assert "| Phase 1 |" in throughput.format_tables(r) and r["precision"] == "float32"
  assert r["conv_backward"] == "custom" and "conv gradients: custom" in throughput.format_tables(r)
  # One image: Phase 1's training steps at the timed step time + the reverse process.
  e = r["per_image"]
  smoke = config_lib.preset("smoke")
  assert e["phase1_steps"] == int(smoke.train.steps) and not e["phase2_measured"]
  assert e["seconds"] == pytest.approx(e["phase1_steps"] * p1["step_s"] + p2["reverse_estimate_s"])
  # Its FLOP budget, counted independently: Phase 1's steps × the step's PD forward +
  # backward over the batch, the reverse process's iterations (pinned to 9 above) × one
  # iteration's FLOPs.
  flops1 = e["phase1_steps"] * 3 * p1["batch"] * flops.pd_flops(smoke, p1["crop"])
  flops2 = p2["reverse_iterations"] * flops.phase2_flops(smoke, p2["hr_size"])
  assert (e["phase1_flops"], e["phase2_flops"]) == (flops1, flops2)
  assert e["floor_s"] == pytest.approx((flops1 + flops2) / r["matmul_peak_flop_s"])
  assert 0 < e["floor_s"] < e["seconds"]
  # --from_json prints the tables of a saved run (what launch/device_check.sh brings back).
  saved = tmp_path / "r.json"
  saved.write_text(json.dumps(r))
  throughput.parse_for_tests([f"--from_json={saved}"])
  capsys.readouterr()
  throughput.main([])
  assert capsys.readouterr().out.strip() == throughput.format_tables(r).strip()
  tables = throughput.format_tables(r)
  assert "Per image (24² HR" in tables and "FLOPs per image:" in tables
  assert throughput._duration(7300.0) == "7300 s (2.0 h)" and throughput._duration(90.0) == "90.0 s"
  throughput.parse_for_tests(["--preset=smoke", "--precision=bfloat16"])
  assert throughput.preset_config("smoke").precision == "bfloat16"
  assert throughput.phase2_config("smoke", 2).precision == "bfloat16"
  throughput.parse_for_tests([])  # back to the defaults for any later test


def test_torch_reference_device(monkeypatch):
  """``--torch_device``: auto is the CPU here and CUDA when JAX runs on a GPU that torch
  sees; the PyTorch benchmarks make their tensors on that device."""
  torch = pytest.importorskip("torch")
  from kfjax.bench import throughput
  from kfjax.bench import torch_timing
  throughput.parse_for_tests([])
  assert torch_timing.torch_device() == "cpu"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
  assert torch_timing.torch_device() == "cuda"
  throughput.parse_for_tests(["--torch_device=cpu"])
  assert torch_timing.torch_device() == "cpu"
  throughput.parse_for_tests([])
  # "meta" stands in for a GPU: no data, but every tensor made inside says where it is.
  monkeypatch.setattr(torch_timing, "torch_device", lambda: "meta")
  made = torch_timing._on_torch_device(lambda: (torch.zeros(2), torch.tensor(np.ones(2)),
                                                torch.nn.Linear(2, 2).weight))()
  assert all(t.device.type == "meta" for t in made)
  assert torch.zeros(2).device.type == "cpu"  # only inside


def test_pd_flops_formula():
  from kfjax.bench import flops
  cfg = config_lib.preset("smoke")  # 8 channels, 5 blocks, crop 16 (input 30)
  c = 8
  expected = (2 * 28 ** 2 * 9 * 3 * c + 2 * 26 ** 2 * 9 * c * c
              + sum(2 * s * s * (9 + 1) * c * c for s in (24, 22, 20, 18, 16)) + 2 * 16 ** 2 * c * 3)
  assert flops.pd_flops(cfg, 16) == expected


def test_unet_and_phase2_flops_formula():
  from kfjax.bench import flops
  cfg = config_lib.preset("smoke")  # U-Net 4 → 8 channels over 2 levels; PD 8 channels; ×2, K = 12
  conv = lambda n, k, ci, co: 2 * n * n * k * k * ci * co
  first = conv(24, 3, 3, 4)
  unet = (first + conv(24, 3, 4, 4) + conv(12, 3, 4, 8) + conv(12, 3, 8, 8)  # down, bottom
          + conv(12, 1, 8, 4) + conv(24, 3, 8, 4) + conv(24, 3, 4, 4)        # up (1×1 at 12²)
          + conv(24, 1, 4, 3))                                               # out
  assert flops.unet_flops(cfg, 24, 24) == (unet, first)
  assert flops.unet_flops(cfg, 23, 23) == (unet, first)  # padded to a multiple of 2
  downscale = 3 * conv(12, 12, 1, 1)  # 12² LR output, 12×12 kernel, one filter per colour channel
  assert flops.phase2_flops(cfg, 24) == (6 * unet - first + 2 * flops.pd_flops(cfg, 24)
                                         + 6 * downscale)
