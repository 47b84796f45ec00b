"""Test-wide setup: fixed seeds, small thread use, preset loading."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import pytest  # noqa: E402

from kfjax import config as config_lib  # noqa: E402


@pytest.fixture
def smoke_cfg():
  return config_lib.preset("smoke")
