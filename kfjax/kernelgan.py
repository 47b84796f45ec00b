"""KernelGAN (Bell-Kligler, Shocher & Irani, NeurIPS 2019) in JAX: kernel estimation only.

Written here from the paper's description. The idea: the right downscaling kernel is
the one that makes the image's patches recur across scales, so an image-specific GAN is
trained on the LR image alone:

* **Generator G**: a deep *linear* CNN (:class:`kfjax.models.kernel_net.LinearCNN`;
  layer sizes ``g_sizes``, default ``[7, 5, 3, 1, 1, 1]`` with the stride on the last
  layer, 64 channels, no biases, no activations) that downscales crops of the LR image
  by 2. Being linear it *is* one convolution kernel, extracted by applying its layers
  to a delta (``explicit_kernel``), and its action on images uses the project's
  degradation convention (``kfjax.degrade``), so the kernel can be handed to
  ``degrade.downscale`` / Phase 2 as is.
* **Discriminator D**: fully convolutional, one ``d_kernel × d_kernel`` convolution
  (spectrally normalised) followed by ``d_depth − 2`` 1×1 conv + BatchNorm + ReLU
  layers and a 1×1 conv + sigmoid: a per-pixel real/fake map over ``d_kernel``-sized
  patches. Real patches are crops of the LR image; fake ones are G's output on crops
  about twice as large (G's output borders, which see the crop's padding, are shaved).
* **Loss**: LSGAN (least squares, labels 1 / 0), one G step then one D step per
  iteration (Adam, lr 2e-4, β1 = 0.5, both), on crops drawn with probability
  proportional to the crop's mean gradient magnitude (textured regions carry the
  cross-scale information).
* **Kernel regularisers** on G's explicit kernel ``k``: sum-to-one ``|1 − Σk|``
  (0.5), boundaries ``mean(|k|·m)`` with ``m`` a mask that is 0 in the central
  ``⌈K/2⌉`` square and grows like ``30·(1 − gaussian)`` outside (0.5), sparsity
  ``mean(|k|^0.2)`` (5) and centre of mass (squared distance from the grid centre,
  halved: the MSE of the two coordinates; 1). For the first ``switch_iter`` iterations
  sparsity and centring are off and G is pulled towards bicubic ÷2
  (``mse(G(x), bicubic(x))``, weight 5), after which that weight drops 100× every
  ``lambda_update_freq`` iterations (to at least 5e-6). (The paper switches when the
  bicubic loss first falls below a threshold; a fixed iteration keeps the loop one
  compiled program.)
* **Scales**: G learns the LR → LR/2 kernel, taken as the HR → LR kernel at ×2 (the
  paper's assumption that the kernel is the same across scales). At ×4, as in the
  paper, the ×2 kernel is composed with itself: downscaling twice by 2 with ``k`` is
  one ×4 downscale by ``k * (k dilated by 2)`` (:func:`compose_x2`, size ``3K − 2``),
  exact under the project's convention away from the borders. Other scales train G
  with stride ``s`` directly.
* **Centring** (``kernelgan.centre``): G's 13-px field sits half a pixel off the centre
  of the 14-px grid the ×2 convention needs (an even kernel centred between pixels). G
  is trained centred on its field's pixel (the regularisers see the field-centred grid;
  the bicubic pull is :func:`bicubic_kernel`, centred on that pixel) and its kernel is
  then moved the half pixel (:func:`recentre`).
  ``"grid"`` centres it on the grid during training instead: every kernel then leans
  along the top-left/bottom-right diagonal (the sparsity term makes the half-pixel shift
  with one diagonal tap), whatever the image.
* **Export**: clipped at 0 and renormalised to sum 1 (as every kfjax kernel).

The training loop is ``lax.scan`` over ``steps_per_chunk`` iterations per dispatch,
jitted once. :func:`estimate_kernel` is the entry point; the pipeline then runs the
non-blind Phase 2 with the kernel (two-step, as the papers pair KernelGAN with ZSSR).
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
from kfjax import degrade
from kfjax import loop
from kfjax import ops
from kfjax import resize
from kfjax import runtime
from kfjax.errors import KfjaxError
from kfjax.models import kernel_net


# -- networks ---------------------------------------------------------------------------

def checks(g):
  """``(ok, message)`` pairs for ``cfg.kernelgan`` (``pipeline.validate_config``)."""
  return [
      (g.iterations >= 1 and g.steps_per_chunk >= 1 and g.batch_size >= 1
       and g.checkpoint_every >= 1,
       "kernelgan.iterations, steps_per_chunk, checkpoint_every and batch_size must be >= 1"),
      (g.crop_size >= 4 and g.d_depth >= 2 and g.d_kernel >= 1 and g.g_channels >= 1
       and g.d_channels >= 1 and len(g.g_sizes) >= 1 and all(int(x) >= 1 for x in g.g_sizes),
       "kernelgan.crop_size >= 4, d_depth >= 2, and sizes/channels >= 1 are required"),
      (g.lr > 0 and g.switch_iter >= 0 and g.lambda_update_freq >= 1,
       "kernelgan.lr must be > 0, switch_iter >= 0, lambda_update_freq >= 1"),
      (g.centre in CENTRES,
       f"kernelgan.centre must be one of {', '.join(CENTRES)}, got {g.centre!r}"),
  ]


def g_kernel_size(kcfg, scale_g):
  """K of G's explicit kernel: ``kernelgan.kernel_size`` or G's receptive field rounded
  up to the parity of the scale (so the kernel centre sits on the LR pixel centre)."""
  f = kernel_net.cnn_field(tuple(kcfg.g_sizes))
  k = int(kcfg.kernel_size) or f
  if k % 2 != scale_g % 2:
    k += 1
  if k < f:
    raise KfjaxError(f"kernelgan.kernel_size={k} is below G's receptive field {f}")
  return k


def make_generator(kcfg, scale_g):
  return kernel_net.LinearCNN(sizes=tuple(int(s) for s in kcfg.g_sizes),
                              channels=int(kcfg.g_channels), scale=int(scale_g),
                              size=g_kernel_size(kcfg, scale_g))


class Discriminator(nn.Module):
  """``(B, h, w, C) → (B, h − d_kernel + 1, w − d_kernel + 1)`` real/fake map in (0, 1)."""
  channels: int = 64
  depth: int = 7
  kernel: int = 7

  @nn.compact
  def __call__(self, x):
    c_in = x.shape[-1]
    w = self.param("first", nn.initializers.lecun_normal(),
                   (self.kernel, self.kernel, c_in, self.channels))
    # Spectral normalisation (exact largest singular value; the matrix is small).
    sigma = jnp.linalg.norm(w.reshape(-1, self.channels), ord=2)
    h = ops.conv2d(x, w / sigma) + self.param("first_bias", nn.initializers.zeros,
                                              (self.channels,))
    for _ in range(self.depth - 2):
      h = ops.Conv(self.channels, (1, 1))(h)
      h = nn.BatchNorm(use_running_average=False)(h)
      h = nn.relu(h)
    return nn.sigmoid(ops.Conv(1, (1, 1))(h))[..., 0]


# -- regularisers ----------------------------------------------------------------------

def boundary_mask(size, penalty=30.0):
  """0 in the central ``⌈K/2⌉`` square (plus one pixel each side), ``penalty·(1 −
  gaussian(σ = K))`` outside: mass far from the centre costs more."""
  g = kernel_net.gaussian_blob(size, float(size))
  m = penalty * (1.0 - g)
  centre = size // 2 + size % 2
  lo = max(0, (size - centre) // 2 - 1)
  m[lo:size - lo, lo:size - lo] = 0.0
  return m


def regularisers(k, mask):
  """``dict`` of the four kernel regularisers of G's explicit kernel ``k``."""
  return {
      "sum2one": jnp.abs(1.0 - jnp.sum(k)),
      "boundaries": jnp.mean(jnp.abs(k) * mask),
      "sparse": jnp.mean((k * k + 1e-12) ** 0.1),  # |k|^0.2, smooth at 0
      "centralized": 0.5 * kernel_net.center_of_mass_loss(k),
  }


CENTRES = ("pixel", "grid")


def pixel_centred(kcfg, scale_g):
  """Whether G is trained centred on its field's pixel: ``kernelgan.centre = "pixel"`` and
  G's receptive field half a pixel off the centre of its kernel grid (an odd field in the
  even grid of the ×2 convention: ``[7, 5, 3, 1, 1, 1]`` sees 13 px of 14)."""
  field = kernel_net.cnn_field(tuple(int(x) for x in kcfg.g_sizes))
  return kcfg.centre == "pixel" and (g_kernel_size(kcfg, scale_g) - field) % 2 == 1


def field_grid(k):
  """``k`` without its first row and column: for a pixel-centred G
  (:func:`pixel_centred`) the ``K − 1`` grid whose centre is the centre of G's field
  (:meth:`~kfjax.models.kernel_net.LinearCNN.explicit_kernel` pads the odd part of
  ``K − F`` before the field)."""
  return k[..., 1:, 1:]


def bicubic_kernel(size, scale):
  """MATLAB's antialiased bicubic ÷``scale`` kernel (``cubic(d/s)``, ``|d| < 2s``,
  normalised; taps past either grid edge dropped in pairs) sampled at whole-pixel distances
  from index ``size // 2``: the bicubic
  downscale whose output pixel ``i`` is centred on input pixel ``s·i``, as a
  pixel-centred G's is, in the project's convention (``degrade.downscale``)."""
  d = np.arange(size) - size // 2
  reach = min(size // 2, size - 1 - size // 2)   # (a grid too small keeps it symmetric)
  w = resize._cubic(d / float(scale)) * (np.abs(d) < 2 * scale) * (np.abs(d) <= reach)
  w = w / w.sum()
  return np.outer(w, w).astype(np.float32)


def recentre(k):
  """A pixel-centred G's ×2 kernel (:func:`pixel_centred`) moved half a pixel up and left
  (bilinear: the mean of each 2×2 block), so that its centre is the grid centre, where the
  ×2 convention puts it (``degrade.downscale``). Mass is kept: the first row and column
  of such a kernel are zero."""
  k = np.pad(np.asarray(k, np.float64), ((0, 1), (0, 1)))
  return 0.25 * (k[:-1, :-1] + k[1:, :-1] + k[:-1, 1:] + k[1:, 1:])


def lambdas(kcfg, it):
  """Loss weights at iteration ``it`` (a traced int)."""
  switched = it >= int(kcfg.switch_iter)
  n_decay = 1 + jnp.maximum(it - int(kcfg.switch_iter), 0) // int(kcfg.lambda_update_freq)
  bic = jnp.where(switched, jnp.maximum(kcfg.w_bicubic * 0.01 ** n_decay.astype(jnp.float32),
                                        5e-6), kcfg.w_bicubic)
  on = switched.astype(jnp.float32)
  return {"sum2one": jnp.float32(kcfg.w_sum2one), "boundaries": jnp.float32(kcfg.w_boundaries),
          "sparse": on * kcfg.w_sparse, "centralized": on * kcfg.w_centralized,
          "bicubic": bic}


# -- ×4 from ×2 ---------------------------------------------------------------------------

def compose_x2(k):
  """The ×4 kernel equivalent to downscaling twice by 2 with ``k`` (K×K, K even).

  With the project's convention ``y[i] = Σ_u k[u]·x[2i + K/2 − u]`` (per axis), two
  passes give ``Σ_m k4[m]·x[4i + 3K/2 − m]`` with ``k4[2w + u] += k[w]·k[u]``, which is
  exactly ``degrade.downscale(·, k4, 4)`` for the ``(3K−2)``-sized ``k4`` (its offset
  ``(4 − (3K−2))//2 + 3K − 3 = 3K/2`` matches), away from the borders, where
  symmetric padding of the intermediate image differs.
  """
  k = np.asarray(k, np.float64)
  size = k.shape[0]
  if size % 2:
    raise ValueError(f"compose_x2 needs an even kernel size (×2 convention), got {size}")
  out = np.zeros((3 * size - 2, 3 * size - 2))
  for r in range(size):
    for c in range(size):
      out[2 * r:2 * r + size, 2 * c:2 * c + size] += k[r, c] * k
  return out


def export(kcfg, raw, scale_g, compose=False):
  """G's explicit kernel ``raw`` as a kfjax ×``scale_g`` kernel (with ``compose``, the ×4
  kernel of two ×2 passes, :func:`compose_x2`): clipped at 0, sum 1, and, for a
  pixel-centred G (:func:`pixel_centred`), moved to the grid centre. At ×4 it is composed
  while still pixel-centred, 1.5 px off the ×4 grid's centre, then moved one whole pixel
  and one half (:func:`recentre`): one half-pixel blur (variance +¼ px² per axis) instead
  of one per ×2 pass (+1¼ at ×4)."""
  k = kernel_net.export_kernel(raw)
  pixel = pixel_centred(kcfg, scale_g)
  if compose:
    k = compose_x2(k)
    if pixel:
      k = recentre(np.pad(k[1:, 1:], ((0, 1), (0, 1))))
  elif pixel:
    k = recentre(k)
  return kernel_net.export_kernel(k)


# -- training -----------------------------------------------------------------------------

class KGState(NamedTuple):
  it: jnp.ndarray
  g_params: Any
  d_params: Any
  g_opt: Any
  d_opt: Any


class KGMetrics(NamedTuple):
  g_loss: jnp.ndarray
  d_loss: jnp.ndarray
  adv: jnp.ndarray
  bicubic: jnp.ndarray
  sum2one: jnp.ndarray
  boundaries: jnp.ndarray
  sparse: jnp.ndarray
  centralized: jnp.ndarray


def crop_probabilities(image, crop):
  """Flat probabilities of each crop's top-left corner: the crop's mean gradient
  magnitude, plus 10 % of the average so flat regions are still visited."""
  img = np.asarray(image, np.float64).mean(-1)
  gy, gx = np.gradient(img)
  g = np.sqrt(gx ** 2 + gy ** 2)
  c = np.pad(np.cumsum(np.cumsum(g, 0), 1), ((1, 0), (1, 0)))
  w = (c[crop:, crop:] - c[:-crop, crop:] - c[crop:, :-crop] + c[:-crop, :-crop]) / crop ** 2
  w = w + 0.1 * w.mean() + 1e-12
  return (w / w.sum()).ravel().astype(np.float32), w.shape


def _crops(image, probs, grid_w, crop, batch, key):
  idx = jax.random.choice(key, probs.shape[0], (batch,), p=probs)
  tops, lefts = idx // grid_w, idx % grid_w
  c = image.shape[-1]
  return jax.vmap(lambda t, l: jax.lax.dynamic_slice(image, (t, l, 0), (crop, crop, c)))(
      tops, lefts)


def output_window(gen, crop_g):
  """Slice of G's output on a ``crop_g`` crop that never sees the padding."""
  s, k, f = int(gen.scale), gen.ksize, gen.field
  off = (s - k) // 2 + (k - f) // 2        # G output i reads input s·i + off … + F − 1
  lo = max(0, -(off // s))                 # first output index inside the crop
  hi = min((crop_g - f - off) // s, -(-crop_g // s) - 1)  # last one
  return lo, hi + 1


class KernelGAN:
  """Networks, optimisers and the compiled training chunk for one LR image."""

  def __init__(self, cfg, image_shape, scale_g):
    self.cfg, self.kcfg = cfg, cfg.kernelgan
    kc = self.kcfg
    h, w, _ = image_shape
    self.scale_g = int(scale_g)
    self.gen = make_generator(kc, self.scale_g)
    self.disc = Discriminator(channels=int(kc.d_channels), depth=int(kc.d_depth),
                              kernel=int(kc.d_kernel))
    crop = min(int(kc.crop_size), h, w)
    self.crop_g = crop - crop % self.scale_g
    self.lo, self.hi = output_window(self.gen, self.crop_g)
    self.crop_d = self.hi - self.lo
    if self.crop_d < int(kc.d_kernel):
      raise KfjaxError(
          f"image too small for KernelGAN: {min(h, w)} px gives {self.crop_d}-px fake patches, "
          f"below kernelgan.d_kernel={kc.d_kernel} (lower kernelgan.d_kernel or g_sizes)")
    # kernelgan.centre = "pixel": G is trained centred on the pixel its field centres on
    # (the regularisers see the grid centred there, the bicubic pull is pixel-centred) and
    # its kernel is moved the half pixel to the ×2 convention's centre afterwards
    # (:func:`recentre`). Centring it on the even grid's centre during training ("grid")
    # asks a delta-started G for a half-pixel shift, which under the |k|^0.2 sparsity it
    # makes with a diagonal second tap: every kernel then leans top-left to bottom-right,
    # whatever the image (BENCHMARKS.md, "KernelGAN's diagonal lean").
    self.pixel = pixel_centred(kc, self.scale_g)
    size = self.gen.ksize - 1 if self.pixel else self.gen.ksize
    self.mask = jnp.asarray(boundary_mask(size), jnp.float32)
    self.bic_kernel = (jnp.asarray(bicubic_kernel(self.gen.ksize, self.scale_g))
                       if self.pixel else None)
    self.tx = optax.adam(float(kc.lr), b1=float(kc.beta1), b2=0.999)

  def init(self, rng, channels):
    kg, kd = jax.random.split(rng)
    g = self.gen.init(kg, method=self.gen.explicit_kernel)
    d = self.disc.init(kd, jnp.zeros((1, self.crop_d, self.crop_d, channels)))
    return KGState(jnp.zeros((), jnp.int32), g, d, self.tx.init(g), self.tx.init(d))

  def kernel(self, g_params):
    return self.gen.apply(g_params, method=self.gen.explicit_kernel)

  def regularised(self, k):
    """The grid the kernel regularisers see: G's field's for a pixel-centred G."""
    return field_grid(k) if self.pixel else k

  def bicubic_target(self, crops):
    """Bicubic ÷``scale_g`` of G's input crops, on G's output window and pixel phase."""
    if self.pixel:
      y = degrade.downscale(crops, self.bic_kernel, self.scale_g)
    else:
      y = resize.downscale_bicubic(crops, self.scale_g)
    return y[:, self.lo:self.hi, self.lo:self.hi, :]

  def g_forward(self, g_params, crops):
    """G's shaved output on LR crops ``(B, crop_g, crop_g, C)``."""
    y = self.gen.apply(g_params, crops, method=self.gen.downscale)
    return y[:, self.lo:self.hi, self.lo:self.hi, :]

  def d_apply(self, d_params, x):
    out, _ = self.disc.apply(d_params, x, mutable=["batch_stats"])
    return out

  def make_chunk(self, steps):
    """``chunk(state, image, probs_g, probs_d, rng) -> (state, KGMetrics[steps])``, jitted."""
    kc = self.kcfg
    batch = int(kc.batch_size)

    def iteration(carry, _):
      state, image, pg, pd, gw_g, gw_d, rng = carry
      key = jax.random.fold_in(rng, state.it)
      k1, k2 = jax.random.split(key)
      g_in = _crops(image, pg, gw_g, self.crop_g, batch, k1)
      real = _crops(image, pd, gw_d, self.crop_d, batch, k2)
      lam = lambdas(kc, state.it)
      bic_target = self.bicubic_target(g_in)

      def g_loss(gp):
        fake = self.g_forward(gp, g_in)
        adv = jnp.mean((self.d_apply(state.d_params, fake) - 1.0) ** 2)
        regs = regularisers(self.regularised(self.kernel(gp)), self.mask)
        regs["bicubic"] = jnp.mean((fake - bic_target) ** 2)
        total = adv + sum(lam[n] * regs[n] for n in regs)
        return total, (fake, adv, regs)

      (lg, (fake, adv, regs)), grads = jax.value_and_grad(g_loss, has_aux=True)(state.g_params)
      upd, g_opt = self.tx.update(grads, state.g_opt, state.g_params)
      g_params = optax.apply_updates(state.g_params, upd)
      fake = jax.lax.stop_gradient(fake)

      def d_loss(dp):
        return 0.5 * (jnp.mean((self.d_apply(dp, real) - 1.0) ** 2)
                      + jnp.mean(self.d_apply(dp, fake) ** 2))

      ld, grads = jax.value_and_grad(d_loss)(state.d_params)
      upd, d_opt = self.tx.update(grads, state.d_opt, state.d_params)
      d_params = optax.apply_updates(state.d_params, upd)
      new = KGState(state.it + 1, g_params, d_params, g_opt, d_opt)
      m = KGMetrics(lg, ld, adv, regs["bicubic"], regs["sum2one"], regs["boundaries"],
                    regs["sparse"], regs["centralized"])
      return (new, image, pg, pd, gw_g, gw_d, rng), m

    @runtime.jit
    def chunk(state, image, probs_g, probs_d, grid_w_g, grid_w_d, rng):
      carry = (state, image, probs_g, probs_d, grid_w_g, grid_w_d, rng)
      (state, *_), metrics = jax.lax.scan(iteration, carry, length=steps)
      return state, metrics

    return chunk


def saver(cfg, lr_image, scale_g, workdir):
  """KernelGAN's checkpoint in ``workdir`` (``None`` without one): its state, tied to the
  image, ``cfg.kernelgan``, the seed and the scale it trains at."""
  if not workdir:
    return None
  fp = ckpt.block_fingerprint(np.asarray(lr_image, np.float32), cfg.kernelgan, int(cfg.seed),
                              int(scale_g), skip=("checkpoint_every",))
  return ckpt.discarding_saver(workdir, "kernelgan", fp, "KernelGAN")


def train(cfg, lr_image, scale_g, show_progress=True, workdir=None):
  """Train KernelGAN on ``lr_image`` (h, w, C) in [0, 1] at ×``scale_g``; with ``workdir``
  it checkpoints there (``kernelgan.checkpoint_every``) and resumes from it.

  Returns ``(raw explicit kernel (K, K) as NumPy, info, (model, chunk))``.
  """
  kc = cfg.kernelgan
  img = jnp.asarray(np.asarray(lr_image, np.float32) * 2.0 - 1.0)
  model = KernelGAN(cfg, img.shape, scale_g)
  state = runtime.jit(model.init, static_argnums=1)(jax.random.key(cfg.seed + 7), img.shape[-1])
  pg, (_, gw_g) = crop_probabilities(img, model.crop_g)
  pd, (_, gw_d) = crop_probabilities(img, model.crop_d)
  total = int(kc.iterations)
  n = loop.chunk_size(total, int(kc.steps_per_chunk))
  chunk = model.make_chunk(n)
  rng = jax.random.key(cfg.seed + 8)
  bar = tqdm.tqdm(total=total, desc="KernelGAN", unit="it", disable=not show_progress,
                  dynamic_ncols=True)
  pg, pd = jnp.asarray(pg), jnp.asarray(pd)

  def report(m, at):
    g = loop.finite(m.g_loss[-1], "KernelGAN generator loss", f"iteration {at}")
    return {"g": f"{g:.4f}", "d": f"{float(m.d_loss[-1]):.4f}"}
  try:
    state, final, restored = loop.run_resumable(
        lambda s: chunk(s, img, pg, pd, gw_g, gw_d, rng), state,
        saver(cfg, lr_image, scale_g, workdir), total=total, length=n,
        every=int(kc.checkpoint_every), bar=bar, report=report, label="KernelGAN",
        summarise=loop.last_values,
        show_progress=show_progress)
  finally:
    bar.close()
  info = {"iterations": total, "scale_trained": int(scale_g), "crop_g": model.crop_g,
          "crop_d": model.crop_d, "restored_step": restored}
  if final is not None:
    info["final"] = final
  return np.asarray(runtime.jit(model.kernel)(state.g_params)), info, (model, chunk, state)


def estimate_kernel(lr_image, scale, cfg, show_progress=True, workdir=None):
  """KernelGAN's estimate of the HR → LR kernel of ``lr_image`` ((h, w, C) in [0, 1]).

  Returns ``(kernel, info)``: ``kernel`` float32 (K, K), non-negative, sum 1 (K is G's
  kernel size at ×2, ``3K − 2`` at ×4); ``info`` has the seconds, iterations and final
  losses. ``workdir``: checkpoints there, and resumes (:func:`train`).
  """
  t0 = time.time()
  scale = int(scale)
  scale_g = 2 if scale == 4 else scale
  raw, info, _ = train(cfg, lr_image, scale_g, show_progress, workdir)
  k = export(cfg.kernelgan, raw, scale_g, compose=scale == 4)
  info.update(seconds=round(time.time() - t0, 2), kernel_size=int(k.shape[0]),
              raw_sum=float(raw.sum()))
  return k, info
