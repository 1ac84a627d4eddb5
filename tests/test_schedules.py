"""Tests for ddpm_jax.schedules: values from closed forms, monotonicity, bad input."""

import math

import numpy as np
import pytest

from ddpm_jax import schedules


def test_linear_is_the_papers_schedule():
  betas = schedules.get_beta_schedule("linear", 1000)
  assert betas.dtype == np.float64 and betas.shape == (1000,)
  assert betas[0] == 1e-4 and betas[-1] == pytest.approx(0.02, abs=1e-15)
  # Constant increments of (0.02 - 1e-4) / 999.
  np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)


def test_quad_is_square_of_linear_in_sqrt_space():
  betas = schedules.get_beta_schedule("quad", 10, beta_start=1e-4, beta_end=0.04)
  root = np.sqrt(betas)
  np.testing.assert_allclose(root[[0, -1]], [0.01, 0.2], rtol=1e-12)
  np.testing.assert_allclose(np.diff(root), (0.2 - 0.01) / 9, rtol=1e-9)


def test_const_and_jsd():
  np.testing.assert_array_equal(
    schedules.get_beta_schedule("const", 5, beta_end=0.3), np.full(5, 0.3)
  )
  np.testing.assert_allclose(schedules.get_beta_schedule("jsd", 4), [1 / 4, 1 / 3, 1 / 2, 1.0])


@pytest.mark.parametrize("name,frac", [("warmup10", 0.1), ("warmup50", 0.5)])
def test_warmup(name, frac):
  t = 100
  betas = schedules.get_beta_schedule(name, t, beta_start=1e-4, beta_end=0.02)
  warm = int(t * frac)
  np.testing.assert_allclose(betas[:warm], np.linspace(1e-4, 0.02, warm))
  np.testing.assert_array_equal(betas[warm:], 0.02)


def test_cosine_matches_its_alpha_bar():
  t_max, s = 1000, 0.008
  betas = schedules.get_beta_schedule("cosine", t_max)
  abar = np.cumprod(1.0 - betas)

  def f(t):
    return math.cos((t / t_max + s) / (1 + s) * math.pi / 2) ** 2

  for t in (0, 10, 500, 900):  # abar after step t+1, normalised by f(0).
    assert abar[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)
  assert betas.max() == pytest.approx(0.999)  # the clip bites at the end.


@pytest.mark.parametrize("name", schedules.SCHEDULE_NAMES)
def test_every_schedule_is_valid_and_monotone(name):
  betas = schedules.get_beta_schedule(name, 1000)
  assert betas.dtype == np.float64 and betas.shape == (1000,)
  assert np.all(betas > 0) and np.all(betas <= 1)
  assert np.all(np.diff(betas) >= 0)  # every schedule is non-decreasing.
  abar = np.cumprod(1.0 - betas)
  assert np.all(np.diff(abar) <= 0)


def test_bad_input():
  with pytest.raises(ValueError, match=r"unknown beta schedule 'sigmoid'.*linear"):
    schedules.get_beta_schedule("sigmoid", 10)
  with pytest.raises(ValueError, match=r"num_timesteps.*0"):
    schedules.get_beta_schedule("linear", 0)
  with pytest.raises(ValueError, match=r"num_timesteps.*2.5"):
    schedules.get_beta_schedule("linear", 2.5)
  with pytest.raises(ValueError, match=r"beta_end.*1.5"):
    schedules.get_beta_schedule("linear", 10, beta_end=1.5)
  with pytest.raises(ValueError, match=r"beta_start.*0"):
    schedules.get_beta_schedule("linear", 10, beta_start=0.0)
