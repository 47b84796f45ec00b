"""The evaluation harness: suites, the runner (resume, failures), the report, the CLI."""

import csv
import json
import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest

from kfjax import degrade
from kfjax.bench import kernels
from kfjax.bench import metrics
from kfjax.bench import methods
from kfjax.bench import report
from kfjax.bench import runner
from kfjax.bench import suites

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _bench(*args):
  return subprocess.run([sys.executable, "-m", "kfjax.bench", *args], capture_output=True,
                        text=True, env=ENV, timeout=600)


# -- methods -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,field,value", [
    ("kf_inr", "kernel.net", "inr"), ("kf_linear_cnn", "kernel.net", "linear_cnn"),
    ("kf_direct_relu", "kernel.net", "direct_relu"), ("kf_two_unets", "sample.two_unets", True),
    ("kf_mean3", "sample.num_samples", 3), ("kf_bf16", "precision", "bfloat16")])
def test_variants_run_kernelfusion_with_their_overrides(monkeypatch, name, field, value):
  from kfjax import config as config_lib
  seen = {}
  monkeypatch.setattr(methods, "kernelfusion", lambda case, cfg, workdir: seen.update(cfg=cfg))
  base = config_lib.preset("cpu")
  methods.METHODS[name]("case", base, "wd")
  *section, key = field.split(".")
  got, expected = seen["cfg"].to_dict(), base.to_dict()
  inner_got = got[section[0]] if section else got
  inner_expected = expected[section[0]] if section else expected
  assert inner_got.pop(key) == value
  inner_expected.pop(key)
  assert got == expected  # nothing else changed, and the preset itself is untouched


# -- suites --------------------------------------------------------------------------------

def test_suites_are_well_formed():
  for name in suites.SUITES:
    specs = suites.suite(name)
    assert specs and len({s.name for s in specs}) == len(specs)
    for s in specs:
      assert s.photo in suites.PHOTOS
      assert s.degradation in kernels.KERNELS or s.degradation in kernels.NONLINEAR
      assert s.hr_size % s.scale == 0
  fams = len(kernels.KERNELS) + len(kernels.NONLINEAR)
  assert len(suites.suite("blind")) == len(suites.PHOTOS) * fams * 2
  mini = suites.suite("mini")
  assert {s.scale for s in mini} == {2, 4} and all(s.hr_size // s.scale == 64 for s in mini)


def test_photos_load_and_fit():
  for p in suites.PHOTOS:
    img = suites.photo(p)
    assert img.ndim == 3 and img.shape[-1] in (1, 3) and 0 <= img.min() <= img.max() <= 1
    assert min(img.shape[:2]) >= 256


@pytest.mark.parametrize("spec", [suites.CaseSpec("coffee", "motion", 2, 48, seed=1),
                                  suites.CaseSpec("camera", "lshape", 4, 64),
                                  suites.CaseSpec("astronaut", "bilateral", 2, 32)])
def test_case_is_deterministic_and_cached_exactly(spec, tmp_path):
  a, b = suites.build_case(spec), suites.build_case(spec)
  np.testing.assert_array_equal(a.hr, b.hr)
  np.testing.assert_array_equal(a.lr, b.lr)
  assert a.params == b.params
  assert a.lr.shape == (spec.hr_size // spec.scale,) * 2 + a.hr.shape[-1:]
  np.testing.assert_array_equal(np.round(a.lr * 255), a.lr * 255)      # 8-bit values
  cached = suites.load_case(spec, str(tmp_path))                         # writes the cache
  again = suites.load_case(spec, str(tmp_path))                          # reads it back
  for c in (cached, again):
    np.testing.assert_allclose(c.hr, a.hr, atol=1e-12)
    np.testing.assert_array_equal(c.lr, a.lr)
  if spec.linear:
    np.testing.assert_array_equal(again.kernel, a.kernel)
    # The LR image is the model's own operator applied to the HR crop, quantised.
    lr = np.asarray(degrade.downscale(a.hr[None].astype(np.float32),
                                      a.kernel.astype(np.float32), spec.scale))[0]
    assert np.abs(lr - a.lr).max() <= 0.5 / 255 + 1e-5
  else:
    assert a.kernel is None and again.kernel is None
  # Another seed gives another case.
  other = suites.build_case(suites.CaseSpec(spec.photo, spec.degradation, spec.scale,
                                            spec.hr_size, seed=spec.seed + 1))
  assert not np.array_equal(other.lr, a.lr)


# -- runner with stand-in methods -------------------------------------------------------------

@pytest.fixture
def fake_methods():
  calls = {"oracle": 0, "broken": 0}

  def oracle(case, cfg, workdir):
    calls["oracle"] += 1
    shifted = np.roll(np.pad(case.kernel, 2), 1, axis=1) if case.kernel is not None else None
    return methods.Result(sr=case.hr, kernel=shifted, seconds=1.5)

  def broken(case, cfg, workdir):
    calls["broken"] += 1
    raise RuntimeError("deliberate\nfailure")

  methods.register("test_oracle")(oracle)
  methods.register("test_broken")(broken)
  yield calls
  del methods.METHODS["test_oracle"], methods.METHODS["test_broken"]


def test_runner_records_resumes_and_survives_failures(fake_methods, smoke_cfg, tmp_path):
  wd = str(tmp_path)
  specs = suites.suite("tiny")
  names = ["bicubic", "test_oracle", "test_broken"]
  rows = runner.run(specs, names, smoke_cfg, wd, border=2, show_progress=False,
                    log=lambda m: None)
  assert len(rows) == len(specs) * 3
  by = {(r["case"], r["method"]): r for r in rows}
  lin, nonlin = specs[0].name, specs[1].name
  # The oracle returns the truth: the kernel metrics see through the shift and padding.
  assert float(by[lin, "test_oracle"]["kernel_ncc"]) > 0.999
  assert float(by[lin, "test_oracle"]["psnr"]) == float("inf")
  assert float(by[lin, "test_oracle"]["seconds"]) == 1.5
  assert np.isnan(float(by[nonlin, "test_oracle"]["kernel_ncc"]))
  # Bicubic metrics equal a direct computation from the cached files.
  case = suites.load_case(specs[0], os.path.join(wd, "cases"))
  from kfjax import io as kio
  sr = kio.load_image(os.path.join(wd, "runs", lin, "bicubic", "sr.png"))[0]
  assert abs(float(by[lin, "bicubic"]["psnr"]) - metrics.psnr(sr, case.hr, crop=2)) < 1e-3
  # The failure is one row, one line, with the traceback in errors.log; the run went on.
  assert all(r["status"] == "error" for r in rows if r["method"] == "test_broken")
  assert by[lin, "test_broken"]["error"] == "RuntimeError: deliberate failure"
  assert "Traceback" in open(os.path.join(wd, "errors.log")).read()
  assert all(r["status"] == "ok" for r in rows if r["method"] != "test_broken")
  # Re-run: finished rows are skipped, failed ones retried; the CSV has one row per key.
  runner.run(specs, names, smoke_cfg, wd, border=2, show_progress=False, log=lambda m: None)
  assert fake_methods == {"oracle": 2, "broken": 4}
  on_disk = list(csv.DictReader(open(os.path.join(wd, "results.csv"))))
  assert len(on_disk) == 6 and set(on_disk[0]) == set(runner.FIELDS)
  # A changed config is a new set of rows.
  cfg2 = methods.with_overrides(smoke_cfg, {"sample.lr": 5e-4})
  runner.run(specs[:1], ["test_oracle"], cfg2, wd, show_progress=False)
  assert fake_methods["oracle"] == 3
  # Report: a table per family and method, and both figures.
  paths = report.write(rows, wd, command="python -m kfjax.bench --suite tiny")
  md = open(paths[0]).read()
  assert "| 2 | gaussian | test_oracle | 1 | 1.000 |" in md
  assert "error: RuntimeError" in md
  for p in paths[1:]:
    assert os.path.getsize(p) > 1000
  assert {os.path.basename(p) for p in paths} == {"report.md", "kernels.png", "crops.png"}


def test_runner_seeds_repeat_rows_and_report_the_spread(smoke_cfg, tmp_path):
  seen = []

  def seeded(case, cfg, workdir):
    seen.append((int(cfg.seed), os.path.basename(workdir)))
    off = 0.01 * (int(cfg.seed) + 1)
    return methods.Result(sr=0.9 * case.hr + off, kernel=case.kernel, seconds=1.0)

  methods.register("test_seeded")(seeded)
  try:
    wd = str(tmp_path)
    specs = suites.suite("tiny")
    rows = runner.run(specs, ["test_seeded"], smoke_cfg, wd, border=2, show_progress=False,
                      seeds=[3, 5])
    runner.run(specs, ["test_seeded"], smoke_cfg, wd, border=2, show_progress=False,
               seeds=[3, 5])  # resumed: nothing runs again
  finally:
    del methods.METHODS["test_seeded"]
  n = len(specs)
  assert int(smoke_cfg.seed) == 0
  assert len(seen) == 2 * n and len(rows) == 2 * n
  # Only the config's own seed (0) writes to runs/<case>/<method>/: a later run of seed 0
  # in the same workdir must not overwrite seed 3's outputs.
  assert sorted(set(seen)) == [(3, "test_seeded-seed3"), (5, "test_seeded-seed5")]
  assert sorted({r["seed"] for r in rows}) == ["3", "5"]
  assert len({r["config"] for r in rows}) == 2            # the seed is in the fingerprint
  cases = [s.name for s in specs]
  three = {c: iio.imread(os.path.join(wd, "runs", c, "test_seeded-seed3", "sr.png"))
           for c in cases}
  for c in cases:
    assert os.path.exists(os.path.join(wd, "runs", c, "test_seeded-seed5", "sr.png"))
    assert not os.path.exists(os.path.join(wd, "runs", c, "test_seeded"))
  methods.register("test_seeded")(seeded)
  try:
    zero = runner.run(specs, ["test_seeded"], smoke_cfg, wd, border=2, show_progress=False,
                      seeds=[0])
  finally:
    del methods.METHODS["test_seeded"]
  assert sorted(set(seen))[0] == (0, "test_seeded") and len(zero) == n
  for c in cases:
    np.testing.assert_array_equal(
        iio.imread(os.path.join(wd, "runs", c, "test_seeded-seed3", "sr.png")), three[c])
    assert not np.array_equal(
        iio.imread(os.path.join(wd, "runs", c, "test_seeded", "sr.png")), three[c])
  # The figures of seed 3 read its own folders, not seed 0's.
  assert report.write(rows, wd, figure_seed=3, base_seed=0)[1:] != []
  crops = iio.imread(os.path.join(wd, "figures", "crops.png"))
  report.write(rows, wd, figure_seed=3, base_seed=3)   # seed 3 looked for in test_seeded/
  assert not np.array_equal(iio.imread(os.path.join(wd, "figures", "crops.png")), crops)
  seen[:] = [x for x in seen if x[0] != 0]
  # The spread table: per-seed means over the cases and their sample sd, by NumPy.
  per_seed = []
  for seed in (3, 5):
    ps = []
    for spec in specs:
      hr = suites.load_case(spec, os.path.join(wd, "cases")).hr.astype(np.float64)
      d = (0.9 * hr + 0.01 * (seed + 1) - hr)[2:-2, 2:-2]
      ps.append(10 * np.log10(1.0 / np.mean(d ** 2)))
    per_seed.append(np.mean(ps))
  md = report.markdown(rows, "t")
  line = next(ln for ln in md.splitlines() if ln.startswith("| 2 | test_seeded | 3, 5 |"))
  assert f"{per_seed[0]:.2f}, {per_seed[1]:.2f}" in line
  assert f"{np.mean(per_seed):.2f} ± {np.std(per_seed, ddof=1):.2f}" in line
  assert "## Spread over seeds" in md
  assert "## Spread over seeds" not in report.markdown([r for r in rows if r["seed"] == "3"],
                                                       "t")
  # Rows written before the seed column existed get their seed back when resumed.
  path = os.path.join(wd, "results.csv")
  old = [{k: v for k, v in r.items() if k != "seed"} for r in runner.read_rows(path)]
  runner.write_rows(path, old)
  assert all(not r["seed"] for r in runner.read_rows(path))
  methods.register("test_seeded")(seeded)
  try:
    again = runner.run(specs, ["test_seeded"], smoke_cfg, wd, border=2, show_progress=False,
                       seeds=[3, 5])
  finally:
    del methods.METHODS["test_seeded"]
  assert len(seen) == 2 * n and sorted(r["seed"] for r in again) == ["3"] * n + ["5"] * n


def test_a_changed_block_reruns_only_the_methods_that_read_it(smoke_cfg, tmp_path):
  """Each row's fingerprint covers the blocks its method reads (``register``'s ``reads`` and
  ``estimator``) and the top-level fields: a DDM4IP setting re-runs DDM4IP's rows only."""
  calls = {}

  def make(name):
    def fn(case, cfg, workdir):
      calls[name] = calls.get(name, 0) + 1
      return methods.Result(sr=case.hr, seconds=1.0)
    return fn
  methods.register("test_kf")(make("test_kf"))            # KernelFusion-like: all but estimators
  methods.register("test_dd", reads=("restore",), estimator="ddm4ip")(make("test_dd"))
  methods.register("test_plain", reads=())(make("test_plain"))
  names = ["test_kf", "test_dd", "test_plain"]
  steps = [({}, (1, 1, 1)),
           ({"ddm4ip.kernel_lr": 1e-3}, (1, 2, 1)),      # only the estimator's own rows
           ({"ike.iterations": 9, "kernelgan.iterations": 9}, (1, 2, 1)),   # no one's
           ({"restore.steps": 7}, (2, 3, 1)),            # read by test_kf (all) and test_dd
           ({"sample.lr": 5e-4}, (3, 3, 1)),
           ({"seed": 5}, (4, 4, 2))]                       # top-level: everyone's
  try:
    cfg = smoke_cfg
    for overrides, expected in steps:
      cfg = methods.with_overrides(cfg, overrides)
      runner.run(suites.suite("tiny")[:1], names, cfg, str(tmp_path), border=2,
                 show_progress=False)
      assert tuple(calls.get(n, 0) for n in names) == expected, (overrides, calls)
    with pytest.raises(ValueError, match="estimator must be one of"):
      methods.register("test_bad", estimator="restore")
  finally:
    for n in names:
      del methods.METHODS[n], methods.READS[n]
  from kfjax.errors import KfjaxError
  with pytest.raises(KfjaxError, match="unknown method"):
    methods.fingerprint_of(smoke_cfg, "no_such_method")


def test_narrow_methods_never_read_the_blocks_their_fingerprint_leaves_out(smoke_cfg, tmp_path,
                                                                          monkeypatch):
  """The methods whose fingerprint leaves blocks out really do not read them: each runs on a
  config with every other block deleted (reading one would raise), checks skipped."""
  import ml_collections
  case = suites.load_case(suites.suite("tiny")[0], str(tmp_path / "cases"))
  monkeypatch.setattr(methods.pipeline, "validate_config", lambda cfg: None)
  full = smoke_cfg.to_dict()
  for name in ("bicubic", "tv_nonblind", "tv_generic", "ddm4ip", "ike"):
    reads, estimator = methods.READS[name]
    stripped = ml_collections.ConfigDict(
        {k: v for k, v in full.items() if not isinstance(v, dict) or k in {*reads, estimator}})
    assert methods.fingerprint_of(stripped, name) == methods.fingerprint_of(smoke_cfg, name)
    r = methods.get(name)(case, stripped, str(tmp_path / name))
    assert r.sr.shape == case.hr.shape and np.all(np.isfinite(r.sr)), name
  # KernelFusion's reads everything but the estimators' blocks.
  assert methods.READS["kernelfusion"] == (None, None)
  assert methods.fingerprint_of(methods.with_overrides(smoke_cfg, {"train.steps": 3}),
                                "kernelfusion") != methods.fingerprint_of(smoke_cfg, "kernelfusion")


def test_with_overrides_copies_and_rejects_unknown(smoke_cfg):
  cfg = methods.with_overrides(smoke_cfg, {"kernel.width": 7})
  assert cfg.kernel.width == 7 and smoke_cfg.kernel.width != 7
  from kfjax.errors import KfjaxError
  with pytest.raises(KfjaxError, match="no field"):
    methods.with_overrides(smoke_cfg, {"kernel.nope": 1})


# -- real methods, end to end -----------------------------------------------------------------

def test_kernelfusion_and_nonblind_share_phase1(smoke_cfg, tmp_path):
  wd = str(tmp_path)
  spec = suites.suite("tiny")[0]
  rows = runner.run([spec], ["kernelfusion", "nonblind", "tv_blind", "tv_nonblind", "bicubic"],
                    smoke_cfg, wd, border=2, show_progress=False)
  assert [r["status"] for r in rows] == ["ok"] * 5, rows
  case_dir = os.path.join(wd, "runs", spec.name)
  pds = [d for d in os.listdir(case_dir) if d.startswith("pd-")]
  assert len(pds) == 1                       # trained once, restored by the second method
  k = np.load(os.path.join(case_dir, "kernelfusion", "kernel.npy"))
  assert k.shape == (12, 12) and k.min() >= 0 and abs(k.sum() - 1) < 1e-5
  assert not os.path.exists(os.path.join(case_dir, "nonblind", "kernel.npy"))
  t_kf, t_nb = float(rows[0]["seconds"]), float(rows[1]["seconds"])
  assert t_kf > 0 and t_nb > 0
  sr = os.path.join(case_dir, "nonblind", "sr.png")
  from kfjax import io as kio
  assert kio.load_image(sr)[0].shape == (32, 32, 3)
  # tv_blind reuses kernelfusion's run (one kf-<fingerprint> folder), its kernel and time.
  assert len([d for d in os.listdir(case_dir) if d.startswith("kf-")]) == 1
  np.testing.assert_array_equal(np.load(os.path.join(case_dir, "tv_blind", "kernel.npy")), k)
  assert float(rows[2]["seconds"]) > t_kf
  assert rows[2]["kernel_ncc"] == rows[0]["kernel_ncc"]
  assert float(rows[0]["kernel_width"]) > 0
  with open(os.path.join(case_dir, "kernelfusion", "info.json")) as f:
    kept = json.load(f)
  assert kept["seconds"] == pytest.approx(t_kf, rel=1e-5) and kept["info"]["seconds_phase1"] > 0
  # The classical solver with the true kernel beats bicubic on this Gaussian-blur case.
  assert float(rows[3]["psnr"]) > float(rows[4]["psnr"]) + 1.0
  assert rows[3]["kernel_ncc"] == "nan"
  for r in rows:
    assert float(r["subpixel_psnr"]) >= float(r["psnr"]) - 3.0
  # The post-processing sweep re-derives tv_blind (threshold 0) and tv_nonblind from the
  # stored run: the same numbers as the runner's rows.
  from kfjax.bench import postprocess
  postprocess.main(["--workdir", wd, "--thresholds", "0,0.9", "--sigmas", "0.5,0.35",
                    "--border", "2", "--weights", "1e-4", "--blends", "1",
                    "--blend_sigmas", "0.5"])
  with open(os.path.join(wd, "postprocess.csv")) as f:
    (pp,) = list(csv.DictReader(f))
  assert float(pp["thr0"]) == pytest.approx(float(rows[2]["subpixel_psnr"]), abs=1e-3)
  assert float(pp["tv_true"]) == pytest.approx(float(rows[3]["subpixel_psnr"]), abs=1e-3)
  assert float(pp["bicubic"]) == pytest.approx(float(rows[4]["subpixel_psnr"]), abs=1e-3)
  assert float(pp["phase2"]) == pytest.approx(float(rows[0]["subpixel_psnr"]), abs=1e-3)
  k_case = np.load(os.path.join(wd, "cases", spec.name, "kernel.npy"))
  from kfjax.models import kernel_net
  for t in (0, 0.9):
    want = metrics.kernel_width_ratio(kernel_net.threshold_kernel(k, t), k_case)
    assert float(pp[f"width{t:g}"]) == pytest.approx(want, rel=1e-6)
  assert pp["thr0_w0.0001"] == pp["thr0"]   # the config's own weight, computed again
  # Blend weight 1 is the Gaussian of kernel.blend_sigma = 0.35 alone (another code path).
  assert float(pp["thr0_b1"]) == pytest.approx(float(pp["gauss0.35"]), abs=1e-3)
  # ... and with --blend_sigmas, the Gaussian of that std instead.
  assert float(pp["thr0_b1_s0.5"]) == pytest.approx(float(pp["gauss0.5"]), abs=1e-3)
  assert float(pp["thr0_b1_s0.5"]) != pytest.approx(float(pp["thr0_b1"]), abs=1e-3)
  # Phase 2's own kernel and image are stored beside the finished ones (equal here: the
  # smoke preset post-processes nothing).
  kf = [d for d in os.listdir(case_dir) if d.startswith("kf-")][0]
  np.testing.assert_allclose(np.load(os.path.join(case_dir, kf, "kernel_phase2.npy")), k,
                             rtol=1e-6, atol=1e-9)


def test_tv_generic_restores_with_a_fixed_gaussian_on_any_case(smoke_cfg, tmp_path):
  """No estimate: the kernel is the same Gaussian (std blend_sigma·s, 6s grid) on a linear
  and a non-linear case, and the TV solve fits the LR image through it."""
  s = 2
  r = np.arange(6 * s) - (6 * s - 1) / 2.0
  sigma = smoke_cfg.kernel.blend_sigma * s
  g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2))
  for spec in suites.suite("tiny")[:2]:
    assert spec.scale == s
    row = runner.run_one(spec, "tv_generic", smoke_cfg, str(tmp_path), 2)
    assert row["status"] == "ok", row
    run_dir = os.path.join(str(tmp_path), "runs", spec.name, "tv_generic")
    k = np.load(os.path.join(run_dir, "kernel.npy"))
    np.testing.assert_allclose(k, g / g.sum(), rtol=1e-5, atol=1e-8)
    from kfjax import io as kio
    sr = kio.load_image(os.path.join(run_dir, "sr.png"))[0].astype(np.float64)
    lr = kio.load_image(os.path.join(str(tmp_path), "cases", spec.name, "lr.png"))[0]
    fit = degrade.downscale_np(sr, k.astype(np.float64), s)
    assert np.sqrt(np.mean((fit - lr)[2:-2, 2:-2] ** 2)) < 0.03
  assert row["kernel_ncc"] == "nan"          # the non-linear case has no true kernel


@pytest.mark.parametrize("method", ["nonblind", "tv_nonblind"])
def test_nonblind_is_not_applicable_without_a_kernel(smoke_cfg, tmp_path, method):
  spec = suites.suite("tiny")[1]
  row = runner.run_one(spec, method, smoke_cfg, str(tmp_path), 2)
  assert row["status"] == "n/a"


# -- command line ---------------------------------------------------------------------------

def test_cli_lists_and_rejects_bad_input(tmp_path):
  out = _bench("--suite", "mini", "--list", "--scales", "4")
  assert out.returncode == 0, out.stderr
  assert out.stdout.count("_x4_") == 3 and "kernelfusion" in out.stdout
  for args, msg in [(["--suite", "nope"], "unknown suite"),
                    (["--methods", "bicubic,magic"], "unknown method"),
                    (["--scales", "3", "--suite", "tiny"], "no case"),
                    (["--border", "-1"], "border"),
                    (["--seeds", "0,x", "--suite", "tiny"], "--seeds must be integers")]:
    out = _bench(*args, "--workdir", str(tmp_path))
    assert out.returncode == 2, (args, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in out.stderr


def test_cli_bicubic_run_writes_csv_and_report(tmp_path):
  wd = str(tmp_path / "b")
  cache = str(tmp_path / "cache")
  out = _bench("--suite", "tiny", "--methods", "bicubic", "--workdir", wd, "--config", "smoke",
               "--quiet", f"--compile_cache={cache}")
  assert out.returncode == 0, out.stderr
  assert os.path.isdir(cache)  # what the cache holds is tested through kfjax.main (test_cli)
  rows = list(csv.DictReader(open(os.path.join(wd, "results.csv"))))
  assert [r["status"] for r in rows] == ["ok", "ok"]
  assert "python -m kfjax.bench --suite tiny" in open(os.path.join(wd, "report.md")).read()


def test_fingerprint_leaves_float32_precision_out():
  """Rows written before ``precision`` existed keep their fingerprint; bf16 gets its own."""
  import ml_collections
  from kfjax import config as config_lib
  cfg = config_lib.preset("cpu")
  legacy = cfg.to_dict()
  legacy.pop("precision")
  assert methods.fingerprint_of(cfg) == methods.fingerprint_of(ml_collections.ConfigDict(legacy))
  before = methods.fingerprint_of(cfg)
  cfg.precision = "bfloat16"
  assert methods.fingerprint_of(cfg) != before


@pytest.mark.parametrize("block,field,on", [
    ("ddm4ip", "normalise", True), ("ddm4ip", "max_radius", 2.0), ("ddm4ip", "threshold", 0.2),
    ("ddm4ip", "blend", 0.5), ("ddm4ip", "x4", "direct"), ("ddm4ip", "on_diverge", "generic"),
    ("ike", "d_batch", "joint")])
def test_fingerprint_leaves_later_options_out_while_off(block, field, on):
  import ml_collections
  from kfjax import config as config_lib
  cfg = config_lib.preset("cpu")
  for b, name, off in methods._LATER_FIELDS:    # the cpu preset turns some on
    cfg[b][name] = off
  legacy = cfg.to_dict()
  del legacy[block][field]
  before = methods.fingerprint_of(cfg)
  assert before == methods.fingerprint_of(ml_collections.ConfigDict(legacy))
  cfg[block][field] = on
  assert methods.fingerprint_of(cfg) != before


@pytest.mark.parametrize("method", ["kernelgan", "ddm4ip", "ike"])
def test_fingerprint_never_holds_when_the_estimators_checkpoint(method):
  """``checkpoint_every`` changes no result: rows keep their fingerprint whatever it is (and
  those written before it existed too)."""
  import ml_collections
  from kfjax import config as config_lib
  cfg = config_lib.preset("cpu")
  before = methods.fingerprint_of(cfg, method)
  legacy = cfg.to_dict()
  del legacy[method]["checkpoint_every"]
  assert methods.fingerprint_of(ml_collections.ConfigDict(legacy), method) == before
  cfg[method].checkpoint_every = 7
  assert methods.fingerprint_of(cfg, method) == before
  cfg[method].steps_per_chunk = 7    # (a field the fingerprint does hold)
  assert methods.fingerprint_of(cfg, method) != before


def test_report_splits_the_gap_on_paired_rows():
  def row(case, method, value, seed="0"):
    return {"case": case, "method": method, "scale": "2", "status": "ok", "seed": seed,
            "subpixel_psnr": str(value)}
  rows = [row("a", "bicubic", 30), row("a", "tv_nonblind", 34), row("a", "tv_blind", 31),
          row("a", "nonblind", 32), row("a", "kernelfusion", 29),
          row("b", "bicubic", 20), row("b", "tv_nonblind", 22), row("b", "tv_blind", 22),
          row("b", "nonblind", 23),   # b has no kernelfusion row: not paired
          row("a", "kernelfusion", 35, seed="1")]  # no bicubic row for seed 1: not paired
  table = report.split_table(rows)
  lines = {ln.split("|")[2].strip(): ln for ln in table.splitlines()[2:]}
  assert "| 2 | -0.50 | -2.00 | +1.00 |" in lines["restoration: nonblind − tv_nonblind"]
  assert "| 2 | +1.50 | +0.00 | +3.00 |" in lines["kernel's cost: tv_nonblind − tv_blind"]
  assert "| 1 | -1.00 | -1.00 | -1.00 |" in lines["blind − bicubic"]
  assert report.split_table([row("a", "bicubic", 30)]) is None


def _row(case, method, value, seed="0", date="2026-01-01 00:00", config="c", status="ok"):
  return {**dict.fromkeys(runner.FIELDS, ""),
          "case": case, "method": method, "scale": "2", "status": status, "seed": seed,
          "subpixel_psnr": str(value), "date": date, "config": config, "device": "cpu",
          "preset": "smoke", "family": "f"}


def test_gain_table_pairs_every_seed_with_the_case_bicubic():
  rows = [_row("a", "bicubic", 30), _row("b", "bicubic", 20),
          _row("a", "m", 31), _row("b", "m", 19.5),                       # seed 0: +0.25
          _row("a", "m", 32, "1"), _row("b", "m", 21, "1"),               # seed 1: +1.50
          _row("c", "m", 99, "1"),                      # no bicubic row for c: not paired
          _row("a", "m", 50, "2", status="error")]      # failed: left out
  (line,) = report.gain_table(rows).splitlines()[2:]
  cells = [c.strip() for c in line.split("|")[1:-1]]
  sd = np.std([0.25, 1.5], ddof=1)
  assert cells == ["2", "m", "0, 1", "4", "+0.25, +1.50", f"+0.88 ± {sd:.2f}", "3 / 4",
                   "-0.50", "+2.00"]
  assert report.gain_table([_row("a", "m", 1)]) is None
  assert "## Aligned PSNR gain over bicubic" in report.markdown(rows, "t")


def test_report_merges_workdirs_keeping_the_latest_row_of_each_case_method_and_seed(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  for d, rows in ((a, [_row("x", "bicubic", 30), _row("x", "m", 31, date="2026-01-02 00:00"),
                       _row("x", "m", 40, "1", status="error")]),
                  (b, [_row("x", "m", 35, date="2026-01-01 00:00", config="old"),
                       _row("x", "m", 32, "1", config="new")])):
    os.makedirs(d)
    runner.write_rows(str(d / "results.csv"), [{**r, "photo": "p", "family": "f"} for r in rows])
  rows, left_out = report.merged_rows([str(a), str(b)])
  assert left_out == 1
  assert sorted((r["method"], r["seed"], r["subpixel_psnr"]) for r in rows) == [
      ("bicubic", "0", "30"), ("m", "0", "31"), ("m", "1", "32")]
  out = tmp_path / "out"
  report.main(["--workdirs", f"{a},{b}", "--out", str(out)])
  assert "| 2 | m | 0, 1 | 2 | +1.00, +2.00 |" in (out / "report.md").read_text()
  with pytest.raises(SystemExit, match="no benchmark results"):
    report.main(["--workdirs", str(tmp_path / "none"), "--out", str(out)])


def test_nonblind_methods_skip_the_phases_when_the_output_does_not_read_them(smoke_cfg, tmp_path,
                                                                            monkeypatch):
  """With ``restore.final`` from the bicubic start, ``nonblind`` (Phase 2 with the true
  kernel) is the TV restoration with it, ``tv_nonblind``'s image, and ``kernelgan`` the TV
  restoration with KernelGAN's kernel, which ``postprocess --method kernelgan`` re-derives;
  no PD is trained for either."""
  from kfjax import kernelgan
  from kfjax.bench import postprocess
  k_gan = np.zeros((12, 12), np.float32)
  k_gan[3:9, 5:7] = 1.0 / 12                   # a vertical bar, not the case's Gaussian
  monkeypatch.setattr(kernelgan, "estimate_kernel", lambda *a, **kw: (k_gan, {}))
  cfg = methods.with_overrides(smoke_cfg, {"restore.final": True, "restore.init": "bicubic"})
  assert cfg.restore.to_dict() == {**config_base_restore(), "final": True, "init": "bicubic"}
  spec = suites.suite("tiny")[0]
  wd = str(tmp_path)
  rows = runner.run([spec], ["nonblind", "tv_nonblind", "kernelgan", "bicubic"], cfg, wd,
                    border=2, show_progress=False)
  assert [r["status"] for r in rows] == ["ok"] * 4, rows
  case_dir = os.path.join(wd, "runs", spec.name)
  assert not [d for d in os.listdir(case_dir) if d.startswith("pd-")]
  assert abs(float(rows[0]["psnr"]) - float(rows[1]["psnr"])) < 1e-3
  for r in (0, 2):
    info = json.load(open(os.path.join(case_dir, rows[r]["method"], "info.json")))["info"]
    assert info["seconds_phase1"] == 0.0
  np.testing.assert_array_equal(np.load(os.path.join(case_dir, "kernelgan", "kernel.npy")), k_gan)
  postprocess.main(["--workdir", wd, "--method", "kernelgan", "--thresholds", "0,0.5",
                    "--sigmas", "", "--border", "2"])
  with open(os.path.join(wd, "postprocess_kernelgan.csv")) as f:
    (pp,) = list(csv.DictReader(f))
  assert float(pp["thr0"]) == pytest.approx(float(rows[2]["subpixel_psnr"]), abs=1e-3)
  assert float(pp["bicubic"]) == pytest.approx(float(rows[3]["subpixel_psnr"]), abs=1e-3)
  assert float(pp["tv_true"]) == pytest.approx(float(rows[1]["subpixel_psnr"]), abs=1e-3)


def config_base_restore():
  from kfjax import config as config_lib
  return config_lib.base_config().restore.to_dict()
