"""Test-wide setup: fixed seeds, small thread use, preset loading, one compilation cache."""

import os
import shutil
import tempfile

# Less XLA optimisation: compiles ~40% faster, and tests run tiny shapes. Subprocesses
# (the CLI tests) inherit it.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import skimage.data  # noqa: E402

from kfjax import config as config_lib  # noqa: E402
from kfjax import degrade  # noqa: E402


@pytest.fixture
def smoke_cfg():
  return config_lib.preset("smoke")


@pytest.fixture(scope="session")
def lr_image():
  """A 32×32 LR crop of a real photo, degraded at ×2 by a known Gaussian (σ = 1.5, 12×12):
  the kernel estimators' test image (KernelGAN, DDM4IP, IKE)."""
  hr = skimage.data.chelsea()[80:144, 120:184].astype(np.float64) / 255.0
  r = np.arange(12) - 5.5
  k = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5 ** 2))
  return degrade.downscale_np(hr, k / k.sum(), 2).astype(np.float32)


def pytest_configure(config):
  # The suite has a wall-clock budget on a 2-core CI machine: always list the slowest tests,
  # so a change that blows it shows where (an explicit --durations wins).
  if config.option.durations is None:
    config.option.durations = 25
  # One persistent compilation cache for the session, every program in it: tests rebuild
  # the same jitted functions (fresh closures over the same tiny configs), and XLA then
  # finds each program by its HLO instead of compiling it again.
  # Set before collection, since JAX decides at its first compile whether the cache is on.
  # The command-line tests' subprocesses share it through the environment (modules that
  # test the cache itself set their own), so no compiled program is left under ~/.cache.
  # No size cap (-1): a capped cache lists and stats every entry on each write to find what
  # to evict, quadratic in the thousands of small programs a session writes. Every process
  # must agree: an uncapped writer leaves entries without the access-time files that a
  # capped one's eviction reads (JAX then fails the capped process's writes, warning each
  # time), so the subprocesses get the same settings through the environment.
  import jax
  from kfjax import runtime
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = "-1"
  config._kfjax_cache = runtime.use_compile_cache(
      tempfile.mkdtemp(prefix="kfjax-tests-jaxcache-"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  if config._kfjax_cache:
    os.environ.update({
        "JAX_COMPILATION_CACHE_DIR": config._kfjax_cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"})


def pytest_unconfigure(config):
  cache = getattr(config, "_kfjax_cache", None)
  if cache:
    shutil.rmtree(cache, ignore_errors=True)
