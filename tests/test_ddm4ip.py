"""DDM4IP (``kfjax.ddm4ip``) and ``--method ddm4ip``.

The method's two numerical parts are checked on toy problems with known answers, in
float64: flow matching and its sampler on a Gaussian (whose velocity field is known in
closed form), and the integrated-KL gradient on a 1-D circular Gaussian blur, where both
distributions are Gaussian, so the IKL is a closed-form integral whose finite differences
the estimator must reproduce, and descending it must recover the blur's width. Then the
method itself at the smoke preset: it traces once, its kernel is what its net does to
images, and the command line runs end to end.
"""

import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfjax import config as config_lib
from kfjax import ddm4ip
from kfjax import degrade
from kfjax import io as kio
from kfjax import kernelgan
from kfjax.errors import KfjaxError

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


# -- Gaussian toys -----------------------------------------------------------------------------

def gaussian_velocity(cov):
  """The exact rectified-flow velocity towards N(0, ``cov``): with
  ``C_t = (1−t)²I + t²Σ``, ``v(z, t) = (tΣ − (1−t)I) C_t⁻¹ z``, applied in Σ's eigenbasis
  (``Σ = U diag(λ) Uᵀ``: the factor is ``(tλ − (1−t)) / ((1−t)² + t²λ)`` per eigenvector)."""
  lam, u = jnp.linalg.eigh(jnp.asarray(cov))

  def v(z, t):
    tb = t[:, None]
    f = (tb * lam - (1 - tb)) / ((1 - tb) ** 2 + tb ** 2 * lam)
    return ((z @ u) * f) @ u.T
  return v


N_DIM, NOISE = 6, 0.05


def blur_matrix(width):
  """Circular convolution of length ``N_DIM`` with a normalised Gaussian of std ``width``."""
  d = jnp.arange(N_DIM)
  d = jnp.minimum(d, N_DIM - d)
  g = jnp.exp(-0.5 * (d / width) ** 2)
  g = g / g.sum()
  return jnp.stack([jnp.roll(g, i) for i in range(N_DIM)])


def blur_cov(width):
  """Covariance of ``y = G_w x + NOISE·e`` with x, e white."""
  g = np.asarray(blur_matrix(width))
  return g @ g.T + NOISE ** 2 * np.eye(N_DIM)


def integrated_kl(width, width_true, t_max, nodes=96):
  """``(1/t_max)∫₀^t_max KL(N(0, C_t(w)) ‖ N(0, C_t(w*))) dt`` by Gauss-Legendre, NumPy."""
  x, wq = np.polynomial.legendre.leggauss(nodes)
  ts, wq = 0.5 * t_max * (x + 1), 0.5 * t_max * wq
  a, b = blur_cov(width), blur_cov(width_true)
  total = 0.0
  for t, w in zip(ts, wq):
    ca = (1 - t) ** 2 * np.eye(N_DIM) + t ** 2 * a
    cb = (1 - t) ** 2 * np.eye(N_DIM) + t ** 2 * b
    kl = 0.5 * (np.trace(np.linalg.solve(cb, ca)) - N_DIM + np.linalg.slogdet(cb)[1]
                - np.linalg.slogdet(ca)[1])
    total += w * kl
  return total / t_max


def ikl_gradient_fn(width_true, t_max, per_t=4000, n_t=64, weighting="score"):
  """``(width, key) -> d/dw`` of ``ddm4ip.ikl_surrogate`` with exact velocities, on samples
  ``y1 = G_w x + NOISE·e`` at stratified times in [0, t_max] (jitted)."""
  t = jnp.repeat((jnp.arange(n_t) + 0.5) / n_t * t_max, per_t)
  cov = lambda w: blur_matrix(w) @ blur_matrix(w).T + NOISE ** 2 * jnp.eye(N_DIM)
  v_real = gaussian_velocity(cov(width_true))

  @jax.jit
  def grad(width, key):
    kx, ke, kz = jax.random.split(key, 3)
    x = jax.random.normal(kx, (t.shape[0], N_DIM))
    e = jax.random.normal(ke, (t.shape[0], N_DIM))
    z0 = jax.random.normal(kz, (t.shape[0], N_DIM))
    v_fake = gaussian_velocity(cov(width))

    def surrogate(w):
      y1 = x @ blur_matrix(w).T + NOISE * e
      return ddm4ip.ikl_surrogate(v_fake, v_real, y1, z0, t, weighting)[0]
    return jax.grad(surrogate)(width) * N_DIM   # the surrogate is per element
  return lambda width, key: float(grad(jnp.float64(width), key))


def ikl_gradient(width, width_true, t_max, key, **kw):
  return ikl_gradient_fn(width_true, t_max, **kw)(width, key)


def test_ikl_gradient_matches_finite_differences_of_the_closed_form():
  t_max, w_true = 0.9, 1.4
  for width in (0.8, 2.0):
    h = 1e-4
    fd = (integrated_kl(width + h, w_true, t_max) - integrated_kl(width - h, w_true, t_max)) / (2 * h)
    est = ikl_gradient(width, w_true, t_max, jax.random.key(int(width * 10)))
    assert np.sign(est) == np.sign(fd) != 0
    assert est == pytest.approx(fd, rel=0.05), (width, est, fd)
  # At the true width the gradient vanishes (to Monte-Carlo noise).
  fd_scale = abs((integrated_kl(0.8 + 1e-4, w_true, t_max)
                  - integrated_kl(0.8 - 1e-4, w_true, t_max)) / 2e-4)
  assert abs(ikl_gradient(w_true, w_true, t_max, jax.random.key(3))) < 0.05 * fd_scale


def test_descending_the_ikl_recovers_the_blur_width():
  """Adam on the width with the estimator (fresh samples each step, the fake model exact
  for the current width) recovers the true width from either side."""
  import optax  # noqa: PLC0415
  w_true = 1.4
  grad = ikl_gradient_fn(w_true, 0.9, per_t=200, n_t=16)
  for start in (0.6, 2.4):
    w, tx = start, optax.adam(0.05)
    opt = tx.init(jnp.float64(w))
    for i in range(200):
      upd, opt = tx.update(jnp.float64(grad(w, jax.random.key(100 + i))), opt)
      w = float(w + upd)
    assert w == pytest.approx(w_true, abs=0.05), (start, w)


def test_velocity_weighting_has_the_same_sign_and_zero():
  g_score = ikl_gradient(0.8, 1.4, 0.9, jax.random.key(5))
  g_vel = ikl_gradient(0.8, 1.4, 0.9, jax.random.key(5), weighting="velocity")
  assert np.sign(g_score) == np.sign(g_vel) == -1


def test_sampler_transports_noise_to_a_known_gaussian():
  """Euler integration of the exact velocity field carries N(0, I) to N(0, Σ)."""
  cov = blur_cov(1.0)
  z0 = jax.random.normal(jax.random.key(0), (20000, N_DIM))
  z1 = np.asarray(ddm4ip.euler_sample(gaussian_velocity(cov), z0, 200))
  np.testing.assert_allclose(np.cov(z1.T), cov, atol=0.03)
  np.testing.assert_allclose(z1.mean(0), 0, atol=0.03)


def test_flow_matching_learns_a_gaussian_transport():
  """A velocity field affine in z with polynomial-in-t coefficients, trained by the CFM
  loss on samples of N(μ, diag(s²)), samples that distribution through the Euler sampler;
  and the exact field is a minimum of the loss (its gradient there vanishes)."""
  mu, s = jnp.array([1.5, -0.5]), jnp.array([0.5, 2.0])
  deg = 6

  def field(p):
    def v(z, t):
      pw = t[:, None] ** jnp.arange(deg + 1)[None]
      return (pw @ p["a"]) * z + pw @ p["b"]
    return v

  def loss(p, key):
    k1, k2, k3 = jax.random.split(key, 3)
    y = mu + s * jax.random.normal(k1, (4096, 2))
    return ddm4ip.cfm_loss(field(p), y, jax.random.normal(k2, y.shape),
                           jax.random.uniform(k3, (4096,)))

  import optax  # noqa: PLC0415
  p = {"a": jnp.zeros((deg + 1, 2)), "b": jnp.zeros((deg + 1, 2))}
  tx = optax.adam(3e-2)
  opt = tx.init(p)

  @jax.jit
  def step(p, opt, key):
    g = jax.grad(loss)(p, key)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt
  for i in range(1500):
    p, opt = step(p, opt, jax.random.key(i))
  z1 = np.asarray(ddm4ip.euler_sample(field(p), jax.random.normal(jax.random.key(9), (20000, 2)), 100))
  np.testing.assert_allclose(z1.mean(0), mu, atol=0.08)
  np.testing.assert_allclose(z1.std(0), s, rtol=0.08)

  # The exact field (Gaussian posterior mean) minimises the expected loss.
  def exact(eps):
    def v(z, t):
      tb = t[:, None]
      c = (1 - tb) ** 2 + tb ** 2 * s ** 2
      return ((tb * s ** 2 - (1 - tb)) * (z - tb * mu)) / c + mu
    return lambda z, t: v(z, t) + eps * z
  key = jax.random.key(1)
  k1, k2, k3 = jax.random.split(key, 3)
  y = mu + s * jax.random.normal(k1, (200000, 2))
  z0, t = jax.random.normal(k2, y.shape), jax.random.uniform(k3, (200000,), maxval=0.99)
  at = lambda eps: ddm4ip.cfm_loss(exact(eps), y, z0, t)
  assert abs(float(jax.grad(at)(0.0))) < 0.02
  assert float(at(0.2)) > float(at(0.0)) and float(at(-0.2)) > float(at(0.0))


# -- the method, smoke-sized ------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(lr_image):
  cfg = config_lib.preset("smoke")
  with jax.enable_x64(False):
    raw, info, (model, flow, match) = ddm4ip.train(cfg, lr_image, 2, show_progress=False)
  return dict(cfg=cfg, raw=raw, info=info, model=model, flow=flow, match=match)


def test_training_runs_every_step_and_the_kernel_is_what_the_net_does(trained, lr_image):
  dc, info = trained["cfg"].ddm4ip, trained["info"]
  assert "fallback" not in info   # a healthy run returns its last kernel
  assert dc.flow_steps // dc.steps_per_chunk >= 2 and dc.match_steps // dc.steps_per_chunk >= 2
  assert int(trained["flow"].it) == dc.flow_steps and int(trained["match"].it) == dc.match_steps
  assert info["flow"]["steps"] == dc.flow_steps and np.isfinite(info["flow"]["final_loss"])
  assert all(np.isfinite(v) for v in info["match"]["final"].values())
  # The auxiliary flow moved away from the image's flow it started from.
  diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), trained["match"].aux_params,
                      trained["flow"].ema)
  assert max(jax.tree.leaves(diff)) > 0
  model, g = trained["model"], trained["match"].g_params
  with jax.enable_x64(False):
    k = model.kernel(g)
    x = jnp.asarray(lr_image)[None]
    y = model.gen.apply(g, x, method=model.gen.downscale)
    np.testing.assert_allclose(np.asarray(y), np.asarray(degrade.downscale(x, k, 2)), atol=2e-5)
  np.testing.assert_allclose(np.asarray(k), trained["raw"], atol=1e-6)


def test_fake_patches_never_see_the_crop_padding(trained, lr_image):
  """A fake patch equals the same window of the kernel net applied to the whole image."""
  model, g = trained["model"], trained["match"].g_params
  with jax.enable_x64(False):
    img = jnp.asarray(lr_image)
    s, c = model.scale_g, model.crop_g
    top = 4  # an even offset keeps the stride's phase
    crop = img[None, top:top + c, top:top + c]
    whole = model.gen.apply(g, img[None], method=model.gen.downscale)
    o = top // s + model.lo
    np.testing.assert_allclose(np.asarray(model.fake(g, crop))[0],
                               np.asarray(whole)[0, o:o + model.patch, o:o + model.patch],
                               atol=1e-5)


def test_normalised_fakes_are_the_kernel_divided_by_its_sum(trained, lr_image):
  """``ddm4ip.normalise``: the same net, its fakes divided by its kernel's sum; the matching
  step still runs and keeps any sum (the sum never reaches the fakes)."""
  cfg = trained["cfg"].copy_and_resolve_references()
  cfg.ddm4ip.normalise = True
  g = trained["match"].g_params
  with jax.enable_x64(False):
    model = ddm4ip.DDM4IP(cfg, lr_image.shape, 2)
    crops = jnp.asarray(lr_image)[None, :model.crop_g, :model.crop_g]
    total = float(jnp.sum(model.kernel(g)))
    assert abs(total - 1.0) > 1e-3   # a sum away from 1, so the division shows
    np.testing.assert_allclose(np.asarray(model.fake(g, crops)),
                               np.asarray(trained["model"].fake(g, crops)) / total, rtol=1e-5)
    img = jnp.asarray(lr_image * 2 - 1)
    match = model.init_match(jax.random.key(2), trained["flow"].ema)
    match, m = model.make_match_chunk(2)(match, trained["flow"].ema, img, jax.random.key(3))
  assert int(match.it) == 2 and all(np.all(np.isfinite(np.asarray(v))) for v in m)
  assert ddm4ip.healthy(0.3 * np.ones((4, 4)) / 16, tol=None)
  assert not ddm4ip.healthy(0.3 * np.ones((4, 4)) / 16)


def test_a_kernel_spread_over_the_grid_becomes_the_generic_gaussian():
  """``ddm4ip.max_radius``: a kernel whose RMS radius passes max_radius × scale is replaced
  by the Gaussian of std blend_sigma × scale (NumPy reference); a compact one is not."""
  cfg = config_lib.preset("smoke")
  cfg.ddm4ip.max_radius, cfg.ddm4ip.threshold, cfg.ddm4ip.blend = 2.0, 0.0, 0.0
  size, s = 16, 2
  u = np.arange(size) - (size - 1) / 2
  ring = (np.maximum(np.abs(u)[:, None], np.abs(u)[None, :]) >= 7).astype(np.float64)
  ring /= ring.sum()
  # RMS radius of the rim of a 16² grid: sqrt(mean(u² + v²)) over its 60 taps, > 4 px
  assert np.sqrt((ring * (u[:, None] ** 2 + u[None, :] ** 2)).sum()) > 2.0 * s
  info = {}
  k = ddm4ip.finish_kernel(cfg, ring.astype(np.float32), s, info)
  g = np.exp(-(u[:, None] ** 2 + u[None, :] ** 2) / (2 * (cfg.kernel.blend_sigma * s) ** 2))
  np.testing.assert_allclose(k, g / g.sum(), atol=1e-7)
  assert info["spread_fallback"]["limit"] == 4.0 and info["spread_fallback"]["rms_radius"] > 4
  compact = np.exp(-(u[:, None] ** 2 + u[None, :] ** 2) / (2 * 1.2 ** 2))
  compact /= compact.sum()
  info = {}
  np.testing.assert_allclose(ddm4ip.finish_kernel(cfg, compact.astype(np.float32), s, info),
                             compact, atol=1e-7)
  assert "spread_fallback" not in info
  cfg.ddm4ip.max_radius = 0.0    # off
  np.testing.assert_allclose(ddm4ip.finish_kernel(cfg, ring.astype(np.float32), s), ring,
                             atol=1e-7)
  bad = cfg.copy_and_resolve_references()
  bad.ddm4ip.max_radius = -1.0
  assert not all(ok for ok, _ in ddm4ip.checks(bad.ddm4ip))


def test_chunks_trace_once(lr_image):
  cfg = config_lib.preset("smoke")
  with jax.enable_x64(False):
    model = ddm4ip.DDM4IP(cfg, lr_image.shape, 2)
    img = jnp.asarray(lr_image * 2 - 1)
    flow = model.init_flow(jax.random.key(0), 3)
    chunk = model.make_flow_chunk(2)
    for _ in range(2):
      flow, _ = chunk(flow, img, jax.random.key(1))
    assert chunk._cache_size() == 1
    match = model.init_match(jax.random.key(2), flow.ema)
    mchunk = model.make_match_chunk(2)
    for _ in range(2):
      match, _ = mchunk(match, flow.ema, img, jax.random.key(3))
    assert mchunk._cache_size() == 1


def test_estimate_kernel_is_valid_and_x4_composes(trained, lr_image, monkeypatch):
  monkeypatch.setattr(ddm4ip, "train", lambda *a, **kw: (trained["raw"], dict(trained["info"]), None))
  k, info = ddm4ip.estimate_kernel(lr_image, 2, trained["cfg"], show_progress=False)
  size = trained["model"].gen.ksize
  assert k.dtype == np.float32 and k.shape == (size, size)
  assert np.all(np.isfinite(k)) and k.min() >= 0 and abs(float(k.sum()) - 1.0) < 1e-5
  k4, info4 = ddm4ip.estimate_kernel(lr_image, 4, trained["cfg"], show_progress=False)
  expect = kernelgan.compose_x2(k)
  np.testing.assert_allclose(k4, expect / expect.sum(), atol=1e-6)
  # ddm4ip.x4 = "direct": the net is matched at x4 itself and its kernel kept as it is.
  scales = []
  monkeypatch.setattr(ddm4ip, "train", lambda c, im, s, *a, **kw: (
      scales.append(s) or trained["raw"], dict(trained["info"]), None))
  direct = trained["cfg"].copy_and_resolve_references()
  direct.ddm4ip.x4 = "direct"
  k4d, _ = ddm4ip.estimate_kernel(lr_image, 4, direct, show_progress=False)
  ddm4ip.estimate_kernel(lr_image, 4, trained["cfg"], show_progress=False)
  assert scales == [4, 2]
  np.testing.assert_allclose(k4d, k, atol=1e-7)
  # Its post-processing (ddm4ip.threshold then blend; kernel.blend_sigma), against NumPy;
  # KernelFusion's (cfg.kernel threshold / blend) does not reach it:
  cfg = trained["cfg"].copy_and_resolve_references()
  cfg.ddm4ip.threshold, cfg.ddm4ip.blend, cfg.kernel.blend_sigma = 0.4, 0.5, 0.35
  cfg.kernel.threshold, cfg.kernel.blend = 0.9, 1.0
  kp, infop = ddm4ip.estimate_kernel(lr_image, 2, cfg, show_progress=False)
  ref = np.asarray(k, np.float64)
  ref = np.where(ref >= 0.4 * ref.max(), ref, 0.0)
  ref /= ref.sum()
  u = np.arange(size) - (size - 1) / 2
  g = np.exp(-(u[:, None] ** 2 + u[None, :] ** 2) / (2 * 0.7 ** 2))
  ref = 0.5 * ref + 0.5 * g / g.sum()
  np.testing.assert_allclose(kp, ref / ref.sum(), atol=1e-6)
  assert (infop["threshold"], infop["blend"]) == (0.4, 0.5) and info["blend"] == 0.0
  monkeypatch.setattr(ddm4ip, "train", lambda *a, **kw: (-np.ones((4, 4)), {}, None))
  with pytest.raises(KfjaxError, match="no positive mass"):
    ddm4ip.estimate_kernel(lr_image, 2, trained["cfg"], show_progress=False)


def test_bench_keeps_the_kernel_before_post_processing(trained, monkeypatch, tmp_path):
  """The benchmark's ``ddm4ip`` row saves the matched kernel (``kernel_raw.npy``) beside the
  post-processed one it restores with, so the post-processing can be re-tuned offline."""
  from kfjax.bench import runner, suites  # noqa: PLC0415
  from kfjax.models import kernel_net  # noqa: PLC0415
  monkeypatch.setattr(ddm4ip, "train", lambda *a, **kw: (trained["raw"], dict(trained["info"]), None))
  cfg = trained["cfg"].copy_and_resolve_references()
  cfg.ddm4ip.threshold, cfg.ddm4ip.blend = 0.4, 0.5
  spec, nonlinear = suites.suite("tiny")[:2]
  with jax.enable_x64(False):
    row = runner.run_one(spec, "ddm4ip", cfg, str(tmp_path), 2)
    row_nl = runner.run_one(nonlinear, "ddm4ip", cfg, str(tmp_path), 2)
  assert row["status"] == "ok" and row_nl["status"] == "ok", (row, row_nl)
  run_dir = os.path.join(str(tmp_path), "runs", spec.name, "ddm4ip")
  raw = np.load(os.path.join(run_dir, "kernel_raw.npy"))
  np.testing.assert_allclose(raw, kernel_net.export_kernel(trained["raw"]), atol=1e-7)
  # What the row cannot hold is kept beside it: whether the matching or the guard fell back.
  with open(os.path.join(run_dir, "info.json")) as f:
    kept = json.load(f)
  assert kept["config"] == row["config"] and kept["seed"] == cfg.seed
  assert kept["info"]["fallback"] is None and kept["info"]["spread_fallback"] is None
  assert kept["info"]["diverged"] is False and kept["info"]["diverged_generic"] is False
  assert kept["info"]["seconds_ddm4ip"] > 0
  ref = np.asarray(raw, np.float64)
  ref = np.where(ref >= 0.4 * ref.max(), ref, 0.0)
  ref /= ref.sum()
  size = ref.shape[0]
  u = np.arange(size) - (size - 1) / 2
  g = np.exp(-(u[:, None] ** 2 + u[None, :] ** 2) / (2 * (cfg.kernel.blend_sigma * 2) ** 2))
  ref = 0.5 * ref + 0.5 * g / g.sum()
  np.testing.assert_allclose(np.load(os.path.join(run_dir, "kernel.npy")), ref / ref.sum(),
                             atol=1e-6)
  # The offline sweep re-derives the row from kernel_raw.npy (same post-processing, same
  # TV solve), and a setting it did not run.
  from kfjax.bench import postprocess  # noqa: PLC0415
  with jax.enable_x64(False):
    postprocess.main(["--workdir", str(tmp_path), "--method", "ddm4ip", "--thresholds", "0,0.4",
                      "--sigmas", "0.35", "--border", "2", "--blends", "0.5"])
  with open(os.path.join(str(tmp_path), "postprocess_ddm4ip.csv")) as f:
    pp_nl, pp = list(csv.DictReader(f))      # sorted by case: camera_median first
  assert pp["config"] == "ddm4ip" and "phase2" not in pp
  assert float(pp["thr0.4_b0.5"]) == pytest.approx(float(row["subpixel_psnr"]), abs=1e-3)
  assert float(pp["thr0"]) != pytest.approx(float(pp["thr0.4_b0.5"]), abs=1e-3)
  assert pp["spread"] == "0" and -1 <= float(pp["kernel_ncc"]) <= 1
  # The median-filtered case has no true kernel: scored all the same, without the columns
  # that need one.
  assert pp_nl["case"] == nonlinear.name and pp_nl["tv_true"] == pp_nl["kernel_ncc"] == ""
  assert pp_nl["width0"] == "" and pp["width0"] != ""
  assert float(pp_nl["thr0.4_b0.5"]) == pytest.approx(float(row_nl["subpixel_psnr"]), abs=1e-3)
  assert float(pp_nl["bicubic"]) > 0 and float(pp_nl["gauss0.35"]) > 0
  # The summary averages each column over the rows that have it.
  rows = [{"case": "a", "bicubic": 1.0, "thr0": 2.0, "tv_true": 4.0},
          {"case": "b", "bicubic": 1.0, "thr0": 0.0}]
  assert postprocess.summary(rows) == {"thr0": (0.0, -1.0, 2), "tv_true": (3.0, 3.0, 1)}
  # A radius limit every kernel passes: each column is the generic Gaussian's (gauss0.35).
  with jax.enable_x64(False):
    postprocess.main(["--workdir", str(tmp_path), "--method", "ddm4ip", "--thresholds", "0,0.4",
                      "--sigmas", "0.35", "--border", "2", "--blends", "0.5",
                      "--max_radius", "0.01"])
  with open(os.path.join(str(tmp_path), "postprocess_ddm4ip.csv")) as f:
    pp = list(csv.DictReader(f))[1]
  assert pp["spread"] == "1"
  for col in ("thr0", "thr0.4", "thr0.4_b0.5"):
    assert float(pp[col]) == pytest.approx(float(pp["gauss0.35"]), abs=0.02)
  # --on_diverge generic: a run whose info.json says its matching diverged is scored as the
  # generic Gaussian; the healthy one as before.
  path = os.path.join(run_dir, "info.json")
  kept = json.load(open(path))
  kept["info"]["diverged"] = True
  with open(path, "w") as f:
    json.dump(kept, f)
  with jax.enable_x64(False):
    postprocess.main(["--workdir", str(tmp_path), "--method", "ddm4ip", "--thresholds", "0.4",
                      "--sigmas", "0.35", "--border", "2", "--on_diverge", "generic"])
  with open(os.path.join(str(tmp_path), "postprocess_ddm4ip.csv")) as f:
    healthy_row, gone_row = list(csv.DictReader(f))
  assert (gone_row["diverged"], healthy_row["diverged"]) == ("1", "0")
  assert float(gone_row["thr0.4"]) == pytest.approx(float(gone_row["gauss0.35"]), abs=0.02)
  assert float(healthy_row["thr0.4"]) != pytest.approx(float(healthy_row["gauss0.35"]), abs=0.02)


def test_a_diverged_matching_falls_back_to_the_last_healthy_kernel(lr_image):
  """A kernel learning rate 1000x the smoke preset's drives the kernel's sum far from 1
  within the first chunk: the run warns and returns the starting kernel, not the wreck."""
  cfg = config_lib.preset("smoke")
  cfg.ddm4ip.kernel_lr = 0.5
  with jax.enable_x64(False):
    with pytest.warns(UserWarning, match="DDM4IP's matching diverged"):
      raw, info, (model, flow, match) = ddm4ip.train(cfg, lr_image, 2, show_progress=False)
    final = np.asarray(model.kernel(match.g_params))
    keys = jax.random.split(jax.random.key(cfg.seed + 11), 4)
    start = np.asarray(model.kernel(model.init_match(keys[2], flow.ema).g_params))
  assert not ddm4ip.healthy(final) and ddm4ip.healthy(raw)
  assert info["fallback"] == {"step": 0, "final_sum": pytest.approx(float(final.sum()))}
  np.testing.assert_allclose(raw, start, atol=1e-6)
  from kfjax.models import kernel_net  # noqa: PLC0415
  # What the restoration gets: the kept kernel, post-processed, or (ddm4ip.on_diverge)
  # the generic Gaussian; a healthy run is never affected by the option.
  assert info["diverged"] is True
  k = kernel_net.export_kernel(raw)
  generic = kernel_net.gaussian_kernel(k.shape[0], cfg.kernel.blend_sigma * 2)
  np.testing.assert_allclose(ddm4ip.finish_kernel(cfg, k, 2, dict(info)),
                             kernel_net.post_process(k, 0.0, 0.0, cfg.kernel.blend_sigma * 2))
  cfg.ddm4ip.on_diverge = "generic"
  with pytest.warns(UserWarning, match="using the generic Gaussian"):
    out = dict(info)
    np.testing.assert_allclose(ddm4ip.finish_kernel(cfg, k, 2, out), generic)
  assert out["diverged_generic"] is True
  assert not np.allclose(generic, ddm4ip.finish_kernel(cfg, k, 2, {**info, "diverged": False}))


def test_healthy_kernels():
  k = np.full((4, 4), 1 / 16)
  assert ddm4ip.healthy(k) and ddm4ip.healthy(1.2 * k) and ddm4ip.healthy(0.8 * k)
  assert not ddm4ip.healthy(1.3 * k) and not ddm4ip.healthy(0.7 * k)
  assert not ddm4ip.healthy(np.where(np.eye(4) > 0, np.nan, k))
  assert not ddm4ip.healthy(-k) and not ddm4ip.healthy(np.zeros((4, 4)))


def test_regularisers():
  k = jnp.zeros((6, 6)).at[2:4, 2:4].set(0.25)
  regs = ddm4ip.regularisers(k)
  assert float(regs["sum2one"]) < 1e-12 and float(regs["center"]) < 1e-12
  assert float(regs["sparse"]) == pytest.approx(1.0)
  off = jnp.zeros((6, 6)).at[0, 0].set(2.0).at[1, 1].set(-0.5)
  regs = ddm4ip.regularisers(off)
  assert float(regs["sum2one"]) == pytest.approx(0.25) and float(regs["sparse"]) == pytest.approx(2.5)
  assert float(regs["center"]) > 1


def test_image_too_small_and_bad_config_are_clear_errors():
  cfg = config_lib.preset("smoke")
  cfg.ddm4ip.g_sizes = (7, 5, 5, 1)
  with pytest.raises(KfjaxError, match="too small for DDM4IP"):
    ddm4ip.DDM4IP(cfg, (16, 16, 3), 2)
  bad = config_lib.preset("smoke")
  bad.ddm4ip.weighting = "nope"
  assert not all(ok for ok, _ in ddm4ip.checks(bad.ddm4ip))
  bad = config_lib.preset("smoke")
  bad.ddm4ip.x4 = "twice"
  assert [m for ok, m in ddm4ip.checks(bad.ddm4ip) if not ok] == [
      "ddm4ip.x4 must be one of compose, direct, got 'twice'"]
  bad = config_lib.preset("smoke")
  bad.ddm4ip.on_diverge = "retry"
  assert [m for ok, m in ddm4ip.checks(bad.ddm4ip) if not ok] == [
      "ddm4ip.on_diverge must be one of last_healthy, generic, got 'retry'"]


# -- command line -----------------------------------------------------------------------------

def _cli(*args):
  return subprocess.run([sys.executable, "-m", "kfjax.main", *args], capture_output=True,
                        text=True, env=ENV, timeout=600)


def test_cli_method_ddm4ip_end_to_end(tmp_path, lr_image):
  path = str(tmp_path / "lr.png")
  kio.save_image(path, lr_image)
  out = str(tmp_path / "out")
  res = _cli("--image", path, "--config", "smoke", "--method", "ddm4ip", "--workdir", out,
             "--quiet")
  assert res.returncode == 0, res.stderr[-3000:]
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["method"] == "ddm4ip" and summary["mode"] == "ddm4ip"
  assert summary["phase1"]["steps"] == 0 and summary["ddm4ip"]["flow"]["steps"] == 4
  k = np.load(os.path.join(out, "kernel.npy"))
  assert k.min() >= 0 and abs(k.sum() - 1) < 1e-5 and k.shape == (summary["kernel_size"],) * 2
  sr = kio.load_image(os.path.join(out, "sr.png"))[0]
  assert sr.shape == (64, 64, 3)
  # The SR image is the TV restoration with that kernel: consistent with the LR image.
  back = degrade.downscale_np(sr.astype(np.float64), k.astype(np.float64), 2)
  assert np.mean(np.abs(back - lr_image)) < 0.02
  # The same command with another post-processing restores the trained state from the
  # workdir's checkpoints (no training) and only finishes the kernel differently.
  res = _cli("--image", path, "--config", "smoke", "--method", "ddm4ip", "--workdir", out,
             "--quiet", "--config.ddm4ip.threshold=0.6")
  assert res.returncode == 0, res.stderr[-3000:]
  again = json.load(open(os.path.join(out, "summary.json")))
  assert again["ddm4ip"]["flow"]["restored_step"] == again["ddm4ip"]["match"]["restored_step"] == 4
  assert again["ddm4ip"]["raw_sum"] == summary["ddm4ip"]["raw_sum"]
  assert np.count_nonzero(np.load(os.path.join(out, "kernel.npy"))) < np.count_nonzero(k)
  res = _cli("--image", path, "--config", "smoke", "--method", "ddm4ip", "--workdir", out,
             "--kernel", os.path.join(out, "kernel.npy"), "--quiet")
  assert res.returncode != 0 and "exclude each other" in res.stderr
  assert "Traceback" not in res.stderr
