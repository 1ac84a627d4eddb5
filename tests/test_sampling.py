"""Tests of the samplers (ddpm_jax/sampling.py) with exact model functions in closed form.

For data x_0 ~ N(mu, s^2) per dimension, x_t ~ N(sqrt(abar) mu, abar s^2 + 1 - abar) and the
exact (Bayes-optimal) noise predictor is E[eps | x_t] = sqrt(1-abar) (x_t - sqrt(abar) mu) /
(abar s^2 + 1 - abar); s = 0 is the point mass at mu.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion
from ddpm_jax import sampling
from ddpm_jax import schedules

T = 100
SCHED = diffusion.DiffusionSchedule.from_betas(
    schedules.get_beta_schedule("linear", T, beta_start=1e-3, beta_end=0.2))
SHAPE = (4, 2, 2, 3)


def gaussian_eps_fn(mu: float, s: float):
  def eps_fn(x_t, t):
    abar = SCHED.alphas_cumprod[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
    return jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * mu) / (abar * s**2 + 1 - abar)
  return eps_fn


def exact_output_fn(mu: float, mean_type: str):
  """Exact model output of each mean type for the point mass at mu."""
  eps_fn = gaussian_eps_fn(mu, 0.0)

  def fn(x_t, t):
    eps = eps_fn(x_t, t)
    x0 = jnp.full_like(x_t, mu)
    if mean_type == "eps":
      return eps
    if mean_type == "xstart":
      return x0
    if mean_type == "v":
      return diffusion.v_target(SCHED, x0, t, eps)
    return diffusion.q_posterior_mean_variance(SCHED, x0, x_t, t)[0]  # xprev
  return fn


@pytest.fixture(scope="module")
def ancestral():
  fn = jax.jit(lambda rng: sampling.sample(SCHED, gaussian_eps_fn(0.3, 0.0), rng, SHAPE,
                                           model_mean_type="eps", model_var_type="fixedlarge"))
  return fn


def test_shape_dtype_range_and_determinism(ancestral):
  a = ancestral(jax.random.key(0))
  b = ancestral(jax.random.key(0))
  c = sampling.sample(SCHED, lambda x, t: jax.random.normal(jax.random.key(1), x.shape) * 3,
                      jax.random.key(2), SHAPE, model_mean_type="eps",
                      model_var_type="fixedlarge")
  chex.assert_shape([a, c], SHAPE)
  chex.assert_type([a, c], jnp.float32)
  np.testing.assert_array_equal(a, b)
  # x_0 is the posterior mean at t=0 = the clipped pred_xstart: inside [-1, 1] whatever the model.
  assert float(jnp.abs(c).max()) <= 1.0
  u8 = sampling.to_uint8(jnp.array([-1.0, -0.999, 0.0, 1.0, 1.5]))
  np.testing.assert_array_equal(u8, [0, 0, 128, 255, 255])


@pytest.mark.parametrize("mean_type", diffusion.MEAN_TYPES)
@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_ancestral_point_mass_recovered(mean_type, var_type):
  x0 = sampling.sample(SCHED, exact_output_fn(0.3, mean_type), jax.random.key(3), SHAPE,
                       model_mean_type=mean_type, model_var_type=var_type)
  np.testing.assert_allclose(x0, 0.3, atol=1e-4)


@pytest.mark.parametrize("mean_type", diffusion.MEAN_TYPES)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_point_mass_recovered(mean_type, eta):
  x0 = sampling.ddim_sample(SCHED, exact_output_fn(-0.4, mean_type), jax.random.key(4), SHAPE,
                            num_steps=10, eta=eta, model_mean_type=mean_type)
  np.testing.assert_allclose(x0, -0.4, atol=1e-4)


def test_ddim_eta0_deterministic_given_x_T():
  fn = gaussian_eps_fn(0.2, 0.5)
  x_T = jax.random.normal(jax.random.key(5), SHAPE)
  kw = dict(num_steps=20, model_mean_type="eps", clip_denoised=False, x_init=x_T)
  a = sampling.ddim_sample(SCHED, fn, jax.random.key(6), SHAPE, eta=0.0, **kw)
  b = sampling.ddim_sample(SCHED, fn, jax.random.key(7), SHAPE, eta=0.0, **kw)
  c = sampling.ddim_sample(SCHED, fn, jax.random.key(7), SHAPE, eta=1.0, **kw)
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - c).max()) > 1e-2


def test_ddim_full_eta1_matches_ancestral_fixedsmall_in_distribution():
  """With num_steps=T and eta=1, DDIM's sigma^2 is beta~_t and its mean the posterior mean:
  the ancestral sampler with 'fixedsmall'. Gaussian data N(0.2, 0.5^2), exact eps."""
  mu, s, shape = 0.2, 0.5, (4096, 1, 1, 8)  # 32768 scalar samples per sampler.
  fn = gaussian_eps_fn(mu, s)
  kw = dict(model_mean_type="eps", clip_denoised=False)
  anc = sampling.sample(SCHED, fn, jax.random.key(8), shape, model_var_type="fixedsmall", **kw)
  ddim = sampling.ddim_sample(SCHED, fn, jax.random.key(9), shape, num_steps=T, eta=1.0, **kw)
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
  same = sampling.ddim_sample(SCHED, fn, jax.random.key(8), shape, num_steps=T, eta=1.0, **kw)
  np.testing.assert_allclose(same, anc, atol=1e-4)


def test_ddim_timestep_grids():
  np.testing.assert_array_equal(sampling.ddim_timesteps(1000, 4), [0, 250, 500, 750])
  # Exactly S steps even where T // S does not divide T (range(0, 1000, 333) has 4).
  np.testing.assert_array_equal(sampling.ddim_timesteps(1000, 3), [0, 333, 666])
  quad = sampling.ddim_timesteps(1000, 10, "quad")
  expected = [int(v) for v in np.linspace(0, np.sqrt(800.0), 10) ** 2]  # DDIM's CIFAR grid.
  np.testing.assert_array_equal(quad, expected)
  assert quad[-1] == 800 and np.all(np.diff(quad) > 0)
  dense = sampling.ddim_timesteps(1000, 100, "quad")
  assert len(dense) == 100 and np.all(np.diff(dense) >= 0) and dense[0] == dense[1] == 0


def test_ddim_without_clipping_uses_the_predicted_eps():
  """The reference DDIM step: x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps_theta with
  x0_hat from eps_theta, unclipped; with clipping x0_hat is clipped and eps recomputed."""
  eps_value = 0.9
  fn = lambda x_t, t: jnp.full_like(x_t, eps_value)
  x_T = jnp.full(SHAPE, 3.0)
  kw = dict(num_steps=1, eta=0.0, model_mean_type="eps", x_init=x_T)
  # One step from t=0 to "s=-1" (abar_s = 1): x_0 = x0_hat.
  abar = float(SCHED.alphas_cumprod[0])
  x0_hat = (3.0 - np.sqrt(1 - abar) * eps_value) / np.sqrt(abar)
  got = sampling.ddim_sample(SCHED, fn, jax.random.key(0), SHAPE, clip_denoised=False, **kw)
  np.testing.assert_allclose(got, x0_hat, rtol=1e-5)
  assert x0_hat > 1.0  # Outside the data range: clipping would change it.
  clipped = sampling.ddim_sample(SCHED, fn, jax.random.key(0), SHAPE, clip_denoised=True, **kw)
  np.testing.assert_allclose(clipped, 1.0, rtol=1e-6)
  two = dict(kw, num_steps=2)  # From t=50 to t=0 the predicted eps itself is carried.
  abar_t, abar_s = (float(SCHED.alphas_cumprod[i]) for i in (50, 0))
  x0_t = (3.0 - np.sqrt(1 - abar_t) * eps_value) / np.sqrt(abar_t)
  x_s = np.sqrt(abar_s) * x0_t + np.sqrt(1 - abar_s) * eps_value
  expected = (x_s - np.sqrt(1 - abar_s) * eps_value) / np.sqrt(abar_s)
  got2 = sampling.ddim_sample(SCHED, fn, jax.random.key(0), SHAPE, clip_denoised=False, **two)
  np.testing.assert_allclose(got2, expected, rtol=1e-5)


@pytest.mark.parametrize("method", sampling.SAMPLING_METHODS)
def test_one_scan_not_unrolled(method):
  fn = gaussian_eps_fn(0.0, 1.0)
  jaxpr = jax.make_jaxpr(lambda rng: sampling.generate(
      SCHED, fn, rng, SHAPE, method=method, model_mean_type="eps", model_var_type="fixedlarge",
      num_steps=T, eta=0.0, clip_denoised=True))(jax.random.key(0)).jaxpr
  top = [e.primitive.name for e in jaxpr.eqns]
  assert top.count("scan") == 1
  scan = next(e for e in jaxpr.eqns if e.primitive.name == "scan")
  assert scan.params["length"] == T
  # T unrolled steps would be thousands of equations; annealed Langevin's final denoising
  # step (one network evaluation) sits outside the scan.
  assert len(jaxpr.eqns) < 60


def test_trajectory_records_chosen_timesteps():
  fn = gaussian_eps_fn(0.3, 0.0)
  x0, traj = sampling.sample(SCHED, fn, jax.random.key(10), SHAPE, model_mean_type="eps",
                             model_var_type="fixedlarge", return_trajectory=True,
                             trajectory_timesteps=[0, 50, 99, 10])
  np.testing.assert_array_equal(traj["timesteps"], [99, 50, 10, 0])
  chex.assert_shape([traj["x_t"], traj["pred_xstart"]], (4,) + SHAPE)
  # Exact model: every x_0 estimate is the point itself; x_t at t=0 gives x_0 exactly.
  np.testing.assert_allclose(traj["pred_xstart"], 0.3, atol=1e-4)
  # The same rng without the trajectory gives the same sample.
  same = sampling.sample(SCHED, fn, jax.random.key(10), SHAPE, model_mean_type="eps",
                         model_var_type="fixedlarge")
  np.testing.assert_array_equal(x0, same)
  # x_T is unit Gaussian noise; x_t at t=10 is close to the data already.
  assert 0.7 < float(traj["x_t"][0].std()) < 1.3
  full = sampling.sample(SCHED, fn, jax.random.key(10), SHAPE, model_mean_type="eps",
                         model_var_type="fixedlarge", return_trajectory=True)[1]
  assert full["x_t"].shape[0] == T
  np.testing.assert_array_equal(full["x_t"][T - 1 - 10], traj["x_t"][2])


def test_slerp_and_interpolation():
  z1 = jax.random.normal(jax.random.key(11), (2, 4, 4, 3))
  z2 = jax.random.normal(jax.random.key(12), (2, 4, 4, 3))
  np.testing.assert_allclose(sampling.slerp(z1, z2, jnp.zeros(2)), z1, atol=1e-5)
  np.testing.assert_allclose(sampling.slerp(z1, z2, jnp.ones(2)), z2, atol=1e-5)
  mid = sampling.slerp(z1, z2, jnp.full((2,), 0.5))
  norms = lambda z: jnp.linalg.norm(z.reshape(2, -1), axis=1)
  np.testing.assert_allclose(norms(mid), (norms(z1) + norms(z2)) / 2, rtol=0.1)
  # Decoding with the exact point-mass model returns the point for every lambda.
  x_a, x_b = jnp.full((2, 2, 3), -0.5), jnp.full((2, 2, 3), 0.5)
  out = sampling.interpolate(SCHED, exact_output_fn(0.1, "eps"), jax.random.key(13), x_a, x_b,
                             jnp.linspace(0, 1, 3), t=50, model_mean_type="eps",
                             model_var_type="fixedlarge")
  chex.assert_shape(out, (3, 2, 2, 3))
  np.testing.assert_allclose(out, 0.1, atol=1e-4)


@pytest.mark.parametrize("call,match", [
    (lambda: sampling.ddim_sample(SCHED, None, jax.random.key(0), SHAPE, num_steps=0,
                                  model_mean_type="eps"), r"num_steps=0 must lie in \[1, T=100\]"),
    (lambda: sampling.ddim_sample(SCHED, None, jax.random.key(0), SHAPE, num_steps=101,
                                  model_mean_type="eps"), "num_steps=101"),
    (lambda: sampling.sample(SCHED, None, jax.random.key(0), (0, 2, 2, 3),
                             model_mean_type="eps", model_var_type="fixedlarge"), "positive"),
    (lambda: sampling.sample(SCHED, None, jax.random.key(0), SHAPE, model_mean_type="eps",
                             model_var_type="fixedlarge", return_trajectory=True,
                             trajectory_timesteps=[100]), r"\[0, T=100\)"),
    (lambda: sampling.generate(SCHED, None, jax.random.key(0), SHAPE, method="euler",
                               model_mean_type="eps", model_var_type="fixedlarge", num_steps=1,
                               eta=0.0, clip_denoised=True), "euler"),
])
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()
