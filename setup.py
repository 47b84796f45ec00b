"""kfjax: KernelFusion zero-shot blind super-resolution in JAX/Flax."""

import re

from setuptools import setup

with open("kfjax/__init__.py") as f:
  version = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

setup(
    name="kfjax",
    version=version,
    description="KernelFusion: zero-shot blind super-resolution via patch diffusion, in JAX",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["kfjax", "kfjax.models", "kfjax.bench", "kfjax.configs"],
    package_dir={"kfjax.configs": "configs"},
    install_requires=[
        "jax>=0.4.35,<0.12",
        "flax>=0.10.2,<0.14",
        "optax>=0.2.3,<0.3",
        "orbax-checkpoint>=0.10,<0.14",
        "ml_collections>=0.1.1,<2",
        "numpy>=1.26,<3",
        "imageio>=2.31,<3",
        "tifffile>=2023.7.10",
        "imagecodecs>=2024.6.1",     # 16-bit PNG (Pillow reads colour ones at 8 bits)
        "absl-py>=2.0,<3",
        "filelock>=3.12,<4",         # JAX's compilation cache needs it to cap its size
        "tqdm>=4.65,<5",
        "scipy>=1.11,<2",            # kernel zoo (kfjax.bench.kernels)
        "scikit-image>=0.22,<0.27",  # SSIM, and the bundled photos used as examples
        "matplotlib>=3.8,<4",        # benchmark figures (kfjax.bench.report)
    ],
    extras_require={
        # torch: the PyTorch reference of the throughput benchmark (a CPU wheel, ~20 s to
        # install); in "test" too, so CI runs the reference-equivalence test. nbclient,
        # nbformat, ipykernel: CI executes examples/quickstart.ipynb (tests/test_examples.py)
        # in a "python3" kernel of the same interpreter; its figures need matplotlib (above).
        "test": ["pytest>=8,<10", "chex>=0.1.87,<0.2", "torch==2.13.0",
                 "nbclient>=0.10,<0.12", "nbformat>=5.10,<6", "ipykernel>=6.29,<8"],
        "bench": ["torch==2.13.0"],
    },
    entry_points={"console_scripts": ["kfjax=kfjax.main:cli"]},
)
