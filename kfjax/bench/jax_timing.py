"""Measuring helpers and the JAX timings of the throughput benchmark.

The helpers time calls, compiles and whole programs and read a compiled program's memory
and XLA's FLOP count; the ``bench_*_jax`` functions build Phase 1's step, Phase 2's
iteration and its parts as training and sampling compile them, and time them. They take
configs and sizes as arguments and read no flags, so tests and scripts call them directly
(:mod:`kfjax.bench.throughput` turns its flags into those arguments), and
:mod:`kfjax.bench.torch_timing` builds its inputs with the same functions
(:func:`random_image`, :func:`parts_setup`), so both sides time the same work.
"""

import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from kfjax import config as config_lib
from kfjax import degrade
from kfjax import phase1
from kfjax import phase2
from kfjax import runtime
from kfjax import schedule as sch
from kfjax.bench import flops as flops_lib
from kfjax.models import pd as pd_lib


# -- measuring --------------------------------------------------------------------------------

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


# -- inputs -----------------------------------------------------------------------------------

def random_image(size, seed=0):
  """A ``size × size`` float32 image, uniform in [-1, 1]: what is timed does not depend on
  the content, and a seed makes the JAX and PyTorch timings see the same one."""
  return np.random.default_rng(seed).uniform(-1, 1, (size, size, flops_lib.CHANNELS)).astype(np.float32)


def _init_pd(model):
  """Freshly initialised PD parameters (the benchmarks time PD, not its training)."""
  return runtime.jit(lambda k: model.init(k, jnp.zeros((1, 16, 16, flops_lib.CHANNELS)),
                                          jnp.ones((1,))))(jax.random.key(1))


# -- Phase 1 ----------------------------------------------------------------------------------

def bench_phase1_jax(cfg, steps, repeats, peak):
  """Seconds per PD step inside the compiled ``steps``-step chunk, and FLOP counts."""
  crop, batch = int(cfg.train.crop_size), int(cfg.train.batch_size)
  image = random_image(max(2 * crop, 64))
  model = phase1.make_model(cfg, flops_lib.CHANNELS)
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
  flops = 3 * batch * flops_lib.pd_flops(cfg, crop)
  # XLA's own count of one step (forward + backward), outside the scan.
  size = crop + 2 * pd_lib.HALO
  x = jnp.zeros((batch, size, size, flops_lib.CHANNELS))
  t = jnp.ones((batch,), jnp.int32)
  grad = runtime.jit(jax.grad(lambda p: phase1.loss_fn(model, sched, p, x, t, x)))
  xla = xla_flops(grad.lower(state.params).compile())
  return dict(batch=batch, crop=crop, compile_s=compile_s, step_s=per_step, steps_per_s=1 / per_step,
              flops_per_step=flops, xla_flops_per_step=xla, flop_s=flops / per_step,
              peak_fraction=flops / per_step / peak)


# -- Phase 2 ----------------------------------------------------------------------------------

def reverse_iterations(preset):
  """Inner iterations of the preset's whole reverse process of one image."""
  s = config_lib.preset(preset).sample
  return int(s.n_iter_first) + (int(s.num_steps) - 1) * int(s.n_iter)


def _phase2_setup(cfg, hr_size, images=None):
  scale = int(cfg.scale)
  lr_side = hr_size // scale
  model = phase1.make_model(cfg, flops_lib.CHANNELS)
  sched = sch.from_config(cfg)
  pd_params = _init_pd(model)
  p2 = phase2.Phase2(cfg, model, pd_params, sched, (lr_side, lr_side, flops_lib.CHANNELS))
  if images is None:
    lr = jnp.asarray(random_image(lr_side, 2))
    state = runtime.jit(p2.init)(lr, jax.random.key(3))
    rng = jax.random.key(4)
  else:
    lr = jnp.asarray(np.stack([random_image(lr_side, 2 + i) for i in range(images)]))
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
    flops = flops_lib.phase2_flops(cfg, hr_size)
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


def bench_full_reverse(cfg, hr_size):
  """Wall time of the whole reverse process of one image (``cfg``'s steps and iterations),
  one compiled program."""
  p2, state, lr, rng = _phase2_setup(cfg, hr_size)
  chunk, compile_s = compile_timed(p2.make_chunk(p2.total_iterations), state, lr, rng)
  t0 = time.perf_counter()
  jax.block_until_ready(chunk(state, lr, rng))
  return dict(compile_s=compile_s, seconds=time.perf_counter() - t0)


# -- Phase 2, part by part --------------------------------------------------------------------

PARTS = ("unet_fwd", "unet_grad_x", "unet_grad_all", "pd_fwd", "pd_grad_x", "downscale_grad")


def parts_setup(cfg, hr_size):
  """Each part's networks, parameters and inputs at ``hr_size``², and its FLOPs; the JAX and
  PyTorch timings of the parts both start from these, so they time the same work."""
  scale = int(cfg.scale)
  ksize = phase2.kernel_size(cfg)
  unet = phase2.make_unet(cfg, flops_lib.CHANNELS)
  model = phase1.make_model(cfg, flops_lib.CHANNELS)
  x = jnp.asarray(random_image(hr_size, 5))
  lr = jnp.asarray(random_image(-(-hr_size // scale), 6))
  unet_params = runtime.jit(unet.init)(jax.random.key(0), x[None])
  pd_params = _init_pd(model)
  kernel = jnp.full((ksize, ksize), 1.0 / ksize ** 2)
  unet_f, _ = flops_lib.unet_flops(cfg, hr_size, hr_size)
  pd_f = flops_lib.pd_flops(cfg, hr_size)
  down_f = flops_lib.downscale_flops(cfg, hr_size)
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
  st = parts_setup(cfg, hr_size)
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
