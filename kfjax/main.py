"""Command line: ``python -m kfjax.main --image x.png [--scale 4] [--config FILE] [--workdir DIR]
[--method kernelfusion|kernelgan]``.

Parses flags and calls :func:`kfjax.pipeline.run`; everything else is a library.
``--config`` takes a preset file (``configs/paper.py``, ``configs/cpu.py``,
``configs/smoke.py``) or a bare preset name, and any field can be overridden with
``--config.<field>=<value>`` (e.g. ``--config.train.steps=500``).
"""

import os

from absl import app
from absl import flags
from absl import logging

from kfjax import runtime
from kfjax import config as config_lib
from kfjax.errors import KfjaxError
from kfjax.errors import fail as _fail

_IMAGE = flags.DEFINE_string("image", None, "Low-resolution input image (PNG, JPEG or TIFF).")
_SCALE = flags.DEFINE_integer("scale", None, "Integer upscaling factor (>= 2); default: the preset's.",
                              lower_bound=2)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Output directory (default: kfjax_out/<image name>). Re-running "
                               "with the same workdir reuses the trained patch-diffusion model.")
_KERNEL = flags.DEFINE_string("kernel", None,
                              "Non-blind mode: a K×K .npy kernel to use instead of estimating one.")
_CONFIG = config_lib.define_config_flag(
    "Preset file (configs/<preset>.py) or preset name: paper, cpu, smoke.")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bars (nor restore/resume messages).")
_COMPILE_CACHE = flags.DEFINE_string(
    "compile_cache", None,
    "Folder for JAX's persistent compilation cache: later runs on same-size images skip "
    "compiling. Default: $JAX_COMPILATION_CACHE_DIR, "
    "else $XDG_CACHE_HOME/kfjax/jax (~/.cache/kfjax/jax); '' turns it off.")
_METHOD = flags.DEFINE_enum("method", "kernelfusion", ["kernelfusion", "kernelgan"],
                            "kernelfusion (blind, the default) or kernelgan: KernelGAN estimates "
                            "the kernel, then KernelFusion's non-blind Phase 2 uses it.")


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _IMAGE.value:
    _fail("--image is required")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  # Imported here so that --help and flag errors do not pay for importing JAX.
  from kfjax import ops, pipeline
  try:
    cfg = _CONFIG.value
    cfg.name  # a file that failed to load raises on first attribute access
  except Exception as e:  # config_flags reports a bad file lazily, as a long OSError
    reason = [ln.strip() for ln in str(e).splitlines() if ln.strip()][-1]
    _fail(f"cannot load --config: {reason}")
  if _SCALE.value is not None:
    cfg.scale = _SCALE.value
  stem = os.path.splitext(os.path.basename(_IMAGE.value))[0] or "image"
  workdir = _WORKDIR.value or os.path.join("kfjax_out", stem)
  runtime.use_compile_cache(runtime.compile_cache_dir(_COMPILE_CACHE.value))
  try:
    ops.conv_backward()  # a bad KFJAX_CONV_BACKWARD fails before any work
    pipeline.run(_IMAGE.value, cfg, workdir, kernel_path=_KERNEL.value,
                 show_progress=not _QUIET.value, method=_METHOD.value)
  except KfjaxError as e:
    _fail(str(e))
  except KeyboardInterrupt:
    _fail(f"interrupted; finished phases are checkpointed in {workdir} and resume on re-run")


def _parse_flags(argv):
  return config_lib.parse_flags(argv, _fail)


def cli():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
