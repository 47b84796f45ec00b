"""DDPM noise schedule maths with the velocity (v) parameterisation.

Timesteps are integers ``t = 0 … T``; ``alpha_bar[0] = 1`` is the clean image and
``alpha_bar[t] = prod_{i<=t} (1 - beta_i)``. With ``a = sqrt(alpha_bar_t)`` and
``b = sqrt(1 - alpha_bar_t)``::

    x_t = a·x0 + b·eps,     v = a·eps − b·x0,
    x0  = a·x_t − b·v,      eps = b·x_t + a·v.

``posterior`` generalises the DDPM posterior ``q(x_s | x_t, x0)`` to any ``s < t``
(strided samplers); for ``s = t − 1`` it is the textbook formula.
"""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class Schedule(NamedTuple):
  """Per-timestep arrays of length ``T + 1`` (index 0 is the clean image)."""
  betas: jnp.ndarray
  alpha_bar: jnp.ndarray

  @property
  def num_steps(self):
    return self.betas.shape[0] - 1


def linear_schedule(num_steps=1000, beta_start=1e-4, beta_end=0.02, dtype=jnp.float32):
  """The standard DDPM linear beta schedule (computed in float64, cast to ``dtype``)."""
  betas = np.concatenate([[0.0], np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)])
  alpha_bar = np.cumprod(1.0 - betas)
  return Schedule(jnp.asarray(betas, dtype), jnp.asarray(alpha_bar, dtype))


def from_config(cfg):
  """The schedule of ``cfg.diffusion`` (shared by Phase 1's training and Phase 2)."""
  d = cfg.diffusion
  return linear_schedule(d.num_steps, d.beta_start, d.beta_end)


def _coefs(sched, t):
  ab = sched.alpha_bar[t]
  return jnp.sqrt(ab), jnp.sqrt(1.0 - ab)


def q_sample(sched, x0, t, noise):
  """Sample ``x_t ~ q(x_t | x0)`` given the noise."""
  a, b = _coefs(sched, t)
  return a * x0 + b * noise


def v_target(sched, x0, t, noise):
  """The velocity ``v = a·eps − b·x0`` that the model learns to predict."""
  a, b = _coefs(sched, t)
  return a * noise - b * x0


def x0_from_v(sched, x_t, t, v):
  a, b = _coefs(sched, t)
  return a * x_t - b * v


def eps_from_v(sched, x_t, t, v):
  a, b = _coefs(sched, t)
  return b * x_t + a * v


def v_from_x0_eps(sched, x0, eps, t):
  return v_target(sched, x0, t, eps)


def posterior(sched, t, s):
  """Coefficients of ``q(x_s | x_t, x0) = N(c0·x0 + ct·x_t, var)`` for ``0 <= s < t``.

  Returns ``(c0, ct, var)``. With ``alpha = ab_t / ab_s`` (the product of the
  ``1 - beta`` between the two steps)::

      c0  = sqrt(ab_s)·(1 − alpha) / (1 − ab_t)
      ct  = sqrt(alpha)·(1 − ab_s) / (1 − ab_t)
      var = (1 − alpha)·(1 − ab_s) / (1 − ab_t)
  """
  ab_t = sched.alpha_bar[t]
  ab_s = sched.alpha_bar[s]
  alpha = ab_t / ab_s
  c0 = jnp.sqrt(ab_s) * (1.0 - alpha) / (1.0 - ab_t)
  ct = jnp.sqrt(alpha) * (1.0 - ab_s) / (1.0 - ab_t)
  var = (1.0 - alpha) * (1.0 - ab_s) / (1.0 - ab_t)
  return c0, ct, var


def posterior_sample(sched, x0, x_t, t, s, noise, eta=1.0):
  """One reverse step ``x_t → x_s`` given an estimate of ``x0`` (DDIM family).

  ``eta = 1`` is the DDPM posterior ``mean + sqrt(var)·noise`` (Algorithm 1); ``eta = 0``
  is deterministic DDIM. In general, with ``eps = (x_t − sqrt(ab_t)·x0)/sqrt(1 − ab_t)``
  and ``sigma = eta·sqrt(var)``::

      x_s = sqrt(ab_s)·x0 + sqrt(1 − ab_s − sigma²)·eps + sigma·noise
  """
  c0, ct, var = posterior(sched, t, s)
  if isinstance(eta, (int, float)) and eta == 1.0:
    return c0 * x0 + ct * x_t + jnp.sqrt(var) * noise
  ab_t, ab_s = sched.alpha_bar[t], sched.alpha_bar[s]
  eps = (x_t - jnp.sqrt(ab_t) * x0) / jnp.sqrt(1.0 - ab_t)
  sigma = eta * jnp.sqrt(var)
  return (jnp.sqrt(ab_s) * x0 + jnp.sqrt(jnp.maximum(1.0 - ab_s - sigma ** 2, 0.0)) * eps
          + sigma * noise)


def sampling_timesteps(t_start, num_steps):
  """``num_steps + 1`` distinct integer timesteps from ``t_start + 1`` down to 1.

  Element 0 is the starting noise level; reverse step ``i`` goes from element ``i`` to
  element ``i + 1`` (Algorithm 1's ``x_t`` from ``x_{t+1}``), and the denoiser is
  evaluated at element ``i + 1``, which is never 0 (it is not trained at t = 0).
  With ``num_steps == t_start`` this is every step ``t_start … 1``.
  """
  if not 1 <= num_steps <= t_start:
    raise ValueError(f"need 1 <= num_steps <= t_start, got {num_steps}, {t_start}")
  return np.round(np.linspace(t_start + 1, 1, num_steps + 1)).astype(np.int32)
