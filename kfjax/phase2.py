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
(:func:`make_kernel_net`), ``sample.prior`` picks one of the registered priors
(:data:`PRIORS`: ``"diffusion"``, Algorithm 1, with ``sample.two_unets`` giving the
application after PD its own U-Net, ``params["unet2"]``; ``"dip"``, no diffusion,
:class:`DipPrior`). A prior is the one place the forward pass differs.

:func:`run` is the phase: it drives the compiled chunks on the host (checkpoints,
resume, progress, averaging ``sample.num_samples`` runs), then :func:`finish_output` applies
the kfjax options that follow Algorithm 1 (kernel threshold and blend, the TV
restoration with the found kernel).
"""

import functools
import time
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from kfjax import checkpoint as ckpt
from kfjax import config as config_lib
from kfjax import degrade
from kfjax import loop
from kfjax import resize
from kfjax import restore
from kfjax import runtime
from kfjax import schedule as sch
from kfjax.errors import NotTogether
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


def kernel_size(cfg):
  """The kernel's side K: ``kernel.size``, or 6 × ``cfg.scale`` when it is 0 (the one place
  this default is worked out)."""
  return int(cfg.kernel.size) if cfg.kernel.size else 6 * int(cfg.scale)


def make_unet(cfg, channels):
  u = cfg.unet
  return unet_lib.UNet(out_channels=channels, base_channels=u.base_channels, levels=u.levels,
                       max_channels=u.max_channels, residual=u.residual,
                       upsample=u.upsample, dtype=config_lib.compute_dtype(cfg))


def make_kernel_net(cfg):
  """The kernel network ``cfg.kernel.net`` (SIREN by default; see ``kernel_net.make``) for
  the scale ``cfg.scale``."""
  return kernel_net.make(cfg.kernel, kernel_size(cfg), int(cfg.scale))


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


PRIORS = {}


def register_prior(name):
  """Class decorator: ``sample.prior = name`` selects the class. A prior gets the
  :class:`Phase2` it serves and provides ``networks`` (the U-Net parameter sets it
  trains), ``start(x0, key) -> (x, x0)`` (the initial state from the bicubic upscale),
  ``forward(params, x, x0, t, s, xi, lr_image, pd_params) -> (loss, (x, x0, cons_a, cons_b,
  com))`` (one iteration's loss; the aux's ``x``/``x0`` become the state's at a step's end;
  ``pd_params`` None: the PD the :class:`Phase2` was built with)
  and ``result(params, x0)`` (the HR image of a finished state)."""
  def register(cls):
    PRIORS[name] = cls
    return cls
  return register


@register_prior("diffusion")
class DiffusionPrior:
  """Algorithm 1 (the module docstring's loss); ``sample.two_unets`` (appendix C.2) gives
  the application after PD its own U-Net."""

  def __init__(self, p2):
    self.p2 = p2
    self.networks = ("unet", "unet2") if p2.cfg.sample.two_unets else ("unet",)

  def start(self, x0, key):
    return sch.q_sample(self.p2.sched, x0, self.p2.ts[0], jax.random.normal(key, x0.shape)), x0

  def forward(self, params, x, x0, t, s, xi, lr_image, pd_params=None):
    p2 = self.p2
    k = p2.kernel(params)
    a = p2.unet_apply(params, x0)
    x_s = sch.posterior_sample(p2.sched, a, x, t, s, xi, float(p2.cfg.sample.eta))
    v = p2.pd_apply(x_s, s, pd_params)
    b = p2.unet_apply(params, sch.x0_from_v(p2.sched, x_s, s, v), self.networks[-1])
    loss, cons_a, cons_b, com = p2.loss(k, a, b, lr_image)
    return loss, (x_s, b, cons_a, cons_b, com)

  def result(self, params, x0):
    del params
    return x0


@register_prior("dip")
class DipPrior:
  """Deep-Image-Prior ablation (appendix C.2, ``sample.prior = "dip"``): no noise, no PD.

  ``a = R(x0)`` with the fixed network input ``x0`` (the bicubic upscale, or fixed noise
  ~ U(−0.1, 0.1) as in Ulyanov et al.'s DIP with ``sample.dip_input = "noise"``); the loss
  is the diffusion loss with ``b = a``, i.e. ``2·mse(I_LR, (a*k)↓s) + λ_com·COM(k)``, so
  the consistency/COM balance, the iteration counts and the optimiser are those of the
  diffusion run. ``x`` and ``x0`` pass through unchanged (the state keeps the input;
  :meth:`result` applies the network to it).
  """
  networks = ("unet",)

  def __init__(self, p2):
    self.p2 = p2

  def start(self, x0, key):
    if self.p2.cfg.sample.dip_input == "noise":
      x0 = jax.random.uniform(key, x0.shape, jnp.float32, -0.1, 0.1)
    return x0, x0

  def forward(self, params, x, x0, t, s, xi, lr_image, pd_params=None):
    del t, s, xi, pd_params
    p2 = self.p2
    a = p2.unet_apply(params, x0)
    loss, cons_a, cons_b, com = p2.loss(p2.kernel(params), a, a, lr_image)
    return loss, (x, x0, cons_a, cons_b, com)

  def result(self, params, x0):
    return runtime.jit(self.p2.unet_apply)(params, x0)


class Phase2:
  """Builds the networks and the compiled Phase 2 programs for one image shape.

  ``lr_image`` is (h, w, C) in [−1, 1]; ``fixed_kernel`` (K, K) selects non-blind mode.
  The upscaling factor is ``cfg.scale``.
  """

  def __init__(self, cfg, pd_model, pd_params, sched, lr_shape,
               fixed_kernel: Optional[np.ndarray] = None):
    self.cfg = cfg
    self.scale = int(cfg.scale)
    c = lr_shape[-1]
    self.pd_model, self.pd_params, self.sched = pd_model, pd_params, sched
    self.unet = make_unet(cfg, c)
    self.kernel_net = make_kernel_net(cfg)
    self.fixed_kernel = None if fixed_kernel is None else jnp.asarray(fixed_kernel, jnp.float32)
    self.ts = jnp.asarray(timesteps(cfg))
    if int(self.ts[0]) > sched.num_steps:
      raise ValueError(f"sample.t_start must be below diffusion.num_steps ({sched.num_steps})")
    self.num_steps = int(cfg.sample.num_steps)
    self.tx = optax.scale_by_adam()
    self.prior = PRIORS[cfg.sample.prior](self)

  # -- pieces -----------------------------------------------------------------
  def kernel(self, params):
    if self.fixed_kernel is not None:
      return self.fixed_kernel
    return self.kernel_net.apply(params["kernel"])

  def unet_apply(self, params, x, which="unet"):
    out, _ = self.unet.apply(params[which], x[None], mutable=["batch_stats"])
    return out[0]

  def pd_apply(self, x, t, pd_params=None):
    """PD's v-prediction for ``x`` at level ``t``, with ``pd_params`` (one image's PD in a
    group, :func:`run_group`) or the PD this object was built with."""
    pd_params = self.pd_params if pd_params is None else pd_params
    tile = int(self.cfg.sample.pd_tile)
    if tile:
      return pd_lib.apply_tiled(self.pd_model, pd_params, x, t, tile,
                                int(self.cfg.sample.pd_tile_batch) or None)
    return pd_lib.apply_whole(self.pd_model, pd_params, x[None], jnp.full((1,), t))[0]

  def forward(self, params, x, x0, t, s, xi, lr_image, pd_params=None):
    """One iteration's loss and aux ``(x, x0, cons_a, cons_b, com)`` (see :data:`PRIORS`):
    what ``jax.grad`` differentiates in :meth:`make_chunk`."""
    return self.prior.forward(params, x, x0, t, s, xi, lr_image, pd_params)

  def loss(self, k, a, b, lr_image):
    """``mse(I_LR, (a*k)↓s) + mse(I_LR, (b*k)↓s) + λ_com·COM(k)`` and its three terms."""
    cons_a = jnp.mean((degrade.downscale(a, k, self.scale) - lr_image) ** 2)
    cons_b = jnp.mean((degrade.downscale(b, k, self.scale) - lr_image) ** 2)
    com = kernel_net.center_of_mass_loss(k)
    loss = cons_a + cons_b + self.cfg.sample.com_weight * com
    tv_weight = restore.weight_at(self.cfg.sample.tv_weight, self.scale)
    if tv_weight:
      # restore.tv on [−1, 1] images: ε doubled so the smoothing matches the [0, 1] solver's.
      eps = 2.0 * float(self.cfg.restore.eps)
      loss = loss + tv_weight * (restore.tv(a.astype(jnp.float32), eps)
                                 + restore.tv(b.astype(jnp.float32), eps))
    sparsity = float(self.cfg.sample.sparsity_weight)
    if sparsity and self.fixed_kernel is None:
      loss = loss + sparsity * kernel_net.sparsity_loss(k)
    return loss, cons_a, cons_b, com

  # -- state ------------------------------------------------------------------
  def init(self, lr_image, rng):
    """Initial state: the bicubic guess through the prior's ``start`` (diffusion: noised
    to ``ts[0]``); fresh networks (U-Net ``j`` of the prior's ``networks`` from the U-Net
    key folded with ``j``, the first from the key itself)."""
    lr_image = jnp.asarray(lr_image, jnp.float32)
    k_unet, k_kern, k_noise = jax.random.split(rng, 3)
    x0 = jnp.clip(resize.upscale(lr_image, self.scale), -1.0, 1.0)
    params = {name: self.unet.init(jax.random.fold_in(k_unet, j) if j else k_unet, x0[None])
              for j, name in enumerate(self.prior.networks)}
    if self.fixed_kernel is None:
      params["kernel"] = kernel_net.initial_params(self.kernel_net, self.cfg.kernel, self.scale,
                                                   k_kern)
    x, x0 = self.prior.start(x0, k_noise)
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

  def make_chunk(self, iterations, batch=None, mesh=None):
    """``chunk(state, lr_image, rng[, pd_params]) -> (state, Phase2Metrics[iterations])``,
    jitted.

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

    ``pd_params`` (with ``batch``: one PD per image, leading image axis) replaces the PD
    the object was built with: a group of images, each with its own PD
    (:func:`run_group`). ``mesh`` (:func:`kfjax.runtime.image_mesh`, with ``batch``) splits
    the images over its devices (``shard_map``; each device vmaps its own, and only the
    counters, the same on every device, are shared).
    """
    cfg = self.cfg.sample
    n_first, n_iter = int(cfg.n_iter_first), int(cfg.n_iter)
    lr_at = functools.partial(learning_rate, n_first=n_first, n_iter=n_iter,
                              num_steps=self.num_steps, lr=float(cfg.lr),
                              lr_end=float(cfg.lr_end),
                              schedule=cfg.lr_schedule)
    per_image = (lambda f, **_: f) if batch is None else jax.vmap

    def update(params, opt_state, x, x0, xi, lr_image, lr, t, s, pd_params):
      """One Adam iteration on one image."""
      (loss, aux), grads = jax.value_and_grad(
          lambda p: self.forward(p, x, x0, t, s, xi, lr_image, pd_params), has_aux=True)(params)
      updates, opt_state = self.tx.update(grads, opt_state, params)
      params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
      return params, opt_state, (loss, aux)

    def update_all(params, opt_state, x, x0, xi, lr_image, lr, t, s, pd_params):
      pd_axis = None if pd_params is None else 0
      return per_image(update, in_axes=(0, 0, 0, 0, 0, 0, None, None, None, pd_axis))(
          params, opt_state, x, x0, xi, lr_image, lr, t, s, pd_params)
    draw = lambda key, x, i: jax.random.normal(jax.random.fold_in(key, i), x.shape)

    def iteration(carry, _):
      state, lr_image, rng, pd_params = carry
      i, j = state.step, state.it
      t, s = self.ts[i], self.ts[i + 1]
      # One noise draw ξ per reverse step, made at its first iteration and kept in the
      # state (so a chunk may end, and a checkpoint resume, in the middle of a step).
      xi = jax.lax.cond(j == 0, lambda: per_image(draw, in_axes=(0, 0, None))(rng, state.x, i),
                        lambda: state.xi)
      params, opt_state, (loss, (x_s, b, ca, cb, com)) = update_all(
          state.params, state.opt_state, state.x, state.x0, xi, lr_image, lr_at(i, j), t, s,
          pd_params)
      # The step's last iteration moves on: x ← x_s and x0 ← b of that iteration.
      last = j + 1 >= jnp.where(i == 0, n_first, n_iter)
      x, x0 = jax.lax.cond(last, lambda: (x_s, b), lambda: (state.x, state.x0))
      new = Phase2State(jnp.where(last, i + 1, i), jnp.where(last, 0, j + 1), params,
                        opt_state, x, x0, xi)
      return (new, lr_image, rng, pd_params), Phase2Metrics(s, loss, ca, cb, com, i)

    def scan(state, lr_image, rng, pd_params):
      (state, *_), metrics = jax.lax.scan(iteration, (state, lr_image, rng, pd_params),
                                          length=iterations)
      return state, metrics

    if mesh is not None:
      img, shared = runtime.IMAGES, runtime.SHARED
      state_spec = Phase2State(shared, shared, img, img, img, img, img)
      per_iter = jax.sharding.PartitionSpec(None, "images")
      scan = runtime.over_images(
          scan, mesh, in_specs=(state_spec, img, img, img),
          out_specs=(state_spec, Phase2Metrics(shared, per_iter, per_iter, per_iter, per_iter,
                                               shared)))

    @runtime.jit
    def chunk(state, lr_image, rng, pd_params=None):
      return scan(state, lr_image, rng, pd_params)

    return chunk

  def result(self, state):
    """(HR image in [−1, 1], kernel) from a finished state (DIP: the U-Net's output)."""
    return self.prior.result(state.params, state.x0), self.kernel(state.params)


def checks(cfg):
  """``(ok, message)`` pairs for the fields Phase 2 and its finishing own
  (``pipeline.validate_config``; the kernel network's own in :func:`kernel_net.checks`)."""
  s, k, r = cfg.sample, cfg.kernel, cfg.restore
  return [
      (1 <= s.num_steps <= s.t_start, f"sample.num_steps must be in [1, sample.t_start={s.t_start}]"),
      (s.t_start < cfg.diffusion.num_steps, "sample.t_start must be below diffusion.num_steps"),
      (s.n_iter_first >= 1 and s.n_iter >= 1, "sample.n_iter* must be >= 1"),
      (s.iters_per_chunk >= 1 and s.checkpoint_every >= 1,
       "sample.iters_per_chunk and sample.checkpoint_every must be >= 1"),
      (int(s.num_samples) == s.num_samples and s.num_samples >= 1,
       f"sample.num_samples must be an integer >= 1, got {s.num_samples}"),
      (s.pd_tile >= 0, "sample.pd_tile must be >= 0"),
      (s.sparsity_weight >= 0, f"sample.sparsity_weight must be >= 0, got {s.sparsity_weight}"),
      (s.tv_weight >= 0, f"sample.tv_weight must be >= 0, got {s.tv_weight}"),
      (s.prior in PRIORS, f"sample.prior must be one of {', '.join(PRIORS)}, got {s.prior!r}"),
      (s.dip_input in ("bicubic", "noise"),
       f"sample.dip_input must be bicubic or noise, got {s.dip_input!r}"),
      (not (s.two_unets and s.prior == "dip"),
       "sample.two_unets needs sample.prior=diffusion (DIP applies the U-Net once)"),
      (s.lr_schedule in ("per_step", "global"),
       f"sample.lr_schedule must be per_step or global, got {s.lr_schedule!r}"),
      (cfg.unet.levels >= 1, "unet.levels must be >= 1"),
      (0 <= k.threshold < 1, f"kernel.threshold must be in [0, 1), got {k.threshold}"),
      (0 <= k.blend <= 1 and k.blend_sigma > 0,
       f"kernel.blend must be in [0, 1] and kernel.blend_sigma > 0, got {k.blend}, "
       f"{k.blend_sigma}"),
      (r.init in ("phase2", "bicubic"), f"restore.init must be phase2 or bicubic, got {r.init!r}"),
      (r.weight >= 0 and r.steps >= 1 and r.lr > 0 and 0 < r.lr_end <= r.lr and r.eps > 0,
       "restore.weight must be >= 0, steps >= 1, 0 < lr_end <= lr and eps > 0"),
  ]


def fingerprint(cfg, lr_image, fixed_kernel=None, parts=()):
  """Identifies a Phase 2 run (its checkpoints): the image, ``parts`` (the trained PD's
  fingerprint), every field that shapes the run (``cfg.scale`` among them), the mode and
  the state's layout."""
  mode = "nonblind" if fixed_kernel is not None else "blind"
  return ckpt.fingerprint(np.asarray(lr_image), *parts, cfg.unet.to_dict(),
                          _without(cfg.kernel, "threshold", "blend", "blend_sigma"),
                          _without(cfg.sample, "iters_per_chunk", "checkpoint_every"),
                          int(cfg.scale), mode,
                          None if fixed_kernel is None else np.asarray(fixed_kernel),
                          *config_lib.precision_part(cfg), STATE_VERSION)


def sample_keys(seed, num_samples):
  """Phase 2 PRNG keys ``(init_key, noise_key)`` of samples ``0 … n−1``.

  Sample 0 uses ``key(seed + 1)`` and ``key(seed + 2)`` (exactly the single run),
  sample ``j`` those keys folded with ``j``; with ``num_samples > 1`` they come stacked
  (shape ``(n,)``), otherwise as the two single keys.
  """
  def stack(base):
    if num_samples == 1:
      return base
    rest = jax.vmap(lambda j: jax.random.fold_in(base, j))(jnp.arange(1, num_samples))
    return jnp.concatenate([base[None], rest])
  return stack(jax.random.key(seed + 1)), stack(jax.random.key(seed + 2))


def _saver(workdir, name, fp):
  """Phase 2's checkpoint ``name`` in ``workdir``; one made with other settings is
  discarded (Phase 2 is cheap to redo, and its settings are tuned more often)."""
  return ckpt.discarding_saver(workdir, name, fp, "phase 2")


def _report(m, at):
  """The progress bar's postfix after a chunk (raises on a non-finite loss)."""
  loss = loop.finite(m.loss[-1], "phase 2 loss", f"iteration {at}")
  return {"t": int(m.t[-1]), "loss": f"{loss:.5f}"}


def _checkpoint_policy(save, every, total, step):
  """``after(state, at, stop)`` for :func:`kfjax.loop.run_chunks`: ``save(at, state)``
  (labelled by iterations done) whenever the step counter passes a multiple of ``every``,
  at the end, and when a stop was requested. ``step``: the counter at the start."""
  saved = [int(step)]

  def after(state, at, stop):
    step = int(state.step)
    if step // every > saved[0] // every or at >= total or stop:
      save(at, state)
      saved[0] = step
  return after


# summary key <- Phase2Metrics field, for the last iteration of a run
_FINAL_LOSSES = (("final_loss", "loss"), ("final_consistency_a", "cons_a"),
                 ("final_consistency_b", "cons_b"), ("final_com", "com"))


def run(cfg, pd_model, pd_params, lr_image, fixed_kernel=None, workdir=None,
        fingerprint_parts=(), show_progress=True, finish=True):
  """Reverse diffusion with joint U-Net / kernel optimisation, at the scale ``cfg.scale``.

  Returns ``(hr_image in [−1, 1], kernel (K, K), info)``; checkpoints every chunk
  into ``workdir`` and resumes from there. With ``sample.num_samples = N > 1``, N
  independent runs (keys from :func:`sample_keys`) are made and the result is their
  mean: the mean of the N images (each clipped to [−1, 1]) and of the N kernels. With
  ``sample.vmap_samples`` the N runs go through one vmapped program; otherwise (the
  default) one after another through the same compiled program, which was faster where
  measured (vmapped, each convolution over the runs' own weights becomes a grouped one);
  sample j is the same run either way, up to float rounding.

  With ``finish`` (the default) the result then goes through :func:`finish_output`
  (the kfjax options ``kernel.threshold``, ``kernel.blend`` and ``restore.final``);
  ``finish=False`` returns Phase 2's own image and kernel.
  """
  sched = sch.from_config(cfg)
  p2 = Phase2(cfg, pd_model, pd_params, sched, lr_image.shape, fixed_kernel)
  lr_image = jnp.asarray(lr_image, jnp.float32)
  n = int(cfg.sample.num_samples)
  together = n if bool(cfg.sample.vmap_samples) else 1
  init_keys, rngs = sample_keys(int(cfg.seed), n)
  total = p2.total_iterations
  mode = "nonblind" if fixed_kernel is not None else "blind"
  fp = fingerprint(cfg, lr_image, fixed_kernel, fingerprint_parts)
  info = {"steps": p2.num_steps, "iterations": total, "mode": mode, "samples": n,
          "restored_step": None}
  chunk_len = loop.chunk_size(total, int(cfg.sample.iters_per_chunk))
  chunk = p2.make_chunk(chunk_len, batch=None if together == 1 else together)
  every = int(cfg.sample.checkpoint_every)
  # One group of samples per program run: all N vmapped, or sample j alone (j = 0 … N−1;
  # with N = 1 the keys are the single run's, unstacked).
  groups = [slice(0, n)] if together > 1 else list(range(n))
  init = runtime.jit(p2.init_batch if together > 1 else p2.init)
  desc = f"phase 2 ({mode} reverse diffusion{f', {n} samples' if n > 1 else ''})"
  bar = tqdm.tqdm(total=total * len(groups), desc=desc, unit="it", disable=not show_progress,
                  dynamic_ncols=True)
  hrs, kernels, last = [], [], []
  for group in groups:
    pick = (lambda keys: keys) if n == 1 else (lambda keys: keys[group])
    if together > 1:
      lr_in, name, label = jnp.broadcast_to(lr_image, (n,) + lr_image.shape), "phase2", "phase 2"
    elif n > 1:
      lr_in, name, label = lr_image, f"phase2-sample{group}", f"phase 2 sample {group}"
    else:
      lr_in, name, label = lr_image, "phase2", "phase 2"
    state, rng = init(lr_in, pick(init_keys)), pick(rngs)
    saver = _saver(workdir, name, fp) if workdir else None
    if saver is not None:
      step = saver.latest_step()
      if step is not None:
        state = saver.restore(step, state)
        info["restored_step"] = int(state.step)
        if show_progress:
          loop.log(f"resuming {label} from reverse step {int(state.step)}/{p2.num_steps}")
    done = p2.iterations_done(state)
    bar.update(done)
    after = (_checkpoint_policy(saver.save, every, total, state.step)
             if saver is not None else None)
    try:
      state, metrics = loop.run_chunks(lambda s: chunk(s, lr_in, rng), state, done=done,
                                       total=total, length=chunk_len, bar=bar, report=_report,
                                       after=after)
    finally:  # (also on a stop: the last save must be complete before the process ends)
      if saver is not None:
        saver.close()
    # The last iteration's losses (per sample of the group); kept with the checkpoint so
    # that a run restored finished still reports them.
    if metrics is not None:
      final = {f: np.atleast_1d(np.asarray(getattr(metrics, f)[-1], np.float64)).tolist()
               for _, f in _FINAL_LOSSES}
      if saver is not None:
        saver.save_extra(final_metrics=final)
    else:
      final = saver.extra("final_metrics") if saver is not None else None
    if final is not None:
      last.append(final)
    if together > 1:
      hr, kernel = jax.vmap(lambda params, x0: p2.result(state._replace(params=params, x0=x0)))(
          state.params, state.x0)  # (the step counter is shared, not per sample)
    else:
      hr, kernel = (a[None] for a in p2.result(state))
    hrs.append(np.asarray(hr))
    kernels.append(np.asarray(kernel))
  bar.close()
  if len(last) == len(groups):  # (not for a checkpoint finished before losses were kept)
    for key, field in _FINAL_LOSSES:
      value = np.concatenate([np.asarray(m[field], np.float64) for m in last])
      info[key] = float(value.mean())  # the samples' mean when N > 1
      if n > 1:
        info[key + "_per_sample"] = [float(v) for v in value]
  hr, kernel = np.concatenate(hrs), np.concatenate(kernels)
  if n == 1:
    hr, kernel = hr[0], kernel[0]
  else:
    hr = np.clip(hr.astype(np.float64), -1.0, 1.0).mean(axis=0).astype(np.float32)
    kernel = kernel.astype(np.float64).mean(axis=0)
    kernel = (kernel / kernel.sum()).astype(np.float32)
  if finish:
    hr, kernel, extra = finish_output(cfg, lr_image, hr, kernel, fixed_kernel is None)
    info.update(extra)
  return hr, kernel, info


def image_slice(state, n):
  """Image ``n`` of a group's state (every leaf but the shared counters has a leading
  image axis): a single image's state, as :func:`run` would hold it."""
  pick = lambda tree: jax.tree.map(lambda a: a[n], tree)
  return state._replace(params=pick(state.params), opt_state=pick(state.opt_state),
                        x=state.x[n], x0=state.x0[n], xi=state.xi[n])


def stack_states(states):
  """The inverse of :func:`image_slice` over all images (their counters must agree)."""
  stack = lambda *xs: jnp.stack(xs)
  first = states[0]
  return first._replace(**{f: jax.tree.map(stack, *[getattr(st, f) for st in states])
                           for f in ("params", "opt_state", "x", "x0", "xi")})


def run_group(cfg, pd_model, pd_params, lr_images, fixed_kernel=None, workdirs=(),
              fingerprint_parts=(), mesh=None, show_progress=True):
  """:func:`run` for ``G`` same-size images together, each with its own PD.

  ``lr_images`` (G, h, w, C) in [−1, 1]; ``pd_params`` PD parameters with a leading image
  axis (:func:`kfjax.phase1.train_group`); ``workdirs`` and ``fingerprint_parts`` (each a
  tuple) one per image: image ``n``'s checkpoints are exactly those :func:`run` keeps for
  it alone, so a group resumes what single runs began and the other way round. The images
  go through one program (:meth:`Phase2.make_chunk` with ``batch``, split over ``mesh``'s
  devices); image ``n`` follows the path it follows alone (``sample.num_samples = 1``).
  Returns one ``(hr, kernel, info)`` per image, finished as :func:`run` finishes them.
  Raises :class:`kfjax.errors.NotTogether` when the images' checkpoints are at different
  places (the caller then runs them one at a time).
  """
  if int(cfg.sample.num_samples) != 1:
    raise NotTogether("sample.num_samples > 1 runs one image at a time")
  lr_images = np.asarray(lr_images, np.float32)
  g = lr_images.shape[0]
  sched = sch.from_config(cfg)
  p2 = Phase2(cfg, pd_model, pd_params, sched, lr_images.shape[1:], fixed_kernel)
  init_key, rng = sample_keys(int(cfg.seed), 1)
  init_keys, rngs = (jnp.broadcast_to(k, (g,)) for k in (init_key, rng))
  total = p2.total_iterations
  mode = "nonblind" if fixed_kernel is not None else "blind"
  chunk_len = loop.chunk_size(total, int(cfg.sample.iters_per_chunk))
  chunk = p2.make_chunk(chunk_len, batch=g, mesh=mesh)
  every = int(cfg.sample.checkpoint_every)
  lr_in = jnp.asarray(lr_images)
  state = runtime.jit(p2.init_batch)(lr_in, init_keys)
  savers = [_saver(workdir, "phase2",
                   fingerprint(cfg, lr_images[n], fixed_kernel, fingerprint_parts[n]))
            for n, workdir in enumerate(workdirs)]
  steps = [saver.latest_step() for saver in savers]
  if len(set(steps)) > 1:
    raise NotTogether(f"phase 2 checkpoints at different iterations: {steps}")
  infos = [{"steps": p2.num_steps, "iterations": total, "mode": mode, "samples": 1,
            "restored_step": None} for _ in range(g)]
  if steps and steps[0] is not None:
    like = image_slice(state, 0)
    restored = [saver.restore(steps[0], like) for saver in savers]
    state = stack_states(restored)
    for info in infos:
      info["restored_step"] = int(state.step)
    if show_progress:
      loop.log(f"resuming phase 2 of {g} images from reverse step {int(state.step)}/{p2.num_steps}")
  done = p2.iterations_done(state)
  bar = tqdm.tqdm(total=total, initial=done, desc=f"phase 2 ({mode}, {g} images)", unit="it",
                  disable=not show_progress, dynamic_ncols=True)

  def save_each(at, state):  # (one copy to the host, then each image's slice)
    host = ckpt.to_host(state)
    for n, saver in enumerate(savers):
      saver.save(at, image_slice(host, n))
  after = _checkpoint_policy(save_each, every, total, state.step) if savers else None
  try:
    state, metrics = loop.run_chunks(lambda st: chunk(st, lr_in, rngs, pd_params), state,
                                     done=done, total=total, length=chunk_len, bar=bar,
                                     report=_report, after=after)
  finally:
    bar.close()
    for saver in savers:
      saver.close()
  for n, (saver, info) in enumerate(zip(savers, infos)):
    if metrics is not None:
      final = {f: [float(np.asarray(getattr(metrics, f)[-1], np.float64)[n])]
               for _, f in _FINAL_LOSSES}
      saver.save_extra(final_metrics=final)
    else:
      final = saver.extra("final_metrics")
    if final is not None:
      info.update({key: float(final[field][0]) for key, field in _FINAL_LOSSES})
  hrs, kernels = jax.vmap(lambda params, x0: p2.result(state._replace(params=params, x0=x0)))(
      state.params, state.x0)
  hrs, kernels = np.asarray(hrs), np.asarray(kernels)
  out = []
  for n in range(g):
    hr, kernel, extra = finish_output(cfg, lr_images[n], hrs[n], kernels[n], fixed_kernel is None)
    out.append((hr, kernel, {**infos[n], **extra}))
  return out


def finish_kernel(cfg, kernel, scale=None):
  """A blind run's kernel after the kfjax options ``kernel.threshold`` (taps below that
  fraction of the maximum zeroed, :func:`kernel_net.threshold_kernel`) and then
  ``kernel.blend`` (mixed with a centred Gaussian of std ``kernel.blend_sigma × scale``,
  :func:`kernel_net.blend_kernel`; ``scale`` defaults to ``cfg.scale``). Either at 0 leaves
  the kernel as it is."""
  k = cfg.kernel
  return kernel_net.post_process(kernel, k.threshold, k.blend,
                                 k.blend_sigma * int(scale or cfg.scale))


def reads_phase2(cfg, blind):
  """Whether the output of a run depends on Phase 2. A blind run's always does (Phase 2
  finds the kernel). A non-blind run's does not when ``restore.final`` re-solves the image
  from the bicubic start (``restore.init = "bicubic"``, as in the ``cpu`` preset): its
  kernel is the given one and Phase 2's image is discarded, so neither Phase 1 nor
  Phase 2 need run (:func:`restore_only` gives the same output)."""
  return blind or not (bool(cfg.restore.final) and cfg.restore.init == "bicubic")


def restore_only(cfg, lr_image, kernel):
  """What :func:`run` returns for a non-blind run whose output does not read Phase 2
  (``not reads_phase2(cfg, False)``), without running Phase 2: the TV restoration
  (:func:`final_restore`) with ``kernel`` from the bicubic start. ``lr_image`` in [−1, 1];
  returns ``(hr in [−1, 1], kernel, info)`` as :func:`run` does."""
  if reads_phase2(cfg, blind=False):
    raise ValueError("restore_only needs restore.final with restore.init='bicubic'")
  lr_image = jnp.asarray(lr_image, jnp.float32)
  kernel = np.asarray(kernel, np.float32)
  hr, kernel, extra = finish_output(cfg, lr_image, None, kernel, blind=False)
  info = {"steps": 0, "iterations": 0, "mode": "nonblind", "samples": 0, "restored_step": None,
          "skipped": "non-blind with restore.final from the bicubic start: the output is the "
                     "TV restoration with the given kernel, which reads nothing of Phase 2"}
  return hr, kernel, {**info, **extra}


def finish_output(cfg, lr_image, hr, kernel, blind):
  """What follows Algorithm 1 (kfjax options, all off in the paper's setting): the
  kernel through :func:`finish_kernel` (blind runs only), then with ``restore.final``
  the image re-solved with it (:func:`final_restore`). Images in [−1, 1]; returns
  ``(hr, kernel, info)``."""
  info = {}
  if blind:
    kernel = finish_kernel(cfg, kernel)
  if cfg.restore.final:
    hr, info["final_restore"] = final_restore(cfg, lr_image, hr, kernel)
  return hr, kernel, info


def _without(block, *keys):
  """``block.to_dict()`` without ``keys``: fields that change neither Phase 2's state nor
  its result (dispatch and checkpoint granularity, post-processing applied afterwards),
  kept out of the checkpoint fingerprint so that a checkpoint survives them."""
  d = block.to_dict()
  for key in keys:
    d.pop(key, None)
  return d


def final_restore(cfg, lr_image, hr, kernel):
  """``restore.final``: the HR image re-solved with ``kernel`` at the scale ``cfg.scale`` by
  :mod:`kfjax.restore` (TV-regularised least squares), from ``hr`` or the bicubic upscale
  (``restore.init``).
  Images in [−1, 1]; returns ``(hr, info)``."""
  t0 = time.time()
  x_init = (np.asarray(hr) + 1.0) / 2.0 if cfg.restore.init == "phase2" else None
  x, values = restore.solve_cfg((np.asarray(lr_image) + 1.0) / 2.0,
                                kernel_net.export_kernel(kernel), int(cfg.scale), cfg.restore,
                                x_init)
  info = {"init": cfg.restore.init, "final_loss": float(values[-1]),
          "seconds": round(time.time() - t0, 2)}
  return np.asarray(x) * 2.0 - 1.0, info
