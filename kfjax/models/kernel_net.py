"""Kernel network: a SIREN INR evaluated on a fixed K×K grid (appendix A.4, F).

``k = normalise(leaky_sigmoid(INR_ψ(g)))`` where ``g`` is the K×K grid of coordinates in
[−1, 1]², the INR is ``depth`` fully connected layers of ``width`` units (paper: 5 of
256) with sine activations at frequency ``omega`` (paper: 5, in every layer), and
``leaky_sigmoid(z) = (1 + 1e-4)·σ(z) − 1e-4``. The kernel is normalised to sum 1.

The leaky sigmoid lets single taps go very slightly negative during optimisation (as
in the paper); :func:`export_kernel` clips those at zero and renormalises, so kernels
handed to users are non-negative and sum to 1.

``center_of_mass_loss`` is the squared distance (in HR pixels) of the kernel's centre
of mass from the grid centre ``(K−1)/2``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kfjax import degrade
from kfjax import ops

LEAK = 1e-4


def leaky_sigmoid(z, leak=LEAK):
  return (1.0 + leak) * nn.sigmoid(z) - leak


def coordinate_grid(size):
  """``(K*K, 2)`` coordinates in [−1, 1]², row-major."""
  lin = jnp.linspace(-1.0, 1.0, size)
  yy, xx = jnp.meshgrid(lin, lin, indexing="ij")
  return jnp.stack([yy.ravel(), xx.ravel()], axis=-1)


def _uniform(bound):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _siren_init(omega, fan_in, first):
  """SIREN's weight init (Sitzmann et al. 2020): U(±1/fan_in) in the first layer,
  U(±sqrt(6/fan_in)/ω) after it."""
  return _uniform(1.0 / fan_in if first else np.sqrt(6.0 / fan_in) / omega)


def _torch_bias_init(fan_in):
  """PyTorch's ``nn.Linear`` default bias init, U(±1/sqrt(fan_in)), which SIREN keeps.

  Flax's default (zero biases) would make every ``sin`` layer, and so the whole net before
  the final affine map, an odd function of the coordinates: the initial kernel would then
  satisfy ``k(g) + k(−g) = const`` exactly, a point symmetry no real kernel has to have.
  """
  return _uniform(1.0 / np.sqrt(fan_in))


class SirenKernel(nn.Module):
  """Returns the ``(K, K)`` kernel (no inputs: the grid is fixed)."""
  size: int
  width: int = 256
  depth: int = 5
  omega: float = 5.0

  @nn.compact
  def __call__(self):
    h = coordinate_grid(self.size)
    fan_in = 2
    for i in range(self.depth - 1):
      h = nn.Dense(self.width, kernel_init=_siren_init(self.omega, fan_in, i == 0),
                   bias_init=_torch_bias_init(fan_in), name=f"sine{i}")(h)
      h = jnp.sin(self.omega * h)
      fan_in = self.width
    z = nn.Dense(1, kernel_init=_siren_init(self.omega, fan_in, False),
                 bias_init=_torch_bias_init(fan_in), name="out")(h)
    k = leaky_sigmoid(z[:, 0]).reshape(self.size, self.size)
    return k / jnp.sum(k)


def center_of_mass(kernel):
  """Centre of mass ``(cy, cx)`` relative to the grid centre, in pixels."""
  size = kernel.shape[0]
  idx = jnp.arange(size, dtype=kernel.dtype) - (size - 1) / 2.0
  total = jnp.sum(kernel)
  return jnp.sum(kernel.sum(1) * idx) / total, jnp.sum(kernel.sum(0) * idx) / total


def center_of_mass_loss(kernel):
  cy, cx = center_of_mass(kernel)
  return cy ** 2 + cx ** 2


def fit_kernel(net, params, target, steps=500, lr=1e-3):
  """``params`` moved by ``steps`` Adam steps so that ``net.apply(params)`` ≈ ``target``.

  Minimises ``mean((K²·(k − target))²)`` (``target`` normalised to sum 1 first; the K²
  makes entries O(1)). Pure and jit-able (a ``lax.scan``): used to start the SIREN from
  a Gaussian instead of its near-uniform initial output (``kernel.init = "gaussian"``).
  """
  target = jnp.asarray(target, jnp.float32)
  target = target / jnp.sum(target)
  k2 = float(target.size)
  tx = optax.adam(lr)

  def loss(p):
    return jnp.mean((k2 * (net.apply(p) - target)) ** 2)

  def step(carry, _):
    p, opt = carry
    grads = jax.grad(loss)(p)
    updates, opt = tx.update(grads, opt, p)
    return (optax.apply_updates(p, updates), opt), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), length=int(steps))
  return params


def initial_params(net, kcfg, scale, rng):
  """Parameters the kernel net ``net`` (from :func:`make`) starts Phase 2 with.

  ``kcfg.init = "gaussian"`` (SIREN only) fits the freshly initialised INR to an
  isotropic Gaussian of std ``kcfg.init_sigma × scale`` HR pixels
  (:func:`fit_kernel`, ``kcfg.init_steps`` Adam steps). A default-initialised SIREN
  outputs an almost uniform K×K box (max/min ≈ 1.2-1.5: a blur far wider than any
  plausible kernel), which Phase 2 must first unlearn. ``"default"``: as initialised
  (the paper's setup). The direct kernels already start from a Gaussian of std ``s``,
  the linear CNN from an ``s×s`` box; the field changes only the INR.
  """
  params = net.init(rng)
  init = kcfg.init
  if init == "default" or kcfg.net != "inr":
    return params
  if init != "gaussian":
    raise ValueError(f"unknown kernel.init {init!r}; choose default or gaussian")
  target = gaussian_blob(net.size, float(kcfg.init_sigma) * float(scale))
  return fit_kernel(net, params, target, int(kcfg.init_steps))


def sparsity_loss(kernel, power=0.2, eps=1e-8):
  """``mean((|k| + eps)^power)`` over the K×K taps (KernelGAN's sparsity prior, not in
  KernelFusion): concave in each tap, so it pushes stray low-level mass to zero."""
  return jnp.mean((jnp.abs(kernel) + eps) ** power)


def threshold_kernel(kernel, threshold):
  """The kernel with every tap below ``threshold × max`` set to zero (negative taps
  too), renormalised to sum 1 (NumPy float32; ``threshold = 0`` only clips negatives).

  Phase 2's kernels come out with their core in place but a low, wide halo of stray mass
  (the U-Net's image absorbs what the halo does to the LR consistency, so the loss barely
  sees it). NCC hardly notices such a halo, but it makes the kernel about twice as wide
  as the truth (second moments) and costs several dB under any solver that uses the
  kernel. Zeroing the negligible taps is KernelGAN's own post-processing of its kernels.
  """
  k = np.clip(np.asarray(kernel, np.float64), 0.0, None)
  k = np.where(k >= float(threshold) * k.max(), k, 0.0)
  return (k / k.sum()).astype(np.float32)


def blend_kernel(kernel, weight, sigma):
  """``(1 − weight)·k + weight·g`` (NumPy float32, sum 1): ``k`` the kernel clipped at
  zero and renormalised, ``g`` an isotropic Gaussian of std ``sigma`` (HR pixels) on the
  same grid, centred at ``(K − 1)/2``.

  A kernel estimated too wide (or wrong) makes any solver that trusts it over-sharpen
  and ring; a too-narrow one only leaves the image softer. Shrinking the estimate toward
  a small generic blur trades a little of a good estimate's gain for a bound on a bad
  one's loss (BENCHMARKS.md, "Where the gap is").
  """
  k = np.clip(np.asarray(kernel, np.float64), 0.0, None)
  k = k / k.sum()
  g = gaussian_blob(k.shape[0], float(sigma))
  out = (1.0 - float(weight)) * k + float(weight) * g / g.sum()
  return (out / out.sum()).astype(np.float32)


def post_process(kernel, threshold, blend, sigma):
  """:func:`threshold_kernel` at ``threshold`` then :func:`blend_kernel` at ``blend`` with
  the Gaussian of std ``sigma`` (HR pixels); either at 0 is skipped."""
  if threshold > 0:
    kernel = threshold_kernel(kernel, threshold)
  if blend > 0:
    kernel = blend_kernel(kernel, blend, sigma)
  return kernel


def kernel_covariance(k):
  """The 2×2 covariance (second central moments, in pixels², ``(y, x)`` order) of a
  kernel's mass (negative taps clipped to zero)."""
  k = np.clip(np.asarray(k, np.float64), 0.0, None)
  k = k / k.sum()
  yy, xx = np.meshgrid(np.arange(k.shape[0]), np.arange(k.shape[1]), indexing="ij")
  cy, cx = (k * yy).sum(), (k * xx).sum()
  dy, dx = yy - cy, xx - cx
  return np.array([[(k * dy * dy).sum(), (k * dy * dx).sum()],
                   [(k * dy * dx).sum(), (k * dx * dx).sum()]])


def rms_radius(k):
  """The RMS distance of a kernel's mass from its centroid, in pixels."""
  return float(np.sqrt(np.trace(kernel_covariance(k))))


def export_kernel(kernel):
  """Clip to non-negative, renormalise, float32 NumPy."""
  k = np.clip(np.asarray(kernel, np.float64), 0.0, None)
  return (k / k.sum()).astype(np.float32)


# -- alternatives to the INR (appendix C.1) ---------------------------------------------

KERNEL_NETS = ("inr", "direct_relu", "direct_sigmoid", "linear_cnn")


def gaussian_blob(size, sigma):
  """Isotropic Gaussian on the K×K grid, centred at ``(K−1)/2``, peak 1 (NumPy)."""
  r = np.arange(size) - (size - 1) / 2.0
  g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2.0 * sigma ** 2))
  return g / g.max()


def gaussian_kernel(size, sigma):
  """:func:`gaussian_blob` as a kernel: sum 1, float32 (:func:`export_kernel`)."""
  return export_kernel(gaussian_blob(size, sigma))


class DirectKernel(nn.Module):
  """The K×K entries are free parameters (appendix C.1, "direct kernel optimisation").

  ``k = f(w) / sum(f(w))`` with ``f = relu`` or ``sigmoid``. Both start from the same
  kernel: an isotropic Gaussian of standard deviation ``init_sigma`` HR pixels (peak
  1 before normalising; for ``sigmoid`` the logits are set so that ``σ(w) = 0.01 +
  0.98·g``, since a sigmoid cannot reach 0). Parameters are O(1), like the INR's, so the
  same Adam learning rate moves them comparably.
  """
  size: int
  activation: str = "relu"   # or "sigmoid"
  init_sigma: float = 2.0

  def _init(self, key, shape, dtype=jnp.float32):
    del key
    g = gaussian_blob(shape[0], self.init_sigma)
    if self.activation == "sigmoid":
      p = 0.01 + 0.98 * g
      g = np.log(p) - np.log1p(-p)
    return jnp.asarray(g, dtype)

  @nn.compact
  def __call__(self):
    w = self.param("w", self._init, (self.size, self.size))
    k = nn.relu(w) if self.activation == "relu" else nn.sigmoid(w)
    return k / (jnp.sum(k) + 1e-12)


def cnn_field(sizes):
  """Receptive field (in HR pixels) of stacked stride-1 convolutions of these sizes
  (the stride on the last layer does not change it)."""
  return int(sum(sizes) - len(sizes) + 1)


def linear_cnn_sizes(scale, size):
  """Default layer sizes of the linear CNN kernel net (appendix C.1).

  ×4: the paper's ``[7, 7, 5, 3, 1, 4]`` (receptive field 22 inside K = 24). Other
  scales keep six layers with the stride-``s`` layer of size ``s`` last and the same
  margin (field ``K − 2``) where it fits: ``[a, 3, 3, 1, 1, s]`` with ``a`` the largest
  odd size such that the field ``a + s + 3 <= K − 2`` (×2, K = 12: ``[5, 3, 3, 1, 1, 2]``,
  field 10).
  """
  if scale == 4 and size >= 22:
    return (7, 7, 5, 3, 1, 4)
  a = max(1, size - 2 - scale - 3)
  a -= 1 - a % 2  # odd
  return (max(1, a), 3, 3, 1, 1, int(scale))


def _cnn_init(ksize, cin, noise, box):
  """A box (uniform over the whole filter: the last, strided layer, and any even-sized
  one) or a delta (the centre tap), divided by the input channels and copied to every
  (in, out) pair, plus a little Gaussian noise: the stack then starts as area averaging
  over the last layer's footprint (``s×s`` by default), and the noise breaks the
  symmetry between channels."""
  blob = np.zeros((ksize, ksize))
  if box or ksize % 2 == 0:
    blob[:] = 1.0 / ksize ** 2
  else:
    blob[ksize // 2, ksize // 2] = 1.0
  blob = blob / cin

  def init(key, shape, dtype=jnp.float32):
    base = jnp.asarray(blob, dtype)[:, :, None, None] * jnp.ones(shape, dtype)
    return base + noise / (cin * ksize) * jax.random.normal(key, shape, dtype)
  return init


class LinearCNN(nn.Module):
  """Deep linear CNN that downscales by ``scale`` (KernelGAN's generator; appendix C.1).

  Convolutions of the given ``sizes`` (channels ``1 → channels → … → 1``, no biases, no
  nonlinearity), the last one strided by ``scale``. Colour channels are processed
  separately, as one filter serves them all. Being linear and shift-invariant (up to the
  stride), the whole net is one ``(K, K)`` kernel, :meth:`explicit_kernel`: the stack of
  stride-1 convolutions applied to a delta, placed in the K×K grid with the field's
  centre at the grid centre (``d = (K−F)//2`` rows after it). :meth:`downscale_layers`
  applies the layers themselves to images with the padding and pixel phase of
  :func:`kfjax.degrade.downscale`, so it equals ``degrade.downscale(x, explicit_kernel(),
  scale)`` (pinned by tests); :meth:`downscale`, what KernelGAN and DDM4IP train through,
  computes the latter.
  """
  sizes: tuple
  channels: int = 32
  scale: int = 2
  size: int = 0          # K of the explicit kernel; 0: the receptive field
  init_noise: float = 0.1

  @property
  def field(self):
    return cnn_field(self.sizes)

  @property
  def ksize(self):
    return int(self.size) or self.field

  def setup(self):
    n = len(self.sizes)
    chans = [1] + [int(self.channels)] * (n - 1) + [1]
    if self.field > self.ksize:
      raise ValueError(f"linear CNN field {self.field} exceeds the kernel size {self.ksize}")
    self.weights = [
        self.param(f"conv{i}", _cnn_init(s, chans[i], self.init_noise, i == n - 1),
                   (s, s, chans[i], chans[i + 1]))
        for i, s in enumerate(self.sizes)]

  def _stack(self, planes):
    """All layers at stride 1, VALID: ``(N, H, W, 1) → (N, H−F+1, W−F+1, 1)``."""
    h = planes
    for w in self.weights:
      h = ops.conv2d(h, w)
    return h

  def explicit_kernel(self):
    """The net's ``(K, K)`` convolution kernel (not normalised)."""
    f, k = self.field, self.ksize
    delta = jnp.zeros((1, 2 * f - 1, 2 * f - 1, 1)).at[0, f - 1, f - 1, 0].set(1.0)
    kf = self._stack(delta)[0, :, :, 0]  # correlation of a delta: the convolution kernel
    d = (k - f) // 2
    lo = k - f - d
    return jnp.pad(kf, ((lo, d), (lo, d)))

  def downscale(self, x):
    """``(..., H, W, C) → (..., ceil(H/s), ceil(W/s), C)``: the explicit kernel's
    ``degrade.downscale``.

    Convolution is associative, so this is the same function of ``x`` and of the layer
    weights as running the layers on the images (:meth:`downscale_layers`), with the same
    gradients (pinned in float64 by tests): the over-parameterisation, and with it the
    training dynamics, is kept. What changes is the cost: the channel-wide layers run once,
    on a ``(2F−1)²`` delta, instead of on every colour plane of every crop, and the image
    sees one ``K × K`` single-channel filter (BENCHMARKS.md, "DDM4IP and IKE").
    """
    return degrade.downscale(x, self.explicit_kernel(), int(self.scale))

  def downscale_layers(self, x):
    """:meth:`downscale` by the layers themselves (the definition; the reference in tests)."""
    x = jnp.asarray(x)
    *lead, h, w, c = x.shape
    s, k, f = int(self.scale), self.ksize, self.field
    d = (k - f) // 2
    lo_h, hi_h, skip_h, out_h = degrade._pads(h, s, k)
    lo_w, hi_w, skip_w, out_w = degrade._pads(w, s, k)
    planes = jnp.moveaxis(x.reshape((-1, h, w, c)), -1, 1).reshape((-1, h, w, 1))
    planes = jnp.pad(planes, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)), mode="symmetric")
    planes = planes[:, skip_h + d:, skip_w + d:, :]
    y = self._stack(planes)[:, ::s, ::s, 0][:, :out_h, :out_w]
    y = jnp.moveaxis(y.reshape((-1, c, out_h, out_w)), 1, -1)
    return y.reshape((*lead, out_h, out_w, c))

  def __call__(self):
    return self.explicit_kernel()


class LinearCNNKernel(nn.Module):
  """Kernel-net interface around :class:`LinearCNN`: its explicit kernel divided by its
  sum (a scalar, so the net still *is* that kernel up to scale). Entries may be
  negative (no activation, as in the paper); :func:`export_kernel` clips them."""
  size: int
  sizes: tuple
  channels: int = 32
  scale: int = 2

  def setup(self):
    self.cnn = LinearCNN(sizes=tuple(self.sizes), channels=self.channels, scale=self.scale,
                         size=self.size)

  def __call__(self):
    k = self.cnn.explicit_kernel()
    return k / jnp.sum(k)


def checks(kcfg, size, scale):
  """``(ok, message)`` pairs for ``cfg.kernel``'s network fields, for a ``size``-px kernel
  at ×``scale`` (``pipeline.validate_config``)."""
  sizes = tuple(kcfg.cnn_sizes) or linear_cnn_sizes(int(scale), size)
  return [
      (kcfg.size >= 0, "kernel.size must be >= 0 (0: 6 x scale)"),
      (kcfg.net in KERNEL_NETS,
       f"kernel.net must be one of {', '.join(KERNEL_NETS)}, got {kcfg.net!r}"),
      (kcfg.net != "linear_cnn" or cnn_field(sizes) <= size,
       f"kernel.cnn_sizes {list(sizes)} see {cnn_field(sizes)} px, more than the "
       f"{size}-px kernel (raise kernel.size)"),
      (kcfg.cnn_channels >= 1 and all(int(x) >= 1 for x in sizes),
       "kernel.cnn_sizes and kernel.cnn_channels must be >= 1"),
      (kcfg.init in ("default", "gaussian"),
       f"kernel.init must be default or gaussian, got {kcfg.init!r}"),
      (kcfg.init_sigma > 0 and kcfg.init_steps >= 1,
       "kernel.init_sigma must be > 0 and init_steps >= 1"),
  ]


def make(kcfg, size, scale):
  """The kernel network named by ``kcfg.net`` (``cfg.kernel``) for a K×K kernel at ×s.

  Every one is a Flax module with no inputs whose ``init(rng)`` / ``apply(params)``
  give its parameters / the ``(K, K)`` kernel summing to 1.
  """
  net = kcfg.net
  if net == "inr":
    return SirenKernel(size=size, width=kcfg.width, depth=kcfg.depth, omega=kcfg.omega)
  if net in ("direct_relu", "direct_sigmoid"):
    return DirectKernel(size=size, activation=net.split("_")[1], init_sigma=float(scale))
  if net == "linear_cnn":
    sizes = tuple(kcfg.cnn_sizes) or linear_cnn_sizes(int(scale), size)
    return LinearCNNKernel(size=size, sizes=sizes, channels=int(kcfg.cnn_channels),
                           scale=int(scale))
  raise ValueError(f"unknown kernel.net {net!r}; choose one of {', '.join(KERNEL_NETS)}")
