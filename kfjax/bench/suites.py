"""Benchmark suites: deterministic cases built from photos bundled with scikit-image.

A case is one photo, one degradation (a kernel family of :data:`kfjax.bench.kernels.KERNELS`
or a non-linear filter of :data:`kfjax.bench.kernels.NONLINEAR`), one scale and one seed. Its
true HR image is an ``hr_size``² crop of the photo at a position drawn from the seed, its
true kernel is ``make_kernel(family, 6·s, s, seed)``, and its LR image is the HR image
degraded by the model's own operator (:func:`kfjax.bench.kernels.degrade_image`) and quantised
to 8 bits, as the LR photo a user has would be. Everything follows from the case name,
so a case is rebuilt bit for bit anywhere; :func:`load_case` caches it on disk.

Suites (``SUITES``):

* ``mini``: three photos, each with one of the Gaussian / motion / L-shape families, at
  ×2 and ×4 (six cases; LR 64×64). Minutes per case on a 2-core CPU.
* ``photos3x3``: the issue-2 evidence set: chelsea, astronaut and coffee × anisotropic
  Gaussian, motion and L-shape, ×2 and ×4 (nine cases each; LR 64×64).
* ``nonlinear``: the three mini photos × IKE's bilateral, median and anisotropic
  diffusion degradations, ×2 and ×4.
* ``blind``: every bundled real photo (``PHOTOS``) × every kernel family and non-linear
  degradation, ×2 and ×4, like Blind144's 12 images × 12 kernels (312 cases).
* ``tiny``: two 32×32-HR cases for the test suite.
"""

import dataclasses
import json
import os
import zlib

import numpy as np

from kfjax import io as kio
from kfjax.bench import kernels
from kfjax.errors import KfjaxError

# Real photographs bundled with scikit-image (no download needed): colour and grey.
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "moon", "brick", "grass",
          "gravel", "coins", "hubble_deep_field", "immunohistochemistry")


@dataclasses.dataclass(frozen=True)
class CaseSpec:
  photo: str
  degradation: str   # kernel family or non-linear degradation
  scale: int
  hr_size: int
  seed: int = 0

  @property
  def name(self):
    return f"{self.photo}_{self.degradation}_x{self.scale}_{self.hr_size}px_s{self.seed}"

  @property
  def family(self):
    return self.degradation

  @property
  def linear(self):
    return self.degradation in kernels.KERNELS


@dataclasses.dataclass
class Case:
  spec: CaseSpec
  hr: np.ndarray                 # (H, W, C) float64 in [0, 1]
  lr: np.ndarray                 # (h, w, C) float32 in [0, 1], 8-bit values
  kernel: np.ndarray | None      # (K, K) true kernel; None for non-linear degradations
  params: dict                   # degradation parameters drawn from the seed

  @property
  def name(self):
    return self.spec.name


def _lr_size(scale):
  return 64 * scale


def _mini():
  photos = ("chelsea", "astronaut", "coffee")
  fams = ("gaussian", "motion", "lshape")
  return [CaseSpec(p, f, s, _lr_size(s)) for s in (2, 4) for p, f in zip(photos, fams)]


def _photos3x3():
  return [CaseSpec(p, f, s, _lr_size(s)) for s in (2, 4)
          for p in ("chelsea", "astronaut", "coffee")
          for f in ("aniso_gaussian", "motion", "lshape")]


def _nonlinear():
  return [CaseSpec(p, f, s, _lr_size(s)) for s in (2, 4)
          for p in ("chelsea", "astronaut", "coffee") for f in kernels.NONLINEAR]


def _blind():
  fams = tuple(kernels.KERNELS) + tuple(kernels.NONLINEAR)
  return [CaseSpec(p, f, s, _lr_size(s)) for s in (2, 4) for p in PHOTOS for f in fams]


def _tiny():
  return [CaseSpec("chelsea", "gaussian", 2, 32), CaseSpec("camera", "median", 2, 32)]


SUITES = {"mini": _mini, "photos3x3": _photos3x3, "nonlinear": _nonlinear,
          "blind": _blind, "tiny": _tiny}


def suite(name):
  """The :class:`CaseSpec` list of suite ``name``."""
  if name not in SUITES:
    raise KfjaxError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}")
  return SUITES[name]()


def _seed(spec, what):
  """A stable 32-bit seed per case and purpose (independent of Python's hash salt)."""
  return zlib.crc32(f"{spec.name}/{what}".encode())


def photo(name):
  """A bundled photo as (H, W, C) float64 in [0, 1] (alpha dropped, grey kept 1-channel)."""
  import skimage.data
  if name not in PHOTOS:
    raise KfjaxError(f"unknown photo {name!r}; choose one of {', '.join(PHOTOS)}")
  img = np.asarray(getattr(skimage.data, name)())
  if img.ndim == 2:
    img = img[..., None]
  return img[..., :3].astype(np.float64) / 255.0


def build_case(spec):
  """Build a case from its spec (deterministic)."""
  img = photo(spec.photo)
  h, w = img.shape[:2]
  size = spec.hr_size
  if size > min(h, w) or size % spec.scale:
    raise KfjaxError(f"{spec.name}: hr_size must be a multiple of the scale and fit in "
                     f"the {w}x{h} photo")
  rng = np.random.default_rng(_seed(spec, "crop"))
  y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
  hr = img[y:y + size, x:x + size]
  params = {"crop_yx": [y, x]}
  if spec.linear:
    k = kernels.make_kernel(spec.degradation, 6 * spec.scale, spec.scale,
                            seed=_seed(spec, "kernel"))
    lr = kernels.degrade_image(hr, k, spec.scale)
  else:
    k = None
    lr, p = kernels.degrade_nonlinear(hr, spec.degradation, spec.scale,
                                      seed=_seed(spec, "filter"))
    params.update(p)
  lr = (np.round(lr * 255.0) / 255.0).astype(np.float32)
  return Case(spec, hr, lr, k, params)


def load_case(spec, cache_dir=None):
  """The case, from ``cache_dir/<name>/`` when cached there, else built (and cached)."""
  if cache_dir is None:
    return build_case(spec)
  d = os.path.join(cache_dir, spec.name)
  files = {n: os.path.join(d, n) for n in ("hr.png", "lr.png", "kernel.npy", "case.json")}
  if os.path.exists(files["case.json"]):
    meta = json.load(open(files["case.json"]))
    hr = kio.load_image(files["hr.png"])[0].astype(np.float64)
    lr = kio.load_image(files["lr.png"])[0].astype(np.float32)
    k = np.load(files["kernel.npy"]) if os.path.exists(files["kernel.npy"]) else None
    return Case(spec, hr, lr, k, meta["params"])
  case = build_case(spec)
  kio.save_image(files["hr.png"], case.hr)
  kio.save_image(files["lr.png"], case.lr)
  if case.kernel is not None:
    kio.save_array_atomic(files["kernel.npy"], case.kernel)
  kio.save_text_atomic(files["case.json"], json.dumps(
      {"spec": dataclasses.asdict(spec), "params": case.params}, indent=1))
  return case
