"""The configuration every preset starts from (presets in ``configs/`` change sizes).

Every field can be overridden on the command line, e.g. ``--config.train.steps=2000``.
"""

import ml_collections

DTYPES = ("float32", "bfloat16")


def base_config():
  cfg = ml_collections.ConfigDict()
  cfg.name = "base"
  cfg.seed = 0
  cfg.scale = 4
  # Compute dtype of the two convolutional networks (PD and the U-Net): "float32", or
  # "bfloat16" for mixed precision (parameters, optimiser state, losses, the kernel and
  # the schedule stay float32; meant for accelerators with bf16 matrix units).
  cfg.precision = "float32"

  cfg.diffusion = ml_collections.ConfigDict(dict(num_steps=1000, beta_start=1e-4, beta_end=0.02))

  # Phase 1: patch diffusion (appendix A.2).
  cfg.pd = ml_collections.ConfigDict(dict(channels=128, num_blocks=5, emb_dim=128))
  cfg.train = ml_collections.ConfigDict(dict(
      steps=100_000,        # paper: 600k; 100k costs ~0.07 dB (appendix E)
      batch_size=32,
      crop_size=64,
      lr=1e-4,
      lr_end=1e-6,          # cosine annealing target
      steps_per_chunk=500,  # optimiser steps per dispatch (lax.scan)
      checkpoint_every=10_000,
      # Highest noise level PD is trained on (0: all of 1 … diffusion.num_steps, the
      # paper). Phase 2 only queries PD at t <= sample.t_start; t_max = t_start spends all
      # of Phase 1 there (a kfjax option).
      t_max=0,
  ))

  # Phase 2: reverse diffusion with joint U-Net / kernel optimisation (appendix A.1, A.3-A.4).
  cfg.unet = ml_collections.ConfigDict(dict(base_channels=32, levels=5, max_channels=512,
                                            residual=False, upsample="bilinear"))
  cfg.kernel = ml_collections.ConfigDict(dict(
      size=0,               # 0: 6 × scale (24 at ×4, as in the paper)
      # Kernel network (appendix C.1): "inr" (SIREN, the paper's choice), "direct_relu" /
      # "direct_sigmoid" (the K×K entries as free parameters), "linear_cnn" (a deep
      # linear CNN that downscales the image; its kernel is the net applied to a delta).
      net="inr",
      width=256, depth=5, omega=5.0,   # SIREN ("inr")
      cnn_sizes=(),         # "linear_cnn" layer sizes, last one strided; (): [7,7,5,3,1,4] at ×4
      cnn_channels=32,      # "linear_cnn" hidden channels (appendix C.1: 32)
      # How the INR starts: "default" (as initialised: an almost uniform K×K box, the
      # paper's setup) or "gaussian" (fitted to an isotropic Gaussian of std
      # init_sigma × scale HR pixels in init_steps Adam steps before Phase 2).
      init="default",
      init_sigma=0.25,      # tuned on the cpu preset (BENCHMARKS.md, "Tuning")
      init_steps=1000,
      # After Phase 2, taps below threshold × the kernel's maximum are zeroed and the rest
      # renormalised (kernel_net.threshold_kernel; KernelGAN's post-processing, not in
      # KernelFusion). 0: off. Blind runs only; restore.final then uses the cleaned kernel.
      threshold=0.0,
      # Then (after any threshold) the kernel becomes (1 − blend)·k + blend·g, g a centred
      # isotropic Gaussian of std blend_sigma × scale (kernel_net.blend_kernel; a kfjax
      # option): shrinks an estimate toward a small generic blur, which costs little when
      # the estimate is right and bounds the damage when Phase 2's kernel is wrong or too
      # wide. 0: off. Blind runs only.
      blend=0.0,
      blend_sigma=0.35,
  ))
  cfg.sample = ml_collections.ConfigDict(dict(
      t_start=200,          # first noise level (unofficial port: 200)
      num_steps=200,        # reverse steps from t_start to 1 (200 = every step)
      eta=1.0,              # 1: DDPM posterior step (Algorithm 1); 0: deterministic DDIM
      n_iter_first=100,
      n_iter=20,
      lr=1e-4,
      lr_end=1e-5,
      # "per_step": the learning rate is cosine-annealed from lr to lr_end within every
      # reverse step and restarts at lr at the next (Algorithm 1; Adam state carried over);
      # "global": one cosine from lr to lr_end over all of Phase 2's iterations (a kfjax
      # option).
      lr_schedule="per_step",
      com_weight=1e-2,      # centre-of-mass weight (not published)
      sparsity_weight=0.0,  # λ_sp·mean((|k|+ε)^0.2), KernelGAN's sparsity prior (0: off, paper)
      # λ_tv·(TV(a) + TV(b)): kfjax.restore's total variation of both U-Net outputs (images
      # in [−1, 1]), × (s/2)² at scales other than 2. The consistency alone lets the U-Net
      # ring or over-sharpen (and the kernel widen to match); 0: off (the paper).
      tv_weight=0.0,
      # Independent runs of Phase 2 (own U-Net/kernel init and noise); sr.png and
      # kernel.npy are their means (a kfjax option; 1: the paper's single run).
      num_samples=1,
      # True runs them as one vmapped program. Off by default: vmapped, each convolution
      # over the runs' own weights becomes a grouped one, and the same program vmapped over
      # images ran 2.5x slower per image on an H200 (BENCHMARKS.md), as on XLA:CPU.
      vmap_samples=False,
      iters_per_chunk=20,   # Adam iterations per dispatch (the progress bar's granularity)
      checkpoint_every=20,  # reverse steps between checkpoints (and at the end)
      pd_tile=0,            # 0: PD on the whole image; N: N×N tiles (+7 px halo)
      pd_tile_batch=0,      # tiles per vmapped batch (0: all at once)
      two_unets=False,      # True: separate U-Nets before and after PD (appendix C.2)
      prior="diffusion",    # "dip": no PD, the U-Net alone (Deep-Image-Prior ablation, C.1)
      dip_input="bicubic",  # "dip" network input: "bicubic" upscale or fixed "noise"
  ))

  # TV-regularised non-blind restoration (kfjax.restore): the benchmark's tv_nonblind /
  # tv_blind methods, and with final=True a last step of every run (a kfjax option, not in
  # the paper): the SR image re-solved with the kernel Phase 2 found, started from Phase
  # 2's image (init="phase2") or the bicubic upscale ("bicubic").
  cfg.restore = ml_collections.ConfigDict(dict(
      final=False,
      init="phase2",
      weight=1e-4,          # TV weight at x2 for [0, 1] images; x (s/2)^2 at other scales
      steps=1500,           # Adam steps, lr cosine-annealed from lr to lr_end
      lr=1e-2,
      lr_end=1e-4,
      eps=1e-3,             # Charbonnier smoothing of the TV term
  ))

  # KernelGAN (Bell-Kligler et al. 2019) as a kernel estimator (``--method kernelgan``);
  # defaults are the paper's. Phase 2 then runs non-blind with its kernel.
  cfg.kernelgan = ml_collections.ConfigDict(dict(
      iterations=3000,      # G and D steps (one each per iteration)
      lr=2e-4,              # Adam, both networks
      beta1=0.5,
      g_sizes=(7, 5, 3, 1, 1, 1),  # deep linear generator, last layer strided (×2)
      g_channels=64,
      d_channels=64,
      d_depth=7,            # discriminator layers: one d_kernel² conv, then 1×1 convs
      d_kernel=7,           # discriminator receptive field (patch size it judges)
      crop_size=64,         # G's input crop (LR pixels); D compares crop_size/2-ish patches
      batch_size=1,
      w_sum2one=0.5,        # regulariser weights on G's explicit kernel
      w_boundaries=0.5,
      w_sparse=5.0,         # from switch_iter on (0 before)
      w_centralized=1.0,    # from switch_iter on (0 before)
      w_bicubic=5.0,        # G ≈ bicubic ÷2 at the start; ÷100 at switch_iter and every
      switch_iter=200,      # lambda_update_freq iterations after it
      lambda_update_freq=200,
      kernel_size=0,        # G's kernel grid at ×2; 0: its receptive field rounded up to even
      centre="pixel",       # G trained centred on its field's pixel, moved ½ px after ("grid":
                            # centred on the even grid while training; leans diagonally)
      steps_per_chunk=100,  # iterations per dispatch (lax.scan)
      checkpoint_every=500, # iterations between checkpoints in the command line's workdir
  ))

  # DDM4IP (seed 003, §4.4 / B.4) as a kernel estimator (``--method ddm4ip``); defaults
  # are the paper's where it gives them. The SR image is then the TV restoration above.
  cfg.ddm4ip = ml_collections.ConfigDict(dict(
      patch=32,             # flow model's patch size (LR pixels)
      channels=64,          # velocity U-Net: channels·2^i at level i (~4M parameters at
      levels=3,             # 64/3 with emb_dim 256; the paper gives only the size)
      emb_dim=256,
      flow_steps=2000,      # step 1: CFM on the image's patches (1M patches)
      flow_batch=512,
      flow_lr=1e-2,         # Adam, 5 % warm-up then cosine to 1 % (kfjax's schedule)
      flow_ema=0.999,       # EMA of the weights: the model used in step 2
      match_steps=8000,     # step 2: distribution matching (512k samples)
      match_batch=64,
      aux_lr=1e-5,          # the auxiliary flow (started from step 1's)
      kernel_lr=8e-5,       # the kernel net
      g_sizes=(7, 5, 5, 1), # deep linear kernel net, last layer strided, no biases
      g_channels=64,
      kernel_size=0,        # explicit kernel's grid; 0: the field rounded up to the scale's parity
      w_sum2one=0.1,
      w_center=0.01,
      w_sparse=0.1,
      weighting="score",    # IKL gradient: score difference (t/(1-t)·Δv) or "velocity" (Δv)
      t_max=0.95,           # IKL's times drawn from U[0, t_max] (t/(1-t) diverges at 1)
      steps_per_chunk=100,
      checkpoint_every=500, # steps (of each stage) between checkpoints in the workdir
      # kfjax options, off in the paper's setting (BENCHMARKS.md, "DDM4IP and IKE"):
      threshold=0.0,        # its kernel's post-processing, as kernel.threshold / blend do
      blend=0.0,            # for KernelFusion's (the same functions and blend_sigma)
      normalise=False,      # fake patches through the kernel divided by its sum
      max_radius=0.0,       # a kernel with an RMS radius above this × the scale is replaced
                            # by the generic Gaussian (kernel.blend_sigma); 0: off
      x4="compose",         # at x4: "compose" the x2 kernel with itself (as KernelGAN), or
                            # match a x4 kernel net "direct"ly (smaller patches fit)
      on_diverge="last_healthy",  # a diverged matching (the kernel's sum off 1 by > 0.25)
                            # gives its last healthy chunk's kernel, or the "generic" Gaussian
  ))

  # IKE (seed 002) as a blind SR method (``--method ike``): kernel and SR image from one
  # invertible network; defaults are the paper's where it gives them.
  cfg.ike = ml_collections.ConfigDict(dict(
      iterations=3000,      # encoding + decoding phase per iteration
      couplings=4,          # K tri-channel coupling layers per downscaling block
      hidden=32,            # φ, σ, ρ hidden channels (not given in the paper)
      u_layers=8,           # Z-upsampling module: 8 hidden layers of 64 channels
      u_channels=64,
      d_channels=64,        # PD1, PD2: KernelGAN's discriminator
      d_depth=7,
      d_kernel=7,
      d_batch="separate",   # PD on real and fake as separate batches (KernelGAN's) or "joint"
      lr=2e-4,              # Adam as KernelGAN's (not given in the paper)
      beta1=0.5,
      w_energy_start=4.0,   # energy weight, 4 falling linearly to 1
      w_energy_end=1.0,
      energy_size=9,        # the energy loss's mean filter
      w_bwd=5.0,
      w_tv=1.0,
      w_inter=5.0,
      crop=64,              # LR crop per iteration (multiple of s²)
      kernel_size=0,        # impulse-response kernel's grid; 0: 6 x scale
      steps_per_chunk=100,
      checkpoint_every=500, # iterations between checkpoints in the workdir
  ))
  return cfg


def compute_dtype(cfg):
  """The networks' compute dtype from ``cfg.precision`` (``float32`` or ``bfloat16``)."""
  import jax.numpy as jnp  # noqa: PLC0415 (the config itself needs no JAX)
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.precision]


def precision_part(cfg):
  """``(precision,)`` for checkpoint fingerprints, or ``()`` at the float32 default, so
  float32 checkpoints written before the field existed keep their fingerprint."""
  p = cfg.get("precision", "float32")  # (configs stored before the field existed lack it)
  return () if p == "float32" else (p,)


PRESETS = ("paper", "cpu", "smoke")


def preset(name):
  """The ``get_config()`` of ``configs/<name>.py`` (installed as ``kfjax.configs``)."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
  import importlib
  return importlib.import_module(f"kfjax.configs.{name}").get_config()


def preset_path(name):
  """Filesystem path of a preset file, for ``--config``."""
  import importlib.resources
  return str(importlib.resources.files("kfjax.configs") / f"{name}.py")


def expand_preset_names(argv):
  """Command-line args with ``--config cpu`` / ``--config=paper`` turned into the preset's
  file, so ``config_flags`` can load a bare preset name, and ``--config`` set to the
  ``default`` preset where it is not given (see :func:`define_config_flag`)."""
  out = list(argv)
  given = False
  for i, arg in enumerate(out):
    if arg.startswith("--config=") and arg[9:] in PRESETS:
      out[i] = "--config=" + preset_path(arg[9:])
    elif arg == "--config" and i + 1 < len(out) and out[i + 1] in PRESETS:
      out[i + 1] = preset_path(out[i + 1])
    given = given or arg == "--config" or arg.startswith("--config=")
  if not given:
    out.insert(1, "--config=" + preset_path("default"))
  return out


def parse_flags(argv, fail):
  """absl's flag parsing with the presets' bare names expanded; a bad flag or a bad
  ``--config.<field>=<value>`` override ends in ``fail(one line)`` instead of a traceback."""
  from absl import flags  # noqa: PLC0415
  try:
    return flags.FLAGS(expand_preset_names(argv))
  except flags.Error as e:
    fail(str(e).splitlines()[0] if str(e) else "bad flags")
  except (AttributeError, KeyError) as e:
    # ml_collections raises these, lazily, for an override of a field that does not exist.
    name = str(e).strip("\"' ")
    given = [a.split("=")[0][len("--config."):] for a in argv if a.startswith("--config.")]
    field = next((g for g in given if g.split(".")[-1] == name), name)
    fail(f"the config has no field {field!r} (see the preset file for the fields)")
  except (TypeError, ValueError) as e:
    fail(f"bad --config override: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def define_config_flag(help_text):
  """The ``--config`` flag of kfjax's command lines: a preset name or file, by default the
  ``default`` preset (``paper`` on an accelerator, else ``cpu``); any field overridable as
  ``--config.<field>=<value>`` (see :func:`parse_flags`)."""
  from ml_collections import config_flags  # noqa: PLC0415 (only command lines need it)
  # No default file here: a default is loaded when the flag is defined, i.e. at import,
  # and the default preset asks JAX for its backend, which must wait until
  # jax.distributed has started. parse_flags adds --config=<default> when it is missing.
  return config_flags.DEFINE_config_file("config", None, help_text, lock_config=False)
