"""DDM4IP for blind SR: the kernel found by distribution matching with flow matching.

Written here from the paper (seed ``003_…``: §3 for the method, §4.4 and appendix B.4 for
single-image super-resolution). The idea: scale invariance makes the LR image's patches
and the patches of the LR image downscaled once more *with the true kernel* follow the
same distribution, so the kernel is the one whose outputs match the image's own patches
in distribution. Three steps:

1. **The image's patch distribution.** A conditional flow-matching (CFM) model
   ``v_real(z, t)`` (:class:`kfjax.models.velocity.VelocityUNet`) is trained on random
   ``patch × patch`` crops ``y`` of the LR image with the rectified-flow interpolation
   ``z_t = (1 − t)·z_0 + t·y`` (``z_0`` Gaussian noise, ``t ~ U[0, 1]``) and the loss
   ``‖v(z_t, t) − (y − z_0)‖²`` (:func:`cfm_loss`); an exponential moving average of its
   weights is the model used afterwards.
2. **Distribution matching.** The kernel is a deep linear CNN (the paper's ``[7, 5, 5, 1]``,
   64 channels, no biases; :class:`kfjax.models.kernel_net.LinearCNN`, the same net as
   KernelGAN's generator) with stride ``s``: its outputs on ``s``-times larger crops of the
   LR image are the fake patches. An auxiliary CFM model ``v_fake``, started from
   ``v_real``'s weights, is trained on the current fake patches; in alternation the kernel
   net follows the gradient of the integrated KL divergence
   ``IKL = ∫ KL(fake_t ‖ real_t) dt`` (eq. 4-5, DiffInstruct's estimator):
   ``E[(s_fake(y_t, t) − s_real(y_t, t))ᵀ ∂y_t/∂ω]`` with ``y_t = (1 − t)·z_0 + t·A_ω(x)``.
   Under the interpolation above a velocity field is a score up to terms that cancel in
   the difference: ``s(z, t) = (t·v(z, t) − z)/(1 − t)``, so
   ``s_fake − s_real = t/(1 − t)·(v_fake − v_real)`` (:func:`ikl_surrogate`; ``weighting
   = "velocity"`` drops the factor, a time-reweighted IKL with the same minimiser).
   Regularisers on the explicit kernel ``k`` (B.4): sum to one ``(1 − Σk)²`` (0.1, the net
   is not normalised), centre of mass at the grid centre (0.01), and l1 ``Σ|k|`` (0.1).
   The l1 is summed over the taps: B.4 does not say, B.1 uses the mean for a normalised
   kernel. Against the sum-to-one term a summed l1 of the same weight has its fixed point
   at ``Σk = 1/2`` (per positive tap ``−0.2(1 − Σk) + 0.1 = 0``), which is why a matching
   whose IKL gradient fades drifts to sums of 0.5-0.8; but the mean (the pull divided by
   the number of taps) measured far worse at both the `cpu` and the paper's rates: the
   kernels come out 1.6-4× too wide (BENCHMARKS.md, "DDM4IP and IKE"). The fake patches
   come from the net's explicit kernel (:meth:`kfjax.models.kernel_net.LinearCNN.downscale`:
   the same function and gradients as its layers, far cheaper). A matching that diverges
   (the kernel's sum leaves 1 ± :data:`SUM_TOLERANCE`) returns the last healthy chunk's
   kernel (:func:`train`), or with ``ddm4ip.on_diverge = "generic"`` hands the generic
   Gaussian to the restoration (:func:`finish_kernel`). kfjax option ``ddm4ip.normalise``:
   the fakes come from the kernel divided by its sum, so the IKL shapes the kernel and never
   has to fight the regularisers over its mass (the sum then settles near 1/2, and is not
   checked).
3. **The SR image**: the found kernel, after :func:`finish_kernel` (a guard against a
   kernel spread over the grid, ``ddm4ip.max_radius``, then the post-processing
   ``ddm4ip.threshold`` / ``blend``, the same as KernelFusion's blind kernels get; all off
   in the base config), goes to kfjax's non-blind restoration
   (:mod:`kfjax.restore`, ``cfg.restore``): two-step, as the paper pairs it with
   ZSSR / USRNet / DANv2's restorer.

LR-only, as the paper: nothing but the LR image is used. ×4 trains the ×2 kernel and
composes it with itself (:func:`kfjax.kernelgan.compose_x2`), as KernelGAN does: a
four-times larger crop of a small LR image would not fit. Both loops are ``lax.scan`` over
``steps_per_chunk`` iterations per dispatch, jitted once (:mod:`kfjax.loop`).
"""

import time
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from kfjax import checkpoint as ckpt
from kfjax import kernelgan
from kfjax import loop
from kfjax import runtime
from kfjax.errors import KfjaxError
from kfjax.models import kernel_net
from kfjax.models import velocity

WEIGHTINGS = ("score", "velocity")
X4_MODES = ("compose", "direct")
# A matching kernel is kept only if its (unnormalised) sum is within this of 1. The
# sum-to-one regulariser holds a converging run's sum to about ±0.1; a diverging one's falls
# towards 0 or below (BENCHMARKS.md, "DDM4IP and IKE": coffee × anisotropic diffusion).
SUM_TOLERANCE = 0.25
# What a diverged matching gives the restoration: the last healthy chunk's kernel, or the
# generic Gaussian (``ddm4ip.on_diverge``).
ON_DIVERGE = ("last_healthy", "generic")


def checks(d):
  """``(ok, message)`` pairs for ``cfg.ddm4ip`` (``pipeline.validate_config``)."""
  return [
      (d.flow_steps >= 1 and d.match_steps >= 1 and d.steps_per_chunk >= 1
       and d.checkpoint_every >= 1 and d.flow_batch >= 1 and d.match_batch >= 1,
       "ddm4ip.flow_steps, match_steps, steps_per_chunk, checkpoint_every and batch sizes "
       "must be >= 1"),
      (d.patch >= 4 and d.levels >= 1 and d.patch % 2 ** (d.levels - 1) == 0,
       f"ddm4ip.patch must be >= 4 and a multiple of 2^(levels-1), got {d.patch}"),
      (d.channels >= 1 and d.emb_dim >= 2 and d.g_channels >= 1 and len(d.g_sizes) >= 1
       and all(int(x) >= 1 for x in d.g_sizes), "ddm4ip sizes and channels must be >= 1"),
      (d.flow_lr > 0 and d.aux_lr > 0 and d.kernel_lr > 0 and 0 <= d.flow_ema < 1,
       "ddm4ip learning rates must be > 0 and flow_ema in [0, 1)"),
      (0 < d.t_max < 1, f"ddm4ip.t_max must be in (0, 1), got {d.t_max}"),
      (d.max_radius >= 0, f"ddm4ip.max_radius must be >= 0 (0: off), got {d.max_radius}"),
      (0 <= d.threshold < 1 and 0 <= d.blend <= 1,
       "ddm4ip.threshold must be in [0, 1) and ddm4ip.blend in [0, 1]"),
      (d.weighting in WEIGHTINGS,
       f"ddm4ip.weighting must be one of {', '.join(WEIGHTINGS)}, got {d.weighting!r}"),
      (d.x4 in X4_MODES, f"ddm4ip.x4 must be one of {', '.join(X4_MODES)}, got {d.x4!r}"),
      (d.on_diverge in ON_DIVERGE,
       f"ddm4ip.on_diverge must be one of {', '.join(ON_DIVERGE)}, got {d.on_diverge!r}"),
  ]


# -- flow matching, independent of the networks (tested on toy distributions) ------------

def _bt(t, x):
  """``t`` (B,) broadcast against ``x`` (B, …)."""
  return jnp.reshape(t, (-1,) + (1,) * (x.ndim - 1))


def interpolate(z0, z1, t):
  """Rectified flow: ``z_t = (1 − t)·z_0 + t·z_1`` (noise at t = 0, data at t = 1)."""
  tb = _bt(t, z1)
  return (1.0 - tb) * z0 + tb * z1


def cfm_loss(v, z1, z0, t):
  """Conditional flow-matching loss ``mean ‖v(z_t, t) − (z_1 − z_0)‖²`` of the velocity
  field ``v(z, t)`` on data ``z1`` with noise ``z0`` at times ``t`` (B,)."""
  return jnp.mean((v(interpolate(z0, z1, t), t) - (z1 - z0)) ** 2)


def euler_sample(v, z0, steps):
  """Samples of the model: ``dz = v(z, t) dt`` from ``z0`` at t = 0 to t = 1, ``steps``
  Euler steps."""
  dt = 1.0 / steps

  def step(z, i):
    t = jnp.full((z.shape[0],), i * dt, z.dtype)
    return z + dt * v(z, t), None
  z, _ = jax.lax.scan(step, z0, jnp.arange(steps))
  return z


def ikl_weight(t, weighting):
  """The factor turning a velocity difference into a score difference at time ``t``."""
  return t / (1.0 - t) if weighting == "score" else jnp.ones_like(t)


def ikl_surrogate(v_fake, v_real, y1, z0, t, weighting="score"):
  """A loss whose gradient in ``y1``'s parameters is the IKL gradient (eq. 5).

  ``y1`` (B, …) are samples of the fake distribution (differentiable in the parameters),
  ``z0`` noise, ``t`` (B,) times. The score difference at ``y_t`` is a constant of the
  backward pass (stop-gradient), so ``∂/∂ω`` of ``mean_b Σ (s_fake − s_real)·y_t`` is the
  Monte-Carlo estimate of ``E[(s_fake − s_real)ᵀ ∂y_t/∂ω]``, i.e. of ``∂/∂ω`` of
  ``E_t KL(fake_t ‖ real_t)`` over the distribution ``t`` is drawn from. The surrogate is
  that divided by the number of elements of one sample (the IKL per pixel and channel), so
  that the regularisers' weights do not depend on the patch size.
  Returns ``(surrogate, mean squared velocity difference)`` (the latter for logging).
  """
  yt = interpolate(z0, y1, t)
  dv = jax.lax.stop_gradient(v_fake(yt, t) - v_real(yt, t))
  g = _bt(ikl_weight(t, weighting), dv) * dv
  surrogate = jnp.mean(g * yt)
  return surrogate, jnp.mean(dv ** 2)


# -- the kernel's regularisers -----------------------------------------------------------

def healthy(raw, tol=SUM_TOLERANCE):
  """Whether a raw explicit kernel is worth keeping: finite, some positive mass, and a sum
  within ``tol`` of 1 (``tol=None``: any sum, for ``ddm4ip.normalise``, where the sum
  never reaches the fake patches)."""
  raw = np.asarray(raw, np.float64)
  return bool(np.all(np.isfinite(raw)) and np.clip(raw, 0, None).sum() > 0
              and (tol is None or abs(raw.sum() - 1.0) <= tol))


def regularisers(k):
  """B.4's regularisers of the explicit (unnormalised) kernel ``k`` (l1 summed over the
  taps, see the module docstring)."""
  return {"sum2one": (1.0 - jnp.sum(k)) ** 2,
          "center": kernel_net.center_of_mass_loss(k),
          "sparse": jnp.sum(jnp.abs(k))}


# -- the method on one LR image ------------------------------------------------------------

class FlowState(NamedTuple):
  it: jnp.ndarray
  params: Any
  ema: Any
  opt: Any


class MatchState(NamedTuple):
  it: jnp.ndarray
  g_params: Any
  aux_params: Any
  g_opt: Any
  aux_opt: Any


class MatchMetrics(NamedTuple):
  aux_loss: jnp.ndarray
  mismatch: jnp.ndarray     # mean squared velocity difference at the fake samples
  sum2one: jnp.ndarray
  center: jnp.ndarray
  sparse: jnp.ndarray


def _random_crops(image, size, batch, key):
  h, w, c = image.shape
  kt, kl = jax.random.split(key)
  tops = jax.random.randint(kt, (batch,), 0, h - size + 1)
  lefts = jax.random.randint(kl, (batch,), 0, w - size + 1)
  return jax.vmap(lambda a, b: jax.lax.dynamic_slice(image, (a, b, 0), (size, size, c)))(
      tops, lefts)


class DDM4IP:
  """Networks, optimisers and the two compiled chunks for one LR image at ×``scale_g``."""

  def __init__(self, cfg, image_shape, scale_g):
    self.dc = dc = cfg.ddm4ip
    h, w, c = image_shape
    self.scale_g = int(scale_g)
    self.normalise = bool(dc.normalise)
    self.gen = kernelgan.make_generator(dc, self.scale_g)
    self.vel = velocity.VelocityUNet(out_channels=c, channels=int(dc.channels),
                                     levels=int(dc.levels), emb_dim=int(dc.emb_dim))
    # Fake patches: the kernel net's output on the smallest crop whose output holds a
    # patch × patch window that never sees the crop's padding; the patch shrinks (by the
    # U-Net's unit) where the image is too small for the configured one.
    s, unit, side = self.scale_g, 2 ** (int(dc.levels) - 1), min(h, w)
    self.patch, self.crop_g = int(dc.patch), None
    while self.crop_g is None and self.patch >= max(4, unit):
      for crop in range(s * self.patch, side - side % s + 1, s):
        lo, hi = kernelgan.output_window(self.gen, crop)
        if hi - lo >= self.patch:
          self.crop_g, self.lo = crop, lo
          break
      else:
        self.patch -= unit
    if self.crop_g is None:
      raise KfjaxError(
          f"image too small for DDM4IP: {side} px at x{s} with a {self.gen.ksize}-px kernel "
          f"(lower ddm4ip.patch or g_sizes)")
    warm = max(1, int(dc.flow_steps) // 20)
    self.flow_tx = optax.adam(optax.warmup_cosine_decay_schedule(
        0.0, float(dc.flow_lr), warm, max(int(dc.flow_steps), warm + 1), float(dc.flow_lr) * 0.01))
    self.aux_tx = optax.adam(float(dc.aux_lr))
    self.g_tx = optax.adam(float(dc.kernel_lr))

  def v(self, params):
    return lambda z, t: self.vel.apply(params, z, t)

  def kernel(self, g_params):
    return self.gen.apply(g_params, method=self.gen.explicit_kernel)

  def fake(self, g_params, crops):
    y = self.gen.apply(g_params, crops, method=self.gen.downscale)
    if self.normalise:   # the kernel's shape alone, not its mass, decides the fakes
      y = y / jnp.sum(self.kernel(g_params))
    return y[:, self.lo:self.lo + self.patch, self.lo:self.lo + self.patch, :]

  def init_flow(self, rng, channels):
    z = jnp.zeros((1, self.patch, self.patch, channels))
    p = self.vel.init(rng, z, jnp.zeros((1,)))
    return FlowState(jnp.zeros((), jnp.int32), p, p, self.flow_tx.init(p))

  def init_match(self, rng, flow_params):
    g = self.gen.init(rng, method=self.gen.explicit_kernel)
    return MatchState(jnp.zeros((), jnp.int32), g, flow_params, self.g_tx.init(g),
                      self.aux_tx.init(flow_params))

  def make_flow_chunk(self, steps):
    """``chunk(state, image, rng) -> (state, losses[steps])``: step 1, jitted."""
    dc = self.dc
    batch, decay = int(dc.flow_batch), float(dc.flow_ema)

    def iteration(carry, _):
      st, image, rng = carry
      k1, k2, k3 = jax.random.split(jax.random.fold_in(rng, st.it), 3)
      y = _random_crops(image, self.patch, batch, k1)
      z0, t = jax.random.normal(k2, y.shape), jax.random.uniform(k3, (batch,))
      loss, grads = jax.value_and_grad(lambda p: cfm_loss(self.v(p), y, z0, t))(st.params)
      upd, opt = self.flow_tx.update(grads, st.opt, st.params)
      params = optax.apply_updates(st.params, upd)
      ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, st.ema, params)
      return (FlowState(st.it + 1, params, ema, opt), image, rng), loss

    @runtime.jit
    def chunk(state, image, rng):
      (state, _, _), losses = jax.lax.scan(iteration, (state, image, rng), length=steps)
      return state, losses
    return chunk

  def make_match_chunk(self, steps):
    """``chunk(state, real_params, image, rng) -> (state, MatchMetrics[steps])``: step 2."""
    dc = self.dc
    batch, t_max, weighting = int(dc.match_batch), float(dc.t_max), str(dc.weighting)
    lam = {"sum2one": float(dc.w_sum2one), "center": float(dc.w_center),
           "sparse": float(dc.w_sparse)}

    def iteration(carry, _):
      st, real, image, rng = carry
      k1, k2, k3, k4, k5 = jax.random.split(jax.random.fold_in(rng, st.it), 5)
      crops = _random_crops(image, self.crop_g, batch, k1)
      # (i) the auxiliary model follows the current kernel's outputs
      fake = jax.lax.stop_gradient(self.fake(st.g_params, crops))
      z0, t = jax.random.normal(k2, fake.shape), jax.random.uniform(k3, (batch,))
      aux_loss, grads = jax.value_and_grad(
          lambda p: cfm_loss(self.v(p), fake, z0, t))(st.aux_params)
      upd, aux_opt = self.aux_tx.update(grads, st.aux_opt, st.aux_params)
      aux = optax.apply_updates(st.aux_params, upd)
      # (ii) the kernel follows the IKL gradient, the auxiliary model held fixed
      zb, tb = jax.random.normal(k4, fake.shape), t_max * jax.random.uniform(k5, (batch,))

      def g_loss(gp):
        ikl, mismatch = ikl_surrogate(self.v(aux), self.v(real), self.fake(gp, crops), zb, tb,
                                      weighting)
        regs = regularisers(self.kernel(gp))
        return ikl + sum(lam[n] * regs[n] for n in regs), (mismatch, regs)

      (_, (mismatch, regs)), grads = jax.value_and_grad(g_loss, has_aux=True)(st.g_params)
      upd, g_opt = self.g_tx.update(grads, st.g_opt, st.g_params)
      g_params = optax.apply_updates(st.g_params, upd)
      m = MatchMetrics(aux_loss, mismatch, regs["sum2one"], regs["center"], regs["sparse"])
      return (MatchState(st.it + 1, g_params, aux, g_opt, aux_opt), real, image, rng), m

    @runtime.jit
    def chunk(state, real, image, rng):
      (state, *_), metrics = jax.lax.scan(iteration, (state, real, image, rng), length=steps)
      return state, metrics
    return chunk


# What happens to the kernel after training (finish_kernel) or when it is saved: a change
# of these keeps the trained state of a checkpoint.
_NOT_TRAINING = ("threshold", "blend", "max_radius", "on_diverge", "checkpoint_every")


def savers(cfg, lr_image, scale_g, workdir):
  """DDM4IP's two checkpoints in ``workdir`` (step 1's flow, step 2's matching), or
  ``(None, None)`` without one; tied to the image, ``cfg.ddm4ip`` (but
  :data:`_NOT_TRAINING`), the seed and the scale it trains at."""
  if not workdir:
    return None, None
  fp = lambda stage: ckpt.block_fingerprint(
      np.asarray(lr_image, np.float32), cfg.ddm4ip, int(cfg.seed), int(scale_g), stage,
      skip=_NOT_TRAINING)
  return tuple(ckpt.discarding_saver(workdir, f"ddm4ip-{stage}", fp(stage), f"DDM4IP {stage}")
               for stage in ("flow", "match"))


def train(cfg, lr_image, scale_g, show_progress=True, workdir=None):
  """Steps 1 and 2 on ``lr_image`` (h, w, C) in [0, 1] at ×``scale_g``.

  Returns ``(raw explicit kernel (K, K) as NumPy, info, (model, flow state, match state))``.
  The kernel is the last matching step's, unless the matching diverged (its kernel not
  :func:`healthy`): then it is the kernel at the end of the last chunk whose kernel was, or
  the starting one, with a warning and ``info["fallback"]`` (the step it is from and the
  final sum), so that a run that went wrong late still gives a usable kernel. With
  ``workdir`` both steps checkpoint there (``ddm4ip.checkpoint_every``; the kernel kept for
  that fallback with step 2's state) and resume from it.
  """
  dc = cfg.ddm4ip
  img = jnp.asarray(np.asarray(lr_image, np.float32) * 2.0 - 1.0)
  model = DDM4IP(cfg, img.shape, scale_g)
  keys = jax.random.split(jax.random.key(cfg.seed + 11), 4)
  info = {"patch": model.patch, "crop": model.crop_g, "scale_trained": int(scale_g)}

  def bar(total, desc):
    return tqdm.tqdm(total=total, desc=desc, unit="it", disable=not show_progress,
                     dynamic_ncols=True)

  flow_saver, match_saver = savers(cfg, lr_image, scale_g, workdir)
  every = int(dc.checkpoint_every)
  total = int(dc.flow_steps)
  n = loop.chunk_size(total, int(dc.steps_per_chunk))
  flow_chunk = model.make_flow_chunk(n)
  flow = runtime.jit(model.init_flow, static_argnums=1)(keys[0], img.shape[-1])
  b = bar(total, "DDM4IP flow")

  def report_flow(losses, at):
    return {"loss": f"{loop.finite(losses[-1], 'DDM4IP flow-matching loss', f'step {at}'):.4f}"}
  try:
    flow, final, restored = loop.run_resumable(
        lambda s: flow_chunk(s, img, keys[1]), flow, flow_saver, total=total, length=n,
        every=every, bar=b, report=report_flow, label="DDM4IP flow matching",
        summarise=lambda losses: {"final_loss": float(losses[-1])},
        show_progress=show_progress)
  finally:
    b.close()
  info["flow"] = {"steps": total, "restored_step": restored, **(final or {})}

  total = int(dc.match_steps)
  n = loop.chunk_size(total, int(dc.steps_per_chunk))
  match_chunk = model.make_match_chunk(n)
  match = runtime.jit(model.init_match)(keys[2], flow.ema)
  kernel = runtime.jit(model.kernel)
  start = np.asarray(kernel(match.g_params))
  tol = None if model.normalise else SUM_TOLERANCE
  # The last healthy kernel (step -1: none yet), saved with step 2's state.
  kept = {"step": np.int32(0 if healthy(start, tol) else -1), "raw": start}

  def keep(state, done, stop):
    del stop  # (the checkpoint, kept included, is run_resumable's)
    raw = np.asarray(kernel(state.g_params))
    if healthy(raw, tol):
      kept.update(step=np.int32(done), raw=raw)

  def put(got):
    kept.update(step=np.int32(got["step"]), raw=np.asarray(got["raw"], np.float32))
  b = bar(total, "DDM4IP match")

  def report_match(m, at):
    a = loop.finite(m.aux_loss[-1], "DDM4IP auxiliary flow loss", f"step {at}")
    return {"aux": f"{a:.4f}", "mismatch": f"{float(m.mismatch[-1]):.2e}"}
  try:
    match, final, restored = loop.run_resumable(
        lambda s: match_chunk(s, flow.ema, img, keys[3]), match, match_saver, total=total,
        length=n, every=every, bar=b, report=report_match, after=keep,
        extra=(lambda: dict(kept), put), label="DDM4IP distribution matching",
        summarise=loop.last_values,
        show_progress=show_progress)
  finally:
    b.close()
  info["match"] = {"steps": total, "restored_step": restored}
  if final is not None:
    info["match"]["final"] = final
  raw = np.asarray(kernel(match.g_params))
  info["diverged"] = not healthy(raw, tol)
  if info["diverged"] and kept["step"] >= 0:
    info["fallback"] = {"step": int(kept["step"]), "final_sum": float(np.sum(raw))}
    warnings.warn(f"DDM4IP's matching diverged (kernel sum {float(np.sum(raw)):.3g} after "
                  f"{total} steps); using its kernel of step {kept['step']}, the last with a "
                  f"sum within {SUM_TOLERANCE} of 1")
    raw = kept["raw"]
  return raw, info, (model, flow, match)


def estimate_kernel(lr_image, scale, cfg, show_progress=True, finish=True, workdir=None):
  """DDM4IP's estimate of the HR → LR kernel of ``lr_image`` ((h, w, C) in [0, 1]).

  Returns ``(kernel, info)``: ``kernel`` float32 (K, K), non-negative, sum 1 (``3K − 2``
  at ×4), after :func:`finish_kernel`; ``info`` has the seconds, steps and final losses.
  ``finish=False`` returns the kernel as matched (exported, before :func:`finish_kernel`), so
  that what follows can be re-tuned without re-training (the benchmark keeps it as
  ``kernel_raw.npy``). ``workdir``: checkpoints there, and resumes (:func:`train`).
  """
  t0 = time.time()
  scale = int(scale)
  compose = scale == 4 and cfg.ddm4ip.x4 == "compose"
  scale_g = 2 if compose else scale
  raw, info, _ = train(cfg, lr_image, scale_g, show_progress, workdir)
  if not np.all(np.isfinite(raw)) or np.clip(raw, 0, None).sum() <= 0:
    raise KfjaxError("DDM4IP's kernel has no positive mass (training diverged)")
  k = kernel_net.export_kernel(raw)
  if compose:
    k = kernel_net.export_kernel(kernelgan.compose_x2(k))
  info.update(raw_sum=float(raw.sum()), rms_radius=round(kernel_net.rms_radius(k), 4))
  if finish:
    k = finish_kernel(cfg, k, scale, info)
  info.update(seconds=round(time.time() - t0, 2), kernel_size=int(k.shape[0]),
              threshold=float(cfg.ddm4ip.threshold) if finish else 0.0,
              blend=float(cfg.ddm4ip.blend) if finish else 0.0)
  return k, info


def too_spread(kernel, max_radius, scale):
  """Whether ``kernel``'s RMS radius passes ``max_radius × scale`` px (never if 0): the
  guard of :func:`finish_kernel` (``ddm4ip.max_radius``)."""
  return max_radius > 0 and kernel_net.rms_radius(kernel) > max_radius * int(scale)


def finish_kernel(cfg, kernel, scale, info=None):
  """What the found (exported) kernel goes through before the restoration.

  A kernel whose RMS radius exceeds ``ddm4ip.max_radius × scale`` HR pixels (if > 0) is
  replaced by the generic Gaussian of std ``kernel.blend_sigma × scale`` on its grid:
  on a smooth image the matching can spread the kernel over the whole grid, and a
  restoration that trusts it loses 10-25 dB (BENCHMARKS.md, "DDM4IP and IKE"); the
  true kernels of the suites stay within 1.2 × the scale. Otherwise its post-processing
  (``ddm4ip.threshold`` / ``blend``: :func:`kfjax.models.kernel_net.post_process`, as
  ``kernel.threshold`` / ``blend`` for KernelFusion, with ``kernel.blend_sigma``).
  ``info`` (a dict) gets ``"spread_fallback"`` when the guard acts.

  With ``ddm4ip.on_diverge = "generic"``, a kernel whose matching diverged (``info``'s
  ``"diverged"``, set by :func:`train`) becomes the generic Gaussian as well (``info`` gets
  ``"diverged_generic"``): the kernel kept from before the divergence comes from an
  arbitrary step of a matching that found no stable answer.
  """
  dc = cfg.ddm4ip
  generic = lambda: kernel_net.gaussian_kernel(kernel.shape[0],
                                               float(cfg.kernel.blend_sigma) * int(scale))
  if dc.on_diverge == "generic" and info is not None and info.get("diverged"):
    warnings.warn("DDM4IP's matching diverged; using the generic Gaussian (ddm4ip.on_diverge)")
    info["diverged_generic"] = True
    return generic()
  if too_spread(kernel, float(dc.max_radius), scale):
    radius, limit = kernel_net.rms_radius(kernel), float(dc.max_radius) * int(scale)
    warnings.warn(f"DDM4IP's kernel is spread over {radius:.1f} px (RMS radius, more than "
                  f"{limit:.1f}); using the generic Gaussian instead")
    if info is not None:
      info["spread_fallback"] = {"rms_radius": round(radius, 4), "limit": limit}
    return generic()
  return kernel_net.post_process(kernel, float(dc.threshold), float(dc.blend),
                                 float(cfg.kernel.blend_sigma) * int(scale))
