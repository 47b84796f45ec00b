r"""Throughput benchmark: Phase 1 steps, Phase 2 iterations, scaling, vmapped images.

    python -m kfjax.bench.throughput --preset cpu            # everything, cpu preset shapes
    python -m kfjax.bench.throughput --preset paper --what phase1,phase2 --steps 2 --iters 2
    python -m kfjax.bench.throughput --json                   # one JSON document on stdout

What is measured (``--what``, comma-separated):

* ``phase1``: one PD optimiser step at batch ``--batch`` and crop ``--crop`` (the preset's
  by default), inside the compiled multi-step chunk that training uses: seconds per step,
  steps/s, compile time apart, achieved FLOP/s and its fraction of the matmul peak
  measured in the same run (a large float32 ``jnp.dot``).
* ``phase2``: one inner iteration of Phase 2 (U-Net twice, posterior step, PD, kernel
  INR, losses, forward + backward + Adam) at HR size ``--hr_size``, compiled as the real
  Phase 2 compiles it (one reverse step of ``--iters`` iterations), and the whole reverse
  process of one image (``n_iter_first + (num_steps-1)·n_iter`` iterations; estimated from
  the per-iteration time, measured with ``--full_reverse``); memory of the compiled program;
  achieved FLOP/s and fraction of the matmul peak, for kfjax and the PyTorch reference, and
  the fraction of peak that 1.5× the reference's speed would take.
* ``scaling``: the Phase 2 iteration against HR size (``--sizes``), with whole-image PD
  and with PD applied to ``--pd_tile`` tiles, ``--pd_tile_batch`` at a time
  (rematerialised per tile batch, so PD's memory does not grow with the image).
* ``batch``: images/hour against the number of same-size images vmapped through Phase 2
  together (``--images``), ``Phase2.make_chunk(iterations, batch=N)``.
* ``parts``: where a Phase 2 iteration's time goes, each part alone at ``--hr_size``
  (inside a compiled loop, as in Phase 2): the U-Net forward, forward + input gradient,
  forward + all gradients; PD forward and forward + input gradient; the degradation with
  both gradients. FLOPs, FLOP/s and % of peak per part, and the PyTorch reference's time.

With ``--torch`` (default when ``torch`` is importable) Phase 1 and Phase 2 are also
timed with :mod:`kfjax.bench.torch_ref`, the same architectures and step in PyTorch eager,
and reported as the speed ratio kfjax / PyTorch (> 1: kfjax is faster).

``--conv_backward custom|native`` picks the convolution gradients being timed: kfjax's
custom VJP (:func:`kfjax.ops.conv2d`, the default on CPU) or XLA's own (the default on
accelerators, where the custom one is unmeasured); ``launch/device_check.sh`` times both.

FLOPs are counted analytically (:func:`pd_flops`, :func:`unet_flops`, :func:`phase2_flops`): a convolution producing an
``H_out × W_out × C_out`` map from ``C_in`` channels with a ``K × K`` kernel costs
``2·H_out·W_out·K²·C_in·C_out`` FLOPs forward, and forward + backward (input and weight
gradients) three times that. Biases, activations and the optimiser are not counted.
The count is cross-checked against XLA's ``compiled.cost_analysis()`` of one step (of one
Phase 2 iteration's loss and gradients).
"""

import functools
import json
import os
import resource
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from kfjax import config as config_lib
from kfjax import degrade
from kfjax import ops
from kfjax import runtime
from kfjax import phase2
from kfjax import schedule as sch
from kfjax import phase1
from kfjax.models import kernel_net
from kfjax.models import pd as pd_lib

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "cpu", ["cpu", "paper", "smoke"], "Configuration preset whose shapes are measured.")
flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16"],
                  "Compute dtype of PD and the U-Net (config.precision); the PyTorch reference "
                  "stays float32, so no ratio is reported for bfloat16.")
flags.DEFINE_enum("conv_backward", "auto", ["auto", "custom", "native"],
                  "Convolution gradients (ops.conv_backward): auto = kfjax's custom VJP on CPU, "
                  "XLA's own elsewhere; sets KFJAX_CONV_BACKWARD for this run.")
flags.DEFINE_list("what", ["phase1", "phase2", "scaling", "batch"],
                  "Measurements to run: phase1, phase2, scaling, batch, parts.")
flags.DEFINE_integer("batch", 0, "Phase 1 crops per step (0: the preset's).")
flags.DEFINE_integer("crop", 0, "Phase 1 crop size (0: the preset's).")
flags.DEFINE_integer("steps", 10, "Phase 1 steps per timed chunk.")
flags.DEFINE_integer("hr_size", 256, "Phase 2 HR image side (square).")
flags.DEFINE_integer("scale", 0, "SR scale (0: the preset's).")
flags.DEFINE_integer("iters", 10, "Phase 2 inner iterations per timed program.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (the median is reported).")
flags.DEFINE_bool("full_reverse", False, "Also run and time the whole reverse process of one image.")
flags.DEFINE_list("sizes", ["128", "256", "512", "1024"], "HR sides for the scaling table.")
flags.DEFINE_integer("pd_tile", 64, "PD tile size for the tiled column of the scaling table.")
flags.DEFINE_integer("pd_tile_batch", 4, "PD tiles per batch in the tiled column.")
flags.DEFINE_integer("scaling_iters", 2, "Phase 2 iterations per timed program in the scaling table.")
flags.DEFINE_list("images", ["1", "2", "4"], "Numbers of images vmapped through Phase 2 together.")
flags.DEFINE_enum("torch_device", "auto", ["auto", "cpu", "cuda"],
                  "Where the PyTorch reference runs: auto = CUDA when JAX runs on a GPU and torch "
                  "sees one, else the CPU.")
flags.DEFINE_bool("torch", True, "Time the PyTorch eager reference too (skipped if torch is absent).")
flags.DEFINE_integer("peak_size", 2048, "Matrix side for the matmul-peak measurement.")
flags.DEFINE_bool("json", False, "Print one JSON document instead of tables.")
flags.DEFINE_string("from_json", None, "Print the tables of a saved --json document (e.g. from "
                    "launch/device_check.sh) and measure nothing.")

CHANNELS = 3


# -- measuring ------------------------------------------------------------------------------

def median_time(fn, repeats):
  """Median wall time of ``repeats`` calls of ``fn`` (which must block until done)."""
  times = []
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def compile_timed(jitted, *args):
  """(compiled executable, seconds to lower + compile)."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def memory_bytes(compiled):
  """Bytes the compiled program needs (arguments + outputs + temporaries), or None."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - backends without it raise various errors
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def peak_rss_bytes():
  """Peak resident set size of this process so far (Linux reports KiB)."""
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def xla_flops(compiled):
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def matmul_peak(size, repeats=5):
  """Measured float32 matmul FLOP/s: the best of ``repeats`` ``size²`` products."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), jnp.float32)
  f = runtime.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(median_time(lambda: f(a).block_until_ready(), 1) for _ in range(repeats))
  return 2.0 * size ** 3 / best


# -- FLOP counting ---------------------------------------------------------------------------

def conv_flops(h_out, w_out, k, c_in, c_out):
  """Forward FLOPs of one convolution: 2·H_out·W_out·K²·C_in·C_out."""
  return 2 * h_out * w_out * k * k * c_in * c_out


def pd_flops(cfg, crop, channels=CHANNELS):
  """Forward convolution FLOPs of PD on one ``crop × crop`` output (input crop + 14)."""
  c = cfg.pd.channels
  size = crop + 2 * pd_lib.HALO
  total = conv_flops(size - 2, size - 2, 3, channels, c)
  size -= 2
  total += conv_flops(size - 2, size - 2, 3, c, c)
  size -= 2
  for _ in range(cfg.pd.num_blocks):
    size -= 2
    total += conv_flops(size, size, 3, c, c) + conv_flops(size, size, 1, c, c)
  return total + conv_flops(size, size, 1, c, channels)


def unet_flops(cfg, h, w, channels=CHANNELS):
  """Forward convolution FLOPs of the U-Net on an ``h × w`` image, and of its first
  convolution alone (sides padded to multiples of ``2**(levels-1)`` as the model pads)."""
  u = cfg.unet
  levels = int(u.levels)
  m = 2 ** (levels - 1)
  h, w = -(-h // m) * m, -(-w // m) * m
  feats = [min(int(u.base_channels) * 2 ** i, int(u.max_channels)) for i in range(levels)]
  first = conv_flops(h, w, 3, channels, feats[0])
  total, c_in = 0, channels
  for lvl, f in enumerate(feats):  # down path and bottom: two 3×3 convolutions per level
    total += conv_flops(h >> lvl, w >> lvl, 3, c_in, f) + conv_flops(h >> lvl, w >> lvl, 3, f, f)
    c_in = f
  # Up path: a 1×1 conv at the coarser level (kfjax runs it before the ×2 bilinear step; the
  # "transpose" upsampling's 1×1 to 4·f channels costs the same), then a block.
  for lvl in reversed(range(levels - 1)):
    hh, ww, f = h >> lvl, w >> lvl, feats[lvl]
    total += (conv_flops(hh // 2, ww // 2, 1, feats[lvl + 1], f) + conv_flops(hh, ww, 3, 2 * f, f)
              + conv_flops(hh, ww, 3, f, f))
  return total + conv_flops(h, w, 1, feats[0], channels), first


def downscale_flops(cfg, hr_size, channels=CHANNELS):
  """Forward FLOPs of one ``(x*k)↓s`` of an ``hr_size``² image (one filter per channel)."""
  scale = int(cfg.scale)
  out = -(-hr_size // scale)
  return conv_flops(out, out, phase2.kernel_size(cfg, scale), 1, 1) * channels


def phase2_flops(cfg, hr_size, channels=CHANNELS):
  """Convolution FLOPs of one Phase 2 iteration at ``hr_size``² (forward + backward).

  Two U-Net applications, each forward + weight gradient + input gradient, except the
  input gradient of the first application's first convolution (its input ``x0`` is a
  constant); PD forward + input gradient (its weights are frozen); the two
  ``(·*k)↓s`` of the losses with their image and kernel gradients. The kernel network
  (a few MFLOP) and elementwise work are not counted.
  """
  unet, first = unet_flops(cfg, hr_size, hr_size, channels)
  return (2 * 3 * unet - first + 2 * pd_flops(cfg, hr_size, channels)
          + 2 * 3 * downscale_flops(cfg, hr_size, channels))


# -- Phase 1 ----------------------------------------------------------------------------------

def _image(size, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (size, size, CHANNELS)).astype(np.float32)


def preset_config(preset):
  """The preset with ``--precision`` applied."""
  cfg = config_lib.preset(preset)
  cfg.precision = FLAGS.precision
  return cfg


def phase1_config(preset):
  cfg = preset_config(preset)
  if FLAGS.batch:
    cfg.train.batch_size = FLAGS.batch
  if FLAGS.crop:
    cfg.train.crop_size = FLAGS.crop
  return cfg


def bench_phase1_jax(cfg, steps, repeats, peak):
  """Seconds per PD step inside the compiled ``steps``-step chunk, and FLOP counts."""
  crop, batch = int(cfg.train.crop_size), int(cfg.train.batch_size)
  image = _image(max(2 * crop, 64))
  model = phase1.make_model(cfg, CHANNELS)
  sched = sch.from_config(cfg)
  tx = phase1.make_optimizer(cfg)
  state = runtime.jit(lambda k: phase1.init_state(cfg, model, tx, image.shape, k))(jax.random.key(0))
  chunk, compile_s = compile_timed(phase1.make_train_chunk(cfg, model, sched, tx, image, steps),
                                   state)
  holder = {"state": chunk(state)[0]}
  jax.block_until_ready(holder["state"])

  def run():
    holder["state"], losses = chunk(holder["state"])
    jax.block_until_ready(losses)
  per_step = median_time(run, repeats) / steps
  flops = 3 * batch * pd_flops(cfg, crop)
  # XLA's own count of one step (forward + backward), outside the scan.
  size = crop + 2 * pd_lib.HALO
  x = jnp.zeros((batch, size, size, CHANNELS))
  t = jnp.ones((batch,), jnp.int32)
  grad = runtime.jit(jax.grad(lambda p: phase1.loss_fn(model, sched, p, x, t, x)))
  xla = xla_flops(grad.lower(state.params).compile())
  return dict(batch=batch, crop=crop, compile_s=compile_s, step_s=per_step, steps_per_s=1 / per_step,
              flops_per_step=flops, xla_flops_per_step=xla, flop_s=flops / per_step,
              peak_fraction=flops / per_step / peak)


def torch_device():
  """``--torch_device`` with ``auto`` resolved (``cpu`` before flags are parsed)."""
  import torch
  dev = FLAGS.torch_device if FLAGS.is_parsed() else "auto"
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


@_on_torch_device
def bench_phase1_torch(cfg, steps, repeats):
  import torch  # noqa: F401 - optional dependency
  from kfjax.bench import torch_ref
  crop, batch = int(cfg.train.crop_size), int(cfg.train.batch_size)
  torch.manual_seed(0)
  model = torch_ref.pd_from_config(cfg, CHANNELS).to(memory_format=torch.channels_last)
  step = torch_ref.Phase1Step(model, sch.from_config(cfg), _image(max(2 * crop, 64)), batch,
                              crop, cfg.train.lr, cfg.train.lr_end, cfg.train.steps)
  return dict(step_s=_torch_seconds_per_call(step, steps, repeats))


def _torch_seconds_per_call(fn, calls, repeats):
  """Median seconds per call of ``fn`` over ``repeats`` runs of ``calls`` calls (after
  one warm-up call), synchronised with the torch device."""
  fn()

  def run():
    for _ in range(calls):
      fn()
    _torch_sync()
  return median_time(run, repeats) / calls


# -- Phase 2 ----------------------------------------------------------------------------------

def phase2_config(preset, iters, pd_tile=0):
  """The preset with ``iters`` iterations in every reverse step (one step is timed)."""
  cfg = preset_config(preset)
  if FLAGS.scale:
    cfg.scale = FLAGS.scale
  cfg.sample.n_iter_first = cfg.sample.n_iter = iters
  cfg.sample.pd_tile = pd_tile
  cfg.sample.pd_tile_batch = FLAGS.pd_tile_batch if pd_tile else 0
  return cfg


def reverse_iterations(preset):
  s = config_lib.preset(preset).sample
  return int(s.n_iter_first) + (int(s.num_steps) - 1) * int(s.n_iter)


def _init_pd(model):
  """Freshly initialised PD parameters (the benchmarks time PD, not its training)."""
  return runtime.jit(lambda k: model.init(k, jnp.zeros((1, 16, 16, CHANNELS)), jnp.ones((1,))))(
      jax.random.key(1))


def _phase2_setup(cfg, hr_size, images=None):
  scale = int(cfg.scale)
  lr_side = hr_size // scale
  model = phase1.make_model(cfg, CHANNELS)
  sched = sch.from_config(cfg)
  pd_params = _init_pd(model)
  p2 = phase2.Phase2(cfg, model, pd_params, sched, (lr_side, lr_side, CHANNELS), scale)
  if images is None:
    lr = jnp.asarray(_image(lr_side, 2))
    state = runtime.jit(p2.init)(lr, jax.random.key(3))
    rng = jax.random.key(4)
  else:
    lr = jnp.asarray(np.stack([_image(lr_side, 2 + i) for i in range(images)]))
    state = runtime.jit(p2.init_batch)(lr, jax.random.split(jax.random.key(3), images))
    rng = jax.random.split(jax.random.key(4), images)
  return p2, state, lr, rng


def bench_phase2_jax(cfg, hr_size, iters, repeats, images=None):
  """Seconds per inner iteration: one reverse step of ``iters`` iterations, compiled."""
  p2, state, lr, rng = _phase2_setup(cfg, hr_size, images)
  chunk, compile_s = compile_timed(p2.make_chunk(iters, batch=images), state, lr, rng)
  jax.block_until_ready(chunk(state, lr, rng))

  def run():
    jax.block_until_ready(chunk(state, lr, rng))
  per_iter = median_time(run, repeats) / iters
  out = dict(hr_size=hr_size, images=images or 1, compile_s=compile_s, iter_s=per_iter,
             memory_bytes=memory_bytes(chunk), peak_rss_bytes=peak_rss_bytes())
  if images is None:
    flops = phase2_flops(cfg, hr_size)
    out.update(flops_per_iter=flops, xla_flops_per_iter=_phase2_xla_flops(p2, state, lr),
               flop_s=flops / per_iter)
  return out


def _phase2_xla_flops(p2, state, lr):
  """XLA's FLOP count of one iteration's loss and gradients (outside the loops, whose
  bodies XLA's cost analysis would count once regardless of the trip count)."""
  t, s = p2.ts[0], p2.ts[1]
  grad = runtime.jit(jax.value_and_grad(
      lambda p: p2.forward(p, state.x, state.x0, t, s, jnp.zeros_like(state.x), lr), has_aux=True))
  return xla_flops(grad.lower(state.params).compile())


def per_image_estimate(cfg, phase1, phase2, peak):
  """Seconds for one image (Phase 1's ``train.steps`` at the timed step time + the reverse
  process, measured if ``--full_reverse`` ran); compiles, I/O and checkpoints excluded.

  Also the image's convolution FLOPs (Phase 1's steps + the reverse process's iterations)
  and ``floor_s``, the time they take at ``peak`` (the float32 matmul rate measured in the
  same run): what these steps cost at that rate, whoever implements them (lower precision
  on faster matrix units can go below it; BENCHMARKS.md, "what one image costs").
  """
  steps = int(cfg.train.steps)
  train = steps * phase1["step_s"]
  reverse = phase2["reverse"]["seconds"] if "reverse" in phase2 else phase2["reverse_estimate_s"]
  flops1 = steps * phase1["flops_per_step"]
  flops2 = phase2["reverse_iterations"] * phase2["flops_per_iter"]
  return dict(phase1_steps=steps, phase1_s=train, phase2_s=reverse,
              phase2_measured="reverse" in phase2, seconds=train + reverse,
              phase1_flops=flops1, phase2_flops=flops2, flops=flops1 + flops2,
              floor_s=(flops1 + flops2) / peak)


def bench_full_reverse(preset, hr_size):
  """Wall time of the whole reverse process of one image, one compiled program."""
  cfg = preset_config(preset)
  if FLAGS.scale:
    cfg.scale = FLAGS.scale
  p2, state, lr, rng = _phase2_setup(cfg, hr_size)
  chunk, compile_s = compile_timed(p2.make_chunk(p2.total_iterations), state, lr, rng)
  t0 = time.perf_counter()
  jax.block_until_ready(chunk(state, lr, rng))
  return dict(compile_s=compile_s, seconds=time.perf_counter() - t0)


@_on_torch_device
def bench_phase2_torch(cfg, hr_size, iters, repeats):
  import torch
  from kfjax.bench import torch_ref
  scale = int(cfg.scale)
  lr_side = hr_size // scale
  torch.manual_seed(0)
  cl = torch.channels_last
  pd = torch_ref.pd_from_config(cfg, CHANNELS).to(memory_format=cl)
  unet = torch_ref.unet_from_config(cfg, CHANNELS).to(memory_format=cl)
  # The kernel net starts where kfjax's does (e.g. the linear CNN's box), not at torch's
  # default initialisation.
  kernel = torch_ref.load_kernel(
      torch_ref.kernel_from_config(cfg, phase2.kernel_size(cfg, scale), scale),
      kernel_net.initial_params(phase2.make_kernel_net(cfg, scale), cfg.kernel, scale,
                                jax.random.key(2)))
  rng = np.random.default_rng(0)
  shape = (1, CHANNELS, hr_size, hr_size)
  ts = phase2.timesteps(cfg)
  it = torch_ref.Phase2Iteration(unet, kernel, pd, sch.from_config(cfg),
                                 rng.uniform(-1, 1, shape), rng.uniform(-1, 1, shape),
                                 rng.normal(size=shape), rng.uniform(-1, 1, (1, CHANNELS, lr_side, lr_side)),
                                 ts[0], ts[1], scale, float(cfg.sample.com_weight))
  return dict(iter_s=_torch_seconds_per_call(it, iters, repeats))


# -- Phase 2, part by part ----------------------------------------------------------------

PARTS = ("unet_fwd", "unet_grad_x", "unet_grad_all", "pd_fwd", "pd_grad_x", "downscale_grad")


def _parts_setup(cfg, hr_size):
  scale = int(cfg.scale)
  ksize = phase2.kernel_size(cfg, scale)
  unet = phase2.make_unet(cfg, CHANNELS)
  model = phase1.make_model(cfg, CHANNELS)
  x = jnp.asarray(_image(hr_size, 5))
  lr = jnp.asarray(_image(-(-hr_size // scale), 6))
  unet_params = runtime.jit(unet.init)(jax.random.key(0), x[None])
  pd_params = _init_pd(model)
  kernel = jnp.full((ksize, ksize), 1.0 / ksize ** 2)
  unet_f, _ = unet_flops(cfg, hr_size, hr_size)
  pd_f = pd_flops(cfg, hr_size)
  down_f = downscale_flops(cfg, hr_size)
  t = jnp.full((1,), 100)
  return dict(scale=scale, unet=unet, model=model, x=x, lr=lr,
              unet_params=unet_params, pd_params=pd_params, kernel=kernel, t=t,
              flops=dict(unet_fwd=unet_f, unet_grad_x=2 * unet_f, unet_grad_all=3 * unet_f,
                         pd_fwd=pd_f, pd_grad_x=2 * pd_f, downscale_grad=3 * down_f))


def _parts_jax(st):
  """name -> scalar function of the HR image, one per part."""
  unet, model = st["unet"], st["model"]
  sq = lambda a: jnp.sum(a ** 2)
  u = lambda p, x: sq(unet.apply(p, x[None], mutable=["batch_stats"])[0])
  pd = lambda x: sq(pd_lib.apply_whole(model, st["pd_params"], x[None], st["t"]))
  down = lambda x, k: sq(degrade.downscale(x, k, st["scale"]) - st["lr"])
  total = lambda tree: sum(jnp.sum(leaf) for leaf in jax.tree.leaves(tree))
  return dict(
      unet_fwd=lambda x: u(st["unet_params"], x),
      unet_grad_x=lambda x: total(jax.grad(u, argnums=1)(st["unet_params"], x)),
      unet_grad_all=lambda x: total(jax.grad(u, argnums=(0, 1))(st["unet_params"], x)),
      pd_fwd=pd,
      pd_grad_x=lambda x: total(jax.grad(pd)(x)),
      downscale_grad=lambda x: total(jax.grad(down, argnums=(0, 1))(x, st["kernel"])))


def bench_parts_jax(cfg, hr_size, iters, repeats, peak):
  """Seconds per call of each part, ``iters`` calls in one compiled loop."""
  st = _parts_setup(cfg, hr_size)
  rows = {}
  for name, f in _parts_jax(st).items():
    # Each call depends on the previous one, so XLA cannot hoist it out of the loop.
    loop = runtime.jit(lambda x, f=f: jax.lax.scan(
        lambda c, _: (c + 1e-12 * f(x + 1e-12 * c), None), jnp.zeros(()), length=iters)[0])
    loop(st["x"]).block_until_ready()
    sec = median_time(lambda: loop(st["x"]).block_until_ready(), repeats) / iters
    flops = st["flops"][name]
    rows[name] = dict(s=sec, flops=flops, flop_s=flops / sec, peak_fraction=flops / sec / peak)
  return rows


@_on_torch_device
def bench_parts_torch(cfg, hr_size, iters, repeats):
  import torch
  from kfjax.bench import torch_ref
  st = _parts_setup(cfg, hr_size)
  cl = torch.channels_last
  unet = torch_ref.load_unet(torch_ref.unet_from_config(cfg, CHANNELS), st["unet_params"]).to(memory_format=cl)
  pd = torch_ref.load_pd(torch_ref.pd_from_config(cfg, CHANNELS), st["pd_params"]).to(memory_format=cl)
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
    rows[name] = dict(s=median_time(run, repeats) / iters)
  return rows


# -- driver -----------------------------------------------------------------------------------

def have_torch():
  try:
    import torch  # noqa: F401
    return True
  except ImportError:
    return False


def _log(msg):
  print(f"throughput: {msg}", file=sys.stderr, flush=True)


def run_all(preset, what, use_torch):
  """Every requested measurement, as one dict (progress on stderr)."""
  out = {"preset": preset, "precision": FLAGS.precision, "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
         "jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "torch": None,
         "conv_backward": ops.conv_backward()}
  if use_torch:
    import torch
    out["torch"] = torch.__version__
    out["torch_threads"] = torch.get_num_threads()
    out["torch_device"] = torch_device()
  peak = matmul_peak(FLAGS.peak_size)
  out["matmul_peak_flop_s"] = peak
  out["peak_size"] = FLAGS.peak_size
  if "phase1" in what:
    _log("phase 1")
    cfg = phase1_config(preset)
    r = bench_phase1_jax(cfg, FLAGS.steps, FLAGS.repeats, peak)
    if use_torch:
      r["torch"] = bench_phase1_torch(cfg, FLAGS.steps, FLAGS.repeats)
      r["speed_vs_torch"] = r["torch"]["step_s"] / r["step_s"]
    out["phase1"] = r
  if "phase2" in what:
    _log("phase 2")
    cfg = phase2_config(preset, FLAGS.iters)
    r = bench_phase2_jax(cfg, FLAGS.hr_size, FLAGS.iters, FLAGS.repeats)
    r["reverse_iterations"] = reverse_iterations(preset)
    r["reverse_estimate_s"] = r["reverse_iterations"] * r["iter_s"]
    if FLAGS.full_reverse:
      r["reverse"] = bench_full_reverse(preset, FLAGS.hr_size)
    r["peak_fraction"] = r["flop_s"] / peak
    if use_torch:
      r["torch"] = bench_phase2_torch(cfg, FLAGS.hr_size, FLAGS.iters, FLAGS.repeats)
      r["torch"]["peak_fraction"] = r["flops_per_iter"] / r["torch"]["iter_s"] / peak
      r["speed_vs_torch"] = r["torch"]["iter_s"] / r["iter_s"]
    out["phase2"] = r
  if "phase1" in out and "phase2" in out:
    out["per_image"] = per_image_estimate(preset_config(preset), out["phase1"], out["phase2"],
                                           peak)
  if "parts" in what:
    _log("phase 2 parts")
    cfg = phase2_config(preset, FLAGS.iters)
    parts = bench_parts_jax(cfg, FLAGS.hr_size, FLAGS.iters, FLAGS.repeats, peak)
    if use_torch:
      for name, row in bench_parts_torch(cfg, FLAGS.hr_size, FLAGS.iters, FLAGS.repeats).items():
        parts[name]["torch_s"] = row["s"]
        parts[name]["speed_vs_torch"] = row["s"] / parts[name]["s"]
    out["parts"] = dict(hr_size=FLAGS.hr_size, rows=parts)
  if "scaling" in what:
    rows = []
    for size in [int(s) for s in FLAGS.sizes]:
      for tile in (0, FLAGS.pd_tile) if FLAGS.pd_tile else (0,):
        _log(f"scaling: HR {size}, PD tile {tile or 'none'}")
        cfg = phase2_config(preset, FLAGS.scaling_iters, tile)
        r = bench_phase2_jax(cfg, size, FLAGS.scaling_iters, 1)
        rows.append(dict(r, pd_tile=tile))
    out["scaling"] = rows
  if "batch" in what:
    rows = []
    total = reverse_iterations(preset)
    for n in [int(s) for s in FLAGS.images]:
      _log(f"{n} images vmapped")
      cfg = phase2_config(preset, FLAGS.iters)
      r = bench_phase2_jax(cfg, FLAGS.hr_size, FLAGS.iters, FLAGS.repeats, images=n)
      r["images_per_hour"] = 3600.0 * n / (total * r["iter_s"])
      rows.append(r)
    out["batch"] = rows
  return out


def _mb(b):
  return "n/a" if b is None else f"{b / 2 ** 20:.0f} MiB"


def _duration(seconds):
  """``seconds`` with a readable unit beside it when it is long (``"623628 s (7.2 days)"``)."""
  for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
    if seconds >= 2 * size:
      return f"{seconds:.0f} s ({seconds / size:.1f} {unit})"
  return f"{seconds:.1f} s"


def format_tables(r):
  """Markdown tables of a :func:`run_all` result."""
  lines = [f"preset `{r['preset']}` ({r.get('precision', 'float32')}), {r['device']}, jax {r['jax']}, torch {r['torch']}"
           f"{' on ' + r['torch_device'] if r.get('torch_device') else ''}, {r['date']}, "
           f"conv gradients: {r.get('conv_backward', 'custom')}",
           f"matmul peak (float32 {r.get('peak_size', FLAGS.peak_size)}² jnp.dot): {r['matmul_peak_flop_s'] / 1e9:.1f} GFLOP/s", ""]
  if "phase1" in r:
    p = r["phase1"]
    xla = "n/a" if p["xla_flops_per_step"] is None else f"{p['xla_flops_per_step'] / 1e9:.1f}"
    lines += ["| Phase 1 | B | P | compile s | s/step | steps/s | GFLOP/step (XLA) | GFLOP/s | % peak | torch s/step | kfjax/torch |",
              "|---|---|---|---|---|---|---|---|---|---|---|",
              f"| PD step | {p['batch']} | {p['crop']} | {p['compile_s']:.1f} | {p['step_s']:.4f} | "
              f"{p['steps_per_s']:.2f} | {p['flops_per_step'] / 1e9:.1f} ({xla}) | {p['flop_s'] / 1e9:.1f} | "
              f"{100 * p['peak_fraction']:.0f} | {p['torch']['step_s'] if 'torch' in p else float('nan'):.4f} | "
              f"{p.get('speed_vs_torch', float('nan')):.2f}× |", ""]
  if "phase2" in r:
    p = r["phase2"]
    full = f"{p['reverse']['seconds']:.1f}" if "reverse" in p else "—"
    lines += ["| Phase 2 | HR | compile s | s/iteration | reverse process s (est. / measured) | memory | torch s/iter | kfjax/torch |",
              "|---|---|---|---|---|---|---|---|",
              f"| inner iteration | {p['hr_size']}² | {p['compile_s']:.1f} | {p['iter_s']:.4f} | "
              f"{p['reverse_estimate_s']:.1f} ({p['reverse_iterations']} it.) / {full} | {_mb(p['memory_bytes'])} | "
              f"{p['torch']['iter_s'] if 'torch' in p else float('nan'):.4f} | {p.get('speed_vs_torch', float('nan')):.2f}× |", ""]
    # The ceiling: at the measured peak, how fast could an iteration be, and what would 1.5×
    # the PyTorch reference take.
    xla = "n/a" if p["xla_flops_per_iter"] is None else f"{p['xla_flops_per_iter'] / 1e9:.1f}"
    t_peak = p["torch"]["peak_fraction"] if "torch" in p else float("nan")
    lines += ["| Phase 2 FLOPs | GFLOP/iteration (XLA) | GFLOP/s | % peak | torch % peak | 1.5× torch needs % peak |",
              "|---|---|---|---|---|---|",
              f"| inner iteration | {p['flops_per_iter'] / 1e9:.1f} ({xla}) | {p['flop_s'] / 1e9:.1f} | "
              f"{100 * p['peak_fraction']:.0f} | {100 * t_peak:.0f} | {150 * t_peak:.0f} |", ""]
  if "per_image" in r:
    e = r["per_image"]
    lines += [f"Per image ({r['phase2']['hr_size']}² HR, compiles excluded): {_duration(e['seconds'])}; Phase 1 "
              f"{e['phase1_steps']} steps × {r['phase1']['step_s']:.4f} s = {_duration(e['phase1_s'])}, reverse "
              f"process {_duration(e['phase2_s'])} ({'measured' if e['phase2_measured'] else 'estimated'})"]
    if "flops" in e:  # runs saved before the FLOP budget was recorded lack it
      lines.append(f"FLOPs per image: {e['flops'] / 1e15:.4g} PFLOP (Phase 1 {e['phase1_flops'] / 1e15:.4g}, "
                   f"reverse process {e['phase2_flops'] / 1e15:.4g}); at the measured matmul peak that is "
                   f"{_duration(e['floor_s'])}")
    lines.append("")
  if "parts" in r:
    lines += [f"| Phase 2 part ({r['parts']['hr_size']}²) | GFLOP | ms | GFLOP/s | % peak | torch ms | kfjax/torch |",
              "|---|---|---|---|---|---|---|"]
    for name, row in r["parts"]["rows"].items():
      lines.append(f"| {name} | {row['flops'] / 1e9:.2f} | {1e3 * row['s']:.1f} | {row['flop_s'] / 1e9:.1f} | "
                   f"{100 * row['peak_fraction']:.0f} | {1e3 * row.get('torch_s', float('nan')):.1f} | "
                   f"{row.get('speed_vs_torch', float('nan')):.2f}× |")
    lines.append("")
  if "scaling" in r:
    lines += ["| HR size | PD | s/iteration | compiled memory | peak RSS so far |", "|---|---|---|---|---|"]
    for row in r["scaling"]:
      pd = f"tiles {row['pd_tile']}²" if row["pd_tile"] else "whole image"
      lines.append(f"| {row['hr_size']}² | {pd} | {row['iter_s']:.4f} | {_mb(row['memory_bytes'])} | "
                   f"{_mb(row['peak_rss_bytes'])} |")
    lines.append("")
  if "batch" in r:
    lines += ["| images vmapped | HR | s/iteration (all images) | images/hour | compiled memory |",
              "|---|---|---|---|---|"]
    for row in r["batch"]:
      lines.append(f"| {row['images']} | {row['hr_size']}² | {row['iter_s']:.4f} | "
                   f"{row['images_per_hour']:.1f} | {_mb(row['memory_bytes'])} |")
    lines.append("")
  return "\n".join(lines)


def parse_for_tests(argv):
  """Parse ``argv`` (flag strings) into FLAGS without running ``main``, for tests."""
  FLAGS.unparse_flags()
  FLAGS(["throughput"] + list(argv))


def main(argv):
  del argv
  if FLAGS.from_json:
    with open(FLAGS.from_json) as f:
      print(format_tables(json.load(f)))
    return
  if FLAGS.conv_backward != "auto":
    os.environ[ops.BACKWARD_ENV] = FLAGS.conv_backward
  use_torch = FLAGS.torch and have_torch() and FLAGS.precision == "float32"
  if FLAGS.torch and FLAGS.precision != "float32":
    print("--precision bfloat16: the PyTorch reference is float32 only, no ratio", file=sys.stderr)
  elif FLAGS.torch and not use_torch:
    print("torch is not installed (pip install -e '.[bench]'): no PyTorch reference", file=sys.stderr)
  result = run_all(FLAGS.preset, set(FLAGS.what), use_torch)
  print(json.dumps(result, indent=2) if FLAGS.json else format_tables(result))


if __name__ == "__main__":
  app.run(main)
