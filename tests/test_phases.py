"""Phase 1 (``kfjax.phase1``) and Phase 2 (``kfjax.phase2``) end to end with the smoke preset.

Every jitted program is compiled once per module (module-scoped fixtures). PRNG keys
are ``unsafe_rbg`` keys: the code under test only splits / folds / draws from the keys
it is given, and threefry-based parameter initialisation takes seconds to compile on
XLA:CPU, which would dominate these tests.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfjax import phase2 as phase2_lib
from kfjax import schedule as sch
from kfjax import phase1 as phase1_lib
from kfjax.models import kernel_net
from kfjax.models import pd as pd_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR_SHAPE = (20, 24, 3)
SCALE = 2


def _key(seed):
  return jax.random.key(seed, impl="unsafe_rbg")


def _smoke_config():
  spec = importlib.util.spec_from_file_location("_smoke_preset",
                                                os.path.join(ROOT, "configs", "smoke.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  cfg.scale = SCALE   # (the preset's own; Phase 2 reads it from the config)
  return cfg


def _lr_image():
  """A smooth, deterministic test image in [-1, 1] (plus a little texture)."""
  h, w, c = LR_SHAPE
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  chans = [np.sin(3 * xx + 2 * yy + i) * 0.6 + 0.2 * np.cos(9 * yy - i) for i in range(c)]
  img = np.stack(chans, -1)
  img += 0.05 * np.random.default_rng(0).normal(size=img.shape)
  return np.clip(img, -1, 1).astype(np.float32)


# -- Phase 1 -----------------------------------------------------------------------------

P1_STEPS = 30
P1_CHUNK = 10


@pytest.fixture(scope="module")
def phase1():
  cfg = _smoke_config()
  cfg.train.steps = P1_STEPS
  cfg.train.lr = 1e-2
  cfg.train.lr_end = 1e-3
  cfg.train.batch_size = 8
  image = _lr_image()
  model = phase1_lib.make_model(cfg, LR_SHAPE[-1])
  sched = sch.from_config(cfg)
  tx = phase1_lib.make_optimizer(cfg)
  state = jax.jit(lambda k: phase1_lib.init_state(cfg, model, tx, LR_SHAPE, k))(_key(0))
  params0 = state.params
  chunk = phase1_lib.make_train_chunk(cfg, model, sched, tx, image, P1_CHUNK)
  losses = []
  for _ in range(P1_STEPS // P1_CHUNK):
    state, chunk_losses = chunk(state)
    losses.append(np.asarray(chunk_losses))
  # A fixed evaluation batch (the whole padded image at 16 noise levels, fixed noise):
  # the training losses themselves are dominated by the random timesteps.
  padded = pd_lib.pad_halo(jnp.asarray(image))
  batch = jnp.broadcast_to(padded, (16,) + padded.shape)
  t = jnp.linspace(1, sched.num_steps, 16).astype(jnp.int32)
  noise = jnp.asarray(np.random.default_rng(9).normal(size=batch.shape), jnp.float32)
  evaluate = jax.jit(lambda p: phase1_lib.loss_fn(model, sched, p, batch, t, noise))
  return dict(cfg=cfg, model=model, sched=sched, state=state, chunk=chunk,
              losses=np.concatenate(losses),
              eval_losses=(float(evaluate(params0)), float(evaluate(state.params))))


def test_phase1_chunk_traces_once(phase1):
  assert phase1["chunk"]._cache_size() == 1


def test_phase1_state(phase1):
  state, losses = phase1["state"], phase1["losses"]
  assert int(state.step) == P1_STEPS
  assert losses.shape == (P1_STEPS,)
  assert np.all(np.isfinite(losses))
  for leaf in jax.tree.leaves(state.params):
    assert np.all(np.isfinite(np.asarray(leaf)))


def test_phase1_loss_decreases(phase1):
  """Training losses: mean of the last 5 below the first 5 (measured 0.33 vs 0.41); the
  loss on a fixed batch drops by > 5 % in 30 steps (measured 0.431 -> 0.38 and similar
  for other seeds, 0.35 after 60 steps)."""
  losses = phase1["losses"]
  assert losses[-5:].mean() < losses[:5].mean(), losses
  before, after = phase1["eval_losses"]
  assert after < 0.95 * before, (before, after)


def test_phase1_crop_size():
  cfg = _smoke_config()
  assert phase1_lib.crop_size(cfg, (100, 100, 3)) == cfg.train.crop_size
  assert phase1_lib.crop_size(cfg, (9, 100, 3)) == 9
  assert phase1_lib.crop_size(cfg, (100, 5, 1)) == 5


def test_phase1_loss_fn_zero_for_perfect_model():
  """``loss_fn`` compares the model output with the centre of ``v``: a stand-in model
  that returns exactly that gives zero loss (pins the halo cropping)."""
  cfg = _smoke_config()
  sched = sch.from_config(cfg)
  rng = np.random.default_rng(1)
  batch = jnp.asarray(rng.uniform(-1, 1, size=(2, 30, 30, 3)), jnp.float32)
  noise = jnp.asarray(rng.normal(size=batch.shape), jnp.float32)
  t = jnp.asarray([3, 900])
  v = sch.v_target(sched, batch, t[:, None, None, None], noise)

  class Oracle:
    def apply(self, params, x_t, tt):
      del params
      # v = a·x_t' with x_t = a x0 + b eps: reconstruct v exactly from x_t and the clean batch.
      a, b = jnp.sqrt(sched.alpha_bar[tt]), jnp.sqrt(1 - sched.alpha_bar[tt])
      a, b = a[:, None, None, None], b[:, None, None, None]
      eps = (x_t - a * batch) / b
      return (a * eps - b * batch)[:, 7:-7, 7:-7, :]

  loss = float(jax.jit(lambda b, tt, n: phase1_lib.loss_fn(Oracle(), sched, None, b, tt, n))(
      batch, t, noise))
  assert loss < 1e-8
  assert float(jnp.mean(v ** 2)) > 0.1


# -- Phase 2 -----------------------------------------------------------------------------

def _phase2_run(cfg, pd_model, pd_params, sched, lr_image, fixed_kernel, seed):
  p2 = phase2_lib.Phase2(cfg, pd_model, pd_params, sched, LR_SHAPE, fixed_kernel=fixed_kernel)
  state = jax.jit(p2.init)(lr_image, _key(seed))
  init_state = state
  iters = int(cfg.sample.iters_per_chunk)
  chunk = p2.make_chunk(iters)
  metrics = []
  rng = _key(seed + 1)
  for _ in range(p2.total_iterations // iters):
    state, m = chunk(state, lr_image, rng)
    metrics.append(jax.tree.map(np.asarray, m))
  metrics = phase2_lib.Phase2Metrics(*[np.concatenate(f) for f in zip(*metrics)])
  return dict(p2=p2, init=init_state, state=state, chunk=chunk, metrics=metrics)


@pytest.fixture(scope="module")
def phase2_blind(phase1):
  cfg = _smoke_config()
  lr_image = jnp.asarray(_lr_image())
  out = _phase2_run(cfg, phase1["model"], phase1["state"].params, phase1["sched"], lr_image,
                    None, 3)
  out.update(cfg=cfg, lr_image=lr_image)
  return out


@pytest.fixture(scope="module")
def phase2_nonblind(phase1):
  """Non-blind mode, traced but not compiled (``jax.eval_shape``): compiling a second
  Phase 2 program costs ~12 s of CPU; the numerics of the loop are those of the blind run."""
  cfg = _smoke_config()
  k = np.zeros((12, 12), np.float32)
  k[4:8, 4:8] = 1.0 / 16  # centred 4×4 box: K = 12 and s = 2 have the same parity
  lr_image = jax.ShapeDtypeStruct(LR_SHAPE, jnp.float32)
  p2 = phase2_lib.Phase2(cfg, phase1["model"], phase1["state"].params, phase1["sched"], LR_SHAPE,
                         fixed_kernel=k)
  init = jax.eval_shape(p2.init, lr_image, _key(5))
  chunk = p2.make_chunk(int(cfg.sample.iters_per_chunk))
  state, metrics = jax.eval_shape(chunk, init, lr_image, _key(6))
  return dict(p2=p2, init=init, state=state, metrics=metrics, kernel=k, cfg=cfg)


def test_phase2_steps_and_traces(phase2_blind):
  p2, state, chunk = phase2_blind["p2"], phase2_blind["state"], phase2_blind["chunk"]
  cfg = phase2_blind["cfg"]
  assert p2.num_steps == cfg.sample.num_steps
  iters = cfg.sample.iters_per_chunk
  assert p2.total_iterations == cfg.sample.n_iter_first + (p2.num_steps - 1) * cfg.sample.n_iter
  assert p2.total_iterations % iters == 0
  assert p2.total_iterations // iters >= 2  # really called more than once
  # Chunks end inside reverse steps (the smoke preset's 3-iteration chunks straddle them).
  assert cfg.sample.n_iter % iters != 0
  assert int(state.step) == p2.num_steps and int(state.it) == 0
  assert p2.iterations_done(state) == p2.total_iterations
  assert chunk._cache_size() == 1


def test_phase2_init(phase2_blind):
  init = phase2_blind["init"]
  hr = (LR_SHAPE[0] * SCALE, LR_SHAPE[1] * SCALE, LR_SHAPE[2])
  assert int(init.step) == 0
  assert init.x.shape == init.x0.shape == hr
  assert set(init.params) == {"unet", "kernel"}
  assert float(jnp.abs(init.x0).max()) <= 1.0


def test_phase2_result(phase2_blind):
  p2, state = phase2_blind["p2"], phase2_blind["state"]
  x0, k = p2.result(state)
  x0, k = np.asarray(x0), np.asarray(k)
  assert x0.shape == (LR_SHAPE[0] * SCALE, LR_SHAPE[1] * SCALE, LR_SHAPE[2])
  assert np.all(np.isfinite(x0))
  assert x0.min() >= -1.0 and x0.max() <= 1.0
  ksize = phase2_lib.kernel_size(phase2_blind["cfg"])
  assert k.shape == (ksize, ksize) == (12, 12)
  assert abs(k.sum() - 1.0) < 1e-5 and k.min() >= -1e-4
  e = kernel_net.export_kernel(k)
  assert e.min() >= 0 and abs(float(e.sum()) - 1.0) < 1e-5


def test_phase2_metrics(phase2_blind):
  """One row per Adam iteration: step 0 has ``n_iter_first`` of them, the others
  ``n_iter``; every iteration of step ``i`` targets level ``ts[i + 1]``."""
  m, p2, cfg = phase2_blind["metrics"], phase2_blind["p2"], phase2_blind["cfg"].sample
  for f in m:
    assert f.shape == (p2.total_iterations,)
    assert np.all(np.isfinite(f))
  counts = [cfg.n_iter_first] + [cfg.n_iter] * (p2.num_steps - 1)
  np.testing.assert_array_equal(m.step, np.repeat(np.arange(p2.num_steps), counts))
  np.testing.assert_array_equal(m.t, np.asarray(p2.ts[1:])[m.step])
  assert m.t[-1] == 1
  np.testing.assert_allclose(m.loss, m.cons_a + m.cons_b + phase2_blind["cfg"].sample.com_weight
                             * m.com, rtol=1e-5, atol=1e-7)
  assert np.all(m.cons_a >= 0) and np.all(m.com >= 0)


@pytest.mark.skip(reason=(
    "does not hold at smoke scale: with n_iter_first=30 (lr 1e-3 or 1e-2, residual U-Net "
    "or not, 5 seeds each) cons_a after the last reverse step was >= its value after the "
    "first step in 19 of 20 runs (e.g. 0.137 -> 0.163, residual: 0.0045 -> 0.0052); "
    "with 2 iterations per later step and a barely trained PD, x0 <- b drifts"))
def test_phase2_consistency_decreases(phase2_blind):
  """The LR consistency of the U-Net output at the end is below its value at the end of
  the first step."""
  m = phase2_blind["metrics"]
  assert m.cons_a[-1] < m.cons_a[0], m.cons_a


def test_phase2_nonblind(phase2_nonblind):
  p2, init, state = phase2_nonblind["p2"], phase2_nonblind["init"], phase2_nonblind["state"]
  assert set(init.params) == {"unet"}
  assert set(state.params) == {"unet"}
  assert jax.tree.structure(state) == jax.tree.structure(init)
  hr = (LR_SHAPE[0] * SCALE, LR_SHAPE[1] * SCALE, LR_SHAPE[2])
  assert state.x0.shape == state.x.shape == hr
  iters = int(phase2_nonblind["cfg"].sample.iters_per_chunk)
  assert all(f.shape == (iters,) for f in phase2_nonblind["metrics"])
  x0, k = p2.result(state)
  assert x0.shape == hr
  np.testing.assert_array_equal(np.asarray(k), phase2_nonblind["kernel"])


def test_default_prng_keys_trace(phase1, phase2_blind):
  """The tests use ``unsafe_rbg`` keys; the CLI passes raw threefry ``PRNGKey``s. Both
  chunks trace with those too (``eval_shape``: no compilation)."""
  cfg = phase1["cfg"]
  tx = phase1_lib.make_optimizer(cfg)
  state = jax.eval_shape(lambda k: phase1_lib.init_state(cfg, phase1["model"], tx, LR_SHAPE, k),
                         jax.random.PRNGKey(0))
  assert state.rng.shape == (2,) and state.rng.dtype == jnp.uint32
  chunk = phase1_lib.make_train_chunk(cfg, phase1["model"], phase1["sched"], tx, _lr_image(), 2)
  new_state, losses = jax.eval_shape(chunk, state)
  assert losses.shape == (2,)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  p2 = phase2_blind["p2"]
  lr = jax.ShapeDtypeStruct(LR_SHAPE, jnp.float32)
  init = jax.eval_shape(p2.init, lr, jax.random.PRNGKey(1))
  out, metrics = jax.eval_shape(p2.make_chunk(2), init, lr, jax.random.PRNGKey(2))
  assert jax.tree.structure(out) == jax.tree.structure(init)
  assert metrics.loss.shape == (2,)


def test_checkpoint_extras_follow_the_fingerprint(tmp_path):
  """``PhaseCheckpoint.save_extra``: fields kept beside the fingerprint survive a state
  save and a new handle, merge with later fields, and vanish on reset or under another
  fingerprint."""
  from kfjax import checkpoint as ckpt
  a = ckpt.PhaseCheckpoint(str(tmp_path), "phase", "fp-a")
  assert a.extra("final_metrics") is None
  a.save(1, {"w": jnp.ones(3)})
  a.save_extra(final_metrics={"loss": [0.5]})
  a.save_extra(note="x")
  a.close()
  again = ckpt.PhaseCheckpoint(str(tmp_path), "phase", "fp-a")
  assert again.extra("final_metrics") == {"loss": [0.5]} and again.extra("note") == "x"
  assert again.latest_step() == 1
  assert ckpt.PhaseCheckpoint(str(tmp_path), "phase", "fp-b").extra("final_metrics") is None
  again.reset()
  assert again.extra("final_metrics") is None and again.stored_fingerprint() == "fp-a"


def test_phase2_resumes_mid_step_from_a_checkpoint(phase2_blind, tmp_path):
  """A chunk may end inside a reverse step (the smoke preset: 3-iteration chunks, steps
  of 3 and 2 iterations): a checkpoint there, restored into a fresh state and run on,
  ends exactly where the uninterrupted run ended (the state keeps ``it`` and the step's
  noise draw ``xi``)."""
  from kfjax import checkpoint as ckpt
  p2, chunk, lr = phase2_blind["p2"], phase2_blind["chunk"], phase2_blind["lr_image"]
  state = phase2_blind["init"]
  for _ in range(2):
    state, _ = chunk(state, lr, _key(4))
  assert (int(state.step), int(state.it)) == (2, 1)  # 6 = 3 + 2 + 1 iterations
  assert p2.iterations_done(state) == 6
  saver = ckpt.PhaseCheckpoint(str(tmp_path), "phase2", "fp")
  saver.save(6, state)
  saver.close()
  fresh = jax.jit(p2.init)(lr, _key(11))  # another init: everything must come from disk
  again = ckpt.PhaseCheckpoint(str(tmp_path), "phase2", "fp")
  restored = again.restore(again.latest_step(), fresh)
  again.close()
  end, _ = chunk(restored, lr, _key(4))
  want = phase2_blind["state"]
  assert int(end.step) == int(want.step) and int(end.it) == int(want.it)
  for a, b in zip(jax.tree.leaves(end), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_phase2_progress_bar_moves_per_chunk_of_iterations(phase1, monkeypatch):
  """The CLI's Phase 2 bar counts Adam iterations and advances after every chunk of
  ``sample.iters_per_chunk`` (not once per group of reverse steps)."""
  bars = []

  class Bar:
    def __init__(self, total, **kw):
      self.total, self.updates, self.postfix = total, [], None
      bars.append(self)

    def update(self, n):
      self.updates.append(n)

    def set_postfix(self, **kw):
      self.postfix = kw

    def close(self):
      pass
  monkeypatch.setattr(phase2_lib.tqdm, "tqdm", Bar)
  cfg = _smoke_config()
  phase2_lib.run(cfg, phase1["model"], phase1["state"].params, _lr_image())
  (bar,) = bars
  total = cfg.sample.n_iter_first + (cfg.sample.num_steps - 1) * cfg.sample.n_iter
  assert bar.total == total == 9
  assert bar.updates == [0] + [cfg.sample.iters_per_chunk] * (total // cfg.sample.iters_per_chunk)
  assert bar.postfix["t"] == 1 and float(bar.postfix["loss"]) > 0


# -- non-blind runs whose output reads nothing of Phase 2 ---------------------------------

def _box_kernel():
  k = np.zeros((12, 12), np.float32)
  k[4:8, 4:8] = 1.0 / 16
  return k


def _tv_bicubic_config():
  cfg = _smoke_config()
  cfg.restore.final, cfg.restore.init, cfg.restore.steps = True, "bicubic", 20
  return cfg


def test_reads_phase2_only_blind_or_when_the_restoration_starts_from_it():
  cfg = _smoke_config()
  assert not cfg.restore.final
  assert phase2_lib.reads_phase2(cfg, blind=False)         # no final TV: Phase 2's image
  cfg.restore.final = True
  assert cfg.restore.init == "phase2" and phase2_lib.reads_phase2(cfg, blind=False)
  cfg.restore.init = "bicubic"
  assert not phase2_lib.reads_phase2(cfg, blind=False)
  assert phase2_lib.reads_phase2(cfg, blind=True)          # blind: Phase 2 finds the kernel
  with pytest.raises(ValueError, match="restore.init"):
    phase2_lib.restore_only(_smoke_config(), _lr_image(), _box_kernel())


def test_restore_only_is_the_finished_nonblind_output_whatever_phase2_gave():
  """Phase 2 returns the given kernel unchanged (``test_phase2_nonblind``); with the final
  TV solve from the bicubic start its image is then not read, so the output of
  :func:`phase2.finish_output` is the same for any Phase 2 image and equals
  :func:`phase2.restore_only` and the TV solver called directly."""
  from kfjax import restore
  cfg, lr, k = _tv_bicubic_config(), _lr_image(), _box_kernel()
  hr, k_out, info = phase2_lib.restore_only(cfg, lr, k)
  hr_shape = (LR_SHAPE[0] * SCALE, LR_SHAPE[1] * SCALE, LR_SHAPE[2])
  assert hr.shape == hr_shape
  np.testing.assert_array_equal(k_out, k)
  assert info["mode"] == "nonblind" and info["steps"] == 0 and "skipped" in info
  assert info["final_restore"]["init"] == "bicubic"
  rng = np.random.default_rng(1)
  for phase2_image in (np.zeros(hr_shape, np.float32),
                       rng.uniform(-1, 1, hr_shape).astype(np.float32)):
    other, k2, _ = phase2_lib.finish_output(cfg, jnp.asarray(lr), phase2_image, k, blind=False)
    np.testing.assert_array_equal(np.asarray(other), np.asarray(hr))
    np.testing.assert_array_equal(np.asarray(k2), k)
  x, _ = restore.solve_cfg((lr + 1.0) / 2.0, k, SCALE, cfg.restore)
  np.testing.assert_allclose(np.asarray(hr), np.asarray(x) * 2.0 - 1.0, atol=1e-5)
  # A real restoration: re-degraded with k, nearer the LR image than its bicubic start.
  from kfjax import degrade
  from kfjax import resize
  err = lambda img: float(np.mean((degrade.downscale_np(img, k, SCALE) - lr) ** 2))
  start = np.asarray(resize.upscale(jnp.asarray(lr), SCALE))
  assert err(hr) < 0.5 * err(start)


def test_pipeline_nonblind_skips_both_phases_when_nothing_reads_them(tmp_path):
  from kfjax import io as kio
  from kfjax import pipeline
  from kfjax import restore
  img = (_lr_image() + 1.0) / 2.0
  path, kpath = str(tmp_path / "lr.png"), str(tmp_path / "k.npy")
  kio.save_image(path, img)
  np.save(kpath, _box_kernel())
  cfg, wd = _tv_bicubic_config(), str(tmp_path / "out")
  summary = pipeline.run(path, cfg, wd, kernel_path=kpath, show_progress=False)
  assert summary["mode"] == "nonblind"
  assert summary["phase1"]["steps"] == 0 and "skipped" in summary["phase1"]
  assert summary["phase2"]["iterations"] == 0 and "skipped" in summary["phase2"]
  # Nothing of either phase was trained or checkpointed: only the run's own outputs.
  assert sorted(os.listdir(wd)) == ["bicubic.png", "config.json", "kernel.npy", "kernel.png",
                                    "sr.png", "summary.json"]
  lr, _ = kio.load_image(path)
  x, _ = restore.solve_cfg(lr, _box_kernel(), SCALE, cfg.restore)
  sr, _ = kio.load_image(os.path.join(wd, "sr.png"))
  assert np.abs(sr - np.clip(np.asarray(x), 0, 1)).max() <= 1.0 / 255 + 1e-6   # 8-bit output
