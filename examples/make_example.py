"""Regenerate the shipped example: a real photo degraded at ×2 by a known kernel.

    python examples/make_example.py

Takes a 256×256 crop of scikit-image's *chelsea* photo as the true HR image, blurs it with a
seeded anisotropic Gaussian from the kernel zoo and downscales with kfjax's own operator.
Writes ``chelsea_x2_lr.png`` (the input), ``chelsea_x2_hr.png`` and ``chelsea_x2_kernel.npy``
(the truth, for comparison with ``sr.png`` and ``kernel.npy``).
"""

import os

import numpy as np
import skimage.data

from kfjax import io as kio
from kfjax.bench import kernels

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  hr = skimage.data.chelsea()[40:296, 100:356].astype(np.float64) / 255.0
  k = kernels.make_kernel("aniso_gaussian", size=12, scale=2, seed=3)
  lr = kernels.degrade_image(hr, k, 2)
  kio.save_image(os.path.join(HERE, "chelsea_x2_lr.png"), lr)
  kio.save_image(os.path.join(HERE, "chelsea_x2_hr.png"), hr)
  kio.save_array_atomic(os.path.join(HERE, "chelsea_x2_kernel.npy"), k.astype(np.float32))
  print("wrote", os.listdir(HERE))


if __name__ == "__main__":
  main()
