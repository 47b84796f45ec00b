"""Benchmark methods, pluggable by name.

A method is ``fn(case, cfg, workdir) -> Result``: it gets a :class:`~kfjax.bench.suites.Case`
(whose ``lr`` is all it may look at, except ``nonblind``, which is handed the true kernel),
the run's config (a preset with the command line's overrides) and a folder of its own, and
returns the SR image in [0, 1] and, for kernel estimators, the kernel. Register one with::

    @methods.register("mymethod")
    def mymethod(case, cfg, workdir):
      ...
      return methods.Result(sr=sr, kernel=k)

or a KernelFusion variant that only changes config fields with
``register_variant("kf_direct_relu", {"kernel.net": "direct_relu"})``.

A row is kept under its method's config fingerprint (:func:`fingerprint_of`), which covers
only the config blocks the method reads (``register``'s ``reads`` and ``estimator``), so
that changing one method's settings re-runs that method's rows and not every other's.

KernelFusion's Phase 1 (the PD trained on the LR image) depends only on the image and the
PD/training fields, so the methods of one case share it: :func:`trained_pd` keeps it in
``<case dir>/pd-<fingerprint>/`` and a method that finds it there restores it; the training
time is stored beside it and counted in every method's runtime that uses it.
"""

import dataclasses
import json
import os
import time

import jax.numpy as jnp
import ml_collections
import numpy as np

from kfjax import checkpoint as ckpt
from kfjax import config as config_lib
from kfjax import io as kio
from kfjax import phase1 as phase1_lib
from kfjax import phase2 as phase2_lib
from kfjax import pipeline
from kfjax import resize
from kfjax import restore
from kfjax.errors import KfjaxError
from kfjax.models import kernel_net


class NotApplicable(Exception):
  """The method cannot run on this case (e.g. non-blind without a true kernel)."""


@dataclasses.dataclass
class Result:
  sr: np.ndarray                   # (H, W, C) in [0, 1]
  kernel: np.ndarray | None = None  # (K, K), non-negative, sum 1; None: no kernel estimated
  seconds: float | None = None     # whole cost of the method on this case (None: wall time)
  info: dict = dataclasses.field(default_factory=dict)


METHODS = {}
# The other kernel estimators' own config blocks: KernelFusion's methods never read them.
ESTIMATOR_BLOCKS = ("kernelgan", "ddm4ip", "ike")
# Per method: the config blocks its fingerprint covers (None: every block but
# ESTIMATOR_BLOCKS), and the estimator block it adds.
READS = {}


def register(name, reads=None, estimator=None):
  """Decorator: make ``fn(case, cfg, workdir) -> Result`` available as method ``name``.

  ``reads``: the config blocks the method's result depends on (``None``, the default: all
  but :data:`ESTIMATOR_BLOCKS`, i.e. KernelFusion's); ``estimator``: one of
  :data:`ESTIMATOR_BLOCKS` it also reads. Its rows' fingerprint covers those blocks and the
  top-level fields (seed, scale, ...), so listing too little would let a changed setting
  reuse stale rows: when in doubt leave ``reads`` at ``None``."""
  if estimator is not None and estimator not in ESTIMATOR_BLOCKS:
    raise ValueError(f"estimator must be one of {ESTIMATOR_BLOCKS}, got {estimator!r}")

  def deco(fn):
    if name in METHODS:
      raise ValueError(f"method {name!r} is registered twice")
    METHODS[name] = fn
    READS[name] = (None if reads is None else tuple(reads), estimator)
    return fn
  return deco


def get(name):
  if name not in METHODS:
    raise KfjaxError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
  return METHODS[name]


def with_overrides(cfg, overrides):
  """A copy of ``cfg`` with dotted-field overrides ``{"kernel.net": "direct_relu"}``."""
  cfg = cfg.copy_and_resolve_references()
  for key, value in overrides.items():
    node = cfg
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    if last not in node:
      raise KfjaxError(f"config has no field {key!r}")
    node[last] = value
  return cfg


# -- shared KernelFusion pieces --------------------------------------------------------

def trained_pd(case, cfg, case_dir):
  """``(pd_model, pd_params, seconds)``: Phase 1 on ``case.lr``, shared by the case's
  methods (restored when a previous method trained it with the same fields)."""
  lr_m = case.lr * 2.0 - 1.0
  fp = phase1_lib.fingerprint(cfg, lr_m)
  d = os.path.join(case_dir, f"pd-{fp[:12]}")
  t0 = time.time()
  model, params, info = phase1_lib.train(cfg, lr_m, d, show_progress=False)
  seconds = time.time() - t0
  record = os.path.join(d, "train_seconds.json")
  if info["restored_step"] is not None and info["restored_step"] >= info["steps"]:
    if os.path.exists(record):    # trained earlier (by another method): count that time
      seconds = json.load(open(record))["seconds"]
  else:
    kio.save_text_atomic(record, json.dumps({"seconds": seconds}))
  return model, params, seconds


def phase2(case, cfg, pd, fixed_kernel=None):
  """Phase 2 on ``case.lr`` with trained ``pd = (model, params)`` and ``cfg`` from
  :func:`_prepare` (``cfg.scale`` the case's); returns ``(sr in [0, 1], kernel, seconds)``."""
  t0 = time.time()
  hr, k, _ = phase2_lib.run(cfg, pd[0], pd[1], case.lr * 2.0 - 1.0, fixed_kernel=fixed_kernel,
                            show_progress=False)
  sr = np.clip((hr + 1.0) / 2.0, 0.0, 1.0)
  return sr, kernel_net.export_kernel(k), time.time() - t0


def nonblind_output(case, cfg, workdir, kernel):
  """The non-blind SR image with ``kernel``: Phase 1 + non-blind Phase 2 (+ the config's
  ``restore.final``), or, when the config's output reads nothing of Phase 2
  (:func:`kfjax.phase2.reads_phase2`), the TV restoration alone, as the CLI does. Returns
  ``(sr in [0, 1], seconds of Phase 1, seconds of Phase 2 or the restoration)``."""
  if not phase2_lib.reads_phase2(cfg, blind=False):
    t0 = time.time()
    hr, _, _ = phase2_lib.restore_only(cfg, case.lr * 2.0 - 1.0, kernel)
    return np.clip((hr + 1.0) / 2.0, 0.0, 1.0), 0.0, time.time() - t0
  model, params, t1 = trained_pd(case, cfg, _case_dir(workdir))
  sr, _, t2 = phase2(case, cfg, (model, params), fixed_kernel=kernel)
  return sr, t1, t2


def _case_dir(workdir):
  """Methods get ``<workdir>/<case>/<method>``; the shared PD lives one level up."""
  return os.path.dirname(os.path.normpath(workdir))


def _prepare(case, cfg):
  cfg = cfg.copy_and_resolve_references()
  cfg.scale = case.spec.scale
  pipeline.validate_config(cfg)
  return cfg


# -- methods ------------------------------------------------------------------------------

@register("bicubic", reads=())
def bicubic(case, cfg, workdir):
  """MATLAB-compatible bicubic upscaling (the floor)."""
  del cfg, workdir
  t0 = time.time()
  sr = np.clip(np.asarray(resize.upscale(jnp.asarray(case.lr), case.spec.scale)), 0.0, 1.0)
  return Result(sr=sr, seconds=time.time() - t0)


def blind_result(case, cfg, case_dir):
  """Blind KernelFusion's ``Result`` on ``case``, kept in ``<case dir>/kf-<fingerprint>/``
  (the whole config's) so that ``tv_blind`` reuses the run of ``kernelfusion`` (and vice
  versa) instead of repeating it; its seconds are the original run's.

  The folder holds the run's outputs (``sr.npy``, ``kernel.npy``) and Phase 2's own
  (``sr_phase2.npy``, ``kernel_phase2.npy``: before ``phase2.finish_output``), which
  ``kfjax.bench.postprocess`` re-finishes under other settings."""
  d = os.path.join(case_dir, f"kf-{fingerprint_of(cfg, 'kernelfusion')}")
  names = ("sr.npy", "kernel.npy", "sr_phase2.npy", "kernel_phase2.npy", "info.json")
  files = {n: os.path.join(d, n) for n in names}
  if all(os.path.exists(files[n]) for n in ("sr.npy", "kernel.npy", "info.json")):
    info = json.load(open(files["info.json"]))
    return Result(sr=np.load(files["sr.npy"]), kernel=np.load(files["kernel.npy"]),
                  seconds=info["seconds"], info=info["info"])
  model, params, t1 = trained_pd(case, cfg, case_dir)
  t0 = time.time()
  # What phase2.run does by default, split at finish_output so that both halves are kept
  # (the finishing sees Phase 2's unclipped image, as in the command line).
  # (cfg comes from _prepare: cfg.scale is the case's.)
  lr = case.lr * 2.0 - 1.0
  hr_p2, k_p2, _ = phase2_lib.run(cfg, model, params, lr, show_progress=False, finish=False)
  hr, k, _ = phase2_lib.finish_output(cfg, lr, hr_p2, k_p2, blind=True)
  t2 = time.time() - t0
  to_sr = lambda x: np.clip((np.asarray(x) + 1.0) / 2.0, 0.0, 1.0)
  sr_p2, k_p2 = to_sr(hr_p2), kernel_net.export_kernel(k_p2)
  sr, k = to_sr(hr), kernel_net.export_kernel(k)
  result = Result(sr=sr, kernel=k, seconds=t1 + t2,
                  info={"seconds_phase1": t1, "seconds_phase2": t2})
  os.makedirs(d, exist_ok=True)
  for name, a in (("sr_phase2.npy", sr_p2), ("kernel_phase2.npy", k_p2), ("sr.npy", sr),
                  ("kernel.npy", k)):
    kio.save_array_atomic(files[name], np.asarray(a, np.float32))
  kio.save_text_atomic(files["info.json"], json.dumps({"seconds": result.seconds,
                                                       "info": result.info}))
  return result


@register("kernelfusion")
def kernelfusion(case, cfg, workdir):
  """Blind KernelFusion: Phase 1 + Phase 2 with the kernel estimated."""
  return blind_result(case, _prepare(case, cfg), _case_dir(workdir))


def _tv(case, cfg, kernel):
  t0 = time.time()
  x, _ = restore.solve_cfg(case.lr, kernel, case.spec.scale, cfg.restore)
  return np.asarray(x, np.float64), time.time() - t0


@register("tv_nonblind", reads=("restore",))
def tv_nonblind(case, cfg, workdir):
  """Classical non-blind SR: TV-regularised least squares with the TRUE kernel from the
  bicubic start (:mod:`kfjax.restore`, ``cfg.restore``; no diffusion, no network)."""
  del workdir
  if case.kernel is None:
    raise NotApplicable("no true kernel for a non-linear degradation")
  cfg = _prepare(case, cfg)
  sr, seconds = _tv(case, cfg, case.kernel)
  return Result(sr=sr, kernel=None, seconds=seconds)


def generic_kernel(cfg, scale):
  """The kernel of "no estimate": a centred isotropic Gaussian of std ``kernel.blend_sigma
  × scale`` HR pixels on the bench kernels' ``6·scale`` grid, sum 1 (float32); the kernel
  the blind post-processing (``kernel.blend``) shrinks estimates toward."""
  return kernel_net.gaussian_kernel(6 * int(scale), float(cfg.kernel.blend_sigma) * int(scale))


@register("tv_generic", reads=("restore", "kernel"))
def tv_generic(case, cfg, workdir):
  """The TV solver of ``tv_nonblind`` with no kernel estimate, only :func:`generic_kernel`.
  A blind method restored by the same solver (``ddm4ip``, ``tv_blind``) has to beat it for
  its kernel, and not the solver and a mild generic blur, to be what made its gain."""
  del workdir
  cfg = _prepare(case, cfg)
  k = generic_kernel(cfg, case.spec.scale)
  sr, seconds = _tv(case, cfg, k)
  return Result(sr=sr, kernel=k, seconds=seconds)


@register("tv_blind")
def tv_blind(case, cfg, workdir):
  """The TV solver of ``tv_nonblind`` fed with blind KernelFusion's estimated kernel:
  against ``tv_nonblind`` it measures what the kernel's error costs under a solver that
  uses a kernel well. Reuses the case's ``kernelfusion`` run (same config) when there is
  one; its time counts."""
  cfg = _prepare(case, cfg)
  kf = blind_result(case, cfg, _case_dir(workdir))
  sr, seconds = _tv(case, cfg, kf.kernel)
  return Result(sr=sr, kernel=kf.kernel, seconds=kf.seconds + seconds,
                info={**kf.info, "seconds_tv": seconds})


@register("nonblind")
def nonblind(case, cfg, workdir):
  """Phase 2 with the true kernel fixed: the upper bound for blind KernelFusion
  (:func:`nonblind_output`; with ``restore.final`` from the bicubic start that is
  ``tv_nonblind``'s image)."""
  if case.kernel is None:
    raise NotApplicable("no true kernel for a non-linear degradation")
  cfg = _prepare(case, cfg)
  k_size = phase2_lib.kernel_size(cfg)
  if case.kernel.shape[0] != k_size:
    raise NotApplicable(f"true kernel is {case.kernel.shape[0]}px, config kernel {k_size}px")
  sr, t1, t2 = nonblind_output(case, cfg, workdir, case.kernel)
  return Result(sr=sr, kernel=None, seconds=t1 + t2,
                info={"seconds_phase1": t1, "seconds_phase2": t2})


def register_variant(name, overrides, doc=None):
  """Register blind KernelFusion with config ``overrides`` as method ``name``."""
  overrides = dict(overrides)

  def variant(case, cfg, workdir):
    return kernelfusion(case, with_overrides(cfg, overrides), workdir)
  variant.__doc__ = doc or f"KernelFusion with {overrides}"
  register(name)(variant)
  return variant


# Fields added after rows were recorded, left out of the fingerprint at their "off" value
# so that those rows keep theirs: (block, field, off value).
_LATER_FIELDS = (("ddm4ip", "normalise", False), ("ddm4ip", "max_radius", 0.0),
                 ("ddm4ip", "threshold", 0.0), ("ddm4ip", "blend", 0.0),
                 ("ddm4ip", "x4", "compose"), ("ddm4ip", "on_diverge", "last_healthy"),
                 ("ike", "d_batch", "separate"), ("kernelgan", "centre", "grid"))
# Fields that never change a result (when the command line checkpoints): left out always.
_RUN_ONLY_FIELDS = (("kernelgan", "checkpoint_every"), ("ddm4ip", "checkpoint_every"),
                    ("ike", "checkpoint_every"))


def fingerprint_of(cfg, method=None):
  """Short fingerprint of a config, recorded per row so changed settings are visible.

  With ``method``, of the part of the config that method reads (:func:`register`): the
  top-level fields and its blocks; without, of the whole config. ``precision`` enters as the
  checkpoints' :func:`kfjax.config.precision_part` (nothing at its float32 default), and the
  :data:`_LATER_FIELDS` only when on, so rows written before those fields existed keep their
  fingerprint; :data:`_RUN_ONLY_FIELDS` never."""
  d = cfg.to_dict()
  if method is not None:
    get(method)
    reads, estimator = READS[method]
    keep = {estimator} | (set(reads) if reads is not None else
                          {k for k in d if k not in ESTIMATOR_BLOCKS})
    d = {k: v for k, v in d.items() if not isinstance(v, dict) or k in keep}
  d.pop("precision", None)
  for block, field, off in _LATER_FIELDS:
    if block in d and d[block].get(field) == off:
      del d[block][field]
  for block, field in _RUN_ONLY_FIELDS:
    if block in d:
      d[block].pop(field, None)
  return ckpt.fingerprint(ml_collections.ConfigDict(d).to_json_best_effort(sort_keys=True),
                          *config_lib.precision_part(cfg))[:12]


# -- issue 5: KernelFusion's ablations and KernelGAN (added by the ablations work) ----------
# Variants change config fields only (README, "Options (ablations) and KernelGAN"); kf_dip
# skips Phase 1 (no PD, so none is trained or counted); kernelgan estimates the kernel with
# kfjax.kernelgan and restores with KernelFusion's non-blind Phase 2 (two-step, as the
# papers pair KernelGAN with a non-blind SR method).

register_variant("kf_inr", {"kernel.net": "inr"},
                 "KernelFusion with the paper's SIREN kernel (the cpu preset uses the linear CNN)")
register_variant("kf_direct_relu", {"kernel.net": "direct_relu"},
                 "KernelFusion, kernel entries as free parameters through a ReLU (C.1)")
register_variant("kf_direct_sigmoid", {"kernel.net": "direct_sigmoid"},
                 "KernelFusion, kernel entries as free parameters through a sigmoid (C.1)")
register_variant("kf_linear_cnn", {"kernel.net": "linear_cnn"},
                 "KernelFusion, kernel from a deep linear CNN (C.1, KernelGAN-like)")
register_variant("kf_two_unets", {"sample.two_unets": True},
                 "KernelFusion, separate U-Nets before and after PD (C.2)")
register_variant("kf_bf16", {"precision": "bfloat16"},
                 "KernelFusion with PD and the U-Net computing in bfloat16 (mixed precision)")
register_variant("kf_mean3", {"sample.num_samples": 3},
                 "KernelFusion, mean of 3 runs (sample.num_samples, a kfjax option)")


@register("kf_dip")
def kf_dip(case, cfg, workdir):
  """Deep-Image-Prior ablation: the U-Net alone under the same loss, no diffusion (C.1)."""
  del workdir
  cfg = _prepare(case, with_overrides(cfg, {"sample.prior": "dip"}))
  sr, k, t2 = phase2(case, cfg, (None, None))
  return Result(sr=sr, kernel=k, seconds=t2, info={"seconds_phase2": t2})


@register("kernelgan", estimator="kernelgan")
def kernelgan_method(case, cfg, workdir):
  """KernelGAN's kernel (``kfjax.kernelgan``) + KernelFusion's non-blind Phase 2
  (:func:`nonblind_output`: the TV restoration alone where the config's output reads
  nothing of Phase 2)."""
  from kfjax import kernelgan  # noqa: PLC0415
  cfg = _prepare(case, cfg)
  t0 = time.time()
  k, _ = kernelgan.estimate_kernel(case.lr, case.spec.scale, cfg, show_progress=False)
  t_kg = time.time() - t0
  sr, t1, t2 = nonblind_output(case, cfg, workdir, k)
  return Result(sr=sr, kernel=k, seconds=t_kg + t1 + t2,
                info={"seconds_kernelgan": t_kg, "seconds_phase1": t1, "seconds_phase2": t2})


@register("ddm4ip", reads=("restore", "kernel"), estimator="ddm4ip")
def ddm4ip_method(case, cfg, workdir):
  """DDM4IP's kernel (``kfjax.ddm4ip``) + the TV restoration (``cfg.restore``), two-step.
  The kernel before the preset's post-processing is kept as ``kernel_raw.npy`` beside the
  run's outputs, so the post-processing can be re-tuned without re-training."""
  from kfjax import ddm4ip  # noqa: PLC0415
  cfg = _prepare(case, cfg)
  t0 = time.time()
  raw, info = ddm4ip.estimate_kernel(case.lr, case.spec.scale, cfg, show_progress=False,
                                     finish=False)
  k = ddm4ip.finish_kernel(cfg, raw, case.spec.scale, info)
  t_dd = time.time() - t0
  os.makedirs(workdir, exist_ok=True)
  kio.save_array_atomic(os.path.join(workdir, "kernel_raw.npy"), raw)
  sr, t_tv = _tv(case, cfg, k)
  return Result(sr=sr, kernel=k, seconds=t_dd + t_tv,
                info={"seconds_ddm4ip": t_dd, "seconds_tv": t_tv,
                      "mismatch": info["match"].get("final", {}).get("mismatch"),
                      "fallback": info.get("fallback"),
                      "spread_fallback": info.get("spread_fallback"),
                      "diverged": info.get("diverged"),
                      "diverged_generic": info.get("diverged_generic", False)})


@register("ike", reads=(), estimator="ike")
def ike_method(case, cfg, workdir):
  """IKE (``kfjax.ike``): kernel (impulse response) and SR image from one invertible net."""
  del workdir
  from kfjax import ike  # noqa: PLC0415
  cfg = _prepare(case, cfg)
  t0 = time.time()
  sr, k, _ = ike.run(case.lr, case.spec.scale, cfg, show_progress=False)
  return Result(sr=np.asarray(sr, np.float64), kernel=k, seconds=time.time() - t0)

