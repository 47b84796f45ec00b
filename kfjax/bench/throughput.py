r"""Throughput benchmark: Phase 1 steps, Phase 2 iterations, scaling, vmapped images.

    python -m kfjax.bench.throughput --preset cpu            # everything, cpu preset shapes
    python -m kfjax.bench.throughput --preset paper --what phase1,phase2 --steps 2 --iters 2
    python -m kfjax.bench.throughput --json                   # one JSON document on stdout

What is measured (``--what``, comma-separated):

* ``phase1``: one PD optimiser step at batch ``--batch`` and crop ``--crop`` (the preset's
  by default), inside the compiled multi-step chunk that training uses: seconds per step,
  steps/s, compile time apart, achieved FLOP/s and its fraction of the matmul peak
  measured in the same run (a large float32 ``jnp.dot``).
* ``phase2``: one inner iteration of Phase 2 (U-Net twice, posterior step, PD, kernel
  INR, losses, forward + backward + Adam) at HR size ``--hr_size``, compiled as the real
  Phase 2 compiles it (one reverse step of ``--iters`` iterations), and the whole reverse
  process of one image (``n_iter_first + (num_steps-1)·n_iter`` iterations; estimated from
  the per-iteration time, measured with ``--full_reverse``); memory of the compiled program;
  achieved FLOP/s and fraction of the matmul peak, for kfjax and the PyTorch reference, and
  the fraction of peak that 1.5× the reference's speed would take.
* ``scaling``: the Phase 2 iteration against HR size (``--sizes``), with whole-image PD
  and with PD applied to ``--pd_tile`` tiles, ``--pd_tile_batch`` at a time
  (rematerialised per tile batch, so PD's memory does not grow with the image).
* ``batch``: images/hour against the number of same-size images vmapped through Phase 2
  together (``--images``), ``Phase2.make_chunk(iterations, batch=N)``.
* ``parts``: where a Phase 2 iteration's time goes, each part alone at ``--hr_size``
  (inside a compiled loop, as in Phase 2): the U-Net forward, forward + input gradient,
  forward + all gradients; PD forward and forward + input gradient; the degradation with
  both gradients. FLOPs, FLOP/s and % of peak per part, and the PyTorch reference's time.

With ``--torch`` (default when ``torch`` is importable) Phase 1 and Phase 2 are also
timed with :mod:`kfjax.bench.torch_ref`, the same architectures and step in PyTorch eager,
and reported as the speed ratio kfjax / PyTorch (> 1: kfjax is faster).

``--conv_backward custom|native`` picks the convolution gradients being timed: kfjax's
custom VJP (:func:`kfjax.ops.conv2d`, the default on CPU) or XLA's own (the default on
accelerators, where the custom one is unmeasured); ``launch/device_check.sh`` times both.

FLOPs are counted analytically (:mod:`kfjax.bench.flops`: ``pd_flops``, ``unet_flops``,
``phase2_flops``): a convolution producing an
``H_out × W_out × C_out`` map from ``C_in`` channels with a ``K × K`` kernel costs
``2·H_out·W_out·K²·C_in·C_out`` FLOPs forward, and forward + backward (input and weight
gradients) three times that. Biases, activations and the optimiser are not counted.
The count is cross-checked against XLA's ``compiled.cost_analysis()`` of one step (of one
Phase 2 iteration's loss and gradients).

This module is the command line: it turns the flags into configs and arguments for the
timings in :mod:`kfjax.bench.jax_timing` and :mod:`kfjax.bench.torch_timing`, and formats
their results.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import jax

from kfjax import config as config_lib
from kfjax import ops
from kfjax.bench import jax_timing
from kfjax.bench import torch_timing

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "cpu", ["cpu", "paper", "smoke"], "Configuration preset whose shapes are measured.")
flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16"],
                  "Compute dtype of PD and the U-Net (config.precision); the PyTorch reference "
                  "stays float32, so no ratio is reported for bfloat16.")
flags.DEFINE_enum("conv_backward", "auto", ["auto", "custom", "native"],
                  "Convolution gradients (ops.conv_backward): auto = kfjax's custom VJP on CPU, "
                  "XLA's own elsewhere; sets KFJAX_CONV_BACKWARD for this run.")
flags.DEFINE_list("what", ["phase1", "phase2", "scaling", "batch"],
                  "Measurements to run: phase1, phase2, scaling, batch, parts.")
flags.DEFINE_integer("batch", 0, "Phase 1 crops per step (0: the preset's).")
flags.DEFINE_integer("crop", 0, "Phase 1 crop size (0: the preset's).")
flags.DEFINE_integer("steps", 10, "Phase 1 steps per timed chunk.")
flags.DEFINE_integer("hr_size", 256, "Phase 2 HR image side (square).")
flags.DEFINE_integer("scale", 0, "SR scale (0: the preset's).")
flags.DEFINE_integer("iters", 10, "Phase 2 inner iterations per timed program.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (the median is reported).")
flags.DEFINE_bool("full_reverse", False, "Also run and time the whole reverse process of one image.")
flags.DEFINE_list("sizes", ["128", "256", "512", "1024"], "HR sides for the scaling table.")
flags.DEFINE_integer("pd_tile", 64, "PD tile size for the tiled column of the scaling table.")
flags.DEFINE_integer("pd_tile_batch", 4, "PD tiles per batch in the tiled column.")
flags.DEFINE_integer("scaling_iters", 2, "Phase 2 iterations per timed program in the scaling table.")
flags.DEFINE_list("images", ["1", "2", "4"], "Numbers of images vmapped through Phase 2 together.")
flags.DEFINE_enum("torch_device", "auto", ["auto", "cpu", "cuda"],
                  "Where the PyTorch reference runs: auto = CUDA when JAX runs on a GPU and torch "
                  "sees one, else the CPU.")
flags.DEFINE_bool("torch", True, "Time the PyTorch eager reference too (skipped if torch is absent).")
flags.DEFINE_integer("peak_size", 0, "Matrix side for the matmul-peak measurement (0: 2048 on "
                     "the CPU, 8192 on an accelerator, where a 2048² product is too short to time: "
                     "it read 50-93 TFLOP/s on an H200).", lower_bound=0)
flags.DEFINE_bool("json", False, "Print one JSON document instead of tables.")
flags.DEFINE_string("from_json", None, "Print the tables of a saved --json document (e.g. from "
                    "launch/device_check.sh) and measure nothing.")


# -- flags to configs -------------------------------------------------------------------------
# Here rather than beside the timings, so that those take plain arguments and read no flags.

def preset_config(preset):
  """The preset with ``--precision`` applied."""
  cfg = config_lib.preset(preset)
  cfg.precision = FLAGS.precision
  return cfg


def phase1_config(preset):
  cfg = preset_config(preset)
  if FLAGS.batch:
    cfg.train.batch_size = FLAGS.batch
  if FLAGS.crop:
    cfg.train.crop_size = FLAGS.crop
  return cfg


def reverse_config(preset):
  """The preset with ``--precision`` and ``--scale`` applied, its reverse process as is."""
  cfg = preset_config(preset)
  if FLAGS.scale:
    cfg.scale = FLAGS.scale
  return cfg


def phase2_config(preset, iters, pd_tile=0):
  """The preset with ``iters`` iterations in every reverse step (one step is timed)."""
  cfg = reverse_config(preset)
  cfg.sample.n_iter_first = cfg.sample.n_iter = iters
  cfg.sample.pd_tile = pd_tile
  cfg.sample.pd_tile_batch = FLAGS.pd_tile_batch if pd_tile else 0
  return cfg


# -- driver -----------------------------------------------------------------------------------

def _log(msg):
  print(f"throughput: {msg}", file=sys.stderr, flush=True)


def run_all(preset, what, use_torch):
  """Every requested measurement, as one dict (progress on stderr)."""
  out = {"preset": preset, "precision": FLAGS.precision, "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
         "jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "torch": None,
         "conv_backward": ops.conv_backward()}
  if use_torch:
    import torch
    out["torch"] = torch.__version__
    out["torch_threads"] = torch.get_num_threads()
    out["torch_device"] = torch_timing.torch_device()
  size = FLAGS.peak_size or (2048 if jax.default_backend() == "cpu" else 8192)
  peak = jax_timing.matmul_peak(size)
  out["matmul_peak_flop_s"] = peak
  out["peak_size"] = size
  if "phase1" in what:
    _log("phase 1")
    cfg = phase1_config(preset)
    r = jax_timing.bench_phase1_jax(cfg, FLAGS.steps, FLAGS.repeats, peak)
    if use_torch:
      r["torch"] = torch_timing.bench_phase1_torch(cfg, FLAGS.steps, FLAGS.repeats)
      r["speed_vs_torch"] = r["torch"]["step_s"] / r["step_s"]
    out["phase1"] = r
  if "phase2" in what:
    _log("phase 2")
    cfg = phase2_config(preset, FLAGS.iters)
    r = jax_timing.bench_phase2_jax(cfg, FLAGS.hr_size, FLAGS.iters, FLAGS.repeats)
    r["reverse_iterations"] = jax_timing.reverse_iterations(preset)
    r["reverse_estimate_s"] = r["reverse_iterations"] * r["iter_s"]
    if FLAGS.full_reverse:
      r["reverse"] = jax_timing.bench_full_reverse(reverse_config(preset), FLAGS.hr_size)
    r["peak_fraction"] = r["flop_s"] / peak
    if use_torch:
      r["torch"] = torch_timing.bench_phase2_torch(cfg, FLAGS.hr_size, FLAGS.iters, FLAGS.repeats)
      r["torch"]["peak_fraction"] = r["flops_per_iter"] / r["torch"]["iter_s"] / peak
      r["speed_vs_torch"] = r["torch"]["iter_s"] / r["iter_s"]
    out["phase2"] = r
  if "phase1" in out and "phase2" in out:
    out["per_image"] = jax_timing.per_image_estimate(preset_config(preset), out["phase1"],
                                                      out["phase2"], peak)
  if "parts" in what:
    _log("phase 2 parts")
    cfg = phase2_config(preset, FLAGS.iters)
    parts = jax_timing.bench_parts_jax(cfg, FLAGS.hr_size, FLAGS.iters, FLAGS.repeats, peak)
    if use_torch:
      for name, row in torch_timing.bench_parts_torch(cfg, FLAGS.hr_size, FLAGS.iters, FLAGS.repeats).items():
        parts[name]["torch_s"] = row["s"]
        parts[name]["speed_vs_torch"] = row["s"] / parts[name]["s"]
    out["parts"] = dict(hr_size=FLAGS.hr_size, rows=parts)
  if "scaling" in what:
    rows = []
    for size in [int(s) for s in FLAGS.sizes]:
      for tile in (0, FLAGS.pd_tile) if FLAGS.pd_tile else (0,):
        _log(f"scaling: HR {size}, PD tile {tile or 'none'}")
        cfg = phase2_config(preset, FLAGS.scaling_iters, tile)
        r = jax_timing.bench_phase2_jax(cfg, size, FLAGS.scaling_iters, 1)
        rows.append(dict(r, pd_tile=tile))
    out["scaling"] = rows
  if "batch" in what:
    rows = []
    total = jax_timing.reverse_iterations(preset)
    for n in [int(s) for s in FLAGS.images]:
      _log(f"{n} images vmapped")
      cfg = phase2_config(preset, FLAGS.iters)
      r = jax_timing.bench_phase2_jax(cfg, FLAGS.hr_size, FLAGS.iters, FLAGS.repeats, images=n)
      r["images_per_hour"] = 3600.0 * n / (total * r["iter_s"])
      rows.append(r)
    out["batch"] = rows
  return out


def _mb(b):
  return "n/a" if b is None else f"{b / 2 ** 20:.0f} MiB"


def _duration(seconds):
  """``seconds`` with a readable unit beside it when it is long (``"623628 s (7.2 days)"``)."""
  for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
    if seconds >= 2 * size:
      return f"{seconds:.0f} s ({seconds / size:.1f} {unit})"
  return f"{seconds:.1f} s"


def format_tables(r):
  """Markdown tables of a :func:`run_all` result."""
  lines = [f"preset `{r['preset']}` ({r.get('precision', 'float32')}), {r['device']}, jax {r['jax']}, torch {r['torch']}"
           f"{' on ' + r['torch_device'] if r.get('torch_device') else ''}, {r['date']}, "
           f"conv gradients: {r.get('conv_backward', 'custom')}",
           f"matmul peak (float32 {r.get('peak_size', 2048)}² jnp.dot): {r['matmul_peak_flop_s'] / 1e9:.1f} GFLOP/s", ""]
  if "phase1" in r:
    p = r["phase1"]
    xla = "n/a" if p["xla_flops_per_step"] is None else f"{p['xla_flops_per_step'] / 1e9:.1f}"
    lines += ["| Phase 1 | B | P | compile s | s/step | steps/s | GFLOP/step (XLA) | GFLOP/s | % peak | torch s/step | kfjax/torch |",
              "|---|---|---|---|---|---|---|---|---|---|---|",
              f"| PD step | {p['batch']} | {p['crop']} | {p['compile_s']:.1f} | {p['step_s']:.4f} | "
              f"{p['steps_per_s']:.2f} | {p['flops_per_step'] / 1e9:.1f} ({xla}) | {p['flop_s'] / 1e9:.1f} | "
              f"{100 * p['peak_fraction']:.0f} | {p['torch']['step_s'] if 'torch' in p else float('nan'):.4f} | "
              f"{p.get('speed_vs_torch', float('nan')):.2f}× |", ""]
  if "phase2" in r:
    p = r["phase2"]
    full = f"{p['reverse']['seconds']:.1f}" if "reverse" in p else "—"
    lines += ["| Phase 2 | HR | compile s | s/iteration | reverse process s (est. / measured) | memory | torch s/iter | kfjax/torch |",
              "|---|---|---|---|---|---|---|---|",
              f"| inner iteration | {p['hr_size']}² | {p['compile_s']:.1f} | {p['iter_s']:.4f} | "
              f"{p['reverse_estimate_s']:.1f} ({p['reverse_iterations']} it.) / {full} | {_mb(p['memory_bytes'])} | "
              f"{p['torch']['iter_s'] if 'torch' in p else float('nan'):.4f} | {p.get('speed_vs_torch', float('nan')):.2f}× |", ""]
    # The ceiling: at the measured peak, how fast could an iteration be, and what would 1.5×
    # the PyTorch reference take.
    xla = "n/a" if p["xla_flops_per_iter"] is None else f"{p['xla_flops_per_iter'] / 1e9:.1f}"
    t_peak = p["torch"]["peak_fraction"] if "torch" in p else float("nan")
    lines += ["| Phase 2 FLOPs | GFLOP/iteration (XLA) | GFLOP/s | % peak | torch % peak | 1.5× torch needs % peak |",
              "|---|---|---|---|---|---|",
              f"| inner iteration | {p['flops_per_iter'] / 1e9:.1f} ({xla}) | {p['flop_s'] / 1e9:.1f} | "
              f"{100 * p['peak_fraction']:.0f} | {100 * t_peak:.0f} | {150 * t_peak:.0f} |", ""]
  if "per_image" in r:
    e = r["per_image"]
    lines += [f"Per image ({r['phase2']['hr_size']}² HR, compiles excluded): {_duration(e['seconds'])}; Phase 1 "
              f"{e['phase1_steps']} steps × {r['phase1']['step_s']:.4f} s = {_duration(e['phase1_s'])}, reverse "
              f"process {_duration(e['phase2_s'])} ({'measured' if e['phase2_measured'] else 'estimated'})"]
    if "flops" in e:  # runs saved before the FLOP budget was recorded lack it
      lines.append(f"FLOPs per image: {e['flops'] / 1e15:.4g} PFLOP (Phase 1 {e['phase1_flops'] / 1e15:.4g}, "
                   f"reverse process {e['phase2_flops'] / 1e15:.4g}); at the measured matmul peak that is "
                   f"{_duration(e['floor_s'])}")
    lines.append("")
  if "parts" in r:
    lines += [f"| Phase 2 part ({r['parts']['hr_size']}²) | GFLOP | ms | GFLOP/s | % peak | torch ms | kfjax/torch |",
              "|---|---|---|---|---|---|---|"]
    for name, row in r["parts"]["rows"].items():
      lines.append(f"| {name} | {row['flops'] / 1e9:.2f} | {1e3 * row['s']:.1f} | {row['flop_s'] / 1e9:.1f} | "
                   f"{100 * row['peak_fraction']:.0f} | {1e3 * row.get('torch_s', float('nan')):.1f} | "
                   f"{row.get('speed_vs_torch', float('nan')):.2f}× |")
    lines.append("")
  if "scaling" in r:
    lines += ["| HR size | PD | s/iteration | compiled memory | peak RSS so far |", "|---|---|---|---|---|"]
    for row in r["scaling"]:
      pd = f"tiles {row['pd_tile']}²" if row["pd_tile"] else "whole image"
      lines.append(f"| {row['hr_size']}² | {pd} | {row['iter_s']:.4f} | {_mb(row['memory_bytes'])} | "
                   f"{_mb(row['peak_rss_bytes'])} |")
    lines.append("")
  if "batch" in r:
    lines += ["| images vmapped | HR | s/iteration (all images) | images/hour | compiled memory |",
              "|---|---|---|---|---|"]
    for row in r["batch"]:
      lines.append(f"| {row['images']} | {row['hr_size']}² | {row['iter_s']:.4f} | "
                   f"{row['images_per_hour']:.1f} | {_mb(row['memory_bytes'])} |")
    lines.append("")
  return "\n".join(lines)


def parse_for_tests(argv):
  """Parse ``argv`` (flag strings) into FLAGS without running ``main``, for tests."""
  FLAGS.unparse_flags()
  FLAGS(["throughput"] + list(argv))


def main(argv):
  del argv
  if FLAGS.from_json:
    with open(FLAGS.from_json) as f:
      print(format_tables(json.load(f)))
    return
  if FLAGS.conv_backward != "auto":
    os.environ[ops.BACKWARD_ENV] = FLAGS.conv_backward
  use_torch = FLAGS.torch and torch_timing.have_torch() and FLAGS.precision == "float32"
  if FLAGS.torch and FLAGS.precision != "float32":
    print("--precision bfloat16: the PyTorch reference is float32 only, no ratio", file=sys.stderr)
  elif FLAGS.torch and not use_torch:
    print("torch is not installed (pip install -e '.[bench]'): no PyTorch reference", file=sys.stderr)
  result = run_all(FLAGS.preset, set(FLAGS.what), use_torch)
  print(json.dumps(result, indent=2) if FLAGS.json else format_tables(result))


if __name__ == "__main__":
  app.run(main)
