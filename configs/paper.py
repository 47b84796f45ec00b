"""The paper's sizes: 128-channel PD on 64-px crops, 32→512 U-Net, 5×256 SIREN, K = 6·s.

Phase 1 uses the 100k-step budget of appendix E (the paper's main runs use 600k:
``--config.train.steps=600000``). Meant for an accelerator.

The PD training budget is the ablation of appendix E / Tables 5-6 (27.19 dB at 600k vs
27.12 dB at 100k): run the same image with ``--config.train.steps=100000`` and
``--config.train.steps=600000``. The other ablations are config fields too
(``kernel.net``, ``sample.two_unets``, ``sample.prior``; README, "Options (ablations)
and KernelGAN"), and ``--method kernelgan`` swaps the kernel estimator for KernelGAN.

    python -m kfjax.main --image x.png --scale 4 --config configs/paper.py

Expected runtime: hours on a CPU; not yet measured on an accelerator.
"""

from kfjax import config


def get_config():
  cfg = config.base_config()
  cfg.name = "paper"
  return cfg
