"""Phase 1: train the patch-diffusion model on random crops of the single LR image.

Everything per step runs on device: crop positions, timesteps and noise are drawn
from the state's PRNG key, crops are cut with ``dynamic_slice`` vmapped over the batch,
and :func:`make_train_chunk` scans ``steps_per_chunk`` optimiser steps per dispatch.
Crops are cut from the LR image padded by the PD halo (7 px, symmetric), so the
network's VALID output covers exactly the crop, the same way it is applied in Phase 2.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfjax import ops
from kfjax import schedule as sch
from kfjax.models import pd as pd_lib


class PDState(NamedTuple):
  step: jnp.ndarray
  params: Any
  opt_state: Any
  rng: jnp.ndarray


def compute_dtype(cfg):
  """The networks' compute dtype from ``cfg.precision`` (``float32`` or ``bfloat16``)."""
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.precision]


def make_model(cfg, channels):
  return pd_lib.PatchDiffusion(channels=cfg.pd.channels, out_channels=channels,
                               num_blocks=cfg.pd.num_blocks, emb_dim=cfg.pd.emb_dim,
                               dtype=compute_dtype(cfg))


def make_schedule(cfg):
  return sch.linear_schedule(cfg.diffusion.num_steps, cfg.diffusion.beta_start,
                             cfg.diffusion.beta_end)


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
  return int(cfg.train.get("t_max", 0)) or int(sched.num_steps)


def draw_levels(key, n, t_max):
  """``n`` noise levels uniform on ``1 … t_max``."""
  return jax.random.randint(key, (n,), 1, t_max + 1)


def make_train_chunk(cfg, model, sched, tx, image, steps):
  """Returns ``chunk(state) -> (state, losses[steps])``, jitted; ``image`` in [−1, 1]."""
  padded = pd_lib.pad_halo(jnp.asarray(image, jnp.float32))
  size = crop_size(cfg, image.shape) + 2 * pd_lib.HALO
  max_y = padded.shape[0] - size
  max_x = padded.shape[1] - size
  batch_size = cfg.train.batch_size
  num_t = max_level(cfg, sched)

  def sample_batch(rng):
    ky, kx, kt, kn = jax.random.split(rng, 4)
    ys = jax.random.randint(ky, (batch_size,), 0, max_y + 1)
    xs = jax.random.randint(kx, (batch_size,), 0, max_x + 1)
    cut = lambda y, x: jax.lax.dynamic_slice(padded, (y, x, 0), (size, size, padded.shape[-1]))
    batch = jax.vmap(cut)(ys, xs)
    t = draw_levels(kt, batch_size, num_t)
    noise = jax.random.normal(kn, batch.shape)
    return batch, t, noise

  def one_step(state, _):
    rng = jax.random.fold_in(state.rng, state.step)
    batch, t, noise = sample_batch(rng)
    loss, grads = jax.value_and_grad(lambda p: loss_fn(model, sched, p, batch, t, noise))(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return PDState(state.step + 1, params, opt_state, state.rng), loss

  @ops.jit
  def chunk(state):
    return jax.lax.scan(one_step, state, length=steps)

  return chunk
