"""Gaussian data in closed form, the exact models the sampler tests run on.

For data x_0 ~ N(mu, s^2) per dimension, x_t ~ N(sqrt(abar) mu, v_t) with
v_t = abar s^2 + 1 - abar; the score of q(x_t) is -(x_t - sqrt(abar) mu) / v_t, and the exact
(Bayes-optimal) model outputs follow from E[x_0 | x_t] = mu + sqrt(abar) s^2 (x_t - sqrt(abar)
mu) / v_t and E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / v_t; s = 0 is the point
mass at mu. Moments are checked within 5 standard errors: mean +- 5 s / sqrt(N), std
+- 5 s / sqrt(2 N) for N values.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, schedules

T = 100
BETAS = schedules.get_beta_schedule("linear", T, beta_start=1e-3, beta_end=0.2)
SCHED = diffusion.DiffusionSchedule.from_betas(BETAS)
ABAR = np.cumprod(1.0 - BETAS)
SHAPE = (4, 2, 2, 3)


def abar(t: jnp.ndarray, ndim: int) -> jnp.ndarray:
  return SCHED.alphas_cumprod[t].reshape((-1,) + (1,) * (ndim - 1))


def exact_output_fn(mu: float, s: float, mean_type: str = "eps", var_channels: bool = False):
  """The Bayes-optimal model output of ``mean_type`` for x_0 ~ N(mu, s^2); var_channels
  appends C arbitrary variance channels (a learned-variance model's [mean | variance])."""

  def fn(x_t, t):
    a = abar(t, x_t.ndim)
    v = a * s**2 + 1 - a

    def x0():
      return mu + jnp.sqrt(a) * s**2 * (x_t - jnp.sqrt(a) * mu) / v

    def eps():
      return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * mu) / v

    out = {
      "eps": eps,
      "xstart": x0,
      "v": lambda: jnp.sqrt(a) * eps() - jnp.sqrt(1 - a) * x0(),
      "xprev": lambda: diffusion.q_posterior_mean_variance(SCHED, x0(), x_t, t)[0],
    }[mean_type]()  # Only the requested output is traced.
    return jnp.concatenate([out, jnp.full_like(out, 0.3)], -1) if var_channels else out

  return fn


def closed_form_score(x_t: np.ndarray, t: np.ndarray, mu: float, s: float) -> np.ndarray:
  a = ABAR[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
  return -(x_t - np.sqrt(a) * mu) / (a * s**2 + 1 - a)


def q_t_samples(
  rng: jax.Array, t: np.ndarray, shape: tuple[int, ...], mu: float, s: float
) -> jnp.ndarray:
  """Exact draws of q(x_t) for Gaussian data, float64 moments."""
  a = ABAR[t].reshape((-1,) + (1,) * (len(shape) - 1))
  z = np.asarray(jax.random.normal(rng, shape), np.float64)
  return jnp.asarray(np.sqrt(a) * mu + np.sqrt(a * s**2 + 1 - a) * z, jnp.float32)


def assert_moments(x, mu: float, s: float, *, label: str = "") -> None:
  x = np.asarray(x, np.float64)
  n = x.size
  assert abs(x.mean() - mu) < 5 * s / np.sqrt(n), f"{label} mean {x.mean():.4f} vs {mu}"
  assert abs(x.std() - s) < 5 * s / np.sqrt(2 * n), f"{label} std {x.std():.4f} vs {s}"
