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
"""

import csv
import glob
import hashlib
import io
import json
import os
import time
import traceback

import tqdm

from kfjax import io as kio
from kfjax import loop
from kfjax.errors import KfjaxError

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


def estimate_cost(cfg, size):
  """A relative cost of one image of ``size = (h, w)`` under ``cfg``: Phase 1 trains on
  fixed-size crops (steps × batch × crop²), Phase 2 runs its Adam iterations over the HR
  image (two U-Net passes and one PD pass per iteration, ~3 × h·w·s²)."""
  if size is None:
    return 0.0
  h, w = size
  s = int(cfg.scale)
  crop = min(int(cfg.train.crop_size), h, w)
  phase1 = 0 if cfg.sample.prior == "dip" else int(cfg.train.steps) * int(cfg.train.batch_size) * crop * crop
  iters = int(cfg.sample.n_iter_first) + (int(cfg.sample.num_steps) - 1) * int(cfg.sample.n_iter)
  return float(phase1 + 3 * iters * int(cfg.sample.num_samples) * h * w * s * s)


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


def run(paths, cfg, out, *, kernel_path=None, method="kernelfusion", show_progress=True,
        process=0, num_processes=1):
  """Run every image of ``paths`` (from :func:`expand`) that belongs to this process
  (``process`` of ``num_processes``) into ``OUT/<name>/``; returns ``(rows of this
  process, merged rows)``.

  A failing image is recorded (status ``failed`` with its one-line error) and the rest go
  on; :class:`kfjax.loop.Stopped` (SIGTERM) ends the batch after the current image's
  checkpoint, with this process's part and the report written.
  """
  from kfjax import pipeline  # noqa: PLC0415 (imports JAX; --help stays fast)
  names = unique_names(paths)
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise KfjaxError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
  by_name = {n: p for p, n in names.items()}
  costs = {n: estimate_cost(cfg, image_size(p)) for n, p in by_name.items()}
  mine = shares(costs, num_processes)[process]
  loop.log(f"{len(paths)} images, {len(mine)} for process {process} of {num_processes}"
           f" -> {os.path.abspath(out)}")
  rows = []
  bar = tqdm.tqdm(total=len(mine), desc=f"images (process {process})", unit="image",
                  disable=not show_progress, dynamic_ncols=True, position=0)
  try:
    for name in mine:
      path, folder = by_name[name], os.path.join(out, name)
      summary = finished(folder, path)
      if summary is not None:
        rows.append(_row(name, path, "skipped", process, cfg, summary))
      else:
        loop.raise_if_stopped()
        t0 = time.time()
        try:
          summary = pipeline.run(path, cfg, folder, kernel_path=kernel_path,
                                 show_progress=show_progress, method=method)
          rows.append(_row(name, path, "done", process, cfg, summary))
        except loop.Stopped:
          raise
        except KfjaxError as e:
          rows.append(_row(name, path, "failed", process, cfg, error=str(e)))
          loop.log(f"FAILED {name}: {e}")
        except Exception as e:  # noqa: BLE001 - one image's crash must not end the batch
          last = traceback.extract_tb(e.__traceback__)[-1]
          msg = f"{type(e).__name__}: {e} ({os.path.basename(last.filename)}:{last.lineno})"
          rows.append(_row(name, path, "failed", process, cfg,
                           {"total_seconds": round(time.time() - t0, 2)}, msg.splitlines()[0]))
          loop.log(f"FAILED {name}: {msg.splitlines()[0]}")
      _save_part(out, process, rows)
      bar.update(1)
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
