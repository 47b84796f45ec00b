"""The KernelFusion ablation options (issue 5): kernel nets, two U-Nets, DIP.

Every option runs Phase 2 under the ``smoke`` preset (three chunks of three iterations, crossing reverse steps),
traces its chunk once, and yields a valid kernel; non-blind mode is traced for each
(``jax.eval_shape``, no compilation). The kernel networks' own properties (normalised,
the linear CNN's explicit kernel equals what it does to images) are checked directly.
PD is untrained (random parameters): these tests are about plumbing, not quality.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfjax import config as config_lib
from kfjax import degrade
from kfjax import pipeline
from kfjax import phase2
from kfjax import schedule as sch
from kfjax import phase1
from kfjax.errors import KfjaxError
from kfjax.models import kernel_net

LR_SHAPE = (12, 16, 3)
SCALE = 2

OPTIONS = {
    "direct_relu": {"kernel.net": "direct_relu"},
    "direct_sigmoid": {"kernel.net": "direct_sigmoid"},
    "linear_cnn": {"kernel.net": "linear_cnn"},
    "two_unets": {"sample.two_unets": True},
    "dip": {"sample.prior": "dip"},
    "inr_gaussian_init": {"kernel.init": "gaussian", "kernel.init_steps": 20},
    "sparsity": {"sample.sparsity_weight": 0.5},
    "lr_global": {"sample.lr_schedule": "global"},
    "tv": {"sample.tv_weight": 1e-2},
}


def _key(seed):
  return jax.random.key(seed, impl="unsafe_rbg")


def _cfg(overrides=()):
  cfg = config_lib.preset("smoke")
  cfg.scale = SCALE   # (the preset's own; Phase 2 reads it from the config)
  for key, value in dict(overrides).items():
    node = cfg
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  pipeline.validate_config(cfg)
  return cfg


def _lr_image():
  h, w, c = LR_SHAPE
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  img = np.stack([np.sin(4 * xx + 3 * yy + i) * 0.7 for i in range(c)], -1)
  return jnp.asarray(img, jnp.float32)


@pytest.fixture(scope="module")
def pd():
  cfg = _cfg()
  model = phase1.make_model(cfg, LR_SHAPE[-1])
  tx = phase1.make_optimizer(cfg)
  state = jax.jit(lambda k: phase1.init_state(cfg, model, tx, LR_SHAPE, k))(_key(0))
  return model, state.params, sch.from_config(cfg)


def _count_forward(p2):
  """Count Python traces of ``p2.forward`` (one per trace of a chunk)."""
  calls = [0]
  inner = p2.forward

  def counted(*args):
    calls[0] += 1
    return inner(*args)
  p2.forward = counted
  return calls


@pytest.fixture(scope="module", params=list(OPTIONS))
def option_run(request, pd):
  name = request.param
  cfg = _cfg(OPTIONS[name])
  model, params, sched = pd
  dip = cfg.sample.prior == "dip"
  p2 = phase2.Phase2(cfg, None if dip else model, None if dip else params, sched, LR_SHAPE)
  calls = _count_forward(p2)
  lr = _lr_image()
  init = jax.jit(p2.init)(lr, _key(1))
  iters = int(cfg.sample.iters_per_chunk)
  chunk = p2.make_chunk(iters)
  state, traces, metrics = init, [], []
  for _ in range(p2.total_iterations // iters):
    state, m = chunk(state, lr, _key(2))
    traces.append(calls[0])
    metrics.append(jax.tree.map(np.asarray, m))
  metrics = phase2.Phase2Metrics(*[np.concatenate(f) for f in zip(*metrics)])
  hr, k = p2.result(state)
  return dict(name=name, cfg=cfg, p2=p2, init=init, state=state, chunk=chunk, traces=traces,
              metrics=metrics, hr=np.asarray(hr), kernel=np.asarray(k))


def test_option_runs_traces_once_and_gives_a_valid_kernel(option_run):
  r = option_run
  assert len(r["traces"]) == 3 and r["traces"][0] >= 1
  assert r["traces"][1:] == r["traces"][:1] * 2, "the chunk was traced again on a later call"
  assert r["chunk"]._cache_size() == 1
  assert int(r["state"].step) == r["p2"].num_steps and int(r["state"].it) == 0
  k = r["kernel"]
  ksize = phase2.kernel_size(r["cfg"])
  assert k.shape == (ksize, ksize) and np.all(np.isfinite(k))
  assert abs(float(k.sum()) - 1.0) < 1e-4
  e = kernel_net.export_kernel(k)
  assert e.dtype == np.float32 and e.min() >= 0 and abs(float(e.sum()) - 1.0) < 1e-5
  hr = r["hr"]
  assert hr.shape == (LR_SHAPE[0] * SCALE, LR_SHAPE[1] * SCALE, LR_SHAPE[2])
  assert np.all(np.isfinite(hr)) and hr.min() >= -1 and hr.max() <= 1
  for f in r["metrics"]:
    assert np.all(np.isfinite(f))
  # The kernel was optimised (it moved from its initial value).
  k0 = np.asarray(r["p2"].kernel(r["init"].params))
  assert np.abs(k - k0).max() > 0


def test_option_specifics(option_run):
  r = option_run
  name, init, state, m = r["name"], r["init"], r["state"], r["metrics"]
  w = r["cfg"].sample.com_weight
  if name == "two_unets":
    assert set(init.params) == {"unet", "unet2", "kernel"}
    a, b = jax.tree.leaves(state.params["unet"]), jax.tree.leaves(state.params["unet2"])
    assert any(np.abs(np.asarray(x) - np.asarray(y)).max() > 0 for x, y in zip(a, b))
  else:
    assert set(init.params) == {"unet", "kernel"}
  if name == "sparsity":
    # The sparsity term is in the loss: loss − (cons_a + cons_b + λ_com·COM) = λ_sp·S(k),
    # and S(k) = mean((|k| + ε)^0.2) is at most (1/K²)^0.2 for a kernel summing to 1 (the
    # uniform kernel, by concavity), so 0 < extra ≤ λ_sp·(K²)^-0.2 (λ_sp = 0.5).
    extra = m.loss - (m.cons_a + m.cons_b + w * m.com)
    k2 = phase2.kernel_size(r["cfg"]) ** 2
    assert np.all(extra > 0) and np.all(extra <= 0.5 * k2 ** -0.2 * 1.001)
  if name == "dip":
    # The network input is fixed (bicubic upscale); the loss counts it twice (a = b).
    np.testing.assert_array_equal(np.asarray(state.x0), np.asarray(init.x0))
    np.testing.assert_array_equal(m.cons_a, m.cons_b)
    np.testing.assert_allclose(m.loss, 2 * m.cons_a + w * m.com, rtol=1e-5, atol=1e-7)
    assert not np.array_equal(r["hr"], np.asarray(state.x0))  # result is R(x0)
  elif name == "tv":
    # λ_tv·(TV(a) + TV(b)) is in the loss: positive, and at most λ_tv·2·sqrt(8C + ε²) for
    # images in [−1, 1] (each difference at most 2 in each of C channels, two directions).
    extra = m.loss - (m.cons_a + m.cons_b + w * m.com)
    assert np.all(extra > 0) and np.all(extra <= 1e-2 * 2 * np.sqrt(8 * LR_SHAPE[2] + 1))
  elif name != "sparsity":
    np.testing.assert_allclose(m.loss, m.cons_a + m.cons_b + w * m.com, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_nonblind_traces(name, pd):
  """Non-blind mode with each option: the kernel stays the given one (traced only)."""
  cfg = _cfg(OPTIONS[name])
  model, params, sched = pd
  k = np.zeros((12, 12), np.float32)
  k[5:7, 5:7] = 0.25
  p2 = phase2.Phase2(cfg, model, params, sched, LR_SHAPE, fixed_kernel=k)
  lr = jax.ShapeDtypeStruct(LR_SHAPE, jnp.float32)
  init = jax.eval_shape(p2.init, lr, _key(5))
  assert "kernel" not in init.params
  state, metrics = jax.eval_shape(p2.make_chunk(2), init, lr, _key(6))
  assert jax.tree.structure(state) == jax.tree.structure(init)
  assert metrics.loss.shape == (2,)
  np.testing.assert_array_equal(np.asarray(p2.kernel(init.params)), k)


# -- kernel networks ------------------------------------------------------------------------

@pytest.mark.parametrize("net", kernel_net.KERNEL_NETS)
@pytest.mark.parametrize("scale,size", [(2, 12), (4, 24), (3, 18)])
def test_kernel_nets_are_normalised(net, scale, size):
  cfg = _cfg({"kernel.net": net})
  module = kernel_net.make(cfg.kernel, size, scale)
  params = jax.jit(module.init)(_key(3))
  k = np.asarray(jax.jit(module.apply)(params))
  assert k.shape == (size, size) and np.all(np.isfinite(k))
  assert abs(float(k.sum()) - 1.0) < 1e-5
  if net.startswith("direct"):
    assert k.min() >= 0
    # Starts as a centred blob: centre of mass at the grid centre, peak in the middle.
    cy, cx = kernel_net.center_of_mass(jnp.asarray(k))
    assert abs(float(cy)) < 1e-4 and abs(float(cx)) < 1e-4
    assert k[size // 2, size // 2] == pytest.approx(k.max(), rel=1e-3)


def test_direct_kernels_stay_normalised_after_any_parameters():
  for act in ("relu", "sigmoid"):
    module = kernel_net.DirectKernel(size=8, activation=act)
    w = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8)), jnp.float32)
    k = np.asarray(module.apply({"params": {"w": w}}))
    assert k.min() >= 0 and abs(float(k.sum()) - 1.0) < 1e-5
    if act == "relu":
      assert np.all(k[np.asarray(w) <= 0] == 0)


@pytest.mark.parametrize("scale,size,sizes", [
    (2, 12, None),            # default at x2: [5, 3, 3, 1, 1, 2]
    (4, 24, None),            # the paper's [7, 7, 5, 3, 1, 4]
    (3, 18, None),
    (2, 14, (7, 5, 3, 1, 1, 1)),  # KernelGAN's generator
    (2, 13, (3, 3, 1, 2)),    # odd K at even s: the net's field sits off-centre
])
def test_linear_cnn_explicit_kernel_is_what_it_does_to_images(scale, size, sizes):
  sizes = sizes or kernel_net.linear_cnn_sizes(scale, size)
  net = kernel_net.LinearCNN(sizes=sizes, channels=3, scale=scale, size=size, init_noise=2.0)
  params = net.init(_key(4), method=net.explicit_kernel)
  k = jax.jit(lambda p: net.apply(p, method=net.explicit_kernel))(params)
  assert k.shape == (size, size)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 21, 26, 3)), jnp.float32)
  y_net = jax.jit(lambda p, x: net.apply(p, x, method=net.downscale_layers))(params, x)
  y_ker = degrade.downscale(x, k, scale)
  assert y_net.shape == y_ker.shape == (2, -(-21 // scale), -(-26 // scale), 3)
  np.testing.assert_allclose(np.asarray(y_net), np.asarray(y_ker), atol=2e-5, rtol=1e-5)
  # Float64 reference for the kernel itself: compose the layers by hand.
  ws = [np.asarray(params["params"][f"conv{i}"], np.float64) for i in range(len(sizes))]
  comp = ws[0][:, :, 0, :]                            # (k, k, C)
  for w in ws[1:]:                                    # full correlation chain
    kh = w.shape[0]
    n = comp.shape[0] + kh - 1
    out = np.zeros((n, n, w.shape[-1]))
    for u in range(kh):
      for v in range(kh):
        out[u:u + comp.shape[0], v:v + comp.shape[0]] += comp @ w[u, v]
    comp = out
  corr = comp[:, :, 0]                                # correlation filter, size F
  f = corr.shape[0]
  d = (size - f) // 2
  expect = np.pad(corr[::-1, ::-1], ((size - f - d, d), (size - f - d, d)))
  np.testing.assert_allclose(np.asarray(k), expect, atol=1e-5)


@pytest.mark.parametrize("scale,size,sizes", [
    (2, 14, (7, 5, 3, 1, 1, 1)),  # KernelGAN's generator
    (2, 16, (7, 5, 5, 1)),        # DDM4IP's kernel net (B.4)
    (3, 13, (3, 3, 1, 3)),        # odd K, stride 3
])
def test_linear_cnn_downscale_has_the_layers_values_and_gradients(scale, size, sizes):
  """``downscale`` (explicit kernel, one filter) and ``downscale_layers`` (the layers on
  every plane) are one function of the weights: same values and same weight and image
  gradients of a loss, in float64, so KernelGAN and DDM4IP train as through the layers."""
  net = kernel_net.LinearCNN(sizes=sizes, channels=4, scale=scale, size=size, init_noise=1.0)
  params32 = net.init(_key(7), method=net.explicit_kernel)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params32)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 23, 20, 3)))
    target = jnp.asarray(rng.normal(size=(2, -(-23 // scale), -(-20 // scale), 3)))

    def loss(method):
      return lambda p, x: jnp.sum((net.apply(p, x, method=method) - target) ** 2)
    fast, ref = loss(net.downscale), loss(net.downscale_layers)
    np.testing.assert_allclose(float(fast(params, x)), float(ref(params, x)), rtol=1e-12)
    g_fast = jax.grad(fast, argnums=(0, 1))(params, x)
    g_ref = jax.grad(ref, argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
      assert a.dtype == jnp.float64 and a.shape == b.shape
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10,
                                 atol=1e-12 * float(jnp.max(jnp.abs(b))))


def test_linear_cnn_starts_as_area_averaging():
  net = kernel_net.LinearCNN(sizes=(5, 3, 3, 1, 1, 2), channels=8, scale=2, size=12,
                             init_noise=0.0)
  k = np.asarray(net.apply(net.init(_key(0), method=net.explicit_kernel),
                           method=net.explicit_kernel))
  expect = np.zeros((12, 12))
  expect[5:7, 5:7] = 0.25
  np.testing.assert_allclose(k, expect, atol=1e-6)


@pytest.mark.parametrize("overrides,needle", [
    ({"kernel.net": "foo"}, "kernel.net"),
    ({"sample.prior": "gan"}, "sample.prior"),
    ({"sample.dip_input": "zeros"}, "dip_input"),
    ({"sample.prior": "dip", "sample.two_unets": True}, "two_unets"),
    ({"kernel.net": "linear_cnn", "kernel.cnn_sizes": (9, 9, 2)}, "cnn_sizes"),
    ({"kernelgan.iterations": 0}, "kernelgan.iterations"),
    ({"kernelgan.centre": "middle"}, "kernelgan.centre"),
    ({"kernel.init": "box"}, "kernel.init"),
    ({"sample.sparsity_weight": -1.0}, "sparsity_weight"),
    ({"sample.num_samples": 0}, "num_samples"),
    ({"precision": "float16"}, "precision"),
    ({"kernel.init": "gaussian", "kernel.init_sigma": 0.0}, "init_sigma"),
])
def test_bad_option_values_are_refused(overrides, needle):
  with pytest.raises(KfjaxError, match=needle) as e:
    _cfg(overrides)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", config_lib.PRESETS)
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_presets_are_valid_at_every_scale(name, scale):
  """Every preset passes validation at ×2-×4, and its kernel net (the ``cpu`` preset's is
  the linear CNN, the others' the SIREN) builds a non-negative K×K kernel, K = 6·s,
  summing to 1 from its Phase 2 starting parameters."""
  cfg = config_lib.preset(name)
  cfg.scale = scale
  pipeline.validate_config(cfg)
  net = phase2.make_kernel_net(cfg)
  kcfg = cfg.kernel.copy_and_resolve_references()
  kcfg.init_steps = 5  # (the Gaussian fit itself is tested in test_models.py)
  params = kernel_net.initial_params(net, kcfg, scale, _key(0))
  k = kernel_net.export_kernel(np.asarray(net.apply(params)))
  assert k.shape == (6 * scale, 6 * scale) and k.min() >= 0
  np.testing.assert_allclose(float(k.sum()), 1.0, rtol=1e-5)
  assert (cfg.kernel.net == "linear_cnn") == (name == "cpu")


# -- issue 16's options: learning-rate schedule, PD levels, final restoration --------------------

def _cosine(frac, lr, lr_end):
  return lr_end + 0.5 * (lr - lr_end) * (1 + np.cos(np.pi * frac))


def test_learning_rate_schedules():
  kw = dict(n_first=5, n_iter=3, num_steps=4, lr=1e-2, lr_end=1e-4)
  per = [[float(phase2.learning_rate(i, j, **kw)) for j in range(5 if i == 0 else 3)]
         for i in range(4)]
  glob = [[float(phase2.learning_rate(i, j, schedule="global", **kw))
           for j in range(5 if i == 0 else 3)] for i in range(4)]
  # Algorithm 1: every step restarts at lr and anneals over its own iterations.
  np.testing.assert_allclose(per[0], _cosine(np.arange(5) / 5, 1e-2, 1e-4), rtol=1e-6)
  for i in (1, 2, 3):
    np.testing.assert_allclose(per[i], _cosine(np.arange(3) / 3, 1e-2, 1e-4), rtol=1e-6)
  # Global: one cosine over the 5 + 3·3 = 14 iterations, strictly decreasing.
  flat = np.concatenate(glob)
  np.testing.assert_allclose(flat, _cosine(np.arange(14) / 14, 1e-2, 1e-4), rtol=1e-5)
  assert np.all(np.diff(flat) < 0)


def test_pd_levels_stay_below_t_max():
  cfg = _cfg({"train.t_max": 20})
  sched = sch.from_config(cfg)
  assert phase1.max_level(cfg, sched) == 20
  assert phase1.max_level(_cfg(), sched) == cfg.diffusion.num_steps
  t = np.asarray(phase1.draw_levels(_key(0), 20000, 20))
  assert t.min() == 1 and t.max() == 20
  counts = np.bincount(t, minlength=21)[1:]
  assert counts.min() > 800   # uniform: 1000 per level expected


@pytest.mark.parametrize("bad,needle", [({"train.t_max": 5}, "t_max"),
                                        ({"sample.lr_schedule": "linear"}, "lr_schedule"),
                                        ({"restore.init": "noise"}, "restore.init"),
                                        ({"restore.eps": 0.0}, "restore.weight"),
                                        ({"kernel.threshold": 1.0}, "kernel.threshold"),
                                        ({"kernel.blend": 1.5}, "kernel.blend"),
                                        ({"kernel.blend_sigma": 0.0}, "kernel.blend"),
                                        ({"sample.tv_weight": -1.0}, "tv_weight")])
def test_new_options_are_validated(bad, needle):
  with pytest.raises(KfjaxError, match=needle):
    _cfg(bad)


def test_final_restore_is_the_tv_solver_from_phase2s_image():
  from kfjax import restore
  cfg = _cfg({"restore.steps": 20})
  lr = _lr_image()
  rng = np.random.default_rng(0)
  hr = np.clip(rng.normal(0, 0.5, (24, 32, 3)), -1, 1).astype(np.float32)
  k = kernel_net.gaussian_blob(12, 1.0).astype(np.float32)
  k /= k.sum()
  got, info = phase2.final_restore(cfg, lr, hr, k)
  want, values = restore.solve((np.asarray(lr) + 1) / 2, k, SCALE, 1e-4, steps=20, lr=1e-2,
                               lr_end=1e-4, eps=1e-3, x_init=(hr + 1) / 2)
  np.testing.assert_allclose(got, np.asarray(want) * 2 - 1, atol=1e-5)  # (float32 rounding)
  assert info["init"] == "phase2" and info["final_loss"] == pytest.approx(float(values[-1]))
  # From the bicubic start instead, the result differs.
  other, _ = phase2.final_restore(_cfg({"restore.steps": 20, "restore.init": "bicubic"}),
                                  lr, hr, k)
  assert np.abs(other - got).max() > 1e-3


def test_threshold_kernel_matches_numpy():
  rng = np.random.default_rng(3)
  k = rng.normal(0.02, 0.03, (12, 12))
  k[5:7, 5:7] += 0.5
  got = kernel_net.threshold_kernel(k, 0.2)
  want = np.clip(k, 0, None)
  want[want < 0.2 * want.max()] = 0
  want /= want.sum()
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got.dtype == np.float32 and (got > 0).sum() == (want > 0).sum() < 144
  np.testing.assert_allclose(kernel_net.threshold_kernel(k, 0.0), kernel_net.export_kernel(k),
                             rtol=1e-6)


def _gaussian_numpy(size, sigma):
  """Centred isotropic Gaussian at the pixel centres, sum 1 (written out here)."""
  c = np.arange(size) - (size - 1) / 2.0
  g = np.exp(-(c[:, None] ** 2 + c[None, :] ** 2) / (2.0 * sigma ** 2))
  return g / g.sum()


def test_blend_kernel_matches_numpy():
  k = np.random.default_rng(1).normal(size=(12, 12))
  got = kernel_net.blend_kernel(k, 0.3, 0.7)
  kp = np.clip(k, 0, None)
  want = 0.7 * kp / kp.sum() + 0.3 * _gaussian_numpy(12, 0.7)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
  assert got.dtype == np.float32 and abs(float(got.sum()) - 1.0) < 1e-6
  np.testing.assert_allclose(kernel_net.blend_kernel(k, 0.0, 0.7), kernel_net.export_kernel(k),
                             rtol=1e-6)
  np.testing.assert_allclose(kernel_net.blend_kernel(k, 1.0, 0.7), _gaussian_numpy(12, 0.7),
                             rtol=1e-6, atol=1e-9)


def test_blind_phase2_thresholds_and_blends_its_kernel_and_nonblind_keeps_the_given_one(pd):
  model, params, _ = pd
  lr = np.asarray(_lr_image())
  cfg = _cfg({"kernel.threshold": 0.9, "kernel.blend": 0.5, "kernel.blend_sigma": 0.4,
              "sample.num_steps": 2})
  _, k, _ = phase2.run(cfg, model, params, lr, show_progress=False)
  assert abs(k.sum() - 1) < 1e-6
  # k = 0.5·thresholded + 0.5·g: the thresholded half is zero below 0.9 × its maximum.
  thr = (k.astype(np.float64) - 0.5 * _gaussian_numpy(12, 0.4 * SCALE)) / 0.5
  assert thr.min() > -1e-6 and abs(thr.sum() - 1) < 1e-5
  assert (thr > 1e-6).sum() < 144 and thr[thr > 1e-6].min() >= 0.9 * thr.max() - 1e-5
  given = np.full((12, 12), 1 / 144, np.float32)
  given[0, 0] = 0.1 / 144
  given /= given.sum()
  _, k2, _ = phase2.run(cfg, model, params, lr, fixed_kernel=given, show_progress=False)
  np.testing.assert_array_equal(k2, given)
