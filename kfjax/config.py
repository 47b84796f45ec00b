"""The configuration every preset starts from (presets in ``configs/`` change sizes).

Every field can be overridden on the command line, e.g. ``--config.train.steps=2000``.
"""

import ml_collections


def base_config():
  cfg = ml_collections.ConfigDict()
  cfg.name = "base"
  cfg.seed = 0
  cfg.scale = 4

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
  ))

  # Phase 2: reverse diffusion with joint U-Net / kernel optimisation (appendix A.1, A.3-A.4).
  cfg.unet = ml_collections.ConfigDict(dict(base_channels=32, levels=5, max_channels=512,
                                            residual=False, upsample="bilinear"))
  cfg.kernel = ml_collections.ConfigDict(dict(
      size=0,               # 0: 6 × scale (24 at ×4, as in the paper)
      width=256, depth=5, omega=5.0))
  cfg.sample = ml_collections.ConfigDict(dict(
      t_start=200,          # first noise level (unofficial port: 200)
      num_steps=200,        # reverse steps from t_start to 1 (200 = every step)
      eta=1.0,              # 1: DDPM posterior step (Algorithm 1); 0: deterministic DDIM
      n_iter_first=100,
      n_iter=20,
      lr=1e-4,
      lr_end=1e-5,
      com_weight=1e-2,      # centre-of-mass weight (not published)
      steps_per_chunk=20,   # reverse steps per dispatch (progress/checkpoint granularity)
      pd_tile=0,            # 0: PD on the whole image; N: N×N tiles (+7 px halo)
      pd_tile_batch=0,      # tiles per vmapped batch (0: all at once)
  ))
  return cfg


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
  file, so ``config_flags`` can load a bare preset name."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config=") and arg[9:] in PRESETS:
      out[i] = "--config=" + preset_path(arg[9:])
    elif arg == "--config" and i + 1 < len(out) and out[i + 1] in PRESETS:
      out[i + 1] = preset_path(out[i + 1])
  return out
