"""Test-wide setup: fixed seeds, small thread use, preset loading."""

import os

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
