"""The paper's sizes: 128-channel PD on 64-px crops, 32→512 U-Net, 5×256 SIREN, K = 6·s.

Phase 1 uses the 100k-step budget of appendix E (the paper's main runs use 600k:
``--config.train.steps=600000``). Meant for an accelerator.

The PD training budget is the ablation of appendix E / Tables 5-6 (27.19 dB at 600k vs
27.12 dB at 100k): run the same image with ``--config.train.steps=100000`` and
``--config.train.steps=600000``. The other ablations are config fields too
(``kernel.net``, ``sample.two_unets``, ``sample.prior``; README, "Options (ablations)
and KernelGAN"), and ``--method kernelgan`` / ``--method ddm4ip`` swap the kernel
estimator for KernelGAN / DDM4IP (``cfg.ddm4ip``'s defaults are DDM4IP's appendix B.4 sizes);
``--method ike`` runs IKE (``cfg.ike``: the paper's K = 4, 3000 iterations, loss weights).

    python -m kfjax.main --image x.png --scale 4 --config configs/paper.py

Phase 1's batch is 4 crops of 64 px. The paper prints no batch size (an unofficial port
uses 32) but reports ~2 ms per PD step on one GPU (600k steps ≈ 20 min, appendix E). A
batch of 32 64-px crops is 888 GFLOP per step (forward + backward), which in 2 ms would be
~440 TFLOP/s sustained, beyond any GPU on such small convolutions; a batch of 4 is ~111
GFLOP per step (~55 TFLOP/s at 2 ms), what a current GPU sustains here. So 4 is the batch
consistent with the paper's own timing; ``--config.train.batch_size=32`` restores the port's.

Expected runtime, measured on one NVIDIA H200 (``launch/device_check.sh``; BENCHMARKS.md,
"On an NVIDIA H200"): a PD step takes 1.56 ms (9× PyTorch eager on the same GPU) and the
reverse process of a 256² image 29 s, so one image is ~3.1 minutes (~2.3 in bf16), compiles
excluded. The floor is arithmetic: Phase 1 at batch 4 is ~111 GFLOP per step, 11.1 PFLOP for
100k steps, and the reverse process of a 256² image another 1.65 PFLOP (26 PFLOP at 1024²),
i.e. at least ~13 s at an H100's dense bf16 peak (989 TFLOP/s); these small convolutions
reach 71 TFLOP/s (float32) and 99 TFLOP/s (bf16), a tenth of it. On a 2-core CPU it is
impractical (``python -m kfjax.bench.throughput --preset paper``; BENCHMARKS.md): use
``configs/cpu.py`` there. ``--config.precision=bfloat16``
computes PD and the U-Net in bf16 (for accelerators; on XLA:CPU it is no faster).
"""

from kfjax import config


def get_config():
  cfg = config.base_config()
  cfg.name = "paper"
  cfg.train.batch_size = 4   # consistent with the paper's ~2 ms per step (docstring)
  return cfg
