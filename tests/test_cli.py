"""End-to-end CLI runs on tiny images with the ``smoke`` preset, and bad-input handling."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data

from kfjax import degrade
from kfjax import io as kio

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _cli(*args, cwd=None, env=None):
  return subprocess.run([sys.executable, "-m", "kfjax.main", *args], capture_output=True,
                        text=True, env={**ENV, **(env or {})}, cwd=cwd, timeout=600)


@pytest.fixture(scope="module", autouse=True)
def private_compile_cache(tmp_path_factory):
  """The CLI's default compilation cache ($XDG_CACHE_HOME/kfjax/jax), private to this module."""
  ENV.pop("JAX_COMPILATION_CACHE_DIR", None)
  ENV["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg"))
  return os.path.join(ENV["XDG_CACHE_HOME"], "kfjax", "jax")


def _phase_programs(folder):
  """The cached Phase 1 / Phase 2 chunk programs (smaller programs are cached or not
  depending on whether their compile took JAX's 1 s threshold)."""
  return sorted(f for f in os.listdir(folder) if f.startswith("jit_chunk-"))


@pytest.fixture(scope="module")
def lr_png(tmp_path_factory):
  """A 20×24 RGB crop of a real photo, degraded at ×2 by a Gaussian kernel."""
  d = tmp_path_factory.mktemp("img")
  hr = skimage.data.chelsea()[100:140, 120:168].astype(np.float64) / 255.0
  yy, xx = np.mgrid[0:12, 0:12] - 5.5
  k = np.exp(-(yy ** 2 + xx ** 2) / (2 * 1.2 ** 2))
  k /= k.sum()
  lr = degrade.downscale_np(hr, k, 2)
  path = str(d / "lr.png")
  kio.save_image(path, lr)
  np.save(str(d / "k.npy"), k)
  return path, str(d / "k.npy")


@pytest.fixture(scope="module")
def blind_run(lr_png, tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("wd") / "out")
  res = _cli("--image", lr_png[0], "--config", "smoke", "--workdir", wd, "--quiet")
  return wd, res


def test_blind_run_writes_every_output(blind_run):
  wd, res = blind_run
  assert res.returncode == 0, res.stderr[-3000:]
  sr, info = kio.load_image(os.path.join(wd, "sr.png"))
  assert sr.shape == (40, 48, 3) and info.bit_depth == 8
  bic, _ = kio.load_image(os.path.join(wd, "bicubic.png"))
  assert bic.shape == (40, 48, 3)
  k = np.load(os.path.join(wd, "kernel.npy"))
  assert k.dtype == np.float32 and k.shape == (12, 12)
  assert k.min() >= 0 and abs(float(k.sum()) - 1.0) < 1e-5
  kimg, _ = kio.load_image(os.path.join(wd, "kernel.png"))
  assert kimg.shape[0] >= 12 and kimg.shape[0] % 12 == 0
  cfg = json.load(open(os.path.join(wd, "config.json")))
  assert cfg["name"] == "smoke" and cfg["scale"] == 2
  summary = json.load(open(os.path.join(wd, "summary.json")))
  assert summary["preset"] == "smoke" and summary["mode"] == "blind"
  assert summary["lr_size"] == [20, 24, 3] and summary["sr_size"] == [40, 48, 3]
  assert summary["phase1"]["steps"] == 6 and summary["phase1"]["restored_step"] is None
  assert np.isfinite(summary["phase2"]["final_loss"])
  assert "preset 'smoke'" in res.stdout and "cpu" in res.stdout


def test_compile_cache_is_filled_then_reused(blind_run, lr_png, private_compile_cache, tmp_path,
                                             monkeypatch):
  """The first run stored its compiled programs; a run on another same-size image's workdir
  compiles nothing new and gives the same image."""
  wd, _ = blind_run
  entries = _phase_programs(private_compile_cache)
  assert len(entries) >= 2, os.listdir(private_compile_cache)
  wd2 = str(tmp_path / "again")
  res = _cli("--image", lr_png[0], "--config", "smoke", "--workdir", wd2, "--quiet")
  assert res.returncode == 0, res.stderr[-3000:]
  assert _phase_programs(private_compile_cache) == entries
  np.testing.assert_array_equal(kio.load_image(os.path.join(wd2, "sr.png"))[0],
                                kio.load_image(os.path.join(wd, "sr.png"))[0])
  # --compile_cache= turns the cache off; a folder that cannot be made never stops a run.
  from kfjax import runtime
  assert runtime.compile_cache_dir("") is None
  assert runtime.compile_cache_dir("~/cc") == os.path.expanduser("~/cc")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/j")
  assert runtime.compile_cache_dir(None) == "/j"
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", "/x")
  assert runtime.compile_cache_dir(None) == os.path.join("/x", "kfjax", "jax")
  blocker = tmp_path / "file"
  blocker.write_text("")
  assert runtime.use_compile_cache(str(blocker / "cache")) is None
  # The size cap: JAX's own variable when set (-1: none), else kfjax's.
  assert runtime.cache_max_bytes({}) == runtime.CACHE_MAX_BYTES == 2 * 2 ** 30
  assert runtime.cache_max_bytes({"JAX_COMPILATION_CACHE_MAX_SIZE": "-1"}) == -1
  assert runtime.cache_max_bytes({"JAX_COMPILATION_CACHE_MAX_SIZE": " 1000 "}) == 1000
  assert runtime.cache_max_bytes({"JAX_COMPILATION_CACHE_MAX_SIZE": "lots"}) == runtime.CACHE_MAX_BYTES


def test_rerun_restores_pd_and_nonblind_uses_given_kernel(blind_run, lr_png):
  wd, _ = blind_run
  res = _cli("--image", lr_png[0], "--config", "smoke", "--workdir", wd, "--quiet",
             "--kernel", lr_png[1], "--config.restore.final=True", "--config.restore.steps=5")
  assert res.returncode == 0, res.stderr[-3000:]
  summary = json.load(open(os.path.join(wd, "summary.json")))
  assert summary["phase1"]["restored_step"] == 6
  assert np.isfinite(summary["phase1"]["final_loss"])   # kept with the finished checkpoint
  assert summary["mode"] == "nonblind"
  assert summary["phase2"]["final_restore"]["init"] == "phase2"   # restore.final ran
  k_true = np.load(lr_png[1])
  np.testing.assert_allclose(np.load(os.path.join(wd, "kernel.npy")), k_true, atol=1e-6)


def test_gray_16bit_scale3_keeps_channels_and_depth(tmp_path):
  img = (skimage.data.camera()[100:118, 100:120].astype(np.float64) / 255.0)[..., None]
  path = str(tmp_path / "g16.png")
  kio.save_image(path, img, bit_depth=16)
  wd = str(tmp_path / "wd")
  res = _cli("--image", path, "--config", "smoke", "--scale", "3", "--workdir", wd, "--quiet",
             "--config.kernel.size=9")
  assert res.returncode == 0, res.stderr[-3000:]
  sr, info = kio.load_image(os.path.join(wd, "sr.png"))
  assert sr.shape == (54, 60, 1) and info.bit_depth == 16 and info.channels == 1


def test_workdir_for_another_image_is_refused(blind_run, tmp_path):
  wd, _ = blind_run
  other = str(tmp_path / "other.png")
  kio.save_image(other, np.random.default_rng(0).random((20, 24, 3)))
  res = _cli("--image", other, "--config", "smoke", "--workdir", wd, "--quiet")
  assert res.returncode != 0
  assert "another image" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("args,needle", [
    (["--image", "/nonexistent/x.png"], "no such file"),
    (["--image", "{txt}"], "not a recognised image"),
    (["--image", "{small}"], "at least 16"),
    (["--image", "{good}", "--scale", "1"], "--scale"),
    (["--image", "{good}", "--config.sample.num_steps=0"], "num_steps"),
    (["--image", "{good}", "--kernel", "/nonexistent/k.npy"], "no such kernel"),
    (["--image", "{good}", "--kernel", "{badk}"], "square"),
    (["--image", "{good}", "--config", "/nonexistent/cfg.py"], "cfg.py"),
    (["--image", "{good}", "--config.bogus=1"], "no field 'bogus'"),
    (["--image", "{good}", "--config.train.bogus=1"], "no field 'train.bogus'"),
    (["--image", "{good}", "--config.train.steps=abc"], "--config.train.steps"),
    (["--image", "{good}", "--workdir", "{blocked}/wd"], "cannot create the workdir"),
    ([], "--image"),
])
def test_bad_input_gives_one_clear_line(tmp_path, lr_png, args, needle):
  txt = tmp_path / "notes.png"
  txt.write_text("not an image")
  small = str(tmp_path / "small.png")
  kio.save_image(small, np.zeros((10, 10, 3)))
  badk = str(tmp_path / "badk.npy")
  np.save(badk, np.ones((3, 4)))
  blocked = tmp_path / "a_file"
  blocked.write_text("")
  args = [a.format(txt=txt, small=small, good=lr_png[0], badk=badk, blocked=blocked)
          for a in args]
  preset = [] if "--config" in args else ["--config", "smoke"]
  workdir = [] if "--workdir" in args else ["--workdir", str(tmp_path / "wd")]
  res = _cli(*preset, *args, *workdir, "--quiet")
  assert res.returncode != 0
  assert "Traceback" not in res.stderr, res.stderr[-2000:]
  assert needle in res.stderr, res.stderr[-2000:]
  assert not os.path.exists(tmp_path / "wd" / "sr.png")


def test_bad_conv_backward_env_gives_one_clear_line(tmp_path, lr_png):
  res = _cli("--image", lr_png[0], "--config", "smoke", "--workdir", str(tmp_path / "wd"),
             "--quiet", env={"KFJAX_CONV_BACKWARD": "cudnn"})
  assert res.returncode == 2
  assert "Traceback" not in res.stderr, res.stderr[-2000:]
  assert "KFJAX_CONV_BACKWARD must be auto, custom or native" in res.stderr
