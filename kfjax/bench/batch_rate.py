r"""Images per hour of whole ``--images`` batches: processes × devices × images per device.

    python -m kfjax.bench.batch_rate --preset smoke --images 8 --size 32 --repeats 2
    python -m kfjax.bench.batch_rate --preset cpu --images 4 --size 48 --layouts 1x1x1,1x1x2

Each layout ``PxDxK`` runs the real command line on one set of same-size images (crops of
scikit-image photos): ``P`` processes (``launch/local.sh`` when P > 1, else one
``python -m kfjax.main``), ``D`` devices per process (simulated CPU devices,
``--xla_force_host_platform_device_count``, on the CPU backend; on an accelerator host the
real ones, where ``D`` must not exceed them) and ``--images_per_device K``. The time is the
command's wall clock from start to exit: loading, compiling, both phases, writing every
output. All layouts share one compilation cache, so with ``--repeats 2`` the second run
of a layout reuses its compiled programs (the rate of a long batch, where compiling is
paid once); the first includes compiling. Every run writes to a fresh folder.

Simulated CPU devices share the machine's cores: on CPU the layouts measure the
overheads of grouping (vmapped convolutions, ``shard_map``) rather than added compute.
"""

import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

_PRESET = flags.DEFINE_string("preset", "smoke", "Preset of every run.")
_IMAGES = flags.DEFINE_integer("images", 8, "Images in the set (all of one size).")
_SIZE = flags.DEFINE_integer("size", 32, "Side of the square LR images.")
_LAYOUTS = flags.DEFINE_list("layouts", ["1x1x1", "1x2x1", "2x1x1", "1x1x2", "1x1x4"],
                             "PxDxK: processes x devices per process x images per device.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Runs per layout (the first compiles).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where images, outputs and the compilation "
                               "cache go (default: a temporary folder).")
_EXTRA = flags.DEFINE_list("extra", [], "More kfjax.main flags for every run, e.g. "
                           "--extra=--config.train.steps=200.")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_images(folder, count, size):
  """``count`` different ``size``×``size`` RGB crops of scikit-image photos."""
  import skimage.data  # noqa: PLC0415 (the test extra)
  from kfjax import io as kio  # noqa: PLC0415
  photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i in range(count):
    photo = photos[i % len(photos)].astype(np.float64) / 255.0
    h, w = photo.shape[:2]
    y = (37 * i) % (h - size)
    x = (61 * i) % (w - size)
    path = os.path.join(folder, f"img{i:03d}.png")
    kio.save_image(path, photo[y:y + size, x:x + size])
    paths.append(path)
  return paths


def parse_layout(text):
  p, d, k = (int(v) for v in text.lower().split("x"))
  if min(p, d, k) < 1:
    raise ValueError(text)
  return p, d, k


def command(layout, images, out, preset, extra):
  """The argv and environment of one run of ``layout``."""
  p, d, k = layout
  flags_ = ["--config", preset, "--quiet", "--images_per_device", str(k), *extra]
  if p > 1:
    argv = ["bash", os.path.join(ROOT, "launch", "local.sh"), str(p), images, out, *flags_]
  else:
    argv = [sys.executable, "-m", "kfjax.main", "--images", images, "--workdir", out, *flags_]
  env = {"PYTHON": sys.executable}
  if d > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={d}"
  return argv, env


def main(argv):
  del argv
  root = _WORKDIR.value or tempfile.mkdtemp(prefix="kfjax_rate_")
  images = os.path.join(root, "images")
  n = len(make_images(images, _IMAGES.value, _SIZE.value))
  base_env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(root, "jaxcache"),
              "PYTHONWARNINGS": "ignore"}
  base_env.pop("XLA_FLAGS", None)
  print(f"kfjax.bench.batch_rate: {n} images of {_SIZE.value}x{_SIZE.value}, preset "
        f"{_PRESET.value}, in {root}", flush=True)
  rows = []
  for text in _LAYOUTS.value:
    layout = parse_layout(text)
    for r in range(_REPEATS.value):
      out = os.path.join(root, f"out_{text}_{r}")
      argv, env = command(layout, images, out, _PRESET.value, _EXTRA.value)
      t0 = time.time()
      res = subprocess.run(argv, env={**base_env, **env}, capture_output=True, text=True)
      wall = time.time() - t0
      status = "ok" if res.returncode == 0 else f"exit {res.returncode}"
      if res.returncode:
        print(res.stderr[-2000:], file=sys.stderr)
      rows.append((text, r, wall, 3600.0 * n / wall, status))
      print(f"  {text} run {r}: {wall:.1f} s, {3600.0 * n / wall:.0f} images/hour ({status})"
            f"\n    {' '.join(f'{k}={v}' for k, v in env.items() if k != 'PYTHON')} "
            f"{' '.join(argv)}", flush=True)
  print("\n| layout (PxDxK) | run | wall s | images/hour | status |\n|---|---|---|---|---|")
  for text, r, wall, rate, status in rows:
    print(f"| {text} | {r}{' (compiles)' if r == 0 else ''} | {wall:.1f} | {rate:.0f} | {status} |")


if __name__ == "__main__":
  app.run(main)
