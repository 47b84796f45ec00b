"""The default preset: ``paper`` on an accelerator, ``cpu`` when JAX only sees a CPU.

    python -m kfjax.main --image x.png            # uses this file
"""

import jax

from kfjax import config


def get_config():
  return config.preset("cpu" if jax.default_backend() == "cpu" else "paper")
