"""The README's quick-start figure script (examples/quickstart_figure.py) and the
quick-start notebook (examples/quickstart.ipynb)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kfjax import io as kio
from kfjax.bench import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "quickstart_figure.py")


def test_figure_and_numbers_from_a_workdir(tmp_path):
  hr = kio.load_image(os.path.join(ROOT, "examples", "chelsea_x2_hr.png"))[0].astype(np.float64)
  rng = np.random.default_rng(0)
  sr = np.clip(hr + 0.02 * rng.normal(size=hr.shape), 0, 1)
  wd = tmp_path / "run"
  wd.mkdir()
  kio.save_image(str(wd / "sr.png"), sr)
  kio.save_image(str(wd / "bicubic.png"), np.roll(hr, 1, axis=1))
  k_true = np.load(os.path.join(ROOT, "examples", "chelsea_x2_kernel.npy"))
  np.save(wd / "kernel.npy", np.roll(k_true, 1, axis=0))
  out = str(tmp_path / "fig.png")
  res = subprocess.run([sys.executable, SCRIPT, "--workdir", str(wd), "--out", out],
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  assert kio.load_image(out)[0].shape[1] > 1000
  sr8 = kio.load_image(str(wd / "sr.png"))[0]
  want = metrics.psnr(sr8, hr, crop=8)
  assert f"SR {want:.2f} dB" in res.stdout
  assert "kernel NCC 1.000, width x1.00" in res.stdout   # a shifted copy of the truth


def test_missing_run_gives_one_line(tmp_path):
  res = subprocess.run([sys.executable, SCRIPT, "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
  assert res.returncode != 0 and "run the quick start first" in res.stderr
  assert "Traceback" not in res.stderr


# ------------------------------------------------------------------------------------------
# examples/quickstart.ipynb

NOTEBOOK = os.path.join(ROOT, "examples", "quickstart.ipynb")


def _load_notebook_json():
  with open(NOTEBOOK, encoding="utf-8") as f:
    return json.load(f)


def test_notebook_is_committed_clean():
  """No stored outputs or execution counts (small, diff-able), and the documented defaults."""
  nb = _load_notebook_json()
  assert nb["nbformat"] == 4
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
  params = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
  assert len(params) == 1
  src = "".join(params[0]["source"])
  assert 'PRESET = "cpu"' in src and 'IMAGE = "chelsea_x2_lr.png"' in src and "CROP = None" in src


def test_quickstart_notebook_runs_on_smoke(monkeypatch):
  """Executes the notebook in a kernel of this interpreter (ipykernel's ``python3`` spec),
  on the smoke preset and a 32×32 crop of the example, from examples/ as its folder."""
  nbclient = pytest.importorskip(
      "nbclient", reason="nbclient not installed (it is in the test extra: pip install -e '.[test]')")
  import nbformat  # noqa: PLC0415 (nbclient depends on it)

  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
      'PRESET = "smoke"\nCROP = 32\nimport sys\nprint("kernel prefix:", sys.prefix)',
      metadata={"tags": ["injected-parameters"]}))
  # Headless: matplotlib's inline backend (Agg-based) rather than a GUI one from a
  # matplotlibrc; "Agg" itself would turn plt.show() into a no-op and leave no figures.
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", "1")   # sys.prefix's python3 spec over a user one
  examples = os.path.dirname(NOTEBOOK)
  before = sorted(os.listdir(examples))
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600, startup_timeout=120,
                                   resources={"metadata": {"path": examples}})
  client.execute()   # raises CellExecutionError on any failing cell
  assert sorted(os.listdir(examples)) == before, "the notebook wrote into examples/"

  def stdout(cell):
    return "".join(o.get("text", "") for o in cell.outputs
                   if o.output_type == "stream" and o.name == "stdout")

  text = "".join(stdout(c) for c in nb.cells if c.cell_type == "code")
  assert f"kernel prefix: {sys.prefix}\n" in text   # the kernel ran this venv's interpreter
  lines = [ln for ln in text.splitlines() if ln.startswith("summary: ")]
  assert len(lines) == 1, text[-2000:]
  s = json.loads(lines[0][len("summary: "):])
  assert s["preset"] == "smoke" and s["scale"] == 2
  assert s["lr_shape"] == [32, 32, 3]
  assert s["sr_shape"] == s["bicubic_shape"] == [64, 64, 3]   # scale × the LR crop
  assert s["kernel_shape"] == [12, 12]                        # K = 6 · scale
  assert s["kernel_finite"] and s["sr_finite"]
  assert abs(s["kernel_sum"] - 1.0) < 1e-3
  assert np.isfinite(s["phase1_loss"]) and np.isfinite(s["phase2_loss"])
  # The crop of the true HR image lines up with the LR crop: bicubic is close to it.
  assert s["bicubic_psnr"] > 25 and np.isfinite(s["sr_psnr"])
  assert -1.0 <= s["kernel_ncc"] <= 1.0
  pngs = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
             for o in c.outputs if o.output_type == "display_data")
  assert pngs == 2   # the images figure and the kernel figure
