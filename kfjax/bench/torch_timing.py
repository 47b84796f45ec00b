"""The PyTorch timings of the throughput benchmark: the same work in PyTorch eager.

:mod:`kfjax.bench.torch_ref` holds the reference networks and steps; these functions time
them on the inputs the JAX timings use (:mod:`kfjax.bench.jax_timing`), so that the two
speeds compare. ``torch`` is optional (``pip install -e '.[bench]'``): it is imported only
inside the functions, so this module imports without it; :func:`have_torch` says whether
the timings can run.
"""

import functools
import importlib

from absl import flags
import jax
import numpy as np

from kfjax import phase2
from kfjax import schedule as sch
from kfjax.bench import flops as flops_lib
from kfjax.bench import jax_timing
from kfjax.models import kernel_net
from kfjax.models import pd as pd_lib

FLAGS = flags.FLAGS


def have_torch():
  """Whether ``torch`` imports (by name: the probe has no use for the module itself)."""
  try:
    importlib.import_module("torch")
    return True
  except ImportError:
    return False


def torch_device():
  """``--torch_device`` (a flag of :mod:`kfjax.bench.throughput`) with ``auto`` resolved
  (``auto`` before flags are parsed, or where that module's flags are not defined)."""
  import torch
  dev = FLAGS.torch_device if FLAGS.is_parsed() and "torch_device" in FLAGS else "auto"
  if dev == "auto":
    dev = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  return dev


def _on_torch_device(bench):
  """Runs a PyTorch benchmark with :func:`torch_device` as the default device, so that
  its modules and tensors are made there."""
  @functools.wraps(bench)
  def wrapped(*args, **kwargs):
    import torch
    with torch.device(torch_device()):
      return bench(*args, **kwargs)
  return wrapped


def _torch_sync():
  """Wait for queued CUDA work (timings of asynchronous launches mean nothing)."""
  import torch
  if torch.cuda.is_initialized():
    torch.cuda.synchronize()


def _torch_seconds_per_call(fn, calls, repeats):
  """Median seconds per call of ``fn`` over ``repeats`` runs of ``calls`` calls (after
  one warm-up call), synchronised with the torch device."""
  fn()

  def run():
    for _ in range(calls):
      fn()
    _torch_sync()
  return jax_timing.median_time(run, repeats) / calls


@_on_torch_device
def bench_phase1_torch(cfg, steps, repeats):
  """Seconds per PD step of the reference (the same batch, crop and schedule)."""
  import torch
  from kfjax.bench import torch_ref
  crop, batch = int(cfg.train.crop_size), int(cfg.train.batch_size)
  torch.manual_seed(0)
  model = torch_ref.pd_from_config(cfg, flops_lib.CHANNELS).to(memory_format=torch.channels_last)
  step = torch_ref.Phase1Step(model, sch.from_config(cfg), jax_timing.random_image(max(2 * crop, 64)),
                              batch, crop, cfg.train.lr, cfg.train.lr_end, cfg.train.steps)
  return dict(step_s=_torch_seconds_per_call(step, steps, repeats))


@_on_torch_device
def bench_phase2_torch(cfg, hr_size, iters, repeats):
  """Seconds per Phase 2 inner iteration of the reference at ``hr_size``²."""
  import torch
  from kfjax.bench import torch_ref
  scale = int(cfg.scale)
  lr_side = hr_size // scale
  torch.manual_seed(0)
  cl = torch.channels_last
  pd = torch_ref.pd_from_config(cfg, flops_lib.CHANNELS).to(memory_format=cl)
  unet = torch_ref.unet_from_config(cfg, flops_lib.CHANNELS).to(memory_format=cl)
  # The kernel net starts where kfjax's does (e.g. the linear CNN's box), not at torch's
  # default initialisation.
  kernel = torch_ref.load_kernel(
      torch_ref.kernel_from_config(cfg, phase2.kernel_size(cfg), scale),
      kernel_net.initial_params(phase2.make_kernel_net(cfg), cfg.kernel, scale,
                                jax.random.key(2)))
  rng = np.random.default_rng(0)
  shape = (1, flops_lib.CHANNELS, hr_size, hr_size)
  ts = phase2.timesteps(cfg)
  it = torch_ref.Phase2Iteration(unet, kernel, pd, sch.from_config(cfg),
                                 rng.uniform(-1, 1, shape), rng.uniform(-1, 1, shape),
                                 rng.normal(size=shape),
                                 rng.uniform(-1, 1, (1, flops_lib.CHANNELS, lr_side, lr_side)),
                                 ts[0], ts[1], scale, float(cfg.sample.com_weight))
  return dict(iter_s=_torch_seconds_per_call(it, iters, repeats))


@_on_torch_device
def bench_parts_torch(cfg, hr_size, iters, repeats):
  """Seconds per call of each of :data:`jax_timing.PARTS` in the reference, same inputs."""
  import torch
  from kfjax.bench import torch_ref
  st = jax_timing.parts_setup(cfg, hr_size)
  cl = torch.channels_last
  unet = torch_ref.load_unet(torch_ref.unet_from_config(cfg, flops_lib.CHANNELS),
                             st["unet_params"]).to(memory_format=cl)
  pd = torch_ref.load_pd(torch_ref.pd_from_config(cfg, flops_lib.CHANNELS),
                         st["pd_params"]).to(memory_format=cl)
  for p in pd.parameters():
    p.requires_grad_(False)
  nchw = lambda a: torch.as_tensor(np.array(a)).permute(2, 0, 1)[None].contiguous(memory_format=cl)
  x, lr = nchw(st["x"]), nchw(st["lr"])
  halo = pd_lib.HALO
  xp = torch_ref.pad_symmetric(x, halo, halo, halo, halo).contiguous(memory_format=cl)
  kernel = torch.as_tensor(np.array(st["kernel"]))
  t = torch.full((1,), 100)

  def unet_grad(wrt_params):
    xx = x.clone().requires_grad_(True)
    unet.requires_grad_(wrt_params)
    unet.zero_grad(set_to_none=True)
    (unet(xx) ** 2).sum().backward()

  def pd_grad():
    xx = xp.clone().requires_grad_(True)
    (pd(xx, t) ** 2).sum().backward()

  def down_grad():
    xx, kk = x.clone().requires_grad_(True), kernel.clone().requires_grad_(True)
    ((torch_ref.downscale(xx, kk, st["scale"]) - lr) ** 2).sum().backward()

  def no_grad(f):
    def run():
      with torch.no_grad():
        f()
    return run
  parts = dict(unet_fwd=no_grad(lambda: unet(x)), unet_grad_x=lambda: unet_grad(False),
               unet_grad_all=lambda: unet_grad(True), pd_fwd=no_grad(lambda: pd(xp, t)),
               pd_grad_x=pd_grad, downscale_grad=down_grad)
  rows = {}
  for name, f in parts.items():
    f()

    def run(f=f):
      for _ in range(iters):
        f()
      _torch_sync()
    rows[name] = dict(s=jax_timing.median_time(run, repeats) / iters)
  return rows
