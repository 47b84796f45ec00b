"""Classical non-blind restoration: total-variation regularised least squares.

Given the LR image ``y`` (h, w, C), a kernel ``k`` and the scale ``s``, minimise::

    L(x) = mean(((x * k)↓s − y)²) + λ · mean_pixels( sqrt(Σ_c (∂_h x_c)² + (∂_w x_c)² + ε²) )

over the HR image ``x`` with Adam, starting from the bicubic upscale (or a given image).
``(x * k)↓s`` is the model's own operator (:func:`kfjax.degrade.downscale`); the TV term
is isotropic, couples the colour channels (one gradient magnitude per pixel, so edges
stay aligned across channels instead of ringing in colour), and is Charbonnier-smoothed
by ``ε`` so its gradient exists everywhere. Forward differences with the last row/column's
difference zero (Neumann boundary). Images are in [0, 1]; ``λ`` is for that range.

It serves three roles: the benchmark's classical non-blind baseline (``tv_nonblind``: the
true kernel), the test of an estimated kernel under a solver that uses it well
(``tv_blind``), and an optional final restoration after Phase 2 with the kernel it found
(``restore.final``). The loop is one ``lax.scan`` (compiled once per image shape).
"""

import functools

import jax
import jax.numpy as jnp
import optax

from kfjax import degrade
from kfjax import resize
from kfjax import runtime

FIELDS = ("weight", "steps", "lr", "lr_end", "eps")


def tv(x, eps):
  """Mean over pixels of the Charbonnier-smoothed, channel-coupled isotropic TV of
  ``x`` (..., H, W, C)."""
  dh = jnp.concatenate([x[..., 1:, :, :] - x[..., :-1, :, :],
                        jnp.zeros_like(x[..., :1, :, :])], axis=-3)
  dw = jnp.concatenate([x[..., :, 1:, :] - x[..., :, :-1, :],
                        jnp.zeros_like(x[..., :, :1, :])], axis=-2)
  return jnp.mean(jnp.sqrt(jnp.sum(dh * dh + dw * dw, axis=-1) + eps * eps))


def loss(x, lr_image, kernel, scale, weight, eps):
  """``mean(((x*k)↓s − y)²) + weight · tv(x, eps)``."""
  data = jnp.mean((degrade.downscale(x, kernel, scale) - lr_image) ** 2)
  return data + weight * tv(x, eps)


def _solve_impl(x0, lr_image, kernel, scale, steps, weight, eps, lr, lr_end):
  sched = optax.cosine_decay_schedule(lr, steps, alpha=lr_end / lr)
  tx = optax.adam(sched)

  def step(carry, _):
    x, opt = carry
    value, g = jax.value_and_grad(loss)(x, lr_image, kernel, scale, weight, eps)
    updates, opt = tx.update(g, opt, x)
    return (optax.apply_updates(x, updates), opt), value

  (x, _), values = jax.lax.scan(step, (x0, tx.init(x0)), length=steps)
  return x, values


@functools.cache
def _solver():
  """The compiled solver, built at first use rather than at import: its compiler options
  depend on the backend, and starting the backend at import would forbid
  ``jax.distributed.initialize`` afterwards."""
  return runtime.jit(_solve_impl, static_argnames=("scale", "steps"))


def solve(lr_image, kernel, scale, weight, steps=1500, lr=1e-2, lr_end=1e-4, eps=1e-3,
          x_init=None):
  """The HR image (H, W, C) in [0, 1] minimising :func:`loss`, and the loss per step.

  Args:
    lr_image: (h, w, C) in [0, 1].
    kernel: (K, K), summing to 1.
    scale: integer ``s``.
    weight: ``λ`` (for [0, 1] images).
    steps: Adam steps (learning rate cosine-annealed from ``lr`` to ``lr_end``).
    eps: Charbonnier smoothing of the TV term.
    x_init: starting HR image (default: the bicubic upscale of ``lr_image``).
  """
  y = jnp.asarray(lr_image, jnp.float32)
  k = jnp.asarray(kernel, jnp.float32)
  x0 = resize.upscale(y, int(scale)) if x_init is None else jnp.asarray(x_init, jnp.float32)
  if x0.shape[-3:-1] != tuple(int(scale) * n for n in y.shape[-3:-1]):
    raise ValueError(f"x_init {x0.shape} is not {scale}x the LR image {y.shape}")
  x, values = _solver()(x0, y, k, int(scale), int(steps), float(weight), float(eps),
                     float(lr), float(lr_end))
  return jnp.clip(x, 0.0, 1.0), values


def weight_at(weight, scale):
  """The TV weight at ``scale`` from the config's ×2 value: ``weight · (s/2)²``.

  A larger factor leaves more of the HR image unseen by the LR data (the operator's null
  space grows with s²), so the prior has to carry more: on the tuning photos the best
  weight was 3e-5…1e-4 at ×2 and 3e-4…1e-3 at ×4 (BENCHMARKS.md, "TV restoration").
  """
  return float(weight) * (int(scale) / 2.0) ** 2


def solve_cfg(lr_image, kernel, scale, rcfg, x_init=None):
  """:func:`solve` with the settings of a config's ``restore`` block (weight per
  :func:`weight_at`)."""
  kw = {f: rcfg[f] for f in FIELDS}
  kw["weight"] = weight_at(kw["weight"], scale)
  return solve(lr_image, kernel, scale, x_init=x_init, **kw)
