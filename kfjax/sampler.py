"""Phase 2: reverse diffusion with joint U-Net + kernel optimisation (Algorithm 1).

State entering reverse step ``i`` is the noisy image ``x`` at level ``ts[i]`` and the
current clean estimate ``x0`` (initially the bicubic upscale). For each step, with one
noise draw ``ξ`` fixed for the step, ``n`` Adam iterations (``n_iter_first`` at the
first step, ``n_iter`` after; learning rate cosine-annealed from ``lr`` to ``lr_end``
within the step, Adam moments carried across steps) minimise::

    a   = R(x0)                                   # U-Net, first application
    x_s = posterior(a, x; ts[i] → ts[i+1]) + σ·ξ  # DDPM step, differentiable in R
    b   = R(x0_from_v(x_s, PD(x_s, ts[i+1])))     # PD denoises, same U-Net again
    L   = mse(I_LR, (a*k)↓s) + mse(I_LR, (b*k)↓s) + λ_com·COM(k)

then ``x0 ← b`` and ``x ← x_s`` (both from the last iteration). The result is the
final ``b`` and the kernel. The inner loop is a ``lax.scan`` as long as the longest step
(iterations past a step's own count are skipped by ``lax.cond``), the loop over steps a
``lax.scan`` too; :func:`make_phase2_chunk`
compiles ``chunk`` steps into one program, and ``chunk = num_steps`` makes the whole
of Phase 2 a single dispatch. ``--kernel`` mode (non-blind) fixes ``k``.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kfjax import degrade
from kfjax import resize
from kfjax import schedule as sch
from kfjax.models import kernel_net
from kfjax.models import pd as pd_lib
from kfjax.models import unet as unet_lib


class Phase2State(NamedTuple):
  step: jnp.ndarray   # index of the next reverse step
  params: Any         # {"unet": ..., "kernel": ...} ("kernel" absent when non-blind)
  opt_state: Any
  x: jnp.ndarray      # noisy image at level ts[step]
  x0: jnp.ndarray     # current clean estimate


class Phase2Metrics(NamedTuple):
  t: jnp.ndarray
  loss: jnp.ndarray
  cons_a: jnp.ndarray
  cons_b: jnp.ndarray
  com: jnp.ndarray


def kernel_size(cfg, scale):
  return int(cfg.kernel.size) if cfg.kernel.size else 6 * int(scale)


def make_unet(cfg, channels):
  u = cfg.unet
  return unet_lib.UNet(out_channels=channels, base_channels=u.base_channels, levels=u.levels,
                       max_channels=u.max_channels, residual=u.residual,
                       upsample=u.upsample)


def make_kernel_net(cfg, scale):
  k = cfg.kernel
  return kernel_net.SirenKernel(size=kernel_size(cfg, scale), width=k.width, depth=k.depth,
                                omega=k.omega)


def timesteps(cfg):
  return sch.sampling_timesteps(cfg.sample.t_start, cfg.sample.num_steps)


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

  # -- pieces -----------------------------------------------------------------
  def kernel(self, params):
    if self.fixed_kernel is not None:
      return self.fixed_kernel
    return self.kernel_net.apply(params["kernel"])

  def unet_apply(self, params, x):
    out, _ = self.unet.apply(params["unet"], x[None], mutable=["batch_stats"])
    return out[0]

  def pd_apply(self, x, t):
    tile = int(self.cfg.sample.pd_tile)
    if tile:
      return pd_lib.apply_tiled(self.pd_model, self.pd_params, x, t, tile,
                                int(self.cfg.sample.pd_tile_batch) or None)
    return pd_lib.apply_whole(self.pd_model, self.pd_params, x[None], jnp.full((1,), t))[0]

  def _forward(self, params, x, x0, t, s, xi, lr_image):
    k = self.kernel(params)
    a = self.unet_apply(params, x0)
    x_s = sch.posterior_sample(self.sched, a, x, t, s, xi, float(self.cfg.sample.eta))
    v = self.pd_apply(x_s, s)
    b = self.unet_apply(params, sch.x0_from_v(self.sched, x_s, s, v))
    cons_a = jnp.mean((degrade.downscale(a, k, self.scale) - lr_image) ** 2)
    cons_b = jnp.mean((degrade.downscale(b, k, self.scale) - lr_image) ** 2)
    com = kernel_net.center_of_mass_loss(k)
    loss = cons_a + cons_b + self.cfg.sample.com_weight * com
    return loss, (x_s, b, cons_a, cons_b, com)

  # -- state ------------------------------------------------------------------
  def init(self, lr_image, rng):
    """Initial state: bicubic guess, noised to ``ts[0]``; fresh networks."""
    lr_image = jnp.asarray(lr_image, jnp.float32)
    k_unet, k_kern, k_noise = jax.random.split(rng, 3)
    x0 = jnp.clip(resize.upscale(lr_image, self.scale), -1.0, 1.0)
    params = {"unet": self.unet.init(k_unet, x0[None])}
    if self.fixed_kernel is None:
      params["kernel"] = self.kernel_net.init(k_kern)
    x = sch.q_sample(self.sched, x0, self.ts[0], jax.random.normal(k_noise, x0.shape))
    return Phase2State(jnp.zeros((), jnp.int32), params, self.tx.init(params), x, x0)

  def make_chunk(self, steps):
    """``chunk(state, lr_image, rng) -> (state, Phase2Metrics[steps])``, jitted."""
    cfg = self.cfg.sample
    n_first, n_iter = int(cfg.n_iter_first), int(cfg.n_iter)
    lr0, lr1 = float(cfg.lr), float(cfg.lr_end)

    def reverse_step(carry, _):
      state, lr_image, rng = carry
      i = state.step
      t, s = self.ts[i], self.ts[i + 1]
      xi = jax.random.normal(jax.random.fold_in(rng, i), state.x.shape)
      n = jnp.where(i == 0, n_first, n_iter)
      grad_fn = jax.value_and_grad(
          lambda p: self._forward(p, state.x, state.x0, t, s, xi, lr_image), has_aux=True)

      def iteration(c, j):
        params, opt_state, _ = c
        (loss, aux), grads = grad_fn(params)
        frac = j.astype(jnp.float32) / n.astype(jnp.float32)
        lr = lr1 + 0.5 * (lr0 - lr1) * (1.0 + jnp.cos(jnp.pi * frac))
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        return params, opt_state, (loss, aux)

      def inner(c, j):
        # The scan is as long as the longest step; later steps skip the surplus
        # iterations (lax.cond runs one branch, so a skipped iteration costs nothing).
        c = jax.lax.cond(j < n, iteration, lambda c, j: c, c, j)
        return c, None

      dummy = (jnp.zeros(()), (state.x, state.x0, jnp.zeros(()), jnp.zeros(()), jnp.zeros(())))
      (params, opt_state, (loss, (x_s, b, ca, cb, com))), _ = jax.lax.scan(
          inner, (state.params, state.opt_state, dummy), jnp.arange(max(n_first, n_iter)))
      new = Phase2State(i + 1, params, opt_state, x_s, b)
      return (new, lr_image, rng), Phase2Metrics(s, loss, ca, cb, com)

    @jax.jit
    def chunk(state, lr_image, rng):
      (state, _, _), metrics = jax.lax.scan(reverse_step, (state, lr_image, rng), length=steps)
      return state, metrics

    return chunk

  def result(self, state):
    """(HR image in [−1, 1], kernel) from a finished state."""
    return state.x0, self.kernel(state.params)
