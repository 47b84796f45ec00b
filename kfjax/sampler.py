"""Phase 2: reverse diffusion with joint U-Net + kernel optimisation (Algorithm 1).

State entering reverse step ``i`` is the noisy image ``x`` at level ``ts[i]`` and the
current clean estimate ``x0`` (initially the bicubic upscale). For each step, with one
noise draw ``ξ`` fixed for the step, ``n`` Adam iterations (``n_iter_first`` at the
first step, ``n_iter`` after; learning rate cosine-annealed from ``lr`` to ``lr_end``
within the step, Adam moments carried across steps; ``sample.lr_schedule = "global"``:
one cosine over all iterations instead) minimise::

    a   = R(x0)                                   # U-Net, first application
    x_s = posterior(a, x; ts[i] → ts[i+1]) + σ·ξ  # DDPM step, differentiable in R
    b   = R(x0_from_v(x_s, PD(x_s, ts[i+1])))     # PD denoises, same U-Net again
    L   = mse(I_LR, (a*k)↓s) + mse(I_LR, (b*k)↓s) + λ_com·COM(k) [+ λ_sp·S(k)] [+ λ_tv·(TV(a) + TV(b))]

then ``x0 ← b`` and ``x ← x_s`` (both from the last iteration). The result is the
final ``b`` and the kernel. All of Phase 2 is one sequence of Adam iterations, each
knowing its reverse step and its place in it (``Phase2State.step``/``it``);
:meth:`Phase2.make_chunk` compiles the next ``m`` of them into one ``lax.scan`` program:
a few iterations per dispatch keep a progress bar moving, all of them make the whole of
Phase 2 a single dispatch. ``--kernel`` mode (non-blind) fixes ``k``.

Ablation options (appendix C.1-C.2): ``kernel.net`` picks the kernel network
(:func:`make_kernel_net`), ``sample.two_unets`` gives the application after PD its own
U-Net (``params["unet2"]``), and ``sample.prior = "dip"`` drops the diffusion prior
(:meth:`Phase2._forward_dip`).
"""

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kfjax import degrade
from kfjax import ops
from kfjax import resize
from kfjax import restore
from kfjax import schedule as sch
from kfjax import train_pd
from kfjax.models import kernel_net
from kfjax.models import pd as pd_lib
from kfjax.models import unet as unet_lib


# The layout of Phase2State, part of Phase 2's checkpoint fingerprint: a checkpoint of
# another layout is discarded rather than restored into the wrong fields.
STATE_VERSION = "phase2-state-2"


class Phase2State(NamedTuple):
  step: jnp.ndarray   # index of the current reverse step
  it: jnp.ndarray     # iterations of that step already done
  params: Any         # {"unet": ..., "kernel": ...} ("kernel" absent when non-blind)
  opt_state: Any
  x: jnp.ndarray      # noisy image at level ts[step]
  x0: jnp.ndarray     # current clean estimate
  xi: jnp.ndarray     # the step's noise draw (drawn at its first iteration)


class Phase2Metrics(NamedTuple):
  t: jnp.ndarray
  loss: jnp.ndarray
  cons_a: jnp.ndarray
  cons_b: jnp.ndarray
  com: jnp.ndarray
  step: jnp.ndarray   # the reverse step the iteration belongs to


def kernel_size(cfg, scale):
  """The kernel's side K: ``kernel.size``, or 6 × scale when it is 0 (the one place this
  default is worked out)."""
  return int(cfg.kernel.size) if cfg.kernel.size else 6 * int(scale)


def make_unet(cfg, channels):
  u = cfg.unet
  return unet_lib.UNet(out_channels=channels, base_channels=u.base_channels, levels=u.levels,
                       max_channels=u.max_channels, residual=u.residual,
                       upsample=u.upsample, dtype=train_pd.compute_dtype(cfg))


def make_kernel_net(cfg, scale):
  """The kernel network ``cfg.kernel.net`` (SIREN by default; see ``kernel_net.make``)."""
  return kernel_net.make(cfg.kernel, kernel_size(cfg, scale), int(scale))


def timesteps(cfg):
  return sch.sampling_timesteps(cfg.sample.t_start, cfg.sample.num_steps)


def learning_rate(step, j, n_first, n_iter, num_steps, lr, lr_end, schedule="per_step"):
  """Phase 2's learning rate at iteration ``j`` of reverse step ``step`` (traceable).

  ``"per_step"`` (Algorithm 1): a cosine from ``lr`` to ``lr_end`` over the step's own
  iterations, restarting at every step. ``"global"``: one cosine over all
  ``n_first + (num_steps − 1)·n_iter`` iterations of Phase 2.
  """
  step = jnp.asarray(step)
  j = jnp.asarray(j).astype(jnp.float32)
  if schedule == "global":
    before = jnp.where(step == 0, 0, n_first + (step - 1) * n_iter).astype(jnp.float32)
    frac = (before + j) / float(n_first + (num_steps - 1) * n_iter)
  else:
    frac = j / jnp.where(step == 0, n_first, n_iter).astype(jnp.float32)
  return lr_end + 0.5 * (lr - lr_end) * (1.0 + jnp.cos(jnp.pi * frac))


class Phase2:
  """Builds the networks and the compiled Phase 2 programs for one image shape.

  ``lr_image`` is (h, w, C) in [−1, 1]; ``fixed_kernel`` (K, K) selects non-blind mode.
  """

  def __init__(self, cfg, pd_model, pd_params, sched, lr_shape, scale,
               fixed_kernel: Optional[np.ndarray] = None):
    self.cfg = cfg
    self.scale = int(scale)
    c = lr_shape[-1]
    self.pd_model, self.pd_params, self.sched = pd_model, pd_params, sched
    self.unet = make_unet(cfg, c)
    self.kernel_net = make_kernel_net(cfg, scale)
    self.fixed_kernel = None if fixed_kernel is None else jnp.asarray(fixed_kernel, jnp.float32)
    self.ts = jnp.asarray(timesteps(cfg))
    if int(self.ts[0]) > sched.num_steps:
      raise ValueError(f"sample.t_start must be below diffusion.num_steps ({sched.num_steps})")
    self.num_steps = int(cfg.sample.num_steps)
    self.tx = optax.scale_by_adam()
    # Ablations (appendix C.1-C.2): a second U-Net for the application after PD, and
    # the Deep-Image-Prior setup without diffusion (see _forward_dip).
    self.two_unets = bool(cfg.sample.get("two_unets", False))
    self.dip = cfg.sample.get("prior", "diffusion") == "dip"
    self.dip_input = cfg.sample.get("dip_input", "bicubic")

  # -- pieces -----------------------------------------------------------------
  def kernel(self, params):
    if self.fixed_kernel is not None:
      return self.fixed_kernel
    return self.kernel_net.apply(params["kernel"])

  def unet_apply(self, params, x, which="unet"):
    out, _ = self.unet.apply(params[which], x[None], mutable=["batch_stats"])
    return out[0]

  def pd_apply(self, x, t):
    tile = int(self.cfg.sample.pd_tile)
    if tile:
      return pd_lib.apply_tiled(self.pd_model, self.pd_params, x, t, tile,
                                int(self.cfg.sample.pd_tile_batch) or None)
    return pd_lib.apply_whole(self.pd_model, self.pd_params, x[None], jnp.full((1,), t))[0]

  def _forward(self, params, x, x0, t, s, xi, lr_image):
    if self.dip:
      return self._forward_dip(params, x, x0, lr_image)
    k = self.kernel(params)
    a = self.unet_apply(params, x0)
    x_s = sch.posterior_sample(self.sched, a, x, t, s, xi, float(self.cfg.sample.eta))
    v = self.pd_apply(x_s, s)
    b = self.unet_apply(params, sch.x0_from_v(self.sched, x_s, s, v),
                        "unet2" if self.two_unets else "unet")
    loss, cons_a, cons_b, com = self._loss(k, a, b, lr_image)
    return loss, (x_s, b, cons_a, cons_b, com)

  def _loss(self, k, a, b, lr_image):
    """``mse(I_LR, (a*k)↓s) + mse(I_LR, (b*k)↓s) + λ_com·COM(k)`` and its three terms."""
    cons_a = jnp.mean((degrade.downscale(a, k, self.scale) - lr_image) ** 2)
    cons_b = jnp.mean((degrade.downscale(b, k, self.scale) - lr_image) ** 2)
    com = kernel_net.center_of_mass_loss(k)
    loss = cons_a + cons_b + self.cfg.sample.com_weight * com
    tv_weight = restore.weight_at(self.cfg.sample.get("tv_weight", 0.0), self.scale)
    if tv_weight:
      # restore.tv on [−1, 1] images: ε doubled so the smoothing matches the [0, 1] solver's.
      eps = 2.0 * float(self.cfg.restore.eps)
      loss = loss + tv_weight * (restore.tv(a.astype(jnp.float32), eps)
                                 + restore.tv(b.astype(jnp.float32), eps))
    sparsity = float(self.cfg.sample.get("sparsity_weight", 0.0))
    if sparsity and self.fixed_kernel is None:
      loss = loss + sparsity * kernel_net.sparsity_loss(k)
    return loss, cons_a, cons_b, com

  def _forward_dip(self, params, x, x0, lr_image):
    """Deep-Image-Prior ablation (``sample.prior = "dip"``): no noise, no PD.

    ``a = R(x0)`` with the fixed network input ``x0`` (the bicubic upscale, or fixed
    noise with ``sample.dip_input = "noise"``); the loss is the diffusion loss with
    ``b = a``, i.e. ``2·mse(I_LR, (a*k)↓s) + λ_com·COM(k)``, so the consistency/COM
    balance, the iteration counts and the optimiser are those of the diffusion run.
    ``x`` and ``x0`` pass through unchanged (the state keeps the input; :meth:`result`
    applies the network to it).
    """
    k = self.kernel(params)
    a = self.unet_apply(params, x0)
    loss, cons_a, cons_b, com = self._loss(k, a, a, lr_image)
    return loss, (x, x0, cons_a, cons_b, com)

  # -- state ------------------------------------------------------------------
  def init(self, lr_image, rng):
    """Initial state: bicubic guess, noised to ``ts[0]``; fresh networks.

    DIP: ``x = x0`` = the network's fixed input (bicubic upscale, or noise ~ U(−0.1, 0.1)
    as in Ulyanov et al.'s DIP with ``sample.dip_input = "noise"``).
    """
    lr_image = jnp.asarray(lr_image, jnp.float32)
    k_unet, k_kern, k_noise = jax.random.split(rng, 3)
    x0 = jnp.clip(resize.upscale(lr_image, self.scale), -1.0, 1.0)
    params = {"unet": self.unet.init(k_unet, x0[None])}
    if self.two_unets and not self.dip:
      params["unet2"] = self.unet.init(jax.random.fold_in(k_unet, 1), x0[None])
    if self.fixed_kernel is None:
      params["kernel"] = kernel_net.initial_params(self.kernel_net, self.cfg.kernel, self.scale,
                                                   k_kern)
    if self.dip:
      if self.dip_input == "noise":
        x0 = jax.random.uniform(k_noise, x0.shape, jnp.float32, -0.1, 0.1)
      x = x0
    else:
      x = sch.q_sample(self.sched, x0, self.ts[0], jax.random.normal(k_noise, x0.shape))
    zero = jnp.zeros((), jnp.int32)
    return Phase2State(zero, zero, params, self.tx.init(params), x, x0, jnp.zeros_like(x))

  def init_batch(self, lr_images, rngs):
    """Initial state of ``N`` same-size images for ``make_chunk(iterations, batch=N)``.

    ``lr_images`` (N, h, w, C), ``rngs`` (N,) keys. Every leaf gets a leading image
    axis except the counters ``step`` and ``it``, which all images share.
    """
    state = jax.vmap(self.init)(jnp.asarray(lr_images, jnp.float32), rngs)
    zero = jnp.zeros((), jnp.int32)
    return state._replace(step=zero, it=zero)

  def iterations_before(self, step):
    """Adam iterations of Phase 2 before reverse step ``step`` (host ints)."""
    n_first, n_iter = int(self.cfg.sample.n_iter_first), int(self.cfg.sample.n_iter)
    return 0 if step == 0 else n_first + (int(step) - 1) * n_iter

  @property
  def total_iterations(self):
    """Adam iterations of the whole of Phase 2: ``n_first + (num_steps − 1)·n_iter``."""
    return self.iterations_before(self.num_steps)

  def iterations_done(self, state):
    """How many of Phase 2's iterations ``state`` has behind it (host int)."""
    return self.iterations_before(int(state.step)) + int(state.it)

  def make_chunk(self, iterations, batch=None):
    """``chunk(state, lr_image, rng) -> (state, Phase2Metrics[iterations])``, jitted.

    Runs the next ``iterations`` Adam iterations of Phase 2, crossing reverse steps where
    a step's iterations run out (the last iteration of step ``i`` moves the state to
    step ``i + 1``), so a chunk can be a few iterations (a progress bar that moves) or
    all :attr:`total_iterations` (one dispatch for the whole of Phase 2). A chunk must
    not run past the end: the caller picks ``iterations`` dividing what is left.

    ``batch=N`` runs ``N`` same-size images together (state from :meth:`init_batch`,
    ``lr_image`` (N, h, w, C), ``rng`` (N,) keys; metrics ``(iterations, N)``, ``t`` and
    ``step`` (iterations,)). Only the per-image work is vmapped: the step and iteration
    counters and the timesteps stay shared. Image ``n`` of a batch follows exactly the
    path it would follow alone.
    """
    cfg = self.cfg.sample
    n_first, n_iter = int(cfg.n_iter_first), int(cfg.n_iter)
    lr_at = functools.partial(learning_rate, n_first=n_first, n_iter=n_iter,
                              num_steps=self.num_steps, lr=float(cfg.lr),
                              lr_end=float(cfg.lr_end),
                              schedule=cfg.get("lr_schedule", "per_step"))
    per_image = (lambda f, **_: f) if batch is None else jax.vmap

    def update(params, opt_state, x, x0, xi, lr_image, lr, t, s):
      """One Adam iteration on one image."""
      (loss, aux), grads = jax.value_and_grad(
          lambda p: self._forward(p, x, x0, t, s, xi, lr_image), has_aux=True)(params)
      updates, opt_state = self.tx.update(grads, opt_state, params)
      params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
      return params, opt_state, (loss, aux)

    update_all = per_image(update, in_axes=(0, 0, 0, 0, 0, 0, None, None, None))
    draw = lambda key, x, i: jax.random.normal(jax.random.fold_in(key, i), x.shape)

    def iteration(carry, _):
      state, lr_image, rng = carry
      i, j = state.step, state.it
      t, s = self.ts[i], self.ts[i + 1]
      # One noise draw ξ per reverse step, made at its first iteration and kept in the
      # state (so a chunk may end, and a checkpoint resume, in the middle of a step).
      xi = jax.lax.cond(j == 0, lambda: per_image(draw, in_axes=(0, 0, None))(rng, state.x, i),
                        lambda: state.xi)
      params, opt_state, (loss, (x_s, b, ca, cb, com)) = update_all(
          state.params, state.opt_state, state.x, state.x0, xi, lr_image, lr_at(i, j), t, s)
      # The step's last iteration moves on: x ← x_s and x0 ← b of that iteration.
      last = j + 1 >= jnp.where(i == 0, n_first, n_iter)
      x, x0 = jax.lax.cond(last, lambda: (x_s, b), lambda: (state.x, state.x0))
      new = Phase2State(jnp.where(last, i + 1, i), jnp.where(last, 0, j + 1), params,
                        opt_state, x, x0, xi)
      return (new, lr_image, rng), Phase2Metrics(s, loss, ca, cb, com, i)

    @ops.jit
    def chunk(state, lr_image, rng):
      (state, _, _), metrics = jax.lax.scan(iteration, (state, lr_image, rng),
                                            length=iterations)
      return state, metrics

    return chunk

  def result(self, state):
    """(HR image in [−1, 1], kernel) from a finished state (DIP: the U-Net's output)."""
    if self.dip:
      return ops.jit(self.unet_apply)(state.params, state.x0), self.kernel(state.params)
    return state.x0, self.kernel(state.params)
