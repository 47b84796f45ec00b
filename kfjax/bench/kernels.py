"""A zoo of synthetic blur kernels, and the LR image they make.

Every generator has the signature ``f(size, scale, rng=0, **params) -> (size, size)``
float64 array: non-negative, sum 1, centre of mass on the grid centre ``(K-1)/2``
(see :mod:`kfjax.degrade`). ``rng`` is a ``np.random.Generator`` or an integer seed; a
parameter left at ``None`` is drawn at random from a range that grows with ``scale``
(ranges below, in HR pixels, ``s`` = scale). Every random draw is made whether or not the
parameter is given, so fixing one parameter leaves the others' draws unchanged.

Shapes are built in coordinates relative to the grid centre, offset so that their
centre of mass falls on it: analytically where the rasterisation keeps the centroid
(symmetric shapes, bilinear splats); otherwise (box-filtered L, narrow sampled Gaussians,
mass cut by the grid edge) the offset is refined by re-rendering until the discrete
centre of mass is on the grid centre to ~1e-12 px. ``div2krk`` (whose multiplicative
noise moves the mass centre) is re-centred by a linear-interpolation sub-pixel shift.

With the default ``K = 6s`` all families keep well under 1% of their mass in the outer
one-pixel ring, except ``div2krk``, which draws covariances as wide as DIV2KRK's own
(see its docstring) and at ``s = 2`` can reach the border.

Families (``KERNELS``):

* ``gaussian``: isotropic, sigma ~ U(0.35s, 0.8s).
* ``aniso_gaussian``: sigma_major ~ U(0.5s, 0.85s), sigma_minor ~ U(0.2s, 0.5s),
  angle ~ U(0, pi).
* ``div2krk``: the DIV2KRK / KernelGAN generator (covariance eigenvalues ~ U(0.175s,
  min(2.5s, 10)), angle ~ U(0, pi), multiplicative noise U(-0.4, 0.4)).
* ``motion``: camera-shake trail (smooth random path), path length ~ U(1.5s, 4s).
* ``lshape`` (Blind144 K0), ``hollow_square`` (K1), ``solid_square`` (K2): box-filtered
  (exactly area-weighted) shapes, extent ~ U(1.5s, 2.5s), bar thickness 0.5s.
* ``disk``: defocus disk, radius ~ U(0.6s, 1.2s).
* ``multilobe``: 2 or 3 Gaussian blobs, blob sigma ~ U(0.25s, 0.4s), at U(0.5s, 1.0s)
  from the centre.
* ``random``: a non-negative random field on a lattice of step 0.4s inside a disk of
  radius ~ U(1.0s, 1.5s), smoothed by a Gaussian of sigma 0.3s.
"""

import numpy as np
from scipy import ndimage

from kfjax import degrade
from kfjax.errors import KfjaxError


def _rng(rng):
  """A ``np.random.Generator`` from a generator or an integer seed."""
  if isinstance(rng, np.random.Generator):
    return rng
  return np.random.default_rng(rng)


def _draw(rng, lo, hi, value):
  """Draw U(lo, hi) (always, to keep the stream aligned); return ``value`` if given."""
  x = rng.uniform(lo, hi)
  return float(x if value is None else value)


def _check(size, scale):
  if int(size) != size or size < 1:
    raise ValueError(f"kernel size must be a positive integer, got {size}")
  if int(scale) != scale or scale < 1:
    raise ValueError(f"scale must be a positive integer, got {scale}")


def _coords(size):
  """Pixel-centre coordinates relative to the grid centre ``(K-1)/2``."""
  return np.arange(size) - (size - 1) / 2.0


def _grid(size):
  """``(y, x)`` coordinate planes relative to the grid centre."""
  c = _coords(size)
  return np.meshgrid(c, c, indexing="ij")


def _finish(k):
  """Clip at zero and normalise to unit sum."""
  k = np.clip(np.asarray(k, np.float64), 0.0, None)
  total = k.sum()
  if not total > 0:
    raise ValueError("kernel has no mass inside the grid; increase its size")
  return k / total


def _cov(sigma1, sigma2, theta):
  """(y, x) covariance with std ``sigma1`` along angle ``theta`` (from the x axis)."""
  u = np.array([np.sin(theta), np.cos(theta)])
  v = np.array([np.cos(theta), -np.sin(theta)])
  return sigma1 ** 2 * np.outer(u, u) + sigma2 ** 2 * np.outer(v, v)


def _gauss(size, cov, mean=(0.0, 0.0)):
  """Normalised Gaussian density with ``cov`` sampled at the pixel centres."""
  y, x = _grid(size)
  dy, dx = y - mean[0], x - mean[1]
  inv = np.linalg.inv(cov)
  q = inv[0, 0] * dy * dy + 2 * inv[0, 1] * dy * dx + inv[1, 1] * dx * dx
  return np.exp(-0.5 * q) / (2 * np.pi * np.sqrt(np.linalg.det(cov)))


def _cover(lo, hi, size):
  """Length of each pixel ``[c-1/2, c+1/2]`` covered by the interval ``[lo, hi]``."""
  c = _coords(size)
  return np.clip(np.minimum(c + 0.5, hi) - np.maximum(c - 0.5, lo), 0.0, None)


def _rect(size, y0, y1, x0, x1):
  """Exact area coverage of each pixel by the rectangle ``[y0, y1] x [x0, x1]``."""
  return np.outer(_cover(y0, y1, size), _cover(x0, x1, size))


def _recentre(render, iters=10):
  """Render ``render(offset)`` with the ``(dy, dx)`` offset that puts its discrete
  centre of mass on the grid centre (fixed-point iteration; converges in a few steps
  because the centre moves almost one-for-one with the offset)."""
  off = np.zeros(2)
  k = render(off)
  for _ in range(iters):
    c = np.array(kernel_center_of_mass(k))
    if np.abs(c).max() < 1e-12:
      break
    off = off - c
    k = render(off)
  return k


def kernel_center_of_mass(k):
  """Centre of mass ``(cy, cx)`` of ``k`` relative to the grid centre ``(K-1)/2``."""
  k = np.asarray(k, np.float64)
  total = k.sum()
  cy = (k.sum(axis=1) * np.arange(k.shape[0])).sum() / total - (k.shape[0] - 1) / 2.0
  cx = (k.sum(axis=0) * np.arange(k.shape[1])).sum() / total - (k.shape[1] - 1) / 2.0
  return float(cy), float(cx)


def gaussian(size, scale, rng=0, sigma=None):
  """Isotropic Gaussian, ``sigma`` ~ U(0.35s, 0.8s) HR pixels."""
  _check(size, scale)
  rng = _rng(rng)
  sigma = _draw(rng, 0.35 * scale, 0.8 * scale, sigma)
  return _finish(_gauss(size, _cov(sigma, sigma, 0.0)))


def aniso_gaussian(size, scale, rng=0, sigma1=None, sigma2=None, theta=None):
  """Anisotropic Gaussian: std ``sigma1`` along angle ``theta`` (radians from the x axis,
  towards +y), ``sigma2`` across it. Defaults: sigma1 ~ U(0.5s, 0.85s), sigma2 ~
  U(0.2s, 0.5s), theta ~ U(0, pi)."""
  _check(size, scale)
  rng = _rng(rng)
  sigma1 = _draw(rng, 0.5 * scale, 0.85 * scale, sigma1)
  sigma2 = _draw(rng, 0.2 * scale, 0.5 * scale, sigma2)
  theta = _draw(rng, 0.0, np.pi, theta)
  return _finish(_gauss(size, _cov(sigma1, sigma2, theta)))


def div2krk(size, scale, rng=0, lambda1=None, lambda2=None, theta=None, noise=0.4,
            var_range=None):
  """DIV2KRK-style kernel (the KernelGAN / BlindSR dataset generator).

  ``lambda1``, ``lambda2`` ~ U(0.175s, min(2.5s, 10)) are the eigenvalues of the
  covariance, i.e. *variances* along the principal axes (KernelGAN builds
  ``Sigma = Q diag(lambda) Q^T``), ``theta`` ~ U(0, pi); ``var_range`` replaces the
  eigenvalue range. Each entry is then multiplied by ``1 + U(-noise, noise)``. The noise
  moves the centre of mass, which is put back on the grid centre with
  ``scipy.ndimage.shift(order=1)`` (linear interpolation keeps the mass and moves the
  mass centre by exactly the shift, up to mass leaving the grid, which re-shifting the
  original corrects). Then clip and normalise.

  Note: at ``s = 2`` the widest draws (std up to sqrt(5) = 2.2 px) reach the border of
  a 12-pixel grid (up to ~2% of the mass in the outer ring), as DIV2KRK's own 11x11 x2
  kernels do (they are truncated too); pass e.g. ``var_range=(0.35, 3.0)`` to avoid it.
  """
  _check(size, scale)
  rng = _rng(rng)
  lo, hi = (0.175 * scale, min(2.5 * scale, 10.0)) if var_range is None else var_range
  lambda1 = _draw(rng, lo, hi, lambda1)
  lambda2 = _draw(rng, lo, hi, lambda2)
  theta = _draw(rng, 0.0, np.pi, theta)
  mult = 1.0 + rng.uniform(-noise, noise, (size, size))
  k = _finish(_gauss(size, _cov(np.sqrt(lambda1), np.sqrt(lambda2), theta)) * mult)
  shift = lambda off: ndimage.shift(k, off, order=1, mode="grid-constant", cval=0.0)
  return _finish(_recentre(shift))


def _trajectory(rng, steps, turn, speed):
  """A smooth 2-D random path: ``(steps + 1, 2)`` points, arbitrary scale.

  Heading ``phi`` starts uniform; its rate of turn follows ``w <- 0.9 w + turn N(0, 1)``
  (rad per step), the log step length ``l <- 0.8 l + speed N(0, 1)``.
  """
  xi = rng.normal(size=(steps, 2))
  phi = rng.uniform(0.0, 2 * np.pi)
  w, l = 0.0, 0.0
  pts = [np.zeros(2)]
  for t in range(steps):
    w = 0.9 * w + turn * xi[t, 0]
    l = 0.8 * l + speed * xi[t, 1]
    phi += w
    pts.append(pts[-1] + np.exp(l) * np.array([np.sin(phi), np.cos(phi)]))
  return np.array(pts)


def _splat(size, pts, weights):
  """Bilinear splatting of weighted points (grid-centre coordinates) into a K x K grid.

  The splat of a point has its centre of mass exactly at the point. Points whose
  footprint leaves the grid are dropped.
  """
  k = np.zeros((size, size))
  p = pts + (size - 1) / 2.0
  i0 = np.floor(p).astype(int)
  f = p - i0
  for dy in (0, 1):
    for dx in (0, 1):
      wy = f[:, 0] if dy else 1.0 - f[:, 0]
      wx = f[:, 1] if dx else 1.0 - f[:, 1]
      iy, ix = i0[:, 0] + dy, i0[:, 1] + dx
      ok = (iy >= 0) & (iy < size) & (ix >= 0) & (ix < size)
      np.add.at(k, (iy[ok], ix[ok]), (weights * wy * wx)[ok])
  return k


def motion(size, scale, rng=0, length=None, steps=48, turn=0.04, speed=0.25, blur=0.5):
  """Camera-shake trail.

  A smooth random path (``steps`` steps; heading whose rate of turn is an AR(1) process
  with innovation ``turn`` rad/step; log step length an AR(1) process with innovation
  ``speed``) is scaled to path length ``length`` ~ U(1.5s, 4s) HR pixels. Every time
  step gets the same exposure, spread evenly along its segment (so slow parts are
  brighter), sampled every <= 0.1 px and bilinearly splatted; the path is centred on
  its exposure-weighted mean first, so the splat is centred exactly (unless the trail
  leaves the grid; re-rendering then corrects it). A discrete Gaussian blur (sigma
  ``blur`` px, symmetric) keeps it band-limited without moving its centre.
  """
  _check(size, scale)
  rng = _rng(rng)
  length = _draw(rng, 1.5 * scale, 4.0 * scale, length)
  pts = _trajectory(rng, steps, turn, speed)
  seg = np.diff(pts, axis=0)
  seg_len = np.linalg.norm(seg, axis=1)
  total = seg_len.sum()
  pts = pts * (length / total if total > 0 else 0.0)
  seg_len = seg_len * (length / total if total > 0 else 0.0)
  samples, weights = [], []
  for t in range(steps):
    n = int(np.ceil(seg_len[t] / 0.1)) + 1
    a = (np.arange(n) + 0.5) / n
    samples.append(pts[t] + a[:, None] * (pts[t + 1] - pts[t]))
    weights.append(np.full(n, 1.0 / n))
  samples, weights = np.concatenate(samples), np.concatenate(weights)
  samples = samples - (weights[:, None] * samples).sum(0) / weights.sum()
  def render(off):
    k = _splat(size, samples + off, weights)
    if blur > 0:
      k = ndimage.gaussian_filter(k, blur, mode="constant", cval=0.0, truncate=4.0)
    return k
  return _finish(_recentre(render))


def lshape(size, scale, rng=0, height=None, width=None, thickness=None, rotation=None):
  """Blind144 K0: an "L" of two bars, ``height``, ``width`` ~ U(1.5s, 2.5s), bar
  ``thickness`` 0.5s, turned by ``rotation`` (0-3) quarter turns ~ uniform.

  Built from two disjoint rectangles with exact area coverage (box filter), placed so
  that the discrete centre of mass is the grid centre (the box filter moves the
  centroid of an asymmetric shape slightly, so the placement is refined by
  re-rendering).
  """
  _check(size, scale)
  rng = _rng(rng)
  h = _draw(rng, 1.5 * scale, 2.5 * scale, height)
  w = _draw(rng, 1.5 * scale, 2.5 * scale, width)
  t = 0.5 * scale if thickness is None else float(thickness)
  rot = int(rng.integers(0, 4))
  rot = rot if rotation is None else int(rotation)
  t = min(t, h, w)
  # Vertical bar [0, h] x [0, t]; foot [h - t, h] x [t, w] (y down, x right).
  rects = [(0.0, h, 0.0, t), (h - t, h, t, w)]
  areas = [(r[1] - r[0]) * (r[3] - r[2]) for r in rects]
  cy = sum(a * (r[0] + r[1]) / 2 for a, r in zip(areas, rects)) / sum(areas)
  cx = sum(a * (r[2] + r[3]) / 2 for a, r in zip(areas, rects)) / sum(areas)
  def render(off):
    oy, ox = off[0] - cy, off[1] - cx
    return sum(_rect(size, r[0] + oy, r[1] + oy, r[2] + ox, r[3] + ox) for r in rects)
  return _finish(np.rot90(_recentre(render), rot))


def hollow_square(size, scale, rng=0, side=None, thickness=None):
  """Blind144 K1: a square frame, ``side`` ~ U(1.5s, 2.5s), wall ``thickness`` 0.5s
  (exact area coverage)."""
  _check(size, scale)
  rng = _rng(rng)
  a = _draw(rng, 1.5 * scale, 2.5 * scale, side) / 2
  t = 0.5 * scale if thickness is None else float(thickness)
  b = max(a - t, 0.0)
  return _finish(_rect(size, -a, a, -a, a) - _rect(size, -b, b, -b, b))


def solid_square(size, scale, rng=0, side=None):
  """Blind144 K2: a uniform square (box blur), ``side`` ~ U(1.5s, 2.5s), exact area
  coverage."""
  _check(size, scale)
  rng = _rng(rng)
  a = _draw(rng, 1.5 * scale, 2.5 * scale, side) / 2
  return _finish(_rect(size, -a, a, -a, a))


def disk(size, scale, rng=0, radius=None, supersample=8):
  """Defocus disk, ``radius`` ~ U(0.6s, 1.2s), anti-aliased by ``supersample``-fold
  supersampling (a point-symmetric pattern, so the centre of mass stays exact)."""
  _check(size, scale)
  rng = _rng(rng)
  r = _draw(rng, 0.6 * scale, 1.2 * scale, radius)
  n = int(supersample)
  sub = (np.arange(size * n) + 0.5) / n - 0.5 - (size - 1) / 2.0
  y, x = np.meshgrid(sub, sub, indexing="ij")
  fine = (y * y + x * x <= r * r).astype(np.float64)
  k = fine.reshape(size, n, size, n).mean(axis=(1, 3))
  if k.sum() == 0:  # radius far below a pixel: a delta
    k[(size - 1) // 2:size // 2 + 1, (size - 1) // 2:size // 2 + 1] = 1.0
  return _finish(k)


def multilobe(size, scale, rng=0, lobes=None, sigma=None, spread=None):
  """2 or 3 Gaussian blobs (``lobes``), each of std ~ U(0.25s, 0.4s) (``sigma`` fixes
  all), mass ~ U(0.5, 1), at distance ~ U(0.5s, 1.0s) (``spread`` fixes all) from the
  centre in roughly evenly spread directions. The blob positions are shifted so their
  mass-weighted mean is the grid centre (then refined by re-rendering, since sampling a
  narrow Gaussian at pixel centres moves its mass slightly)."""
  _check(size, scale)
  rng = _rng(rng)
  n = int(rng.integers(2, 4))
  n = n if lobes is None else int(lobes)
  sig = rng.uniform(0.25 * scale, 0.4 * scale, n)
  dist = rng.uniform(0.5 * scale, 1.0 * scale, n)
  mass = rng.uniform(0.5, 1.0, n)
  base = rng.uniform(0.0, 2 * np.pi)
  jit = rng.uniform(-0.35, 0.35, n) * np.pi / n
  if sigma is not None:
    sig[:] = sigma
  if spread is not None:
    dist[:] = spread
  ang = base + 2 * np.pi * np.arange(n) / n + jit
  mu = np.stack([dist * np.sin(ang), dist * np.cos(ang)], axis=1)
  mu = mu - (mass[:, None] * mu).sum(0) / mass.sum()
  def render(off):
    return sum(m * _gauss(size, _cov(s, s, 0.0), c + off)
               for m, s, c in zip(mass, sig, mu))
  return _finish(_recentre(render))


def random(size, scale, rng=0, radius=None, smooth=None, spacing=None):
  """A smoothed non-negative random field inside a disk.

  White noise ``max(N(0, 1), 0)`` (about half the cells empty) on a lattice of step
  ``spacing`` (default 0.4s) inside a disk of ``radius`` ~ U(1.0s, 1.5s), smoothed by a
  Gaussian of std ``smooth`` (default 0.3s), i.e. a sum of Gaussians at the lattice
  points: an irregular blob with structure at the scale of the kernel. The lattice is
  shifted so its weighted mean is the grid centre (then refined by re-rendering).
  """
  _check(size, scale)
  rng = _rng(rng)
  r = _draw(rng, 1.0 * scale, 1.5 * scale, radius)
  sm = 0.3 * scale if smooth is None else float(smooth)
  spacing = 0.4 * scale if spacing is None else float(spacing)
  m = int(np.ceil(r / spacing))
  c = np.arange(-m, m + 1) * spacing
  py, px = np.meshgrid(c, c, indexing="ij")
  inside = py * py + px * px <= r * r
  pts = np.stack([py[inside], px[inside]], axis=1)
  w = np.maximum(rng.normal(size=len(pts)), 0.0)
  if w.sum() == 0:
    w[:] = 1.0
  pts = pts - (w[:, None] * pts).sum(0) / w.sum()
  y, x = _grid(size)
  def render(off):
    d2 = ((y[..., None] - pts[:, 0] - off[0]) ** 2
          + (x[..., None] - pts[:, 1] - off[1]) ** 2)
    return np.exp(-0.5 * d2 / sm ** 2) @ w
  return _finish(_recentre(render))


KERNELS = {
    "gaussian": gaussian,
    "aniso_gaussian": aniso_gaussian,
    "div2krk": div2krk,
    "motion": motion,
    "lshape": lshape,
    "hollow_square": hollow_square,
    "solid_square": solid_square,
    "disk": disk,
    "multilobe": multilobe,
    "random": random,
}


def make_kernel(name, size=None, scale=2, seed=0, **params):
  """Kernel ``name`` from :data:`KERNELS`, of ``size`` (default ``6 * scale``)."""
  if name not in KERNELS:
    raise KfjaxError(f"unknown kernel {name!r}; choose one of {', '.join(KERNELS)}")
  size = 6 * scale if size is None else size
  return KERNELS[name](size, scale, seed, **params)


def degrade_image(hr, kernel, scale, noise_sigma=0.0, seed=0):
  """LR image ``clip((hr * kernel)↓scale + n, 0, 1)``, ``n ~ N(0, noise_sigma^2)``.

  ``hr`` is ``(H, W, C)`` (or ``(H, W)``) in [0, 1]; uses
  :func:`kfjax.degrade.downscale_np`, the model's own operator. Returns float64.
  """
  hr = np.asarray(hr, np.float64)
  gray = hr.ndim == 2
  if gray:
    hr = hr[..., None]
  if hr.ndim != 3:
    raise ValueError(f"hr must be (H, W, C) or (H, W), got shape {hr.shape}")
  lr = degrade.downscale_np(hr, kernel, scale)
  if noise_sigma > 0:
    lr = lr + noise_sigma * _rng(seed).standard_normal(lr.shape)
  lr = np.clip(lr, 0.0, 1.0)
  return lr[..., 0] if gray else lr


# -- Non-linear degradations (IKE's benchmark: bilateral, median, anisotropic diffusion) --
#
# No single kernel describes these: the HR image is filtered by an edge-aware or
# order-statistic filter, then decimated. The decimation samples each LR pixel exactly at
# the operator's centre ``s·i + (s−1)/2`` (:mod:`kfjax.degrade`): the pixel itself for odd
# ``s``, the mean of the 2×2 pixels around that point for even ``s``. Filter parameters
# are drawn from a seed, with ranges that grow with ``s`` like the kernels' (IKE does not
# publish its own).


def _decimate(x, scale):
  point = np.ones((1, 1)) if scale % 2 else np.full((2, 2), 0.25)
  return degrade.downscale_np(x, point, scale)


def median_filter(img, size):
  """Per-channel ``size``×``size`` median, reflecting at the borders."""
  return ndimage.median_filter(img, size=(size, size, 1), mode="reflect")


def bilateral_filter(img, sigma_spatial, sigma_color):
  """Bilateral filter (Tomasi & Manduchi): each pixel becomes the mean of its
  ``(2r+1)``² window, ``r = ceil(2·sigma_spatial)``, weighted by
  ``exp(−d²/2σ_s²)·exp(−‖Δc‖²/2σ_c²)`` with ``Δc`` the colour difference over all
  channels; borders reflected."""
  r = int(np.ceil(2 * sigma_spatial))
  h, w = img.shape[:2]
  p = np.pad(img, ((r, r), (r, r), (0, 0)), mode="reflect")
  num = np.zeros_like(img)
  den = np.zeros(img.shape[:2] + (1,))
  for dy in range(-r, r + 1):
    for dx in range(-r, r + 1):
      nb = p[r + dy:r + dy + h, r + dx:r + dx + w]
      wgt = np.exp(-(dy * dy + dx * dx) / (2 * sigma_spatial ** 2)
                   - ((nb - img) ** 2).sum(-1, keepdims=True) / (2 * sigma_color ** 2))
      num += wgt * nb
      den += wgt
  return num / den


def anisotropic_diffusion(img, iterations, kappa, step=0.2):
  """Perona-Malik diffusion, conduction ``g(d) = exp(−(d/κ)²)`` on the four neighbour
  differences, explicit steps of size ``step`` (stable for ``step ≤ 0.25``), zero flux
  across the borders. Colour images diffuse per channel with a shared conduction
  computed from the channel-mean difference, so edges stop all channels alike."""
  if not 0 < step <= 0.25:
    raise ValueError(f"step must be in (0, 0.25] for a stable explicit scheme, got {step}")
  u = np.array(img, np.float64)
  for _ in range(int(iterations)):
    p = np.pad(u, ((1, 1), (1, 1), (0, 0)), mode="edge")  # zero flux across the border
    diffs = [p[:-2, 1:-1] - u, p[2:, 1:-1] - u, p[1:-1, :-2] - u, p[1:-1, 2:] - u]
    u = u + step * sum(np.exp(-(d.mean(-1, keepdims=True) / kappa) ** 2) * d for d in diffs)
  return u


def _median(img, scale, rng):
  size = 2 * int(round(rng.uniform(0.5, 1.0) * scale)) + 1
  return median_filter(img, size), {"size": size}


def _bilateral(img, scale, rng):
  p = {"sigma_spatial": rng.uniform(0.5, 1.0) * scale, "sigma_color": rng.uniform(0.05, 0.2)}
  return bilateral_filter(img, **p), p


def _anisotropic(img, scale, rng):
  p = {"iterations": int(rng.integers(5, 11)) * scale, "kappa": rng.uniform(0.05, 0.15)}
  return anisotropic_diffusion(img, **p), p


NONLINEAR = {
    "median": _median,
    "bilateral": _bilateral,
    "anisotropic_diffusion": _anisotropic,
}


def degrade_nonlinear(hr, name, scale, seed=0, noise_sigma=0.0):
  """LR image from a non-linear degradation of :data:`NONLINEAR`: filter with parameters
  drawn from ``seed``, decimate, add ``N(0, noise_sigma²)``, clip to [0, 1].

  Returns ``(lr, params)``; ``hr`` is ``(H, W, C)`` or ``(H, W)`` in [0, 1].
  """
  if name not in NONLINEAR:
    raise KfjaxError(f"unknown non-linear degradation {name!r}; choose one of "
                     f"{', '.join(NONLINEAR)}")
  hr = np.asarray(hr, np.float64)
  gray = hr.ndim == 2
  if gray:
    hr = hr[..., None]
  rng = _rng(seed)
  filtered, params = NONLINEAR[name](hr, scale, rng)
  lr = _decimate(filtered, scale)
  if noise_sigma > 0:
    lr = lr + noise_sigma * rng.standard_normal(lr.shape)
  lr = np.clip(lr, 0.0, 1.0)
  return (lr[..., 0] if gray else lr), params
