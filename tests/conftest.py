"""Test-wide setup: fixed seeds, small thread use, preset loading."""

import os

# Less XLA optimisation: compiles ~40% faster, and tests run tiny shapes. Subprocesses
# (the CLI tests) inherit it.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import pytest  # noqa: E402

from kfjax import config as config_lib  # noqa: E402


@pytest.fixture
def smoke_cfg():
  return config_lib.preset("smoke")
