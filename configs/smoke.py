"""Smoke preset for tests: tiny networks, a handful of steps; seconds on a CPU.

    python -m kfjax.main --image x.png --scale 2 --config configs/smoke.py

Results are meaningless; it exercises every code path.
"""

from kfjax import config


def get_config():
  cfg = config.base_config()
  cfg.name = "smoke"
  cfg.scale = 2
  cfg.pd.channels = 8
  cfg.pd.emb_dim = 8
  cfg.train.steps = 6
  cfg.train.batch_size = 2
  cfg.train.crop_size = 16
  cfg.train.lr = 1e-3
  cfg.train.lr_end = 1e-4
  cfg.train.steps_per_chunk = 3
  cfg.train.checkpoint_every = 3
  cfg.unet.base_channels = 4
  cfg.unet.levels = 2
  cfg.unet.max_channels = 8
  cfg.kernel.width = 8
  cfg.kernel.depth = 2
  cfg.sample.t_start = 20
  cfg.sample.num_steps = 4
  cfg.sample.n_iter_first = 3
  cfg.sample.n_iter = 2
  cfg.sample.lr = 1e-3
  cfg.sample.lr_end = 1e-4
  cfg.sample.iters_per_chunk = 3
  cfg.sample.checkpoint_every = 2
  cfg.kernel.cnn_channels = 4        # kernel.net=linear_cnn
  kg = cfg.kernelgan                 # --method kernelgan: tiny nets, 4 iterations
  kg.iterations = 4
  kg.steps_per_chunk = 2
  kg.checkpoint_every = 2            # (a checkpoint after every chunk)
  kg.g_sizes = (3, 3, 1, 1)
  kg.g_channels = 4
  kg.d_channels = 4
  kg.d_depth = 3
  kg.d_kernel = 3
  kg.crop_size = 16
  kg.switch_iter = 2
  kg.lambda_update_freq = 2
  dd = cfg.ddm4ip                    # --method ddm4ip: tiny nets, a few steps
  dd.patch = 4
  dd.g_sizes = (3, 1)
  dd.channels = 4
  dd.levels = 2
  dd.emb_dim = 8
  dd.flow_steps = 4
  dd.flow_batch = 4
  dd.match_steps = 4
  dd.match_batch = 2
  dd.g_channels = 4
  dd.steps_per_chunk = 2
  dd.checkpoint_every = 2
  ik = cfg.ike                       # --method ike: tiny nets, a few iterations
  ik.iterations = 4
  ik.couplings = 2
  ik.hidden = 4
  ik.u_layers = 2
  ik.u_channels = 4
  ik.d_channels = 4
  ik.d_depth = 3
  ik.d_kernel = 3
  ik.crop = 16
  ik.energy_size = 3
  ik.steps_per_chunk = 2
  ik.checkpoint_every = 2
  return cfg
