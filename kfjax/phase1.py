"""Phase 1: train the patch-diffusion model (PD) on random crops of the single LR image.

:func:`train` is the phase: it builds PD, restores it from a checkpoint or trains it
(host loop :func:`kfjax.loop.run_chunks`), and returns the trained parameters.

Everything per step runs on device: crop positions, timesteps and noise are drawn
from the state's PRNG key, crops are cut with ``dynamic_slice`` vmapped over the batch,
and :func:`make_train_chunk` scans ``steps_per_chunk`` optimiser steps per dispatch.
Crops are cut from the LR image padded by the PD halo (7 px, symmetric), so the
network's VALID output covers exactly the crop, the same way it is applied in Phase 2.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from kfjax import checkpoint as ckpt
from kfjax import config as config_lib
from kfjax import loop
from kfjax import runtime
from kfjax import schedule as sch
from kfjax.errors import KfjaxError
from kfjax.errors import NotTogether
from kfjax.models import pd as pd_lib


class PDState(NamedTuple):
  step: jnp.ndarray
  params: Any
  opt_state: Any
  rng: jnp.ndarray


def checks(cfg):
  """``(ok, message)`` pairs for the fields Phase 1 owns (``pipeline.validate_config``)."""
  t = cfg.train
  return [
      (t.steps >= 0, "train.steps must be >= 0"),
      (t.steps_per_chunk >= 1, "train.steps_per_chunk must be >= 1"),
      (t.batch_size >= 1, "train.batch_size must be >= 1"),
      (t.crop_size >= 1, "train.crop_size must be >= 1"),
      (t.t_max == 0 or cfg.sample.t_start <= t.t_max <= cfg.diffusion.num_steps,
       f"train.t_max must be 0 or in [sample.t_start={cfg.sample.t_start}, "
       f"diffusion.num_steps={cfg.diffusion.num_steps}] (Phase 2 queries PD up to t_start)"),
  ]


def make_model(cfg, channels):
  return pd_lib.PatchDiffusion(channels=cfg.pd.channels, out_channels=channels,
                               num_blocks=cfg.pd.num_blocks, emb_dim=cfg.pd.emb_dim,
                               dtype=config_lib.compute_dtype(cfg))


def make_optimizer(cfg):
  lr = optax.cosine_decay_schedule(cfg.train.lr, max(cfg.train.steps, 1),
                                   alpha=cfg.train.lr_end / cfg.train.lr)
  return optax.adam(lr)


def crop_size(cfg, image_shape):
  """The training crop: the configured size, or the whole image if that is smaller."""
  return int(min(cfg.train.crop_size, image_shape[0], image_shape[1]))


def init_state(cfg, model, tx, image_shape, rng):
  init_rng, rng = jax.random.split(rng)
  p = crop_size(cfg, image_shape) + 2 * pd_lib.HALO
  params = model.init(init_rng, jnp.zeros((1, p, p, image_shape[-1])), jnp.ones((1,)))
  return PDState(jnp.zeros((), jnp.int32), params, tx.init(params), rng)


def loss_fn(model, sched, params, batch, t, noise):
  """v-prediction MSE on crops ``batch`` (B, P+14, P+14, C); the target is the centre P×P."""
  x_t = sch.q_sample(sched, batch, t[:, None, None, None], noise)
  v = sch.v_target(sched, batch, t[:, None, None, None], noise)
  h = pd_lib.HALO
  pred = model.apply(params, x_t, t)
  return jnp.mean((pred - v[:, h:-h, h:-h, :]) ** 2)


def max_level(cfg, sched):
  """The highest noise level Phase 1 trains on: ``train.t_max``, or every level (0).

  Phase 2 queries PD at ``t <= sample.t_start`` only, so with ``t_max = t_start`` no
  training is spent on levels it never uses (a kfjax option; the paper trains on all)."""
  return int(cfg.train.t_max) or int(sched.num_steps)


def draw_levels(key, n, t_max):
  """``n`` noise levels uniform on ``1 … t_max``."""
  return jax.random.randint(key, (n,), 1, t_max + 1)


def _make_step(cfg, model, sched, tx, image_shape):
  """``one_step(state, padded) -> (state, loss)``: one optimiser step on crops of
  ``padded`` (the image padded by the halo, :func:`kfjax.models.pd.pad_halo`)."""
  size = crop_size(cfg, image_shape) + 2 * pd_lib.HALO
  max_y = image_shape[0] + 2 * pd_lib.HALO - size
  max_x = image_shape[1] + 2 * pd_lib.HALO - size
  batch_size = cfg.train.batch_size
  num_t = max_level(cfg, sched)

  def sample_batch(rng, padded):
    ky, kx, kt, kn = jax.random.split(rng, 4)
    ys = jax.random.randint(ky, (batch_size,), 0, max_y + 1)
    xs = jax.random.randint(kx, (batch_size,), 0, max_x + 1)
    cut = lambda y, x: jax.lax.dynamic_slice(padded, (y, x, 0), (size, size, padded.shape[-1]))
    batch = jax.vmap(cut)(ys, xs)
    t = draw_levels(kt, batch_size, num_t)
    noise = jax.random.normal(kn, batch.shape)
    return batch, t, noise

  def one_step(state, padded):
    rng = jax.random.fold_in(state.rng, state.step)
    batch, t, noise = sample_batch(rng, padded)
    loss, grads = jax.value_and_grad(lambda p: loss_fn(model, sched, p, batch, t, noise))(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return PDState(state.step + 1, params, opt_state, state.rng), loss

  return one_step


def make_train_chunk(cfg, model, sched, tx, image, steps):
  """Returns ``chunk(state) -> (state, losses[steps])``, jitted; ``image`` in [−1, 1]."""
  padded = pd_lib.pad_halo(jnp.asarray(image, jnp.float32))
  one_step = _make_step(cfg, model, sched, tx, image.shape)

  @runtime.jit
  def chunk(state):
    return jax.lax.scan(lambda s, _: one_step(s, padded), state, length=steps)

  return chunk


def make_group_chunk(cfg, model, sched, tx, image_shape, steps, mesh=None):
  """``chunk(states, images) -> (states, losses[G, steps])``, jitted, for ``G`` images of
  one shape ``image_shape`` trained together: every leaf of ``states`` and ``images``
  (G, h, w, C in [−1, 1]) has a leading image axis. The step is vmapped over the images;
  with ``mesh`` (:func:`kfjax.runtime.image_mesh`) the images are split over its devices
  first (``shard_map``, no collectives: each image's training is its own). Image ``n``
  follows exactly the steps of :func:`make_train_chunk` on that image alone."""
  one_step = _make_step(cfg, model, sched, tx, image_shape)

  def per_image(state, image):
    padded = pd_lib.pad_halo(image)
    return jax.lax.scan(lambda s, _: one_step(s, padded), state, length=steps)

  body = jax.vmap(per_image)
  if mesh is not None:
    body = runtime.over_images(body, mesh, in_specs=(runtime.IMAGES, runtime.IMAGES),
                               out_specs=(runtime.IMAGES, runtime.IMAGES))
  return runtime.jit(body)


def fingerprint(cfg, lr_image):
  """Identifies a trained PD: the image and every field that shapes its training."""
  return ckpt.fingerprint(np.asarray(lr_image), cfg.pd.to_dict(), cfg.train.to_dict(),
                          cfg.diffusion.to_dict(), cfg.seed, *config_lib.precision_part(cfg))


def skipped_info(why):
  """Phase 1's info when it does not run (``sample.prior = "dip"`` needs no PD)."""
  return {"steps": 0, "restored_step": None, "final_loss": None, "skipped": why}


def _saver(cfg, lr_image, workdir):
  """Phase 1's checkpoint in ``workdir``; a PD of another image or config there is an error
  (the user chose the workdir), not something to overwrite."""
  saver = ckpt.PhaseCheckpoint(workdir, "pd", fingerprint(cfg, lr_image))
  if saver.stored_fingerprint() not in (None, saver.fp):
    raise KfjaxError(
        f"{workdir} holds a patch-diffusion model trained on another image or config; "
        "use another --workdir (or delete its checkpoints/ folder)")
  return saver


def train(cfg, lr_image, workdir=None, show_progress=True):
  """Train PD on ``lr_image`` (h, w, C in [−1, 1]) or restore it from ``workdir``.

  Returns ``(model, params, info)`` where ``info`` says what happened.
  """
  model = make_model(cfg, lr_image.shape[-1])
  sched = sch.from_config(cfg)
  tx = make_optimizer(cfg)
  # Jitted: eager parameter initialisation costs seconds per layer on CPU.
  state = runtime.jit(lambda k: init_state(cfg, model, tx, lr_image.shape, k))(
      jax.random.key(cfg.seed))
  total = int(cfg.train.steps)
  saver = _saver(cfg, lr_image, workdir) if workdir else None
  info = {"steps": total, "restored_step": None, "final_loss": None}
  if saver is not None:
    step = saver.latest_step()
    if step is not None:
      state = saver.restore(step, state)
      info["restored_step"] = int(step)
      if show_progress:  # (quiet for library callers such as the benchmark)
        loop.log(f"restored patch diffusion from {saver.path} at step {step}/{total}")
  done = int(state.step)
  if done >= total:
    if saver is not None:  # (kept with the finished checkpoint)
      info["final_loss"] = saver.extra("final_loss")
    return model, state.params, info

  chunk_len = loop.chunk_size(total, int(cfg.train.steps_per_chunk))
  chunk = make_train_chunk(cfg, model, sched, tx, lr_image, chunk_len)
  every = max(int(cfg.train.checkpoint_every), chunk_len)
  bar = tqdm.tqdm(total=total, initial=done, desc="phase 1 (patch diffusion)", unit="step",
                  disable=not show_progress, dynamic_ncols=True)
  last = {}

  def report(losses, at):
    last["loss"] = loop.finite(losses, "phase 1 loss", f"step {at}")
    return {"loss": f"{last['loss']:.4f}"}

  def after(state, at, stop):
    if saver is not None and (at % every < chunk_len or at >= total or stop):
      saver.save(at, state)
  try:
    state, _ = loop.run_chunks(chunk, state, done=done, total=total, length=chunk_len, bar=bar,
                               report=report, after=after, lag=True)
  finally:  # (also on a stop: the last save must be complete before the process ends)
    bar.close()
    if saver is not None:
      saver.wait()
  info["final_loss"] = last["loss"]
  if saver is not None:
    saver.save_extra(final_loss=info["final_loss"])
  return model, state.params, info


def train_group(cfg, lr_images, workdirs, mesh=None, show_progress=True):
  """:func:`train` for ``G`` same-size images together (:func:`make_group_chunk`).

  ``lr_images`` (G, h, w, C) in [−1, 1]; ``workdirs`` one per image: image ``n``'s
  checkpoints are exactly those :func:`train` keeps for it alone. Returns ``(model,
  params, infos)``: the parameters with a leading image axis, one info per image.
  Raises :class:`kfjax.errors.NotTogether` when the images' checkpoints are at different
  steps (the caller then runs them one at a time).
  """
  lr_images = np.asarray(lr_images, np.float32)
  g, shape = lr_images.shape[0], lr_images.shape[1:]
  model = make_model(cfg, shape[-1])
  sched = sch.from_config(cfg)
  tx = make_optimizer(cfg)
  # Every image starts from the state a single run starts from (the same seed).
  one = runtime.jit(lambda k: init_state(cfg, model, tx, shape, k))(jax.random.key(cfg.seed))
  total = int(cfg.train.steps)
  savers = [_saver(cfg, lr_images[n], workdir) for n, workdir in enumerate(workdirs)]
  steps = [saver.latest_step() for saver in savers]
  if len(set(steps)) > 1:
    raise NotTogether(f"phase 1 checkpoints at different steps: {steps}")
  start = steps[0] if steps else None
  states = [one] * g if start is None else [saver.restore(start, one) for saver in savers]
  state = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  infos = [{"steps": total, "restored_step": None if start is None else int(start),
            "final_loss": None} for _ in range(g)]
  if start is not None and show_progress:
    loop.log(f"restored patch diffusion of {g} images at step {start}/{total}")
  done = int(start or 0)
  if done >= total:
    for info, saver in zip(infos, savers):  # (kept with the finished checkpoints)
      info["final_loss"] = saver.extra("final_loss")
    return model, state.params, infos

  chunk_len = loop.chunk_size(total, int(cfg.train.steps_per_chunk))
  chunk = make_group_chunk(cfg, model, sched, tx, shape, chunk_len, mesh)
  images = jnp.asarray(lr_images)
  every = max(int(cfg.train.checkpoint_every), chunk_len)
  bar = tqdm.tqdm(total=total, initial=done, desc=f"phase 1 (patch diffusion, {g} images)",
                  unit="step", disable=not show_progress, dynamic_ncols=True)

  def report(losses, at):
    for n, info in enumerate(infos):
      info["final_loss"] = loop.finite(losses[n], f"phase 1 loss of image {n}", f"step {at}")
    return {"loss": f"{np.mean([i['final_loss'] for i in infos]):.4f}"}

  def after(state, at, stop):
    if savers and (at % every < chunk_len or at >= total or stop):
      host = ckpt.to_host(state)
      for n, saver in enumerate(savers):
        saver.save(at, jax.tree.map(lambda a: a[n], host))
  try:
    state, _ = loop.run_chunks(lambda st: chunk(st, images), state, done=done, total=total,
                               length=chunk_len, bar=bar, report=report, after=after, lag=True)
  finally:
    bar.close()
    for saver in savers:
      saver.wait()
  for info, saver in zip(infos, savers):
    saver.save_extra(final_loss=info["final_loss"])
  return model, state.params, infos
