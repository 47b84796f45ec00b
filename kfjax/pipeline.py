"""KernelFusion end to end: one LR image in, kernel + SR image out.

:func:`run` is what ``python -m kfjax.main`` calls and what a notebook calls::

    from kfjax import config, pipeline
    cfg = config.preset("cpu")                   # configs/cpu.py (installed as kfjax.configs)
    summary = pipeline.run("photo.png", cfg, workdir="out/photo")
    print(summary["sr_path"], summary["kernel_path"])

The lower-level pieces are :func:`train_phase1` (returns trained PD parameters) and
:func:`run_phase2` (returns the HR image and kernel as arrays).
"""

import json
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from kfjax import checkpoint as ckpt
from kfjax import io as kio
from kfjax import loop
from kfjax import ops
from kfjax import resize
from kfjax import restore
from kfjax import sampler
from kfjax import train_pd
from kfjax.errors import KfjaxError
from kfjax.models import kernel_net

MIN_LR_SIZE = 16
METHODS = ("kernelfusion", "kernelgan")
PRIORS = ("diffusion", "dip")


def log(msg):
  print(f"kfjax: {msg}", flush=True)


def device_description():
  d = jax.devices()[0]
  kind = getattr(d, "device_kind", d.platform)
  return f"{d.platform}:{kind} x{jax.device_count()}"


def load_kernel(path):
  """A user-given kernel ``.npy``: square 2-D, finite, non-negative; normalised to sum 1."""
  try:
    k = np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise KfjaxError(f"{path}: no such kernel file") from None
  except (OSError, ValueError) as e:
    raise KfjaxError(f"{path}: not a readable .npy kernel ({e})") from None
  k = np.squeeze(k)
  if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] < 1:
    raise KfjaxError(f"{path}: kernel must be a square 2-D array, got shape {k.shape}")
  if not np.issubdtype(k.dtype, np.number) or not np.all(np.isfinite(k)):
    raise KfjaxError(f"{path}: kernel must hold finite numbers")
  k = k.astype(np.float64)
  if k.min() < 0 or k.sum() <= 0:
    raise KfjaxError(f"{path}: kernel must be non-negative with a positive sum")
  return (k / k.sum()).astype(np.float32)


def validate_config(cfg):
  """Raise KfjaxError on config values that cannot work."""
  checks = [
      (int(cfg.scale) == cfg.scale and cfg.scale >= 2, f"scale must be an integer >= 2, got {cfg.scale}"),
      (cfg.train.steps >= 0, "train.steps must be >= 0"),
      (cfg.train.steps_per_chunk >= 1, "train.steps_per_chunk must be >= 1"),
      (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
      (cfg.train.crop_size >= 1, "train.crop_size must be >= 1"),
      (1 <= cfg.sample.num_steps <= cfg.sample.t_start,
       f"sample.num_steps must be in [1, sample.t_start={cfg.sample.t_start}]"),
      (cfg.sample.t_start < cfg.diffusion.num_steps,
       "sample.t_start must be below diffusion.num_steps"),
      (cfg.sample.n_iter_first >= 1 and cfg.sample.n_iter >= 1, "sample.n_iter* must be >= 1"),
      (cfg.sample.iters_per_chunk >= 1 and cfg.sample.checkpoint_every >= 1,
       "sample.iters_per_chunk and sample.checkpoint_every must be >= 1"),
      (int(cfg.sample.num_samples) == cfg.sample.num_samples and cfg.sample.num_samples >= 1,
       f"sample.num_samples must be an integer >= 1, got {cfg.sample.num_samples}"),
      (cfg.sample.pd_tile >= 0, "sample.pd_tile must be >= 0"),
      (cfg.kernel.size >= 0, "kernel.size must be >= 0 (0: 6 x scale)"),
      (cfg.unet.levels >= 1, "unet.levels must be >= 1"),
      (cfg.precision in ("float32", "bfloat16"),
       f"precision must be float32 or bfloat16, got {cfg.get('precision')!r}"),
  ]
  checks += _ablation_checks(cfg)
  for ok, msg in checks:
    if not ok:
      raise KfjaxError(msg)


def _ablation_checks(cfg):
  """``validate_config`` checks of the ablation options and the KernelGAN fields."""
  k, s, g, r = cfg.kernel, cfg.sample, cfg.kernelgan, cfg.restore
  nets = kernel_net.KERNEL_NETS
  ok_net = k.net in nets
  size = sampler.kernel_size(cfg, cfg.scale)
  sizes = tuple(k.cnn_sizes) or kernel_net.linear_cnn_sizes(int(cfg.scale), size)
  return [
      (ok_net, f"kernel.net must be one of {', '.join(nets)}, got {k.net!r}"),
      (k.net != "linear_cnn" or kernel_net.cnn_field(sizes) <= size,
       f"kernel.cnn_sizes {list(sizes)} see {kernel_net.cnn_field(sizes)} px, more than the "
       f"{size}-px kernel (raise kernel.size)"),
      (k.cnn_channels >= 1 and all(int(x) >= 1 for x in sizes),
       "kernel.cnn_sizes and kernel.cnn_channels must be >= 1"),
      (k.init in ("default", "gaussian"), f"kernel.init must be default or gaussian, got {k.init!r}"),
      (k.init_sigma > 0 and k.init_steps >= 1, "kernel.init_sigma must be > 0 and init_steps >= 1"),
      (s.sparsity_weight >= 0, f"sample.sparsity_weight must be >= 0, got {s.sparsity_weight}"),
      (s.tv_weight >= 0, f"sample.tv_weight must be >= 0, got {s.tv_weight}"),
      (s.prior in PRIORS, f"sample.prior must be one of {', '.join(PRIORS)}, got {s.prior!r}"),
      (s.dip_input in ("bicubic", "noise"),
       f"sample.dip_input must be bicubic or noise, got {s.dip_input!r}"),
      (not (s.two_unets and s.prior == "dip"),
       "sample.two_unets needs sample.prior=diffusion (DIP applies the U-Net once)"),
      (cfg.train.t_max == 0 or cfg.sample.t_start <= cfg.train.t_max <= cfg.diffusion.num_steps,
       f"train.t_max must be 0 or in [sample.t_start={cfg.sample.t_start}, "
       f"diffusion.num_steps={cfg.diffusion.num_steps}] (Phase 2 queries PD up to t_start)"),
      (s.lr_schedule in ("per_step", "global"),
       f"sample.lr_schedule must be per_step or global, got {s.lr_schedule!r}"),
      (0 <= k.threshold < 1, f"kernel.threshold must be in [0, 1), got {k.threshold}"),
      (0 <= k.blend <= 1 and k.blend_sigma > 0,
       f"kernel.blend must be in [0, 1] and kernel.blend_sigma > 0, got {k.blend}, "
       f"{k.blend_sigma}"),
      (r.init in ("phase2", "bicubic"), f"restore.init must be phase2 or bicubic, got {r.init!r}"),
      (r.weight >= 0 and r.steps >= 1 and r.lr > 0 and 0 < r.lr_end <= r.lr and r.eps > 0,
       "restore.weight must be >= 0, steps >= 1, 0 < lr_end <= lr and eps > 0"),
      (g.iterations >= 1 and g.steps_per_chunk >= 1 and g.batch_size >= 1,
       "kernelgan.iterations, steps_per_chunk and batch_size must be >= 1"),
      (g.crop_size >= 4 and g.d_depth >= 2 and g.d_kernel >= 1 and g.g_channels >= 1
       and g.d_channels >= 1 and len(g.g_sizes) >= 1 and all(int(x) >= 1 for x in g.g_sizes),
       "kernelgan.crop_size >= 4, d_depth >= 2, and sizes/channels >= 1 are required"),
      (g.lr > 0 and g.switch_iter >= 0 and g.lambda_update_freq >= 1,
       "kernelgan.lr must be > 0, switch_iter >= 0, lambda_update_freq >= 1"),
  ]


def pd_fingerprint(cfg, lr_image):
  """Identifies a trained PD: the image and every field that shapes its training."""
  return ckpt.fingerprint(np.asarray(lr_image), cfg.pd.to_dict(), cfg.train.to_dict(),
                          cfg.diffusion.to_dict(), cfg.seed, *precision_part(cfg))


def precision_part(cfg):
  """``(precision,)`` for checkpoint fingerprints, or ``()`` at the float32 default, so
  float32 checkpoints written before the field existed keep their fingerprint."""
  p = cfg.get("precision", "float32")  # (configs stored before the field existed lack it)
  return () if p == "float32" else (p,)


def train_phase1(cfg, lr_image, workdir=None, show_progress=True):
  """Train PD on ``lr_image`` (h, w, C in [−1, 1]) or restore it from ``workdir``.

  Returns ``(model, params, info)`` where ``info`` says what happened.
  """
  model = train_pd.make_model(cfg, lr_image.shape[-1])
  sched = train_pd.make_schedule(cfg)
  tx = train_pd.make_optimizer(cfg)
  # Jitted: eager parameter initialisation costs seconds per layer on CPU.
  state = ops.jit(lambda k: train_pd.init_state(cfg, model, tx, lr_image.shape, k))(
      jax.random.key(cfg.seed))
  total = int(cfg.train.steps)
  fp = pd_fingerprint(cfg, lr_image)
  saver = ckpt.PhaseCheckpoint(workdir, "pd", fp) if workdir else None
  info = {"steps": total, "restored_step": None, "final_loss": None}
  if saver is not None:
    stored = saver.stored_fingerprint()
    if stored is not None and stored != fp:
      raise KfjaxError(
          f"{workdir} holds a patch-diffusion model trained on another image or config; "
          "use another --workdir (or delete its checkpoints/ folder)")
    step = saver.latest_step()
    if step is not None:
      state = saver.restore(step, state)
      info["restored_step"] = int(step)
      if show_progress:  # (quiet for library callers such as the benchmark)
        log(f"restored patch diffusion from {saver.path} at step {step}/{total}")
  done = int(state.step)
  if done >= total:
    return model, state.params, info

  chunk_len = ops.chunk_size(total, int(cfg.train.steps_per_chunk))
  chunk = train_pd.make_train_chunk(cfg, model, sched, tx, lr_image, chunk_len)
  every = max(int(cfg.train.checkpoint_every), chunk_len)
  bar = tqdm.tqdm(total=total, initial=done, desc="phase 1 (patch diffusion)", unit="step",
                  disable=not show_progress, dynamic_ncols=True)
  last = {}

  def report(losses, at):
    last["loss"] = loop.finite(losses, "phase 1 loss", f"step {at}")
    return {"loss": f"{last['loss']:.4f}"}

  def after(state, at):
    if saver is not None and (at % every < chunk_len or at >= total):
      saver.save(at, state)
  state, _ = loop.run_chunks(chunk, state, done=done, total=total, length=chunk_len, bar=bar,
                             report=report, after=after, lag=True)
  bar.close()
  if saver is not None:
    saver.wait()
  info["final_loss"] = last["loss"]
  return model, state.params, info


def sample_keys(seed, num_samples):
  """Phase 2 PRNG keys ``(init_key, noise_key)`` of samples ``0 … n−1``.

  Sample 0 uses ``key(seed + 1)`` and ``key(seed + 2)`` (exactly the single run),
  sample ``j`` those keys folded with ``j``; with ``num_samples > 1`` they come stacked
  (shape ``(n,)``), otherwise as the two single keys.
  """
  def stack(base):
    if num_samples == 1:
      return base
    rest = jax.vmap(lambda j: jax.random.fold_in(base, j))(jnp.arange(1, num_samples))
    return jnp.concatenate([base[None], rest])
  return stack(jax.random.key(seed + 1)), stack(jax.random.key(seed + 2))


# summary key <- Phase2Metrics field, for the last iteration of a run
_FINAL_LOSSES = (("final_loss", "loss"), ("final_consistency_a", "cons_a"),
                 ("final_consistency_b", "cons_b"), ("final_com", "com"))


def run_phase2(cfg, pd_model, pd_params, lr_image, scale, fixed_kernel=None, workdir=None,
               fingerprint_parts=(), show_progress=True, finish=True):
  """Reverse diffusion with joint U-Net / kernel optimisation.

  Returns ``(hr_image in [−1, 1], kernel (K, K), info)``; checkpoints every chunk
  into ``workdir`` and resumes from there. With ``sample.num_samples = N > 1``, N
  independent runs (keys from :func:`sample_keys`) are made and the result is their
  mean: the mean of the N images (each clipped to [−1, 1]) and of the N kernels. With
  ``sample.vmap_samples`` the N runs go through one vmapped program (for accelerators);
  otherwise one after another through the same compiled program (faster on XLA:CPU,
  where vmapped convolutions become slow grouped ones); sample j is the same run either
  way, up to float rounding.

  With ``finish`` (the default) the result then goes through :func:`finish_phase2`
  (the kfjax options ``kernel.threshold``, ``kernel.blend`` and ``restore.final``);
  ``finish=False`` returns Phase 2's own image and kernel.
  """
  sched = train_pd.make_schedule(cfg)
  p2 = sampler.Phase2(cfg, pd_model, pd_params, sched, lr_image.shape, scale, fixed_kernel)
  lr_image = jnp.asarray(lr_image, jnp.float32)
  n = int(cfg.sample.num_samples)
  together = n if bool(cfg.sample.vmap_samples) else 1
  init_keys, rngs = sample_keys(int(cfg.seed), n)
  total = p2.total_iterations
  mode = "nonblind" if fixed_kernel is not None else "blind"
  fp = ckpt.fingerprint(np.asarray(lr_image), *fingerprint_parts, cfg.unet.to_dict(),
                        _without(cfg.kernel, "threshold", "blend", "blend_sigma"),
                        _without(cfg.sample, "iters_per_chunk", "checkpoint_every"), int(scale),
                        mode, None if fixed_kernel is None else np.asarray(fixed_kernel),
                        *precision_part(cfg), sampler.STATE_VERSION)
  info = {"steps": p2.num_steps, "iterations": total, "mode": mode, "samples": n,
          "restored_step": None}
  chunk_len = ops.chunk_size(total, int(cfg.sample.iters_per_chunk))
  chunk = p2.make_chunk(chunk_len, batch=None if together == 1 else together)
  every = int(cfg.sample.checkpoint_every)
  # One group of samples per program run: all N vmapped, or sample j alone (j = 0 … N−1;
  # with N = 1 the keys are the single run's, unstacked).
  groups = [slice(0, n)] if together > 1 else list(range(n))
  init = ops.jit(p2.init_batch if together > 1 else p2.init)
  desc = f"phase 2 ({mode} reverse diffusion{f', {n} samples' if n > 1 else ''})"
  bar = tqdm.tqdm(total=total * len(groups), desc=desc, unit="it", disable=not show_progress,
                  dynamic_ncols=True)
  hrs, kernels, last = [], [], []
  for group in groups:
    pick = (lambda keys: keys) if n == 1 else (lambda keys: keys[group])
    if together > 1:
      lr_in, name, label = jnp.broadcast_to(lr_image, (n,) + lr_image.shape), "phase2", "phase 2"
    elif n > 1:
      lr_in, name, label = lr_image, f"phase2-sample{group}", f"phase 2 sample {group}"
    else:
      lr_in, name, label = lr_image, "phase2", "phase 2"
    state, rng = init(lr_in, pick(init_keys)), pick(rngs)
    saver = ckpt.PhaseCheckpoint(workdir, name, fp) if workdir else None
    if saver is not None:
      if saver.stored_fingerprint() not in (None, fp):
        log("discarding a phase 2 checkpoint made with other settings")
        saver.reset()
      step = saver.latest_step()
      if step is not None:
        state = saver.restore(step, state)
        info["restored_step"] = int(state.step)
        if show_progress:
          log(f"resuming {label} from reverse step {int(state.step)}/{p2.num_steps}")
    done = p2.iterations_done(state)
    bar.update(done)
    saved = [int(state.step)]

    def report(m, at):
      loss = loop.finite(m.loss[-1], "phase 2 loss", f"iteration {at}")
      return {"t": int(m.t[-1]), "loss": f"{loss:.5f}"}

    def after(state, at):
      # A checkpoint (labelled by iterations done) whenever the step counter passes a
      # multiple of checkpoint_every, and at the end.
      step = int(state.step)
      if saver is not None and (step // every > saved[0] // every or at >= total):
        saver.save(at, state)
        saved[0] = step
    state, metrics = loop.run_chunks(lambda s: chunk(s, lr_in, rng), state, done=done,
                                     total=total, length=chunk_len, bar=bar, report=report,
                                     after=after)
    if saver is not None:
      saver.close()
    # The last iteration's losses (per sample of the group); kept with the checkpoint so
    # that a run restored finished still reports them.
    if metrics is not None:
      final = {f: np.atleast_1d(np.asarray(getattr(metrics, f)[-1], np.float64)).tolist()
               for _, f in _FINAL_LOSSES}
      if saver is not None:
        saver.save_extra(final_metrics=final)
    else:
      final = saver.extra("final_metrics") if saver is not None else None
    if final is not None:
      last.append(final)
    if together > 1:
      hr, kernel = jax.vmap(lambda params, x0: p2.result(state._replace(params=params, x0=x0)))(
          state.params, state.x0)  # (the step counter is shared, not per sample)
    else:
      hr, kernel = (a[None] for a in p2.result(state))
    hrs.append(np.asarray(hr))
    kernels.append(np.asarray(kernel))
  bar.close()
  if len(last) == len(groups):  # (not for a checkpoint finished before losses were kept)
    for key, field in _FINAL_LOSSES:
      value = np.concatenate([np.asarray(m[field], np.float64) for m in last])
      info[key] = float(value.mean())  # the samples' mean when N > 1
      if n > 1:
        info[key + "_per_sample"] = [float(v) for v in value]
  hr, kernel = np.concatenate(hrs), np.concatenate(kernels)
  if n == 1:
    hr, kernel = hr[0], kernel[0]
  else:
    hr = np.clip(hr.astype(np.float64), -1.0, 1.0).mean(axis=0).astype(np.float32)
    kernel = kernel.astype(np.float64).mean(axis=0)
    kernel = (kernel / kernel.sum()).astype(np.float32)
  if finish:
    hr, kernel, extra = finish_phase2(cfg, lr_image, hr, kernel, scale, fixed_kernel is None)
    info.update(extra)
  return hr, kernel, info


def finish_kernel(cfg, kernel, scale):
  """A blind run's kernel after the kfjax options ``kernel.threshold`` (taps below that
  fraction of the maximum zeroed, :func:`kernel_net.threshold_kernel`) and then
  ``kernel.blend`` (mixed with a centred Gaussian of std ``kernel.blend_sigma × scale``,
  :func:`kernel_net.blend_kernel`). Either at 0 leaves the kernel as it is."""
  k = cfg.kernel
  if k.threshold > 0:
    kernel = kernel_net.threshold_kernel(kernel, k.threshold)
  if k.blend > 0:
    kernel = kernel_net.blend_kernel(kernel, k.blend, k.blend_sigma * int(scale))
  return kernel


def finish_phase2(cfg, lr_image, hr, kernel, scale, blind):
  """What follows Algorithm 1 (kfjax options, all off in the paper's setting): the
  kernel through :func:`finish_kernel` (blind runs only), then with ``restore.final``
  the image re-solved with it (:func:`final_restore`). Images in [−1, 1]; returns
  ``(hr, kernel, info)``."""
  info = {}
  if blind:
    kernel = finish_kernel(cfg, kernel, scale)
  if cfg.restore.final:
    hr, info["final_restore"] = final_restore(cfg, lr_image, hr, kernel, scale)
  return hr, kernel, info


def _without(block, *keys):
  """``block.to_dict()`` without ``keys``: fields that change neither Phase 2's state nor
  its result (dispatch and checkpoint granularity, post-processing applied afterwards),
  kept out of the checkpoint fingerprint so that a checkpoint survives them."""
  d = block.to_dict()
  for key in keys:
    d.pop(key, None)
  return d


def final_restore(cfg, lr_image, hr, kernel, scale):
  """``restore.final``: the HR image re-solved with ``kernel`` by :mod:`kfjax.restore`
  (TV-regularised least squares), from ``hr`` or the bicubic upscale (``restore.init``).
  Images in [−1, 1]; returns ``(hr, info)``."""
  t0 = time.time()
  x_init = (np.asarray(hr) + 1.0) / 2.0 if cfg.restore.init == "phase2" else None
  x, values = restore.solve_cfg((np.asarray(lr_image) + 1.0) / 2.0,
                                kernel_net.export_kernel(kernel), scale, cfg.restore, x_init)
  info = {"init": cfg.restore.init, "final_loss": float(values[-1]),
          "seconds": round(time.time() - t0, 2)}
  return np.asarray(x) * 2.0 - 1.0, info


def run(image_path, cfg, workdir, kernel_path=None, show_progress=True, method="kernelfusion"):
  """Run KernelFusion on one image file and write every output into ``workdir``.

  Outputs: ``sr.png``, ``kernel.npy``, ``kernel.png``, ``bicubic.png``,
  ``config.json``, ``summary.json``. Returns the summary dict.

  ``method="kernelgan"`` estimates the kernel with KernelGAN (``kfjax.kernelgan``,
  ``cfg.kernelgan``) and then runs the non-blind Phase 2 with it (Phase 1 still trains
  PD, which Phase 2 needs). With ``sample.prior = "dip"`` Phase 1 is skipped (no PD).
  """
  t_start = time.time()
  validate_config(cfg)
  if method not in METHODS:
    raise KfjaxError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
  if method == "kernelgan" and kernel_path:
    raise KfjaxError("--kernel and --method kernelgan exclude each other (KernelGAN estimates it)")
  scale = int(cfg.scale)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    img, info = kio.load_image(image_path, min_size=MIN_LR_SIZE)
  for w in caught:
    log(f"warning: {w.message}")
  fixed = load_kernel(kernel_path) if kernel_path else None
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise KfjaxError(f"{workdir}: cannot create the workdir ({e.strerror or e})") from None
  if not os.access(workdir, os.W_OK):
    raise KfjaxError(f"{workdir}: workdir is not writable")
  log(f"preset '{cfg.name}' on {device_description()}; image {info.width}x{info.height}x"
      f"{info.channels} ({info.bit_depth}-bit {info.format}), scale x{scale}, "
      f"{'non-blind (kernel given)' if fixed is not None else 'blind'}"
      f"{', KernelGAN kernel + non-blind phase 2' if method == 'kernelgan' else ''}")
  kio.save_text_atomic(os.path.join(workdir, "config.json"), cfg.to_json_best_effort(indent=2))

  bicubic = np.clip(np.asarray(resize.upscale(jnp.asarray(img), scale)), 0.0, 1.0)
  kio.save_image(os.path.join(workdir, "bicubic.png"), bicubic, bit_depth=info.bit_depth)

  kg_info = None
  if method == "kernelgan":
    from kfjax import kernelgan  # noqa: PLC0415 (only this method needs it)
    log(f"estimating the kernel with KernelGAN ({cfg.kernelgan.iterations} iterations)")
    fixed, kg_info = kernelgan.estimate_kernel(img, scale, cfg, show_progress)

  lr_m = img * 2.0 - 1.0
  t0 = time.time()
  if cfg.sample.prior == "dip":
    pd_model = pd_params = None
    p1 = {"steps": 0, "restored_step": None, "final_loss": None, "skipped": "sample.prior=dip"}
  else:
    pd_model, pd_params, p1 = train_phase1(cfg, lr_m, workdir, show_progress)
  t1 = time.time()
  hr, kernel, p2 = run_phase2(cfg, pd_model, pd_params, lr_m, scale, fixed, workdir,
                              fingerprint_parts=(pd_fingerprint(cfg, lr_m),),
                              show_progress=show_progress)
  t2 = time.time()

  sr = np.clip((hr + 1.0) / 2.0, 0.0, 1.0)
  kernel = kernel_net.export_kernel(kernel)
  paths = {name: os.path.join(workdir, name) for name in
           ("sr.png", "kernel.npy", "kernel.png", "bicubic.png", "config.json", "summary.json")}
  kio.save_image(paths["sr.png"], sr, bit_depth=info.bit_depth)
  kio.save_array_atomic(paths["kernel.npy"], kernel)
  kio.save_kernel_png(paths["kernel.png"], kernel)
  summary = {
      "image": os.path.abspath(image_path),
      "preset": cfg.name,
      "method": method,
      "device": device_description(),
      "mode": p2["mode"],
      "scale": scale,
      "lr_size": [info.height, info.width, info.channels],
      "sr_size": list(sr.shape),
      "bit_depth": info.bit_depth,
      "kernel_size": int(kernel.shape[0]),
      "phase1": {**p1, "seconds": round(t1 - t0, 2)},
      "phase2": {**p2, "seconds": round(t2 - t1, 2)},
      "total_seconds": round(time.time() - t_start, 2),
      "sr_path": os.path.abspath(paths["sr.png"]),
      "kernel_path": os.path.abspath(paths["kernel.npy"]),
  }
  if kg_info is not None:
    summary["kernelgan"] = kg_info
  kio.save_text_atomic(paths["summary.json"], json.dumps(summary, indent=2))
  log(f"done in {summary['total_seconds']:.1f} s (phase 1 {t1 - t0:.1f} s, phase 2 {t2 - t1:.1f} s); "
      f"outputs in {os.path.abspath(workdir)}")
  return summary
