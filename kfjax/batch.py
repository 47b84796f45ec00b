"""Many images in one command: ``python -m kfjax.main --images SPEC --workdir OUT``.

Every image goes through the single-image path (:func:`kfjax.pipeline.run`) into its own
folder ``OUT/<name>/`` with exactly the single-image outputs, so a batch and a run of one
image are the same computation and share checkpoints: a folder whose ``summary.json``
exists is finished and skipped, an interrupted one resumes from its checkpoints.

In a multi-process run (``jax.distributed``: a TPU pod, SLURM tasks, or processes on one
machine) each process takes a deterministic share of the sorted image list, balanced by an
estimate of each image's cost (:func:`estimate_cost`; images differ in cost by 10-100×,
so equal counts would not balance), and works through it longest first. Nothing is shared
while the images run: each process writes its own report part
``OUT/report.parts/process-<i>.json`` after every image, and ``OUT/report.csv`` is merged
from all the parts present (:func:`merge_report`) by every process when it finishes, so
the report does not depend on any one process surviving and merging again gives the same
file.

Within a process, images of the same size run together (:func:`plan_groups`): spread
over the process's devices (a ``shard_map`` over an ``images`` mesh axis) and
``images_per_device`` of them vmapped on each device (never padded: the method learns
each image's own patch statistics, so only images of one exact size go together). A
group writes every image's checkpoints and outputs exactly where, and as, a run of that
image alone would (:func:`kfjax.phase1.train_group`, :func:`kfjax.phase2.run_group`), so
a group that cannot run together (checkpoints at different steps, an image that fails)
falls back to its images one at a time, resuming what the group began.
"""

import csv
import glob
import hashlib
import io
import json
import os
import time
import traceback

import numpy as np
import tqdm

from kfjax import io as kio
from kfjax import loop
from kfjax.errors import KfjaxError
from kfjax.errors import NotTogether

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
REPORT_FIELDS = ("name", "status", "phase1_seconds", "phase2_seconds", "total_seconds",
                 "device", "process", "preset", "image", "error")
PARTS = "report.parts"


def expand(spec):
  """The sorted image paths of ``spec``: a directory (its files with an image extension),
  ``@list.txt`` (one path per line; blank lines and ``#`` comments skipped; relative paths
  are relative to the list's folder) or a glob pattern (``**`` recurses)."""
  if spec.startswith("@"):
    path = spec[1:]
    try:
      with open(path) as f:
        lines = [ln.strip() for ln in f]
    except OSError as e:
      raise KfjaxError(f"{path}: cannot read the image list ({e.strerror or e})") from None
    base = os.path.dirname(os.path.abspath(path))
    paths = [os.path.join(base, ln) for ln in lines if ln and not ln.startswith("#")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      raise KfjaxError(f"{path}: {len(missing)} listed image(s) do not exist, first: {missing[0]}")
  elif os.path.isdir(spec):
    paths = [os.path.join(spec, n) for n in os.listdir(spec)
             if n.lower().endswith(EXTENSIONS) and os.path.isfile(os.path.join(spec, n))]
  else:
    paths = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
  paths = sorted({os.path.abspath(p) for p in paths})
  if not paths:
    raise KfjaxError(f"--images {spec}: no images found")
  return paths


def unique_names(paths):
  """``{path: folder name}``: the file's stem, or, where two inputs share a stem, the stem
  and a short hash of the absolute path (the same name whatever else is in the batch)."""
  stems = {p: os.path.splitext(os.path.basename(p))[0] or "image" for p in paths}
  count = {}
  for s in stems.values():
    count[s] = count.get(s, 0) + 1
  return {p: s if count[s] == 1 else f"{s}-{hashlib.sha1(p.encode()).hexdigest()[:8]}"
          for p, s in stems.items()}


def image_size(path):
  """``(height, width)`` from the file's header, or ``None`` if it cannot be read (the
  image then fails, with its own error, when it is loaded)."""
  try:
    from PIL import Image  # noqa: PLC0415 (imageio's reader; opening reads the header only)
    with Image.open(path) as im:
      return im.size[1], im.size[0]
  except Exception:  # noqa: BLE001 - any unreadable file is reported later, by load_image
    return None


# Seconds per unit of work for each part of a run, from the `cpu` preset's measured times
# (BENCHMARKS.md, "Batch: the cost model"). Only ratios matter: they set how much of an
# image's cost grows with its pixels (the Phase 2 / restoration terms) and how much is a
# per-image constant (training on fixed-size crops), which decides the balance between
# processes when images differ in size.
UNIT_SECONDS = {
    "phase1": 5.0e-6,     # PD training: per crop pixel per sample per step
    "phase2": 2.0e-6,     # Phase 2: per HR pixel per network pass (≈ 3 per iteration)
    "restore": 1.0e-7,    # TV restoration: per HR pixel per Adam step
    "kernelgan": 8.4e-7,  # KernelGAN: per crop pixel per iteration
    "ddm4ip": 2.7e-6,     # DDM4IP: per patch pixel per sample per step (both stages)
    "ike": 2.2e-5,        # IKE: per crop pixel per iteration
}


def estimate_cost(cfg, size, method="kernelfusion", kernel_given=False):
  """The estimated cost (≈ seconds, :data:`UNIT_SECONDS`) of one image of ``size = (h, w)``
  under ``cfg`` with ``method``; ``kernel_given``: a non-blind run (``--kernel``).

  KernelFusion: Phase 1 trains on fixed-size crops (steps × batch × crop²), Phase 2 runs
  its iterations over the HR image (two U-Net passes and one PD pass each), then the TV
  restoration if ``restore.final``; a non-blind run that skips both phases
  (:func:`kfjax.phase2.reads_phase2`) is the restoration alone. KernelGAN and DDM4IP train
  on fixed-size crops, then restore; IKE trains on crops and its inverse pass gives the
  image (no per-pixel term worth counting).
  """
  if size is None:
    return 0.0
  from kfjax import phase2  # noqa: PLC0415 (imports JAX; --help stays fast)
  u = UNIT_SECONDS
  h, w = size
  s = int(cfg.scale)
  hr = h * w * s * s
  restore = u["restore"] * int(cfg.restore.steps) * hr
  if method == "ike":
    c = cfg.ike
    return u["ike"] * int(c.iterations) * int(c.crop) ** 2
  if method == "kernelgan":
    c = cfg.kernelgan
    return u["kernelgan"] * int(c.iterations) * int(c.batch_size) * int(c.crop_size) ** 2 + restore
  if method == "ddm4ip":
    c = cfg.ddm4ip
    s_g = 2 if s == 4 and c.x4 == "compose" else s
    flow = int(c.flow_steps) * int(c.flow_batch) * int(c.patch) ** 2
    match = int(c.match_steps) * int(c.match_batch) * (s_g * int(c.patch)) ** 2
    return u["ddm4ip"] * (flow + match) + restore
  restore = restore if cfg.restore.final else 0.0
  if kernel_given and not phase2.reads_phase2(cfg, blind=False):
    return restore
  crop = min(int(cfg.train.crop_size), h, w)
  phase1 = 0 if cfg.sample.prior == "dip" else int(cfg.train.steps) * int(cfg.train.batch_size) * crop * crop
  iters = int(cfg.sample.n_iter_first) + (int(cfg.sample.num_steps) - 1) * int(cfg.sample.n_iter)
  passes = 3 * iters * int(cfg.sample.num_samples) * hr
  return float(u["phase1"] * phase1 + u["phase2"] * passes + restore)


def shares(costs, num_processes):
  """Split items with ``costs`` (a dict name → cost) over ``num_processes``: longest
  first, each to the process with the least total so far (ties: the lower index; equal
  costs: by name). Returns one list of names per process, each longest first; the same
  input gives the same split on every process."""
  order = sorted(costs, key=lambda n: (-costs[n], n))
  load = [0.0] * num_processes
  out = [[] for _ in range(num_processes)]
  for name in order:
    i = min(range(num_processes), key=lambda j: (load[j], j))
    out[i].append(name)
    load[i] += costs[name]
  return out


def finished(folder, path):
  """The ``summary.json`` of a finished run of ``path`` in ``folder``, or ``None``."""
  try:
    with open(os.path.join(folder, "summary.json")) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  return summary if summary.get("image") == os.path.abspath(path) else None


def checkpoint_progress(folder):
  """The latest checkpoint steps ``(phase 1, phase 2)`` found in ``folder`` (None where
  there is none), from the folder names alone: images resumed together must stand at
  the same place (the phases check the fingerprints when they restore)."""
  def latest(phase):
    try:
      steps = [int(n) for n in os.listdir(os.path.join(folder, "checkpoints", phase))
               if n.isdigit()]
    except OSError:
      return None
    return max(steps) if steps else None
  return latest("pd"), latest("phase2")


def plan_groups(keys, devices, per_device):
  """Split images into groups that run together: ``keys`` maps each name (in run order)
  to what must agree within a group (size, checkpoint progress; ``None`` keeps the
  image alone). Each group takes ``d <= devices`` devices and ``k <= per_device`` images
  per device, as many as are left (a remainder runs on fewer devices). Returns
  ``[(names, d), …]`` in the order of each group's first image."""
  by_key, out = {}, []
  for name, key in keys.items():
    by_key.setdefault(key if key is not None else ("alone", name), []).append(name)
  for names in by_key.values():
    while names:
      d = min(devices, len(names))
      k = max(1, min(per_device, len(names) // d))
      out.append((names[:d * k], d))
      names = names[d * k:]
  return out


def _row(name, path, status, process, cfg, summary=None, error=""):
  summary = summary or {}
  return {"name": name, "status": status,
          "phase1_seconds": summary.get("phase1", {}).get("seconds", ""),
          "phase2_seconds": summary.get("phase2", {}).get("seconds", ""),
          "total_seconds": summary.get("total_seconds", ""),
          "device": summary.get("device", ""), "process": process, "preset": cfg.name,
          "image": path, "error": error}


def _save_part(out, process, rows):
  folder = os.path.join(out, PARTS)
  os.makedirs(folder, exist_ok=True)
  kio.save_text_atomic(os.path.join(folder, f"process-{process}.json"),
                       json.dumps(rows, indent=1, sort_keys=True))


def merge_report(out):
  """Merge every process's report part into ``OUT/report.csv`` (one row per image, by
  name; where two parts hold the same image, a finished row wins over a failure, and a
  later part over an earlier one). Returns the rows."""
  rows = {}
  rank = {"done": 2, "skipped": 2, "failed": 1}
  for part in sorted(glob.glob(os.path.join(out, PARTS, "process-*.json"))):
    try:
      with open(part) as f:
        part_rows = json.load(f)
    except (OSError, ValueError):
      continue  # (a part being replaced right now; its process merges again when done)
    for r in part_rows:
      old = rows.get(r["name"])
      if old is None or rank.get(r["status"], 0) >= rank.get(old["status"], 0):
        rows[r["name"]] = r
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=REPORT_FIELDS, extrasaction="ignore",
                          lineterminator="\n")
  writer.writeheader()
  for name in sorted(rows):
    writer.writerow(rows[name])
  kio.save_text_atomic(os.path.join(out, "report.csv"), buf.getvalue())
  return [rows[n] for n in sorted(rows)]


def _crash_message(e):
  last = traceback.extract_tb(e.__traceback__)[-1]
  msg = f"{type(e).__name__}: {e} ({os.path.basename(last.filename)}:{last.lineno})"
  return msg.splitlines()[0]


def _run_one(name, path, folder, cfg, process, kernel_path, method, show_progress):
  """One image through :func:`kfjax.pipeline.run`; its report row (a failure recorded)."""
  from kfjax import pipeline  # noqa: PLC0415 (imports JAX; --help stays fast)
  t0 = time.time()
  try:
    summary = pipeline.run(path, cfg, folder, kernel_path=kernel_path,
                           show_progress=show_progress, method=method)
    return _row(name, path, "done", process, cfg, summary)
  except loop.Stopped:
    raise
  except KfjaxError as e:
    loop.log(f"FAILED {name}: {e}")
    return _row(name, path, "failed", process, cfg, error=str(e))
  except Exception as e:  # noqa: BLE001 - one image's crash must not end the batch
    loop.log(f"FAILED {name}: {_crash_message(e)}")
    return _row(name, path, "failed", process, cfg,
                {"total_seconds": round(time.time() - t0, 2)}, _crash_message(e))


def _run_group(names, devices, by_name, out, cfg, process, kernel_path, method, show_progress):
  """Images of one size through both phases together; their report rows. An image that
  fails to load is recorded; if the rest cannot run together (or their run fails), they
  run one at a time, resuming from whatever the group checkpointed."""
  from kfjax import phase1, phase2, pipeline, runtime  # noqa: PLC0415
  rows, preps = [], []
  for name in names:
    path = by_name[name]
    try:
      preps.append(pipeline.prepare(path, cfg, os.path.join(out, name), kernel_path,
                                    show_progress, method))
    except KfjaxError as e:
      loop.log(f"FAILED {name}: {e}")
      rows.append(_row(name, path, "failed", process, cfg, error=str(e)))
    except Exception as e:  # noqa: BLE001 - as in _run_one: recorded, the rest go on
      loop.log(f"FAILED {name}: {_crash_message(e)}")
      rows.append(_row(name, path, "failed", process, cfg, error=_crash_message(e)))
  kept = [os.path.basename(p.workdir) for p in preps]
  try:
    if len(preps) < 2:
      raise NotTogether("one image")
    if len({p.lr.shape for p in preps}) > 1:
      raise NotTogether("images of different shapes")
    devices = max(d for d in range(1, devices + 1) if len(preps) % d == 0)
    mesh = runtime.image_mesh(devices) if devices > 1 else None
    lr = np.stack([p.lr for p in preps])
    dirs = [p.workdir for p in preps]
    loop.log(f"{len(preps)} images of {lr.shape[2]}x{lr.shape[1]} together on {devices} "
             f"device(s): {', '.join(kept)}")
    t0 = time.time()
    if cfg.sample.prior == "dip":
      pd_model = pd_params = None
      p1s = [phase1.skipped_info("sample.prior=dip") for _ in preps]
    else:
      pd_model, pd_params, p1s = phase1.train_group(cfg, lr, dirs, mesh, show_progress)
    t1 = time.time()
    results = phase2.run_group(cfg, pd_model, pd_params, lr, preps[0].fixed,
                               dirs, [(phase1.fingerprint(cfg, p.lr),) for p in preps], mesh,
                               show_progress)
    t2 = time.time()
    group = {"images": len(preps), "devices": devices, "per_device": len(preps) // devices,
             "names": kept}
    for prep, name, p1, (hr, kernel, p2) in zip(preps, kept, p1s, results):
      summary = pipeline.write_outputs(prep, cfg, hr, kernel, {**p1, "seconds": round(t1 - t0, 2)},
                                       {**p2, "seconds": round(t2 - t1, 2)}, method, group)
      rows.append(_row(name, prep.image_path, "done", process, cfg, summary))
    return rows
  except loop.Stopped:
    raise
  except Exception as e:  # noqa: BLE001 - the images then run one at a time
    if len(preps) > 1:
      why = str(e) if isinstance(e, (NotTogether, KfjaxError)) else _crash_message(e)
      loop.log(f"these {len(preps)} images run one at a time ({why})")
  recorded = {r["name"] for r in rows}
  for prep, name in zip(preps, kept):
    if name in recorded:
      continue
    rows.append(_run_one(name, prep.image_path, prep.workdir, cfg, process, kernel_path,
                         method, show_progress))
  return rows


def run(paths, cfg, out, *, kernel_path=None, method="kernelfusion", show_progress=True,
        process=0, num_processes=1, per_device=1):
  """Run every image of ``paths`` (from :func:`expand`) that belongs to this process
  (``process`` of ``num_processes``) into ``OUT/<name>/``; returns ``(rows of this
  process, merged rows)``.

  Images of one size run together over this process's devices, ``per_device`` on each
  (:func:`plan_groups`; ``kernelfusion`` with one sample per image and a Phase 2 that the
  output reads: other runs go one at a time). A failing image is recorded (status
  ``failed`` with its one-line error) and the rest go on; :class:`kfjax.loop.Stopped`
  (SIGTERM) ends the batch after the current checkpoint, with this process's part and the
  report written.
  """
  import jax  # noqa: PLC0415 (imports JAX; --help stays fast)
  from kfjax import phase2  # noqa: PLC0415
  names = unique_names(paths)
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise KfjaxError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
  by_name = {n: p for p, n in names.items()}
  sizes = {n: image_size(p) for n, p in by_name.items()}
  costs = {n: estimate_cost(cfg, sizes[n], method, bool(kernel_path)) for n in by_name}
  mine = shares(costs, num_processes)[process]
  devices = jax.local_device_count()
  # A given kernel with restore.final from the bicubic start skips both phases
  # (kfjax.phase2.reads_phase2): nothing is left to run together.
  together = (devices * per_device > 1 and method == "kernelfusion"
              and int(cfg.sample.num_samples) == 1
              and (not kernel_path or phase2.reads_phase2(cfg, blind=False)))
  loop.log(f"{len(paths)} images, {len(mine)} for process {process} of {num_processes}"
           f"{f' ({devices} devices, up to {per_device} images each)' if together else ''}"
           f" -> {os.path.abspath(out)}")
  rows = []
  bar = tqdm.tqdm(total=len(mine), desc=f"images (process {process})", unit="image",
                  disable=not show_progress, dynamic_ncols=True, position=0)
  try:
    pending = []
    for name in mine:
      summary = finished(os.path.join(out, name), by_name[name])
      if summary is not None:
        rows.append(_row(name, by_name[name], "skipped", process, cfg, summary))
        bar.update(1)
      else:
        pending.append(name)
    _save_part(out, process, rows)
    keys = {n: ((sizes[n], checkpoint_progress(os.path.join(out, n)))
                if together and sizes[n] is not None else None) for n in pending}
    for group, group_devices in plan_groups(keys, devices, per_device):
      loop.raise_if_stopped()
      if len(group) == 1:
        name = group[0]
        rows.append(_run_one(name, by_name[name], os.path.join(out, name), cfg, process,
                             kernel_path, method, show_progress))
      else:
        rows += _run_group(group, group_devices, by_name, out, cfg, process, kernel_path,
                           method, show_progress)
      _save_part(out, process, rows)
      bar.update(len(group))
  finally:
    bar.close()
    _save_part(out, process, rows)
    merged = merge_report(out)
  return rows, merged


def summary_line(rows, merged, total):
  """One line: this process's counts and the merged report's."""
  count = lambda rs, s: sum(r["status"] == s for r in rs)
  done = count(merged, "done") + count(merged, "skipped")
  return (f"this process: {count(rows, 'done')} done, {count(rows, 'skipped')} already "
          f"finished, {count(rows, 'failed')} failed; report: {done} of {total} images "
          f"finished, {count(merged, 'failed')} failed")
