"""Bits/dim of the bound on a dataset (ddpm_jax/evaluation/bpd.py): independent of the device
count, and equal to the closed form for Gaussian data with the exact noise predictor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, factories, input_pipeline, parallel, schedules, train_state
from ddpm_jax.evaluation import bpd as bpd_lib


@pytest.mark.slow
def test_bpd_does_not_depend_on_device_count(make_config):
  """The bound of 16 images is the same computed on 8 devices and on 1 (20 timesteps: the
  property does not depend on T, the cost does)."""
  config = make_config(**{"diffusion.num_timesteps": 20})
  model, schedule = factories.create_model(config), factories.create_schedule(config.diffusion)
  params = train_state.create_train_state(
    config, model, train_state.create_optimizer(config.training)
  ).params
  # A zero-initialised output layer would make every example alike: perturb the weights.
  params = jax.tree.map(
    lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), jax.device_get(params)
  )

  def fn_of(p):
    return factories.model_fn(model, p)

  images, _ = next(input_pipeline.create_eval_iterator(config.data, global_batch_size=16))
  rng = jax.random.key(3)
  out8 = bpd_lib.make_p_bpd(config, schedule, fn_of)(parallel.replicate(params), images, rng)
  one = jax.devices()[:1]
  out1 = bpd_lib.make_p_bpd(config, schedule, fn_of, devices=one)(
    parallel.replicate(params, devices=one), images.reshape((1, 16, 8, 8, 3)), rng
  )
  for k in ("total_bpd", "terms_bpd", "mse"):
    np.testing.assert_allclose(
      np.asarray(out8[k]).reshape(16, -1), np.asarray(out1[k]).reshape(16, -1), rtol=2e-5, atol=1e-6
    )


def test_bound_terms_of_exact_gaussian_model_match_closed_form():
  """x_0 ~ N(mu, s^2) per dimension, exact E[eps | x_t], fixedsmall variance, no clipping.

  For t >= 1 the mean error is coef1 (x_0 - E[x_0|x_t]), so E[L_t] = KL of the variances +
  coef1^2 Var(x_0 | x_t) / (2 sigma_t^2), Var(x_0|x_t) = s^2 (1-abar) / (abar s^2 + 1-abar);
  the prior term is E KL(N(sqrt(abar_T) x_0, 1-abar_T) || N(0, 1)). In bits: / ln 2.
  """
  T, mu, s = 50, 0.1, 0.3
  betas = schedules.get_beta_schedule("linear", T, beta_start=1e-3, beta_end=0.3)
  sched = diffusion.DiffusionSchedule.from_betas(betas)
  abar = np.cumprod(1 - betas)
  abar_prev = np.concatenate([[1.0], abar[:-1]])

  def eps_fn(x_t, t):
    a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * mu) / (a * s**2 + 1 - a)

  x0 = mu + s * jax.random.normal(jax.random.key(0), (2048, 1, 1, 4))
  out = jax.jit(
    lambda x, k: diffusion.calc_bpd_loop(
      sched, eps_fn, x, k, model_mean_type="eps", model_var_type="fixedsmall", clip_denoised=False
    )
  )(x0, jax.random.key(1))
  post_var = betas * (1 - abar_prev) / (1 - abar)
  coef1 = betas * np.sqrt(abar_prev) / (1 - abar)
  var_x0 = s**2 * (1 - abar) / (abar * s**2 + 1 - abar)
  with np.errstate(divide="ignore", invalid="ignore"):  # t=0 (beta~ = 0) is not compared.
    expected = (coef1**2 * var_x0 / (2 * post_var)) / np.log(2)  # sigma^2 = beta~: no var. KL.
  terms = np.asarray(out["terms_bpd"])
  mean, sem = terms.mean(0), terms.std(0) / np.sqrt(terms.shape[0])
  np.testing.assert_array_less(np.abs(mean[1:] - expected[1:]), 5 * sem[1:] + 1e-6)
  prior = 0.5 * (-np.log(1 - abar[-1]) + (1 - abar[-1]) + abar[-1] * (mu**2 + s**2) - 1)
  # The prior term is ~1.6e-5 bits: float32 cancellation in the KL limits it to ~1e-6.
  assert float(out["prior_bpd"].mean()) == pytest.approx(prior / np.log(2), abs=1e-6)
  # Rate-distortion: rate non-increasing in t, distortion (exact posterior mean) increasing.
  rd = bpd_lib.rate_distortion(np.asarray(out["prior_bpd"]), terms, np.asarray(out["mse"]))
  assert np.all(np.diff(rd["rate"]) <= 1e-7)
  assert np.all(np.diff(rd["distortion"]) > -0.02 * rd["distortion"][1:])
  assert rd["distortion"][-1] == pytest.approx(127.5 * np.sqrt(var_x0[-1]), rel=0.05)
