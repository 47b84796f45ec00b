"""IKE (invertible kernel estimator) for zero-shot blind SR, from the paper (seed ``002_…``).

One invertible network (:class:`kfjax.models.ikenet.IKENet`) models both directions: its
forward pass downscales, its inverse upscales. Trained on the LR image alone:

* **Input**: the bicubic residual ``R = y − up(down(y))`` (``down``/``up`` bicubic by ``s``),
  sparse where the image is flat. The forward pass gives ``R↓`` and the latents ``Z``;
  ``y_LLR = R↓ + down(y)`` is the LR image downscaled once more by the learnt operator.
* **Encoding phase**: cross-scale recurrence between ``y`` and ``y_LLR`` by a patch
  discriminator PD1 (KernelGAN's, :class:`kfjax.kernelgan.Discriminator`) with the L1 GAN
  loss of eq. 1 (PD1: ``|PD1(p) − 1| + |PD1(p′)|``; the network: ``|PD1(p′) − 1|``), plus
  the local energy loss ``|M(down(y)) − M(y_LLR)|₁`` (M a 9×9 mean filter, ``energy_size``), weight 4 falling
  linearly to 1 over the iterations.
* **Decoding phase**: ``Z↑ = U(Z)`` (U: 8 hidden 3×3 conv layers of 64 channels with ReLU,
  then a depth-to-space by ``s``, one U per downscaling block), the inverse pass on
  ``(R, Z↑)`` gives ``R↑`` and the SR image ``x = up(y) + R↑``; losses (eq. 3-5, weights 5,
  5, 1): cross-scale recurrence between ``y`` and ``x`` by a second discriminator PD2, the
  interpolation loss ``|(1 − Sobel(up(y)))·(x − up(y))|₁`` and total variation of ``x``.
* The two phases alternate every iteration (the paper: 3000), Adam as KernelGAN's.
* **The kernel**: the forward pass is not linear, so its kernel is read off its response to
  a unit impulse (one per sub-pixel phase, :func:`delta_kernel`), in kfjax's degradation
  convention, and exported like every kfjax kernel (clipped at 0, sum 1).

The SR image is IKE's own inverse pass on the whole image. Training runs on random crops
(``crop`` LR pixels) so that the cost does not grow with the image.
"""

import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from kfjax import checkpoint as ckpt
from kfjax import kernelgan
from kfjax import loop
from kfjax import ops
from kfjax import resize
from kfjax import runtime
from kfjax.errors import KfjaxError
from kfjax.models import ikenet
from kfjax.models import kernel_net

SCALES = (2, 4)


def checks(c):
  """``(ok, message)`` pairs for ``cfg.ike`` (``pipeline.validate_config``)."""
  return [
      (c.iterations >= 1 and c.steps_per_chunk >= 1 and c.checkpoint_every >= 1,
       "ike.iterations, steps_per_chunk and checkpoint_every must be >= 1"),
      (c.couplings >= 1 and c.hidden >= 1 and c.u_layers >= 1 and c.u_channels >= 1
       and c.d_channels >= 1 and c.d_depth >= 2 and c.d_kernel >= 1 and c.energy_size >= 1,
       "ike network sizes must be >= 1 (d_depth >= 2)"),
      (c.crop >= 8 and c.lr > 0 and c.kernel_size >= 0,
       "ike.crop must be >= 8, lr > 0 and kernel_size >= 0 (0: 6 x scale)"),
      (c.d_batch in ("separate", "joint"), "ike.d_batch must be 'separate' or 'joint'"),
  ]


class Upsampler(nn.Module):
  """U: ``Z (B, h, w, 4C) → Z↑ (B, s·h, s·w, 4C)``: 3×3 convs with ReLU, depth-to-space."""
  channels: int
  scale: int
  layers: int = 8
  features: int = 64

  @nn.compact
  def __call__(self, z):
    h = z
    for _ in range(self.layers):
      h = nn.relu(ops.Conv(self.features, (3, 3))(h))
    h = ops.Conv(self.channels * self.scale ** 2, (3, 3))(h)
    for _ in range({2: 1, 4: 2}[self.scale]):
      h = ikenet.depth_to_space(h)
    return h


def mean_filter(x, size=9):
  """``size × size`` box mean of (B, H, W, C), VALID."""
  w = jnp.full((size, size, 1, 1), 1.0 / size ** 2)
  b, hh, ww, c = x.shape
  planes = jnp.moveaxis(x, -1, 1).reshape(b * c, hh, ww, 1)
  out = ops.conv2d(planes, w)
  return jnp.moveaxis(out.reshape(b, c, *out.shape[1:3]), 1, -1)


def sobel_mask(x):
  """``1 − Sobel(x)``, the Sobel magnitude (channel mean) scaled to [0, 1]: ~1 where flat."""
  g = jnp.mean(x, -1)
  p = jnp.pad(g, 1, mode="edge")
  gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
  gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
  m = jnp.sqrt(gx ** 2 + gy ** 2)
  return (1.0 - m / jnp.maximum(m.max(), 1e-12))[..., None]


def tv(x, eps=1e-6):
  """Mean of ``√((x[i, j+1] − x[i, j])² + (x[i+1, j] − x[i, j])²)`` (eq. 5, as a mean)."""
  dx = x[:, :-1, 1:] - x[:, :-1, :-1]
  dy = x[:, 1:, :-1] - x[:, :-1, :-1]
  return jnp.mean(jnp.sqrt(dx ** 2 + dy ** 2 + eps))


class IKEState(NamedTuple):
  it: jnp.ndarray
  net: Any        # {"ike": IKENet params, "u": [U params per block]}
  d1: Any
  d2: Any
  net_opt: Any
  d1_opt: Any
  d2_opt: Any


class IKEMetrics(NamedTuple):
  """Per-iteration losses; ``bwd_adv`` and ``d2`` are 0 when PD2 is off (``w_bwd`` 0)."""
  fwd_adv: jnp.ndarray
  energy: jnp.ndarray
  bwd_adv: jnp.ndarray
  inter: jnp.ndarray
  tv: jnp.ndarray
  d1: jnp.ndarray
  d2: jnp.ndarray


class IKE:
  """Networks, optimisers, the compiled chunk and the whole-image passes for one image."""

  def __init__(self, cfg, image_shape, scale):
    self.c = c = cfg.ike
    h, w, ch = image_shape
    self.s = int(scale)
    if self.s not in SCALES:
      raise KfjaxError(f"IKE supports x2 and x4 (one invertible block per factor 2), got x{self.s}")
    self.ch = ch
    self.net = ikenet.IKENet(channels=ch, scale=self.s, couplings=int(c.couplings),
                             hidden=int(c.hidden))
    self.nblocks = {2: 1, 4: 2}[self.s]
    self.u = Upsampler(channels=4 * ch, scale=self.s, layers=int(c.u_layers),
                       features=int(c.u_channels))
    self.disc = kernelgan.Discriminator(channels=int(c.d_channels), depth=int(c.d_depth),
                                        kernel=int(c.d_kernel))
    unit = self.s * self.s
    side = min(h, w)
    self.crop = min(int(c.crop), side) // unit * unit
    if self.crop // self.s < max(int(c.d_kernel), int(c.energy_size)) or self.crop < unit:
      raise KfjaxError(f"image too small for IKE: {side} px at x{self.s} (lower ike.crop or "
                       f"ike.d_kernel)")
    self.tx = optax.adam(float(c.lr), b1=float(c.beta1), b2=0.999)

  # -- the image's fixed maps -------------------------------------------------------------

  def maps(self, y):
    """``(residual R, down(y), up(y), interpolation mask)`` of ``y`` (H, W, C), H and W
    multiples of ``s``."""
    down = resize.downscale_bicubic(y, self.s)
    residual = y - resize.upscale(down, self.s)
    up = resize.upscale(y, self.s)
    return residual, down, up, sobel_mask(up)

  def init(self, rng):
    k1, k2, k3, k4 = jax.random.split(rng, 4)
    x = jnp.zeros((1, self.crop, self.crop, self.ch))
    p = self.net.init(k1, x, method=self.net.forward)
    _, zs = self.net.apply(p, x, method=self.net.forward)
    us = [self.u.init(k, z) for k, z in zip(jax.random.split(k2, self.nblocks), zs)]
    net = {"ike": p, "u": us}
    d1 = self.disc.init(k3, jnp.zeros((1, self.crop // self.s, self.crop // self.s, self.ch)))
    d2 = self.disc.init(k4, jnp.zeros((1, self.crop, self.crop, self.ch)))
    return IKEState(jnp.zeros((), jnp.int32), net, d1, d2, self.tx.init(net),
                    self.tx.init(d1), self.tx.init(d2))

  def _d(self, params, x):
    out, _ = self.disc.apply(params, x, mutable=["batch_stats"])
    return out

  def _d_pair(self, params, real, fake):
    """``(PD(real), PD(fake))``. ``d_batch="separate"`` (KernelGAN's, the paper's) runs PD
    on each on its own; ``"joint"`` cuts both into tiles of the smaller one's size and runs
    PD once on all the tiles, so its BatchNorm statistics are shared: on its own a batch is
    normalised by its own statistics, which makes PD blind to any gain and offset of its
    whole input (:func:`tiles`)."""
    if self.c.d_batch == "separate":
      return self._d(params, real), self._d(params, fake)
    t = min(real.shape[1], fake.shape[1])
    r, f = tiles(real, t), tiles(fake, t)
    out = self._d(params, jnp.concatenate([r, f]))
    return out[:r.shape[0]], out[r.shape[0]:]

  def _d_fake(self, params, real, fake):
    """PD's verdict on ``fake`` alone (the generator's loss); with separate batches the real
    patches are not traced at all."""
    if self.c.d_batch == "separate":
      return self._d(params, fake)
    return self._d_pair(params, real, fake)[1]

  def down_pass(self, net, residual, down):
    """``(y_LLR, Z)`` of residual / bicubic-down batches."""
    r_down, zs = self.net.apply(net["ike"], residual, method=self.net.forward)
    return r_down + down, zs

  def up_pass(self, net, residual, up, zs):
    """The SR image ``up + IKENet⁻¹(R, U(Z))``."""
    z_up = [self.u.apply(p, z) for p, z in zip(net["u"], zs)]
    return up + self.net.apply(net["ike"], residual, z_up, method=self.net.inverse)

  def make_chunk(self, steps, total):
    """``chunk(state, maps, rng) -> (state, IKEMetrics[steps])``, jitted."""
    c, s = self.c, self.s
    crop, esize = self.crop, int(c.energy_size)
    # With w_bwd 0 PD2 cannot reach the network, so neither it nor its training is traced
    # (the same updates of the network, PD1 and the SR image, for less work).
    use_pd2 = float(c.w_bwd) != 0.0

    def iteration(carry, _):
      st, (residual, down, up, mask, y), rng = carry
      k1, k2 = jax.random.split(jax.random.fold_in(rng, st.it))
      h, w = y.shape[0] // (s * s), y.shape[1] // (s * s)
      top = jax.random.randint(k1, (), 0, h - crop // (s * s) + 1) * s * s
      left = jax.random.randint(k2, (), 0, w - crop // (s * s) + 1) * s * s
      sl = lambda a, f: jax.lax.dynamic_slice(
          a, (top * f // s, left * f // s, 0), (crop * f // s, crop * f // s, a.shape[-1]))[None]
      r_c, y_c, d_c, u_c, m_c = sl(residual, s), sl(y, s), sl(down, 1), sl(up, s * s), sl(mask, s * s)
      frac = st.it.astype(jnp.float32) / max(total - 1, 1)
      lam_energy = c.w_energy_start + (c.w_energy_end - c.w_energy_start) * frac

      def enc_loss(net):
        llr, _ = self.down_pass(net, r_c, d_c)
        adv = jnp.mean(jnp.abs(self._d_fake(st.d1, y_c, llr) - 1.0))
        energy = jnp.mean(jnp.abs(mean_filter(d_c, esize) - mean_filter(llr, esize)))
        return adv + lam_energy * energy, (llr, adv, energy)

      (_, (llr, fwd_adv, energy)), g = jax.value_and_grad(enc_loss, has_aux=True)(st.net)
      upd, net_opt = self.tx.update(g, st.net_opt, st.net)
      net = optax.apply_updates(st.net, upd)

      def dec_loss(net):
        _, zs = self.down_pass(net, r_c, d_c)
        x = self.up_pass(net, r_c, u_c, zs)
        adv = jnp.mean(jnp.abs(self._d_fake(st.d2, y_c, x) - 1.0)) if use_pd2 else jnp.zeros(())
        inter = jnp.mean(jnp.abs(m_c * (x - u_c)))
        t = tv(x)
        return c.w_bwd * adv + c.w_inter * inter + c.w_tv * t, (x, adv, inter, t)

      (_, (x, bwd_adv, inter, t)), g = jax.value_and_grad(dec_loss, has_aux=True)(net)
      upd, net_opt = self.tx.update(g, net_opt, net)
      net = optax.apply_updates(net, upd)
      llr, x = jax.lax.stop_gradient(llr), jax.lax.stop_gradient(x)

      def d_loss(dp, real, fake):
        on_real, on_fake = self._d_pair(dp, real, fake)
        return jnp.mean(jnp.abs(on_real - 1.0)) + jnp.mean(jnp.abs(on_fake))
      # PD1 judges LR patches against y_LLR; PD2 LR patches against SR patches.
      l1, g1 = jax.value_and_grad(d_loss)(st.d1, y_c, llr)
      upd, d1_opt = self.tx.update(g1, st.d1_opt, st.d1)
      d1 = optax.apply_updates(st.d1, upd)
      if use_pd2:
        l2, g2 = jax.value_and_grad(d_loss)(st.d2, y_c, x)
        upd, d2_opt = self.tx.update(g2, st.d2_opt, st.d2)
        d2 = optax.apply_updates(st.d2, upd)
      else:
        l2, d2, d2_opt = jnp.zeros(()), st.d2, st.d2_opt
      new = IKEState(st.it + 1, net, d1, d2, net_opt, d1_opt, d2_opt)
      return (new, (residual, down, up, mask, y), rng), IKEMetrics(
          fwd_adv, energy, bwd_adv, inter, t, l1, l2)

    @runtime.jit
    def chunk(state, maps, rng):
      (state, _, _), metrics = jax.lax.scan(iteration, (state, maps, rng), length=steps)
      return state, metrics
    return chunk

  def super_resolve(self, net, y):
    """IKE's SR image of the whole ``y`` (H, W, C), H and W multiples of ``s``."""
    residual, down, up, _ = self.maps(y)
    _, zs = self.down_pass(net, residual[None], down[None])
    return self.up_pass(net, residual[None], up[None], zs)[0]

  def delta_kernel(self, net, size):
    """The forward pass's kernel as its response to unit impulses (:func:`impulse_kernel`)."""
    def respond(x):
      residual, down, _, _ = self.maps(x)
      return self.down_pass(net, residual[None], down[None])[0][0]
    return impulse_kernel(respond, size, self.s, self.ch)


def impulse_kernel(respond, size, s, channels):
  """The ``size × size`` kernel ``k`` of a downscaler ``respond`` ((H, W, C) → (H/s, W/s, C)),
  read off its response to a unit impulse on a zero image at each of the ``s²`` sub-pixel
  phases, in kfjax's convention ``y[i] = Σ_u k[u]·x[s·i + o − u]`` per axis with
  ``o = (s − size)//2 + size − 1`` (:func:`kfjax.degrade.downscale`; exact for a linear
  ``respond`` away from the borders)."""
  n = 4 * s * max(size, 8)
  c0, off = n // 2, (s - size) // 2 + size - 1
  k = np.zeros((size, size))
  filled = np.zeros((size, size), bool)
  for a in range(s):
    for b in range(s):
      x = np.zeros((n, n, channels), np.float32)
      x[c0 + a, c0 + b, :] = 1.0
      resp = np.asarray(respond(jnp.asarray(x))).mean(-1)
      for i in range(resp.shape[0]):
        u = s * i + off - (c0 + a)
        for j in range(resp.shape[1]):
          v = s * j + off - (c0 + b)
          if 0 <= u < size and 0 <= v < size:
            k[u, v], filled[u, v] = resp[i, j], True
  assert filled.all()
  return k


def tiles(x, t):
  """``(B, H, W, C)`` with H and W multiples of ``t`` → ``(B·H/t·W/t, t, t, C)``, row-major."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // t, t, w // t, t, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, t, t, c)


def _pad_to(y, m):
  h, w, _ = y.shape
  return jnp.pad(y, ((0, (-h) % m), (0, (-w) % m), (0, 0)), mode="symmetric")


def train(cfg, lr_image, scale, show_progress=True, workdir=None):
  """IKE on ``lr_image`` (h, w, C) in [0, 1]; returns ``(model, state, info)``. With
  ``workdir`` it checkpoints there (``ike.checkpoint_every``; the state is tied to the
  image, ``cfg.ike``, the seed and the scale) and resumes from it."""
  c = cfg.ike
  s = int(scale)
  y = _pad_to(jnp.asarray(np.asarray(lr_image, np.float32) * 2.0 - 1.0), s * s)
  model = IKE(cfg, y.shape, s)
  state = runtime.jit(model.init)(jax.random.key(cfg.seed + 13))
  residual, down, up, mask = model.maps(y)
  maps = (residual, down, up, mask, y)
  total = int(c.iterations)
  n = loop.chunk_size(total, int(c.steps_per_chunk))
  chunk = model.make_chunk(n, total)
  rng = jax.random.key(cfg.seed + 14)
  bar = tqdm.tqdm(total=total, desc="IKE", unit="it", disable=not show_progress,
                  dynamic_ncols=True)

  def report(m, at):
    e = loop.finite(m.energy[-1], "IKE energy loss", f"iteration {at}")
    return {"energy": f"{e:.4f}", "inter": f"{float(m.inter[-1]):.4f}"}
  saver = None
  if workdir:
    fp = ckpt.block_fingerprint(np.asarray(lr_image, np.float32), c, int(cfg.seed), s,
                                skip=("checkpoint_every", "kernel_size"))
    saver = ckpt.discarding_saver(workdir, "ike", fp, "IKE")
  try:
    state, final, restored = loop.run_resumable(
        lambda st: chunk(st, maps, rng), state, saver, total=total, length=n,
        every=int(c.checkpoint_every), bar=bar, report=report, label="IKE",
        summarise=loop.last_values,
        show_progress=show_progress)
  finally:
    bar.close()
  info = {"iterations": total, "crop": model.crop, "restored_step": restored}
  if final is not None:
    info["final"] = final
  return model, state, info


def run(lr_image, scale, cfg, show_progress=True, workdir=None):
  """IKE end to end: ``(SR image (s·h, s·w, C) in [0, 1], kernel (K, K), info)``;
  ``workdir``: checkpoints there, and resumes (:func:`train`)."""
  t0 = time.time()
  s = int(scale)
  img = np.asarray(lr_image, np.float32)
  h, w, _ = img.shape
  model, state, info = train(cfg, img, s, show_progress, workdir)
  y = _pad_to(jnp.asarray(img * 2.0 - 1.0), s * s)
  sr = runtime.jit(model.super_resolve)(state.net, y)
  sr = np.clip((np.asarray(sr)[:s * h, :s * w] + 1.0) / 2.0, 0.0, 1.0)
  raw = model.delta_kernel(state.net, int(cfg.ike.kernel_size) or 6 * s)
  if not np.all(np.isfinite(raw)) or np.clip(raw, 0, None).sum() <= 0:
    raise KfjaxError("IKE's impulse response has no positive mass (training diverged)")
  k = kernel_net.export_kernel(raw)
  info.update(seconds=round(time.time() - t0, 2), kernel_size=int(k.shape[0]))
  return sr, k, info
