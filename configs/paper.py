"""The paper's sizes: 128-channel PD on 64-px crops, 32→512 U-Net, 5×256 SIREN, K = 6·s.

Phase 1 uses the 100k-step budget of appendix E (the paper's main runs use 600k:
``--config.train.steps=600000``). Meant for an accelerator.

The PD training budget is the ablation of appendix E / Tables 5-6 (27.19 dB at 600k vs
27.12 dB at 100k): run the same image with ``--config.train.steps=100000`` and
``--config.train.steps=600000``. The other ablations are config fields too
(``kernel.net``, ``sample.two_unets``, ``sample.prior``; README, "Options (ablations)
and KernelGAN"), and ``--method kernelgan`` swaps the kernel estimator for KernelGAN.

    python -m kfjax.main --image x.png --scale 4 --config configs/paper.py

Expected runtime: not measured on an accelerator (none was lent to this project so far;
``launch/device_check.sh`` is the prepared measurement). Its floor is set by arithmetic:
Phase 1 is 888 GFLOP per step (batch 32 of 64-px crops, forward + backward), 88.8 PFLOP for
100k steps, and the reverse process of a 256² image another 1.65 PFLOP (26 PFLOP at 1024²),
i.e. at least ~90 s at an H100's dense bf16 peak (989 TFLOP/s) and ~180 s at its TF32 peak.
On the project's 2-core CPU it is impractical, estimated from ``python -m kfjax.bench.throughput
--preset paper`` (BENCHMARKS.md, quiet machine): Phase 1 6.55 s per step × 100k steps ≈ 7.6
days, Phase 2 2.12 s per iteration × 4080 iterations ≈ 2.4 h for a 64×64 image at ×4. Use
``configs/cpu.py`` on a CPU. ``--config.precision=bfloat16`` computes PD and the U-Net in
bf16 (for accelerators; on XLA:CPU it is no faster).
"""

from kfjax import config


def get_config():
  cfg = config.base_config()
  cfg.name = "paper"
  return cfg
