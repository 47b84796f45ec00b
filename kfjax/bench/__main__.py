"""Benchmark runner: ``python -m kfjax.bench --suite mini --methods kernelfusion,bicubic,nonblind``.

Runs every method on every case of a suite (:mod:`kfjax.bench.suites`), appends one row
per case × method to ``<workdir>/results.csv`` (finished rows are skipped on re-run, a
failing row is recorded and the run goes on), and writes ``report.md`` and
``figures/{kernels,crops}.png``. The config is a preset (``--config cpu``) with any field
overridable (``--config.train.steps=2000``); each row records the config's fingerprint.

    python -m kfjax.bench --suite mini --workdir bench/mini --config cpu
    python -m kfjax.bench --suite mini --scales 2 --methods bicubic,kernelfusion
    python -m kfjax.bench --suite mini --scales 2 --methods kernelfusion --seeds 0,1,2

Blind results on the CPU budget move by several dB with the seed alone, so ``--seeds``
runs every row once per seed and the report gives each method's spread over seeds.
"""

import shlex
import sys

from absl import app
from absl import flags
from absl import logging

from kfjax import config as config_lib
from kfjax import errors
from kfjax.errors import KfjaxError

_SUITE = flags.DEFINE_string("suite", "mini", "Suite name: mini, photos3x3, nonlinear, blind, tiny.")
_METHODS = flags.DEFINE_list("methods", ["bicubic", "kernelfusion", "nonblind"],
                             "Comma-separated method names.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default: bench_out/<suite>).")
_SCALES = flags.DEFINE_list("scales", [], "Only these scales (default: all of the suite's).")
_CASES = flags.DEFINE_list("cases", [], "Only cases whose name contains one of these strings.")
_BORDER = flags.DEFINE_integer("border", 8, "Pixels cropped from every border before PSNR/SSIM.",
                               lower_bound=0)
_CONFIG = config_lib.define_config_flag(
    "Preset file or name (paper, cpu, smoke); fields overridable as --config.<field>=<value>.")
_SEEDS = flags.DEFINE_list("seeds", [], "Run every row once per seed (sets config.seed); "
                           "default: the config's seed only.")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bar.")
_LIST = flags.DEFINE_bool("list", False, "List the suite's cases and the methods, then exit.")
_COMPILE_CACHE = flags.DEFINE_string(
    "compile_cache", None,
    "JAX persistent compilation cache folder (as kfjax.main's --compile_cache); off by default "
    "here so that each case's seconds include its compiles, comparable with earlier runs. With "
    "it, cases of one size and config after the first skip compiling.")


def _fail(msg):
  errors.fail(msg, prog="kfjax.bench")


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  from kfjax.bench import methods
  from kfjax.bench import report
  from kfjax.bench import runner
  from kfjax.bench import suites
  try:
    specs = suites.suite(_SUITE.value)
    for m in _METHODS.value:
      methods.get(m)
  except KfjaxError as e:
    _fail(str(e))
  if _SCALES.value:
    try:
      scales = {int(s) for s in _SCALES.value}
    except ValueError:
      _fail(f"--scales must be integers, got {','.join(_SCALES.value)}")
    specs = [s for s in specs if s.scale in scales]
  if _CASES.value:
    specs = [s for s in specs if any(c in s.name for c in _CASES.value)]
  if not specs:
    _fail("no case of the suite matches --scales/--cases")
  try:
    seeds = [int(s) for s in _SEEDS.value]
  except ValueError:
    _fail(f"--seeds must be integers, got {','.join(_SEEDS.value)}")
  if _LIST.value:
    print("\n".join(s.name for s in specs))
    print("methods:", ", ".join(methods.METHODS))
    return
  try:
    cfg = _CONFIG.value
    cfg.name
  except Exception as e:
    reason = [ln.strip() for ln in str(e).splitlines() if ln.strip()][-1]
    _fail(f"cannot load --config: {reason}")
  if _COMPILE_CACHE.value is not None:
    from kfjax import runtime
    runtime.use_compile_cache(runtime.compile_cache_dir(_COMPILE_CACHE.value))
  workdir = _WORKDIR.value or f"bench_out/{_SUITE.value}"
  print(f"kfjax.bench: suite '{_SUITE.value}' ({len(specs)} cases) x "
        f"{','.join(_METHODS.value)} with preset '{cfg.name}' into {workdir}", flush=True)
  try:
    rows = runner.run(specs, _METHODS.value, cfg, workdir, border=_BORDER.value,
                      show_progress=not _QUIET.value, seeds=seeds or None)
  except KfjaxError as e:
    _fail(str(e))
  except KeyboardInterrupt:
    _fail(f"interrupted; finished rows are in {workdir}/results.csv and are skipped on re-run")
  command = "python -m kfjax.bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  paths = report.write(rows, workdir, title=f"kfjax benchmark: suite {_SUITE.value}",
                       command=command, figure_seed=seeds[0] if seeds else cfg.seed,
                       base_seed=cfg.seed)
  failed = sum(r["status"] == "error" for r in rows)
  print(f"kfjax.bench: {len(rows)} rows ({failed} failed); report: {', '.join(paths)}")
  if failed:
    sys.exit(1)


def _parse_flags(argv):
  return config_lib.parse_flags(argv, _fail)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
