"""Tests for ``kfjax.schedule``: alpha_bar, v-parameterisation, (generalised) posterior."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfjax import schedule as sch

T = 1000


@pytest.fixture(scope="module")
def sched64():
  with jax.enable_x64(True):
    yield sch.linear_schedule(T, 1e-4, 0.02, dtype=jnp.float64)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _np_betas():
  return np.linspace(1e-4, 0.02, T)


def test_alpha_bar(sched64, x64):
  ab = np.asarray(sched64.alpha_bar)
  assert ab.dtype == np.float64 and ab.shape == (T + 1,)
  assert ab[0] == 1.0
  np.testing.assert_allclose(ab[1:], np.cumprod(1.0 - _np_betas()), rtol=1e-14, atol=0)
  np.testing.assert_allclose(np.asarray(sched64.betas)[1:], _np_betas(), rtol=0, atol=1e-16)
  assert sched64.num_steps == T
  assert np.all(np.diff(ab) < 0)


def test_default_float32():
  s = sch.linear_schedule()
  assert s.alpha_bar.dtype == jnp.float32 and s.betas.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(s.alpha_bar)[1:], np.cumprod(1.0 - _np_betas()),
                             rtol=1e-5)


@pytest.mark.parametrize("t", [1, 2, 17, 500, 999, 1000])
def test_v_round_trips(sched64, x64, t):
  rng = np.random.default_rng(t)
  x0 = jnp.asarray(rng.uniform(-1, 1, size=(5, 4, 3)))
  eps = jnp.asarray(rng.normal(size=(5, 4, 3)))
  ab = np.cumprod(1.0 - _np_betas())[t - 1]
  a, b = np.sqrt(ab), np.sqrt(1 - ab)
  x_t = sch.q_sample(sched64, x0, t, eps)
  np.testing.assert_allclose(np.asarray(x_t), a * np.asarray(x0) + b * np.asarray(eps),
                             rtol=0, atol=1e-12)
  v = sch.v_target(sched64, x0, t, eps)
  np.testing.assert_allclose(np.asarray(v), a * np.asarray(eps) - b * np.asarray(x0),
                             rtol=0, atol=1e-12)
  np.testing.assert_allclose(np.asarray(sch.x0_from_v(sched64, x_t, t, v)), np.asarray(x0),
                             rtol=0, atol=1e-12)
  np.testing.assert_allclose(np.asarray(sch.eps_from_v(sched64, x_t, t, v)), np.asarray(eps),
                             rtol=0, atol=1e-12)
  np.testing.assert_allclose(np.asarray(sch.v_from_x0_eps(sched64, x0, eps, t)), np.asarray(v),
                             rtol=0, atol=1e-12)


def test_batched_timesteps(sched64, x64):
  """``t`` of shape (B, 1, 1, 1) broadcasts per image, as in Phase 1."""
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.uniform(-1, 1, size=(3, 4, 4, 2)))
  eps = jnp.asarray(rng.normal(size=(3, 4, 4, 2)))
  t = jnp.asarray([1, 300, 1000])
  x_t = sch.q_sample(sched64, x0, t[:, None, None, None], eps)
  for i in range(3):
    one = sch.q_sample(sched64, x0[i], int(t[i]), eps[i])
    np.testing.assert_allclose(np.asarray(x_t[i]), np.asarray(one), rtol=0, atol=1e-14)


@pytest.mark.parametrize("t", [1, 2, 50, 999, 1000])
def test_posterior_textbook(sched64, x64, t):
  """s = t - 1: Ho et al. (2020) eq. 7, written with the betas directly."""
  betas = np.concatenate([[0.0], _np_betas()])
  alphas = 1.0 - betas
  ab = np.cumprod(alphas)
  beta_t, ab_t, ab_prev = betas[t], ab[t], ab[t - 1]
  c0_ref = np.sqrt(ab_prev) * beta_t / (1.0 - ab_t)
  ct_ref = np.sqrt(alphas[t]) * (1.0 - ab_prev) / (1.0 - ab_t)
  var_ref = (1.0 - ab_prev) / (1.0 - ab_t) * beta_t
  c0, ct, var = map(float, sch.posterior(sched64, t, t - 1))
  np.testing.assert_allclose([c0, ct, var], [c0_ref, ct_ref, var_ref], rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("t,s", [(2, 1), (10, 3), (200, 150), (1000, 1), (1000, 999), (7, 0),
                                 (1000, 0)])
def test_posterior_marginal_consistency(sched64, x64, t, s):
  """x_t ~ q(x_t|x0) then x_s ~ posterior has the marginal q(x_s|x0) (exact identities),
  and the coefficients equal Gaussian conditioning of the forward chain."""
  ab = np.asarray(sched64.alpha_bar)
  ab_t, ab_s = ab[t], ab[s]
  c0, ct, var = map(float, sch.posterior(sched64, t, s))
  np.testing.assert_allclose(c0 + ct * np.sqrt(ab_t), np.sqrt(ab_s), rtol=0, atol=1e-12)
  np.testing.assert_allclose(ct ** 2 * (1 - ab_t) + var, 1 - ab_s, rtol=0, atol=1e-12)
  # Conditioning the forward chain x_s = √ab_s·x0 + √(1-ab_s)·e1,
  # x_t = √(ab_t/ab_s)·x_s + √(1-ab_t/ab_s)·e2 on x_t.
  cov = np.sqrt(ab_t / ab_s) * (1 - ab_s)
  ct_ref = cov / (1 - ab_t)
  np.testing.assert_allclose(ct, ct_ref, rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(c0, np.sqrt(ab_s) - ct_ref * np.sqrt(ab_t), rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(var, (1 - ab_s) - cov ** 2 / (1 - ab_t), rtol=1e-9, atol=1e-14)
  assert var >= 0


@pytest.mark.parametrize("t", [1, 5, 1000])
def test_posterior_to_zero(sched64, x64, t):
  c0, ct, var = map(float, sch.posterior(sched64, t, 0))
  assert c0 == pytest.approx(1.0, abs=1e-14)
  assert ct == pytest.approx(0.0, abs=1e-14)
  assert var == pytest.approx(0.0, abs=1e-14)
  rng = np.random.default_rng(t)
  x0, x_t, xi = (jnp.asarray(rng.normal(size=(3, 3, 1))) for _ in range(3))
  out = sch.posterior_sample(sched64, x0, x_t, t, 0, xi)
  np.testing.assert_allclose(np.asarray(out), np.asarray(x0), rtol=0, atol=1e-13)


def test_posterior_sample_formula(sched64, x64):
  rng = np.random.default_rng(5)
  x0, x_t, xi = (jnp.asarray(rng.normal(size=(4, 2, 3))) for _ in range(3))
  c0, ct, var = sch.posterior(sched64, 40, 25)
  out = sch.posterior_sample(sched64, x0, x_t, 40, 25, xi)
  ref = (float(c0) * np.asarray(x0) + float(ct) * np.asarray(x_t)
         + np.sqrt(float(var)) * np.asarray(xi))
  np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize("t_start,num_steps", [(200, 200), (200, 25), (20, 4), (1000, 7), (5, 1),
                                               (1, 1), (999, 998)])
def test_sampling_timesteps(t_start, num_steps):
  ts = sch.sampling_timesteps(t_start, num_steps)
  assert ts.shape == (num_steps + 1,)
  assert np.issubdtype(ts.dtype, np.integer)
  assert ts[0] == t_start + 1
  assert ts[-1] == 1
  assert np.all(np.diff(ts) < 0)
  if num_steps == t_start:
    np.testing.assert_array_equal(ts, np.arange(t_start + 1, 0, -1))


@pytest.mark.parametrize("t_start,num_steps", [(20, 0), (20, 21), (0, 1)])
def test_sampling_timesteps_rejects(t_start, num_steps):
  with pytest.raises(ValueError):
    sch.sampling_timesteps(t_start, num_steps)
