"""DDIM (Song et al. 2021) on exact Gaussian models: the point mass, determinism given x_T,
the eta = 1 limit, the timestep grids and the reference code's unclipped update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, samplers
from tests.gaussian import SCHED, SHAPE, T, exact_output_fn


@pytest.mark.parametrize("mean_type", diffusion.MEAN_TYPES)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_point_mass_recovered(mean_type, eta):
  x0 = samplers.ddim_sample(
    SCHED,
    exact_output_fn(-0.4, 0.0, mean_type),
    jax.random.key(4),
    SHAPE,
    num_steps=10,
    eta=eta,
    model_mean_type=mean_type,
  )
  np.testing.assert_allclose(x0, -0.4, atol=1e-4)


def test_eta0_deterministic_given_x_T():
  fn = exact_output_fn(0.2, 0.5)
  x_T = jax.random.normal(jax.random.key(5), SHAPE)
  kw = dict(num_steps=20, model_mean_type="eps", clip_denoised=False, x_init=x_T)
  a = samplers.ddim_sample(SCHED, fn, jax.random.key(6), SHAPE, eta=0.0, **kw)
  b = samplers.ddim_sample(SCHED, fn, jax.random.key(7), SHAPE, eta=0.0, **kw)
  c = samplers.ddim_sample(SCHED, fn, jax.random.key(7), SHAPE, eta=1.0, **kw)
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - c).max()) > 1e-2


def test_full_eta1_is_ancestral_fixedsmall():
  """With num_steps=T and eta=1, DDIM's sigma^2 is beta~_t and its mean the posterior mean:
  the ancestral sampler with 'fixedsmall'. Gaussian data N(0.2, 0.5^2), exact eps."""
  mu, s, shape = 0.2, 0.5, (4096, 1, 1, 8)  # 32768 scalar samples per sampler.
  fn = exact_output_fn(mu, s)
  kw = dict(model_mean_type="eps", clip_denoised=False)
  anc = samplers.ancestral_sample(
    SCHED, fn, jax.random.key(8), shape, model_var_type="fixedsmall", **kw
  )
  ddim = samplers.ddim_sample(SCHED, fn, jax.random.key(9), shape, num_steps=T, eta=1.0, **kw)
  n = anc.size
  # Moments agree within 5 standard errors of their difference (different noise).
  assert abs(float(anc.mean() - ddim.mean())) < 5 * s * np.sqrt(2 / n)
  assert abs(float(anc.std() - ddim.std())) < 5 * s / np.sqrt(n)
  # Both near the data: 'fixedsmall' is exact for a point mass and too narrow for wider data
  # (it drops the Var(x_0 | x_t) part of the true reverse variance), by ~7% here with T=100.
  for x in (anc, ddim):
    assert abs(float(x.mean()) - mu) < 0.01
    assert 0.85 * s < float(x.std()) < s
  # Same rng: the same noise at every step, hence the same samples up to float rounding.
  same = samplers.ddim_sample(SCHED, fn, jax.random.key(8), shape, num_steps=T, eta=1.0, **kw)
  np.testing.assert_allclose(same, anc, atol=1e-4)


def test_timestep_grids():
  np.testing.assert_array_equal(samplers.ddim_timesteps(1000, 4), [0, 250, 500, 750])
  # Exactly S steps even where T // S does not divide T (range(0, 1000, 333) has 4).
  np.testing.assert_array_equal(samplers.ddim_timesteps(1000, 3), [0, 333, 666])
  quad = samplers.ddim_timesteps(1000, 10, "quad")
  expected = [int(v) for v in np.linspace(0, np.sqrt(800.0), 10) ** 2]  # DDIM's CIFAR grid.
  np.testing.assert_array_equal(quad, expected)
  assert quad[-1] == 800 and np.all(np.diff(quad) > 0)
  dense = samplers.ddim_timesteps(1000, 100, "quad")
  assert len(dense) == 100 and np.all(np.diff(dense) >= 0) and dense[0] == dense[1] == 0


def test_without_clipping_uses_the_predicted_eps():
  """The reference DDIM step: x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps_theta with
  x0_hat from eps_theta, unclipped; with clipping x0_hat is clipped and eps recomputed."""
  eps_value = 0.9

  def fn(x_t, t):
    return jnp.full_like(x_t, eps_value)

  x_T = jnp.full(SHAPE, 3.0)
  kw = dict(num_steps=1, eta=0.0, model_mean_type="eps", x_init=x_T)
  # One step from t=0 to "s=-1" (abar_s = 1): x_0 = x0_hat.
  abar = float(SCHED.alphas_cumprod[0])
  x0_hat = (3.0 - np.sqrt(1 - abar) * eps_value) / np.sqrt(abar)
  got = samplers.ddim_sample(SCHED, fn, jax.random.key(0), SHAPE, clip_denoised=False, **kw)
  np.testing.assert_allclose(got, x0_hat, rtol=1e-5)
  assert x0_hat > 1.0  # Outside the data range: clipping would change it.
  clipped = samplers.ddim_sample(SCHED, fn, jax.random.key(0), SHAPE, clip_denoised=True, **kw)
  np.testing.assert_allclose(clipped, 1.0, rtol=1e-6)
  two = dict(kw, num_steps=2)  # From t=50 to t=0 the predicted eps itself is carried.
  abar_t, abar_s = (float(SCHED.alphas_cumprod[i]) for i in (50, 0))
  x0_t = (3.0 - np.sqrt(1 - abar_t) * eps_value) / np.sqrt(abar_t)
  x_s = np.sqrt(abar_s) * x0_t + np.sqrt(1 - abar_s) * eps_value
  expected = (x_s - np.sqrt(1 - abar_s) * eps_value) / np.sqrt(abar_s)
  got2 = samplers.ddim_sample(SCHED, fn, jax.random.key(0), SHAPE, clip_denoised=False, **two)
  np.testing.assert_allclose(got2, expected, rtol=1e-5)


def test_options_defaults_are_the_public_defaults():
  """ddim_sample's keywords default to DDIMOptions' fields (written once, there)."""
  fn = exact_output_fn(0.2, 0.5)
  kw = dict(model_mean_type="eps")
  default = samplers.ddim_sample(SCHED, fn, jax.random.key(1), SHAPE, **kw)
  options = samplers.DDIMOptions()
  explicit = samplers.ddim_sample(
    SCHED,
    fn,
    jax.random.key(1),
    SHAPE,
    num_steps=options.num_steps,
    eta=options.eta,
    skip=options.skip,
    clip_denoised=options.clip_denoised,
    **kw,
  )
  np.testing.assert_array_equal(default, explicit)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(num_steps=0), r"num_steps=0 must be an integer in \[1, 100\]"),
    (dict(num_steps=101), r"num_steps=101 must be an integer in \[1, 100\]"),
    (dict(num_steps=10, skip="cubic"), "skip='cubic' is unknown; allowed: uniform, quad"),
    (dict(num_steps=10, eta=-0.5), r"eta=-0.5 must be >= 0"),
    (dict(steps=10), "steps"),
  ],
)
def test_bad_input(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    samplers.ddim_sample(SCHED, None, jax.random.key(0), SHAPE, model_mean_type="eps", **kwargs)
