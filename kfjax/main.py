"""Command line: ``python -m kfjax.main --image x.png [--scale 4] [--config FILE] [--workdir DIR]
[--method kernelfusion|kernelgan|ddm4ip|ike]``, or ``--images SPEC --workdir OUT`` for many images
(a glob, a folder or ``@list.txt``; with ``--distributed`` over the processes of a
``jax.distributed`` run).

Parses flags and calls :func:`kfjax.pipeline.run` or :func:`kfjax.batch.run`; everything
else is a library. SIGTERM stops a run after its current chunk, with a checkpoint, and
exits with status 143; re-running the same command resumes.
``--config`` takes a preset file (``configs/paper.py``, ``configs/cpu.py``,
``configs/smoke.py``) or a bare preset name, and any field can be overridden with
``--config.<field>=<value>`` (e.g. ``--config.train.steps=500``).
"""

import contextlib
import os
import signal
import sys

from absl import app
from absl import flags
from absl import logging

from kfjax import config as config_lib
from kfjax import distributed as distributed_lib
from kfjax import runtime
from kfjax.errors import KfjaxError
from kfjax.errors import fail as _fail

_IMAGE = flags.DEFINE_string("image", None, "Low-resolution input image (PNG, JPEG or TIFF).")
_IMAGES = flags.DEFINE_string(
    "images", None, "Many images: a glob ('lr/*.png', '**' recurses), a folder, or @list.txt "
    "(one path per line). Each goes to <workdir>/<name>/; finished ones are skipped; "
    "<workdir>/report.csv lists every image. Needs --workdir.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Share --images over the processes of a multi-process run "
    "(jax.distributed.initialize()). Default: on under SLURM srun with several tasks and on "
    "multi-host Cloud TPU VMs, else off.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for --distributed where the "
    "cluster is not auto-detected (with --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of a --distributed run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a --distributed run.")
_PER_DEVICE = flags.DEFINE_integer(
    "images_per_device", 1, "--images of the same size run together: spread over this "
    "process's devices, this many vmapped on each. Vmapped images share each convolution as "
    "a grouped one, which was slower per image on both CPU and GPU, so 1 is the default.",
    lower_bound=1)
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
_METHOD = flags.DEFINE_enum("method", "kernelfusion", ["kernelfusion", "kernelgan", "ddm4ip", "ike"],
                            "kernelfusion (blind, the default); kernelgan: KernelGAN estimates "
                            "the kernel, then KernelFusion's non-blind Phase 2 uses it; ddm4ip: "
                            "DDM4IP estimates the kernel, then the TV solver restores; ike: IKE's "
                            "invertible network gives both.")


def _init_distributed(coordinator, num_processes, process_id):
  """:func:`kfjax.distributed.initialize`, errors as one line; ``(index, count)``."""
  given = [coordinator, num_processes, process_id]
  if any(v is not None for v in given) and not all(v is not None for v in given):
    _fail("--coordinator_address, --num_processes and --process_id go together")
  try:
    return distributed_lib.initialize(coordinator, num_processes, process_id)
  except (RuntimeError, ValueError) as e:
    _fail(f"jax.distributed.initialize failed: {str(e).splitlines()[0] if str(e) else e}")


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _IMAGE.value and not _IMAGES.value:
    _fail("--image (one image) or --images (many) is required")
  if _IMAGE.value and _IMAGES.value:
    _fail("--image and --images exclude each other")
  if _IMAGES.value and not _WORKDIR.value:
    _fail("--images needs --workdir (the folder that gets one subfolder per image)")
  if _PER_DEVICE.present and not _IMAGES.value:
    _fail("--images_per_device groups --images; it needs --images")
  if (_DISTRIBUTED.value or _COORDINATOR.value is not None) and not _IMAGES.value:
    _fail("--distributed shares --images over processes; it needs --images")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  # Imported here so that --help and flag errors do not pay for importing JAX.
  from kfjax import loop, ops, pipeline
  try:
    cfg = _CONFIG.value
    cfg.name  # a file that failed to load raises on first attribute access
  except Exception as e:  # config_flags reports a bad file lazily, as a long OSError
    reason = [ln.strip() for ln in str(e).splitlines() if ln.strip()][-1]
    _fail(f"cannot load --config: {reason}")
  if _SCALE.value is not None:
    cfg.scale = _SCALE.value
  runtime.use_compile_cache(runtime.compile_cache_dir(_COMPILE_CACHE.value))
  # SIGTERM (a scheduler's preemption notice): finish the chunk, checkpoint, exit 143.
  signal.signal(signal.SIGTERM, loop.request_stop)
  if _IMAGES.value:
    _main_batch(cfg)
    return
  stem = os.path.splitext(os.path.basename(_IMAGE.value))[0] or "image"
  workdir = _WORKDIR.value or os.path.join("kfjax_out", stem)
  with _user_errors(workdir):
    ops.conv_backward()  # a bad KFJAX_CONV_BACKWARD fails before any work
    pipeline.run(_IMAGE.value, cfg, workdir, kernel_path=_KERNEL.value,
                 show_progress=not _QUIET.value, method=_METHOD.value)


@contextlib.contextmanager
def _user_errors(where):
  """How a run ends for the user: a KfjaxError as one line (status 2), a SIGTERM stop
  (checkpointed) with status 143, Ctrl-C as one line."""
  from kfjax import loop  # noqa: PLC0415
  try:
    yield
  except KfjaxError as e:
    _fail(str(e))
  except loop.Stopped:
    print(f"kfjax: stopped by SIGTERM; checkpointed in {where}; the same command resumes",
          file=sys.stderr)
    sys.exit(143)
  except KeyboardInterrupt:
    _fail(f"interrupted; finished work and checkpoints are in {where}; re-run to resume")


def _main_batch(cfg):
  from kfjax import batch, loop, ops, pipeline  # noqa: PLC0415
  out = _WORKDIR.value
  try:
    # (once here rather than per image: a bad config is one line, not one failure each)
    pipeline.validate_config(cfg)
    paths = batch.expand(_IMAGES.value)
  except KfjaxError as e:
    _fail(str(e))
  if _PROCESS["distributed"] and _PROCESS["count"] == 1:
    _fail("--distributed: this is the only process (jax.distributed found no others)")
  process, count = _PROCESS["index"], _PROCESS["count"]
  with _user_errors(out):
    try:
      ops.conv_backward()
      rows, merged = batch.run(paths, cfg, out, kernel_path=_KERNEL.value,
                               method=_METHOD.value, show_progress=not _QUIET.value,
                               process=process, num_processes=count,
                               per_device=_PER_DEVICE.value)
    finally:  # (however this process ends, process 0 outlives the others)
      distributed_lib.finish(process, count, log=loop.log)
  if process == 0 and count > 1:  # the others' final parts are in now
    merged = batch.merge_report(out)
  print(f"kfjax: {batch.summary_line(rows, merged, len(paths))}; "
        f"{os.path.join(os.path.abspath(out), 'report.csv')}", flush=True)
  failed = [r for r in rows if r["status"] == "failed"]
  for r in failed:
    print(f"kfjax: FAILED {r['name']} ({r['image']}): {r['error']}", file=sys.stderr)
  if failed:
    sys.exit(1)


# Filled by _parse_flags, the one place that decides whether this is a distributed run.
_PROCESS = {"distributed": False, "index": 0, "count": 1}


def _early_flags(argv):
  """The distributed flags read before absl parses (see :func:`_parse_flags`)."""
  import argparse  # noqa: PLC0415
  p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # (--image is not --images)
  p.add_argument("--image")
  p.add_argument("--images")
  p.add_argument("--distributed", nargs="?", const="true")
  p.add_argument("--nodistributed", action="store_true")
  p.add_argument("--coordinator_address")
  p.add_argument("--num_processes", type=int)
  p.add_argument("--process_id", type=int)
  known, _ = p.parse_known_args(argv[1:])
  return known


def _parse_flags(argv):
  """Start ``jax.distributed`` when asked to, then parse the flags. Parsing loads the
  config, and the default preset asks JAX for its backend, which must not start before
  ``jax.distributed.initialize``; so this one decision is made from the raw arguments."""
  try:
    early = _early_flags(argv)
  except (SystemExit, ValueError):
    early = None  # (malformed: absl's own parsing reports it)
  if early is not None and early.images:
    if early.nodistributed or (early.distributed or "").lower() in ("false", "0"):
      wanted = False
    else:
      wanted = (early.distributed is not None or early.coordinator_address is not None
                or distributed_lib.auto_detected())
    if wanted:
      _PROCESS["distributed"] = True
      _PROCESS["index"], _PROCESS["count"] = _init_distributed(
          early.coordinator_address, early.num_processes, early.process_id)
  return config_lib.parse_flags(argv, _fail)


def cli():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
