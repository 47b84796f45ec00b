"""PyTorch eager reference of kfjax's networks, Phase 1 step and Phase 2 iteration.

The throughput benchmark (:mod:`kfjax.bench.throughput`) times these next to the
kfjax programs, in the same process, and reports the ratio. They mirror kfjax exactly
(``tests/test_throughput.py`` ports JAX parameters in and compares outputs):

* :class:`PatchDiffusion` — ``kfjax.models.pd``: VALID convolutions, sinusoidal time
  embedding, per-block conditioning, 15×15 receptive field.
* :class:`UNet` — ``kfjax.models.unet`` (``upsample="bilinear"``): two 3×3 conv +
  BatchNorm (statistics of the batch given) + ReLU per block, max-pool down, bilinear up
  (half-pixel centres) then a 1×1 conv, skips, tanh.
* :class:`SirenKernel` — the SIREN kernel INR with the leaky sigmoid, normalised;
  :class:`LinearCNNKernel` — the deep linear CNN kernel net (the ``cpu`` preset's).
* :func:`downscale` — ``kfjax.degrade.downscale`` (true convolution, symmetric borders).
* :class:`Phase1Step` and :class:`Phase2Iteration` — one PD optimiser step (v-MSE on
  random crops, Adam, cosine learning rate) and one inner iteration of Phase 2 (U-Net
  twice, posterior step, PD, consistency + COM losses, Adam on U-Net and kernel net).

Written as a competent PyTorch user would: channels-last tensors (faster on CPU for
these convolutions), functional BatchNorm without running averages, ``foreach`` Adam,
no ``torch.compile``. Needs the optional ``bench`` extra (``pip install -e ".[bench]"``).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kfjax.models import kernel_net

HALO = 7
LEAK = 1e-4


def _to_device_format(x, channels_last):
  return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def pad_symmetric(x, lo_h, hi_h, lo_w, hi_w):
  """NumPy ``mode="symmetric"`` padding (edge pixel repeated) of ``(N, C, H, W)``."""
  def index(n, lo, hi):
    idx = np.concatenate([np.arange(lo - 1, -1, -1), np.arange(n), np.arange(n - 1, n - 1 - hi, -1)])
    return torch.as_tensor(np.clip(idx, 0, n - 1), device=x.device)
  if lo_h or hi_h:
    x = x.index_select(2, index(x.shape[2], lo_h, hi_h))
  if lo_w or hi_w:
    x = x.index_select(3, index(x.shape[3], lo_w, hi_w))
  return x


def timestep_embedding(t, dim, max_period=10_000.0):
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
  args = t.float()[:, None] * freqs[None]
  return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class PatchDiffusion(nn.Module):
  """``v(x_t, t)``: input ``(B, C, H+14, W+14)``, output ``(B, C, H, W)``."""

  def __init__(self, in_channels=3, channels=128, num_blocks=5, emb_dim=128):
    super().__init__()
    self.emb_dim = emb_dim
    self.emb0 = nn.Linear(emb_dim, emb_dim)
    self.emb1 = nn.Linear(emb_dim, emb_dim)
    self.cond = nn.ModuleList([nn.Linear(emb_dim, channels) for _ in range(num_blocks + 1)])
    self.in_conv0 = nn.Conv2d(in_channels, channels, 3)
    self.in_conv1 = nn.Conv2d(channels, channels, 3)
    self.conv3 = nn.ModuleList([nn.Conv2d(channels, channels, 3) for _ in range(num_blocks)])
    self.conv1 = nn.ModuleList([nn.Conv2d(channels, channels, 1) for _ in range(num_blocks)])
    self.out_conv = nn.Conv2d(channels, in_channels, 1)

  def forward(self, x, t):
    emb = F.silu(self.emb1(F.silu(self.emb0(timestep_embedding(t, self.emb_dim)))))
    cond = lambda i: self.cond[i](emb)[:, :, None, None]
    h = F.silu(self.in_conv0(x) + cond(0))
    h = F.silu(self.in_conv1(h))
    for i, (c3, c1) in enumerate(zip(self.conv3, self.conv1)):
      r = c1(F.silu(c3(h) + cond(i + 1)))
      h = F.silu(h[:, :, 1:-1, 1:-1] + r)
    return self.out_conv(h)


class _Block(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.convs = nn.ModuleList([nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)])
    self.scales = nn.ParameterList([nn.Parameter(torch.ones(cout)) for _ in range(2)])
    self.biases = nn.ParameterList([nn.Parameter(torch.zeros(cout)) for _ in range(2)])

  def forward(self, x):
    for conv, s, b in zip(self.convs, self.scales, self.biases):
      # BatchNorm with the statistics of this batch, as kfjax (no running averages).
      x = F.relu(F.batch_norm(conv(x), None, None, s, b, training=True, eps=1e-5))
    return x


class UNet(nn.Module):
  """``(B, C, H, W) → (B, C, H, W)`` in [−1, 1]; bilinear upsampling."""

  def __init__(self, channels=3, base_channels=32, levels=5, max_channels=512, residual=False):
    super().__init__()
    self.levels, self.residual = levels, residual
    feats = [min(base_channels * 2 ** i, max_channels) for i in range(levels)]
    down, cin = [], channels
    for f in feats:
      down.append(_Block(cin, f))
      cin = f
    self.down = nn.ModuleList(down)
    ups, blocks = [], []
    for f in reversed(feats[:-1]):
      ups.append(nn.Conv2d(cin, f, 1))
      blocks.append(_Block(2 * f, f))
      cin = f
    self.ups, self.up_blocks = nn.ModuleList(ups), nn.ModuleList(blocks)
    self.out_conv = nn.Conv2d(cin, channels, 1)

  def forward(self, x):
    h, w = x.shape[-2:]
    m = 2 ** (self.levels - 1)
    x_in = x
    x = pad_symmetric(x, 0, (-h) % m, 0, (-w) % m)
    skips = []
    for block in self.down[:-1]:
      x = block(x)
      skips.append(x)
      x = F.max_pool2d(x, 2)
    x = self.down[-1](x)
    for up, block, skip in zip(self.ups, self.up_blocks, reversed(skips)):
      x = up(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
      x = block(torch.cat([x, skip], dim=1))
    out = self.out_conv(x)[:, :, :h, :w]
    if self.residual:
      out = out + torch.atanh(torch.clamp(x_in, -0.999, 0.999))
    return torch.tanh(out)


class SirenKernel(nn.Module):
  """The K×K kernel from a SIREN on the fixed coordinate grid (no inputs)."""

  def __init__(self, size, width=256, depth=5, omega=5.0):
    super().__init__()
    self.size, self.omega = size, omega
    lin = torch.linspace(-1.0, 1.0, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    self.register_buffer("grid", torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=-1))
    dims = [2] + [width] * (depth - 1)
    self.sines = nn.ModuleList([nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])
    self.out = nn.Linear(dims[-1], 1)

  def forward(self):
    h = self.grid
    for layer in self.sines:
      h = torch.sin(self.omega * layer(h))
    k = ((1.0 + LEAK) * torch.sigmoid(self.out(h)[:, 0]) - LEAK).reshape(self.size, self.size)
    return k / k.sum()


class LinearCNNKernel(nn.Module):
  """The K×K kernel of a deep linear CNN (``sizes``; 1 → channels → … → 1, no biases):
  the stack of stride-1 correlations applied to a delta, placed in the K×K grid with the
  field's centre at the grid centre, divided by its sum."""

  def __init__(self, size, sizes, channels=32):
    super().__init__()
    self.size, self.sizes = size, tuple(sizes)
    chans = [1] + [channels] * (len(self.sizes) - 1) + [1]
    self.weights = nn.ParameterList([nn.Parameter(torch.zeros(chans[i + 1], chans[i], k, k))
                                     for i, k in enumerate(self.sizes)])

  def forward(self):
    field = sum(self.sizes) - len(self.sizes) + 1
    h = torch.zeros(1, 1, 2 * field - 1, 2 * field - 1)
    h[0, 0, field - 1, field - 1] = 1.0
    for w in self.weights:
      h = F.conv2d(h, w)
    d = (self.size - field) // 2
    lo = self.size - field - d
    k = F.pad(h[0, 0], (lo, d, lo, d))
    return k / k.sum()


def center_of_mass_loss(k):
  size = k.shape[0]
  idx = torch.arange(size, dtype=k.dtype) - (size - 1) / 2.0
  total = k.sum()
  cy, cx = (k.sum(1) * idx).sum() / total, (k.sum(0) * idx).sum() / total
  return cy ** 2 + cx ** 2


def _pads(size, scale, ksize):
  off = (scale - ksize) // 2
  out = -(-size // scale)
  return max(0, -off), max(0, scale * (out - 1) + off + ksize - size), max(0, off), out


def downscale(x, kernel, scale):
  """``(x * k)↓s`` of ``(N, C, H, W)``, the convention of ``kfjax.degrade.downscale``."""
  n, c, h, w = x.shape
  ks = kernel.shape[0]
  lo_h, hi_h, skip_h, out_h = _pads(h, scale, ks)
  lo_w, hi_w, skip_w, out_w = _pads(w, scale, ks)
  planes = pad_symmetric(x.reshape(n * c, 1, h, w), lo_h, hi_h, lo_w, hi_w)[:, :, skip_h:, skip_w:]
  y = F.conv2d(planes, torch.flip(kernel, (0, 1))[None, None], stride=scale)
  return y[:, :, :out_h, :out_w].reshape(n, c, out_h, out_w)


class Schedule:
  """The DDPM schedule as float32 tensors, from ``kfjax.schedule.Schedule``."""

  def __init__(self, sched):
    self.alpha_bar = torch.tensor(np.array(sched.alpha_bar, np.float32))
    self.num_steps = int(self.alpha_bar.shape[0] - 1)

  def coefs(self, t):
    ab = self.alpha_bar[t]
    return torch.sqrt(ab), torch.sqrt(1.0 - ab)

  def posterior(self, t, s):
    ab_t, ab_s = self.alpha_bar[t], self.alpha_bar[s]
    alpha = ab_t / ab_s
    return (torch.sqrt(ab_s) * (1 - alpha) / (1 - ab_t), torch.sqrt(alpha) * (1 - ab_s) / (1 - ab_t),
            (1 - alpha) * (1 - ab_s) / (1 - ab_t))


def cosine_lr(step, total, lr0, lr1):
  """optax.cosine_decay_schedule(lr0, total, alpha=lr1/lr0) at ``step``."""
  frac = min(step, total) / max(total, 1)
  return lr1 + (lr0 - lr1) * 0.5 * (1 + math.cos(math.pi * frac))


class Phase1Step:
  """One PD optimiser step on ``batch`` random ``crop``-px crops of ``image`` (H, W, C)."""

  def __init__(self, model, sched, image, batch, crop, lr=1e-4, lr_end=1e-6, total_steps=100_000,
               channels_last=True, seed=0):
    self.model, self.sched = model, Schedule(sched)
    self.batch, self.crop, self.channels_last = batch, crop, channels_last
    self.lr, self.lr_end, self.total = lr, lr_end, total_steps
    img = torch.tensor(np.array(image, np.float32)).permute(2, 0, 1)[None]
    self.padded = pad_symmetric(img, HALO, HALO, HALO, HALO)[0]
    self.opt = torch.optim.Adam(model.parameters(), lr=lr, eps=1e-8, foreach=True)
    self.gen = torch.Generator(device=self.padded.device).manual_seed(seed)
    self.step_count = 0

  def sample(self):
    size = self.crop + 2 * HALO
    _, hp, wp = self.padded.shape
    ys = torch.randint(0, hp - size + 1, (self.batch,), generator=self.gen).tolist()
    xs = torch.randint(0, wp - size + 1, (self.batch,), generator=self.gen).tolist()
    x0 = torch.stack([self.padded[:, y:y + size, x:x + size] for y, x in zip(ys, xs)])
    t = torch.randint(1, self.sched.num_steps + 1, (self.batch,), generator=self.gen)
    noise = torch.randn(x0.shape, generator=self.gen)
    return x0, t, noise

  def loss(self, x0, t, noise):
    a, b = (c[:, None, None, None] for c in self.sched.coefs(t))
    x_t = _to_device_format(a * x0 + b * noise, self.channels_last)
    v = (a * noise - b * x0)[:, :, HALO:-HALO, HALO:-HALO]
    return F.mse_loss(self.model(x_t, t), v)

  def __call__(self, batch=None):
    """One step; ``batch = (crops, t, noise)`` fixes the data (tests), else sampled."""
    for group in self.opt.param_groups:
      group["lr"] = cosine_lr(self.step_count, self.total, self.lr, self.lr_end)
    loss = self.loss(*(batch if batch is not None else self.sample()))
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    self.step_count += 1
    return loss.detach()


class Phase2Iteration:
  """The inner iteration of Phase 2 at one reverse step ``t → s``, blind mode.

  ``x``, ``x0``: (1, C, H, W) HR state; ``xi``: the step's noise; ``lr_image``:
  (1, C, h, w). PD is frozen (its input gradient still flows). ``__call__(lr)`` runs one
  forward, backward and Adam update and returns the loss.
  """

  def __init__(self, unet, kernel_net, pd, sched, x, x0, xi, lr_image, t, s, scale,
               com_weight=1e-2, channels_last=True):
    self.unet, self.kernel_net, self.pd = unet, kernel_net, pd
    for p in pd.parameters():
      p.requires_grad_(False)
    self.sched = Schedule(sched)
    fmt = lambda a: _to_device_format(torch.tensor(np.array(a, np.float32)), channels_last)
    self.x, self.x0, self.xi, self.lr_image = fmt(x), fmt(x0), fmt(xi), fmt(lr_image)
    self.t, self.s, self.scale, self.com_weight = int(t), int(s), int(scale), com_weight
    self.channels_last = channels_last
    params = list(unet.parameters()) + list(kernel_net.parameters())
    self.opt = torch.optim.Adam(params, lr=1e-4, eps=1e-8, foreach=True)

  def forward(self):
    k = self.kernel_net()
    a = self.unet(self.x0)
    c0, ct, var = self.sched.posterior(self.t, self.s)
    x_s = c0 * a + ct * self.x + torch.sqrt(var) * self.xi
    xp = _to_device_format(pad_symmetric(x_s, HALO, HALO, HALO, HALO), self.channels_last)
    v = self.pd(xp, torch.full((1,), self.s))
    ca, cb = self.sched.coefs(self.s)
    b = self.unet(_to_device_format(ca * x_s - cb * v, self.channels_last))
    cons_a = torch.mean((downscale(a, k, self.scale) - self.lr_image) ** 2)
    cons_b = torch.mean((downscale(b, k, self.scale) - self.lr_image) ** 2)
    com = center_of_mass_loss(k)
    return cons_a + cons_b + self.com_weight * com, (x_s, b, cons_a, cons_b, com)

  def __call__(self, lr=1e-4):
    for group in self.opt.param_groups:
      group["lr"] = lr
    loss, _ = self.forward()
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return loss.detach()


# -- porting parameters from kfjax --------------------------------------------------------

def _t(a):
  return torch.as_tensor(np.array(a, np.float32))


def _set_conv(conv, p):
  """Flax conv {kernel (kh, kw, Ci, Co), bias} into a torch Conv2d (Co, Ci, kh, kw)."""
  conv.weight.data.copy_(_t(p["kernel"]).permute(3, 2, 0, 1))
  conv.bias.data.copy_(_t(p["bias"]))


def _set_dense(lin, p):
  lin.weight.data.copy_(_t(p["kernel"]).T)
  lin.bias.data.copy_(_t(p["bias"]))


def load_pd(model, variables):
  """Copy kfjax PD parameters (``model.init`` output) into :class:`PatchDiffusion`."""
  p = variables["params"]
  _set_dense(model.emb0, p["emb0"])
  _set_dense(model.emb1, p["emb1"])
  for i, lin in enumerate(model.cond):
    _set_dense(lin, p[f"cond{i}"])
  _set_conv(model.in_conv0, p["in_conv0"])
  _set_conv(model.in_conv1, p["in_conv1"])
  for i, (c3, c1) in enumerate(zip(model.conv3, model.conv1)):
    _set_conv(c3, p[f"block{i}_conv3"])
    _set_conv(c1, p[f"block{i}_conv1"])
  _set_conv(model.out_conv, p["out_conv"])
  return model


def _set_block(block, p):
  for j in range(2):
    _set_conv(block.convs[j], p[f"Conv_{j}"])
    block.scales[j].data.copy_(_t(p[f"BatchNorm_{j}"]["scale"]))
    block.biases[j].data.copy_(_t(p[f"BatchNorm_{j}"]["bias"]))


def load_unet(model, variables):
  """Copy kfjax U-Net parameters (flax auto-names: ``_Block_i``, ``Conv_i``) into :class:`UNet`."""
  p = variables["params"]
  blocks = list(model.down) + list(model.up_blocks)
  for i, block in enumerate(blocks):
    _set_block(block, p[f"_Block_{i}"])
  for i, up in enumerate(model.ups):
    _set_conv(up, p[f"Conv_{i}"])
  _set_conv(model.out_conv, p["out_conv"])
  return model


def load_siren(model, variables):
  p = variables["params"]
  for i, layer in enumerate(model.sines):
    _set_dense(layer, p[f"sine{i}"])
  _set_dense(model.out, p["out"])
  return model


def load_linear_cnn(model, variables):
  """Copy kfjax ``LinearCNNKernel`` parameters (``conv{i}``: (kh, kw, Ci, Co))."""
  p = variables["params"]["cnn"]
  for i, w in enumerate(model.weights):
    w.data.copy_(_t(p[f"conv{i}"]).permute(3, 2, 0, 1))
  return model


def pd_from_config(cfg, channels):
  return PatchDiffusion(channels, cfg.pd.channels, cfg.pd.num_blocks, cfg.pd.emb_dim)


def unet_from_config(cfg, channels):
  u = cfg.unet
  if u.upsample != "bilinear":
    raise NotImplementedError("the torch reference mirrors the bilinear U-Net only")
  return UNet(channels, u.base_channels, u.levels, u.max_channels, u.residual)


def siren_from_config(cfg, size):
  k = cfg.kernel
  return SirenKernel(size, k.width, k.depth, k.omega)


def kernel_from_config(cfg, size, scale):
  """The preset's kernel network (``cfg.kernel.net``: ``inr`` or ``linear_cnn``), with the
  sizes of the module ``kfjax.models.kernel_net.make`` builds for it."""
  net = kernel_net.make(cfg.kernel, size, int(scale))
  if isinstance(net, kernel_net.SirenKernel):
    return SirenKernel(size, net.width, net.depth, net.omega)
  if isinstance(net, kernel_net.LinearCNNKernel):
    return LinearCNNKernel(size, net.sizes, net.channels)
  raise NotImplementedError(f"the torch reference has no kernel.net {cfg.kernel.net!r}")


def load_kernel(model, variables):
  """Copy kfjax kernel-network parameters into :func:`kernel_from_config`'s module."""
  if isinstance(model, LinearCNNKernel):
    return load_linear_cnn(model, variables)
  return load_siren(model, variables)
