"""``--images``: many images per command, one process or several (``kfjax.batch``).

The pure parts (image lists, names, cost shares, report merging) are tested directly; the
command line end to end on tiny images with the ``smoke`` preset: one process with a
failing image, then two ``jax.distributed`` processes × 2 simulated CPU devices on
localhost, one of them killed and the command re-run.
"""

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
import skimage.data

from kfjax import batch
from kfjax import config as config_lib
from kfjax import distributed
from kfjax import io as kio
from kfjax.errors import KfjaxError

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
# A smaller smoke run: a few Phase 1 steps; three reverse steps, 7 Phase 2 iterations, one
# per chunk and a checkpoint after each, so that a run can be killed between two of them.
TINY = ["--config", "smoke", "--config.train.steps=4", "--config.train.steps_per_chunk=2",
        "--config.train.checkpoint_every=2", "--config.sample.num_steps=3",
        "--config.sample.iters_per_chunk=1", "--config.sample.checkpoint_every=1", "--quiet"]
TINY_PHASE2_ITERATIONS = 7


def _kill_in_phase2(proc, *workdirs, timeout=600):
  """SIGKILL ``proc`` as soon as every one of ``workdirs`` holds a finished Phase 2
  checkpoint that is not the last one (Orbax writes a step into a temporary folder and
  renames it to the step's number when complete; one step is kept, so one of them is
  always there once the first is)."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    steps = [batch.checkpoint_progress(w)[1] for w in workdirs]
    if all(s is not None and s < TINY_PHASE2_ITERATIONS for s in steps):
      break
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)


@pytest.fixture(scope="module", autouse=True)
def private_compile_cache(tmp_path_factory):
  """One compilation cache for the module's runs: same-size images compile once."""
  ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jaxcache"))


def _cli(*args, env=None, **kw):
  return subprocess.run([sys.executable, "-m", "kfjax.main", *args], capture_output=True,
                        text=True, env={**ENV, **(env or {})}, timeout=900, **kw)


def _report(out):
  with open(os.path.join(out, "report.csv")) as f:
    return {r["name"]: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """Four crops of a photo in two sizes (16×16, 16×20), two sharing a stem in
  different folders, and a file with an image name that is not an image."""
  d = tmp_path_factory.mktemp("images")
  photo = skimage.data.astronaut().astype(np.float64) / 255.0
  crops = {"a.png": photo[100:116, 200:216], "b.png": photo[150:166, 240:260],
           "c.png": photo[300:316, 100:120], os.path.join("sub", "a.png"): photo[50:66, 50:66]}
  os.makedirs(d / "sub")
  for name, img in crops.items():
    kio.save_image(str(d / name), img)
  (d / "broken.png").write_text("not an image")
  return d


# -- pure parts ----------------------------------------------------------------------------

def test_expand_takes_a_folder_a_glob_and_a_list(images, tmp_path):
  d = str(images)
  folder = batch.expand(d)
  assert [os.path.basename(p) for p in folder] == ["a.png", "b.png", "broken.png", "c.png"]
  assert batch.expand(os.path.join(d, "**", "a.png")) == sorted(
      [os.path.join(d, "a.png"), os.path.join(d, "sub", "a.png")])
  lst = tmp_path / "list.txt"
  lst.write_text(f"# two images\n{os.path.relpath(os.path.join(d, 'c.png'), tmp_path)}\n\n"
                 f"{os.path.join(d, 'a.png')}\n")
  assert batch.expand(f"@{lst}") == [os.path.join(d, "a.png"), os.path.join(d, "c.png")]
  with pytest.raises(KfjaxError, match="no images found"):
    batch.expand(os.path.join(d, "*.jpg"))
  lst.write_text("missing.png\n")
  with pytest.raises(KfjaxError, match="do not exist, first: .*missing.png"):
    batch.expand(f"@{lst}")
  with pytest.raises(KfjaxError, match="cannot read the image list"):
    batch.expand(f"@{tmp_path / 'nope.txt'}")


def test_unique_names_only_disambiguate_shared_stems():
  names = batch.unique_names(["/x/a.png", "/y/a.png", "/x/b.tif"])
  assert names["/x/b.tif"] == "b"
  assert names["/x/a.png"] != names["/y/a.png"]
  assert all(names[p].startswith("a-") for p in ("/x/a.png", "/y/a.png"))
  # A path's name does not depend on the rest of the batch.
  assert batch.unique_names(["/x/a.png", "/y/a.png"]) == {p: names[p] for p in ("/x/a.png", "/y/a.png")}


def test_shares_balance_cost_longest_first():
  costs = {"a": 100.0, "b": 60.0, "c": 50.0, "d": 40.0, "e": 10.0, "f": 10.0}
  two = batch.shares(costs, 2)
  assert two == [["a", "d"], ["b", "c", "e", "f"]]       # loads 140 / 130
  loads = [sum(costs[n] for n in s) for s in two]
  assert max(loads) - min(loads) <= max(costs.values())
  # Equal counts would put a and b together (sorted by name, split in halves): not balanced.
  assert sorted(sum(two, [])) == sorted(costs)               # disjoint and complete
  assert batch.shares(costs, 1) == [["a", "b", "c", "d", "e", "f"]]
  assert batch.shares(costs, 8)[6:] == [[], []]
  assert batch.shares(dict(reversed(list(costs.items()))), 2) == two  # order-free


def test_estimate_cost_grows_with_pixels_and_scale():
  cfg = config_lib.preset("cpu")
  small, big = batch.estimate_cost(cfg, (64, 64)), batch.estimate_cost(cfg, (256, 256))
  assert 1 < big / small < 16  # Phase 1's crop cost does not grow with the image
  cfg.scale = 4
  assert batch.estimate_cost(cfg, (64, 64)) > small
  assert batch.estimate_cost(cfg, None) == 0.0


def test_estimate_cost_follows_what_each_method_runs():
  cfg = config_lib.preset("cpu")   # restore.final from the bicubic start
  u, px = batch.UNIT_SECONDS, lambda h, w: h * w * int(cfg.scale) ** 2
  tv = lambda h, w: u["restore"] * int(cfg.restore.steps) * px(h, w)
  cost = lambda size, *a: batch.estimate_cost(cfg, size, *a)
  # A non-blind run that skips both phases is its restoration alone: all per pixel.
  assert cost((64, 64), "kernelfusion", True) == pytest.approx(tv(64, 64))
  assert cost((128, 128), "kernelfusion", True) == pytest.approx(16 * cost((32, 32), "kernelfusion", True))
  assert cost((64, 64), "kernelfusion", True) < cost((64, 64)) / 10
  # KernelGAN and DDM4IP: the same training for every size, then the restoration.
  for m in ("kernelgan", "ddm4ip"):
    assert cost((128, 128), m) - cost((64, 64), m) == pytest.approx(tv(128, 128) - tv(64, 64))
    assert cost((64, 64), m) > tv(64, 64)
  # IKE's image comes from its inverse pass: the cost does not depend on the size.
  assert cost((64, 64), "ike") == cost((256, 256), "ike") > 0
  # Without restore.final a non-blind run needs Phase 2 (its output), and Phase 1 for it.
  cfg.restore.final = False
  assert cost((64, 64), "kernelfusion", True) == cost((64, 64), "kernelfusion", False)
  # The `cpu` ×4 numbers the constants come from (BENCHMARKS.md): a 64² LR image costs
  # Phase 1 ≈ 41 s + Phase 2 ≈ 322 s, and with the restoration ≈ 10 s more.
  cfg.scale = 4
  assert cost((64, 64)) == pytest.approx(41 + 322, rel=0.02)
  cfg.restore.final = True
  assert cost((64, 64)) - cost((64, 64), "kernelfusion", True) == pytest.approx(41 + 322, rel=0.02)


def test_merge_report_is_idempotent_and_prefers_finished_rows(tmp_path):
  cfg = ml_collections.ConfigDict({"name": "smoke"})
  row = lambda n, s, p, e="": batch._row(n, f"/i/{n}.png", s, p, cfg, error=e)
  batch._save_part(str(tmp_path), 0, [row("a", "done", 0), row("b", "failed", 0, "boom")])
  batch._save_part(str(tmp_path), 1, [row("b", "done", 1), row("c", "failed", 1, "bad, \"x\"")])
  first = batch.merge_report(str(tmp_path))
  text = (tmp_path / "report.csv").read_text()
  assert batch.merge_report(str(tmp_path)) == first
  assert (tmp_path / "report.csv").read_text() == text
  rows = _report(str(tmp_path))
  assert {n: r["status"] for n, r in rows.items()} == {"a": "done", "b": "done", "c": "failed"}
  assert rows["b"]["process"] == "1" and rows["c"]["error"] == "bad, \"x\""
  assert list(rows["a"]) == list(batch.REPORT_FIELDS)


def test_distributed_is_auto_detected_only_on_multi_process_clusters():
  assert not distributed.auto_detected({})
  assert not distributed.auto_detected({"SLURM_NTASKS": "4"})  # sbatch script, not srun
  assert not distributed.auto_detected({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"})
  assert distributed.auto_detected({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "8"})
  assert not distributed.auto_detected({"TPU_WORKER_HOSTNAMES": "localhost"})
  assert distributed.auto_detected({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"})


def test_heartbeat_comes_from_the_environment_and_bad_values_are_one_line():
  assert distributed.heartbeat_seconds({}) == distributed.HEARTBEAT_SECONDS
  assert distributed.heartbeat_seconds({"KFJAX_HEARTBEAT_SECONDS": " 12 "}) == 12
  for bad in ("1", "ten", "2.5", "-4"):
    with pytest.raises(ValueError, match="KFJAX_HEARTBEAT_SECONDS must be a whole number"):
      distributed.heartbeat_seconds({"KFJAX_HEARTBEAT_SECONDS": bad})


def test_importing_kfjax_starts_no_backend():
  """``jax.distributed.initialize`` must come before JAX's backend starts; kfjax's
  modules must not start it at import (e.g. by compiling at module level)."""
  code = ("import jax; from jax._src import xla_bridge as xb\n"
          "from kfjax import batch, main, pipeline, phase1, phase2, kernelgan, ddm4ip, restore\n"
          "print(bool(xb._backends))")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                       timeout=300)
  assert res.stdout.strip() == "False", res.stderr[-2000:]


# -- one process ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_process(images, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("batch") / "out")
  first = _cli("--images", str(images / "**" / "*.png"), "--workdir", out, *TINY)
  first_rows = _report(out) if os.path.exists(os.path.join(out, "report.csv")) else {}
  second = _cli("--images", str(images / "**" / "*.png"), "--workdir", out, *TINY)
  return out, first, second, first_rows


def test_batch_runs_every_image_and_records_the_failure(one_process, images):
  out, res, _, rows = one_process
  assert res.returncode == 1, res.stderr[-3000:]
  assert "Traceback" not in res.stderr
  failed = [ln for ln in res.stderr.splitlines() if "FAILED broken" in ln]
  assert len(failed) >= 1 and "not a recognised image" in failed[-1]
  assert sorted(rows) == sorted(["a-" + n.split("-")[1] for n in rows if n.startswith("a-")]
                                + ["b", "broken", "c"])
  assert len([n for n in rows if n.startswith("a-")]) == 2
  assert {n: r["status"] for n, r in rows.items() if not n.startswith("a-")} == {
      "b": "done", "broken": "failed", "c": "done"}
  for name, r in rows.items():
    if r["status"] == "done":
      files = set(os.listdir(os.path.join(out, name)))
      assert {"sr.png", "kernel.npy", "kernel.png", "bicubic.png", "summary.json"} <= files
      assert float(r["phase1_seconds"]) > 0 and float(r["phase2_seconds"]) > 0
      assert r["process"] == "0" and r["preset"] == "smoke" and r["device"].startswith("cpu")
  assert "3 done" in res.stdout or "4 done" in res.stdout


def test_batch_rerun_skips_finished_images(one_process):
  out, _, res, _ = one_process
  assert res.returncode == 1  # the broken image still fails
  rows = _report(out)
  assert {r["status"] for n, r in rows.items() if n != "broken"} == {"skipped"}
  assert "0 done, 4 already finished, 1 failed" in res.stdout


def test_batch_image_equals_a_single_image_run(one_process, images, tmp_path):
  """Image n of a batch is exactly the single-image run of image n."""
  out = one_process[0]
  wd = str(tmp_path / "single")
  res = _cli("--image", str(images / "b.png"), "--workdir", wd, *TINY)
  assert res.returncode == 0, res.stderr[-2000:]
  np.testing.assert_array_equal(np.load(os.path.join(out, "b", "kernel.npy")),
                                np.load(os.path.join(wd, "kernel.npy")))
  np.testing.assert_array_equal(kio.load_image(os.path.join(out, "b", "sr.png"))[0],
                                kio.load_image(os.path.join(wd, "sr.png"))[0])


@pytest.mark.parametrize("args,needle", [
    (["--images", "{d}/*.jpg", "--workdir", "{t}/o"], "no images found"),
    (["--images", "{d}"], "--images needs --workdir"),
    (["--images", "{d}", "--image", "{d}/a.png", "--workdir", "{t}/o"], "exclude each other"),
    (["--images", "@{t}/none.txt", "--workdir", "{t}/o"], "cannot read the image list"),
    (["--image", "{d}/a.png", "--distributed", "--workdir", "{t}/o"], "needs --images"),
    (["--images", "{d}", "--workdir", "{t}/o", "--coordinator_address", "127.0.0.1:1"],
     "go together"),
])
def test_batch_bad_input_gives_one_line(images, tmp_path, args, needle):
  args = [a.format(d=images, t=tmp_path) for a in args]
  res = _cli(*args, *TINY)
  assert res.returncode != 0
  assert "Traceback" not in res.stderr, res.stderr[-2000:]
  assert needle in res.stderr, res.stderr[-2000:]


# -- several images per program ----------------------------------------------------------

@pytest.fixture(scope="module")
def grouped_run(tmp_path_factory):
  """Eight same-size images and one of another size, ``--images_per_device 2`` on 4
  simulated CPU devices: the eight run as one group (4 devices × 2 vmapped)."""
  root = tmp_path_factory.mktemp("grouped")
  d = root / "imgs"
  os.makedirs(d)
  photo = skimage.data.astronaut().astype(np.float64) / 255.0
  for i in range(8):
    kio.save_image(str(d / f"s{i}.png"), photo[40 + 50 * i:56 + 50 * i, 180:196])
  kio.save_image(str(d / "wide.png"), photo[200:216, 300:324])
  out = str(root / "out")
  args = ["--images", str(d), "--workdir", out, "--images_per_device", "2", *TINY]
  env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
                             "--xla_backend_optimization_level=0"}
  # Killed (SIGKILL) in the middle of the group's Phase 2, once every image of the group
  # has a checkpoint, then the same command again.
  killed = subprocess.Popen([sys.executable, "-m", "kfjax.main", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _kill_in_phase2(killed, *[os.path.join(out, f"s{i}") for i in range(8)])
  killed_out, _ = killed.communicate(timeout=600)
  at_kill = {f"s{i}": batch.checkpoint_progress(os.path.join(out, f"s{i}")) for i in range(8)}
  res = _cli(*args, env=env)
  return d, root, out, res, (killed.returncode, killed_out, at_kill)


def test_same_size_images_run_together_over_four_devices(grouped_run):
  _, _, out, res, (killed_rc, killed_out, at_kill) = grouped_run
  assert killed_rc == -signal.SIGKILL
  # The eight ran as one group, 2 per device (the odd size runs alone, never padded).
  assert "8 images of 16x16 together on 4 device(s): s0, s1" in killed_out, killed_out[-2000:]
  assert res.returncode == 0, res.stderr[-3000:]
  rows = _report(out)
  assert sorted(rows) == [f"s{i}" for i in range(8)] + ["wide"]
  assert {rows[f"s{i}"]["status"] for i in range(8)} == {"done"}
  assert rows["wide"]["status"] in ("done", "skipped")   # (it may have finished before the kill)
  with open(os.path.join(out, "wide", "summary.json")) as f:
    assert "group" not in json.load(f)
  # The re-run: images that stood at the same checkpoints ran together again, each resumed
  # from its own (Phase 1 finished, Phase 2 in the middle).
  together = 0
  for names, devices in batch.plan_groups(at_kill, devices=4, per_device=2):
    for name in names:
      with open(os.path.join(out, name, "summary.json")) as f:
        summary = json.load(f)
      assert summary["phase1"]["restored_step"] == 4
      assert summary["phase2"]["restored_step"] is not None
      if len(names) > 1:
        group = summary["group"]
        assert (group["names"], group["devices"]) == (names, devices)
      else:
        assert "group" not in summary
    together += len(names) if len(names) > 1 else 0
  assert together >= 2       # the group path restored checkpoints


def test_an_image_of_a_group_matches_its_single_run(grouped_run, tmp_path):
  """Image 5 (the second of the third device), from the group that was killed and resumed,
  against its run alone, to float tolerance: Phase 1 agrees to rounding; Phase 2's Adam
  turns rounding in near-zero gradients (conv biases before BatchNorm) into up to ``lr``
  per iteration (see tests/test_throughput.py), so its images agree closely, not bit for
  bit."""
  d, _, out, _, _ = grouped_run
  name = "s5"
  wd = str(tmp_path / name)
  res = _cli("--image", str(d / f"{name}.png"), "--workdir", wd, *TINY)
  assert res.returncode == 0, res.stderr[-2000:]
  with open(os.path.join(out, name, "summary.json")) as f:
    grouped = json.load(f)
  with open(os.path.join(wd, "summary.json")) as f:
    single = json.load(f)
  np.testing.assert_allclose(grouped["phase1"]["final_loss"], single["phase1"]["final_loss"],
                             rtol=1e-5)
  np.testing.assert_allclose(grouped["phase2"]["final_loss"], single["phase2"]["final_loss"],
                             rtol=2e-3)
  np.testing.assert_allclose(np.load(os.path.join(out, name, "kernel.npy")),
                             np.load(os.path.join(wd, "kernel.npy")), rtol=1e-4, atol=1e-6)
  a = kio.load_image(os.path.join(out, name, "sr.png"))[0]
  b = kio.load_image(os.path.join(wd, "sr.png"))[0]
  assert np.mean(np.abs(a - b)) < 0.01, np.mean(np.abs(a - b))
  # (another image of the group is far from this one: the comparison can fail)
  other = kio.load_image(os.path.join(out, "s4", "sr.png"))[0]
  assert np.mean(np.abs(other - b)) > 0.05


def test_plan_groups_keeps_sizes_apart_and_fills_devices():
  keys = {f"a{i}": (16, 16) for i in range(7)} | {"b": (16, 20), "c": None}
  plan = batch.plan_groups(keys, devices=4, per_device=2)
  assert plan == [([f"a{i}" for i in range(4)], 4), (["a4", "a5", "a6"], 3), (["b"], 1),
                  (["c"], 1)]
  plan = batch.plan_groups({f"a{i}": 1 for i in range(9)}, devices=2, per_device=4)
  assert plan == [([f"a{i}" for i in range(8)], 2), (["a8"], 1)]


# -- two processes -------------------------------------------------------------------------

def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(spec, out, victim, image):
  """Both processes of one ``--distributed`` run (2 simulated CPU devices each); process
  ``victim`` is SIGKILLed in the middle of ``image``'s Phase 2 (:func:`_kill_in_phase2`)."""
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "kfjax.main", "--images", spec, "--workdir", out, *TINY,
       "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
       "--process_id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=TWO_PROCESS_ENV) for i in range(2)]
  _kill_in_phase2(procs[victim], os.path.join(out, image))
  outs = [p.communicate(timeout=900) for p in procs]
  return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


# Two simulated CPU devices per process; a killed process counts as dead after 10 s
# instead of 30 (process 0 waits that long for it before it exits).
TWO_PROCESS_ENV = {**ENV, "KFJAX_HEARTBEAT_SECONDS": "10",
                   "XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                                "--xla_backend_optimization_level=0"}


@pytest.fixture(scope="module")
def two_process_runs(images, tmp_path_factory):
  """Two processes on images a, b, c; process 1 is killed in the middle of its image's
  Phase 2 (its share is image c: b and c cost the same and come first, a goes to the less
  loaded, lower process) while process 0 finishes its share; then the same command again,
  through launch/local.sh (2 processes on this machine), completes the set."""
  root = tmp_path_factory.mktemp("dist")
  good = root / "imgs"
  os.makedirs(good)
  for name in ("a.png", "b.png", "c.png"):
    os.link(images / name, good / name)
  out = str(root / "out")
  first = _two_processes(str(good), out, victim=1, image="c")
  first_rows = _report(out) if os.path.exists(os.path.join(out, "report.csv")) else {}
  script = os.path.join(os.path.dirname(__file__), "..", "launch", "local.sh")
  again = subprocess.run(["bash", script, "2", str(good), out, *TINY], capture_output=True,
                         text=True, timeout=900, env={**TWO_PROCESS_ENV, "PYTHON": sys.executable})
  return good, out, first, first_rows, again


def test_two_processes_share_the_images_and_merge_one_report(two_process_runs):
  good, out, first, first_rows, again = two_process_runs
  assert first[0][0] == 0, first[0][2][-3000:]              # process 0 finished its share
  assert first[1][0] == -signal.SIGKILL
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Traceback" not in again.stderr + first[0][2]
  # The killed process wrote nothing for c; the survivor's part made a report of its own.
  assert {n: (r["status"], r["process"]) for n, r in first_rows.items()} == {
      "a": ("done", "0"), "b": ("done", "0")}
  rows = _report(out)
  assert sorted(rows) == ["a", "b", "c"]
  assert (rows["c"]["status"], rows["c"]["process"]) == ("done", "1")
  assert {rows["a"]["status"], rows["b"]["status"]} <= {"done", "skipped"}
  assert {rows["a"]["process"], rows["b"]["process"]} == {"0"}   # disjoint shares
  assert sorted(os.listdir(os.path.join(out, batch.PARTS))) == ["process-0.json", "process-1.json"]
  for name in rows:
    with open(os.path.join(out, name, "summary.json")) as f:
      assert json.load(f)["image"] == str(good / f"{name}.png")


def test_a_killed_process_loses_only_its_unfinished_work(two_process_runs, one_process, images):
  """The re-run resumes c from the checkpoint the killed process left, and every image
  equals the uninterrupted one-process batch's result for it, to float tolerance: the
  processes' simulated devices split XLA's threads differently, and Phase 2's Adam turns
  rounding into up to ``lr`` per iteration (see the group test above)."""
  _, out, _, _, _ = two_process_runs
  with open(os.path.join(out, "c", "summary.json")) as f:
    assert json.load(f)["phase2"]["restored_step"] is not None
  whole = one_process[0]
  srs = {}
  for name in ("a", "b", "c"):
    (ref,) = [os.path.join(whole, n) for n in os.listdir(whole)
              if batch.finished(os.path.join(whole, n), str(images / f"{name}.png"))]
    np.testing.assert_allclose(np.load(os.path.join(out, name, "kernel.npy")),
                               np.load(os.path.join(ref, "kernel.npy")), rtol=1e-4, atol=1e-6)
    srs[name] = kio.load_image(os.path.join(out, name, "sr.png"))[0]
    diff = np.mean(np.abs(srs[name] - kio.load_image(os.path.join(ref, "sr.png"))[0]))
    assert diff < 0.01, (name, diff)
  assert np.mean(np.abs(srs["b"] - srs["c"])) > 0.05   # (images differ: the check can fail)


def test_launch_scripts_parse():
  """The pod and SLURM scripts cannot run here: they must at least parse (and pass
  shellcheck where it is installed); local.sh runs for real above."""
  folder = os.path.join(os.path.dirname(__file__), "..", "launch")
  scripts = sorted(f for f in os.listdir(folder) if f.endswith(".sh"))
  assert {"local.sh", "slurm.sh", "tpu_pod.sh", "batch.sh"} <= set(scripts)
  for name in scripts:
    res = subprocess.run(["bash", "-n", os.path.join(folder, name)], capture_output=True,
                         text=True)
    assert res.returncode == 0, (name, res.stderr)
  if shutil.which("shellcheck"):
    res = subprocess.run(["shellcheck", "-S", "error", *[os.path.join(folder, n) for n in scripts]],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:]


def test_sigterm_checkpoints_exits_143_and_the_rerun_resumes(images, tmp_path):
  """SIGTERM during Phase 1: the chunk running finishes, a checkpoint is written, the
  command exits with 143 and one line; the same command then resumes from there."""
  wd = str(tmp_path / "wd")
  args = ["--image", str(images / "c.png"), "--workdir", wd, *TINY,
          "--config.train.steps=400", "--config.train.checkpoint_every=1000"]
  proc = subprocess.Popen([sys.executable, "-m", "kfjax.main", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=ENV)
  pd = os.path.join(wd, "checkpoints", "pd")
  deadline = time.time() + 600
  # config.json is written after the handler is installed, just before Phase 1 starts.
  while (time.time() < deadline and proc.poll() is None
         and not os.path.exists(os.path.join(wd, "config.json"))):
    time.sleep(0.05)
  time.sleep(2.0)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 143, err[-3000:]
  assert "Traceback" not in err and "stopped by SIGTERM" in err
  steps = [int(n) for n in os.listdir(pd) if n.isdigit()]
  assert steps and 0 < max(steps) < 400            # a checkpoint where it stopped
  assert not os.path.exists(os.path.join(wd, "summary.json"))
  res = _cli(*args)
  assert res.returncode == 0, res.stderr[-3000:]
  with open(os.path.join(wd, "summary.json")) as f:
    assert json.load(f)["phase1"]["restored_step"] == max(steps)
