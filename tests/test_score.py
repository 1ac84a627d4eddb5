"""Tests of the score view of DDPM: diffusion.score and the samplers of ddpm_jax/langevin.py.

Gaussian data x_0 ~ N(mu, s^2) per dimension has every quantity in closed form:
x_t ~ N(sqrt(abar) mu, v_t) with v_t = abar s^2 + 1 - abar, the score of q(x_t) is
-(x_t - sqrt(abar) mu) / v_t, and the exact model outputs follow from E[x_0 | x_t] =
mu + sqrt(abar) s^2 (x_t - sqrt(abar) mu) / v_t (s = 0: the point mass at mu). Moments are
checked within 5 standard errors: mean +- 5 s / sqrt(N), std +- 5 s / sqrt(2 N) for N values.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion
from ddpm_jax import generation
from ddpm_jax import langevin
from ddpm_jax import sampling
from ddpm_jax import schedules

T = 100
SCHED = diffusion.DiffusionSchedule.from_betas(
    schedules.get_beta_schedule("linear", T, beta_start=1e-3, beta_end=0.2))
ABAR = np.cumprod(1.0 - schedules.get_beta_schedule("linear", T, beta_start=1e-3, beta_end=0.2))
MU, S = 0.2, 0.5
# N = 8192 values: 32 examples of 256 dimensions (the corrector's step uses per-example
# norms, which concentrate only in many dimensions, as for images).
MOMENT_SHAPE = (32, 16, 16, 1)
SHAPE = (4, 2, 2, 3)


def _abar(t, ndim):
  return SCHED.alphas_cumprod[t].reshape((-1,) + (1,) * (ndim - 1))


def exact_output_fn(mu: float, s: float, mean_type: str, var_channels: bool = False):
  """The Bayes-optimal model output of each mean type for x_0 ~ N(mu, s^2); var_channels
  appends C arbitrary variance channels (a learned-variance model's [mean | variance])."""
  def fn(x_t, t):
    abar = _abar(t, x_t.ndim)
    v = abar * s**2 + 1 - abar
    x0 = mu + jnp.sqrt(abar) * s**2 * (x_t - jnp.sqrt(abar) * mu) / v
    eps = jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * mu) / v
    out = {"eps": eps, "xstart": x0, "v": jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * x0,
           "xprev": diffusion.q_posterior_mean_variance(SCHED, x0, x_t, t)[0]}[mean_type]
    return jnp.concatenate([out, jnp.full_like(out, 0.3)], -1) if var_channels else out
  return fn


def closed_form_score(x_t: np.ndarray, t: np.ndarray, mu: float, s: float) -> np.ndarray:
  abar = ABAR[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
  return -(x_t - np.sqrt(abar) * mu) / (abar * s**2 + 1 - abar)


def q_t_samples(rng, t: np.ndarray, shape) -> jnp.ndarray:
  """Exact draws of q(x_t) for Gaussian data, float64 moments."""
  abar = ABAR[t].reshape((-1,) + (1,) * (len(shape) - 1))
  z = np.asarray(jax.random.normal(rng, shape), np.float64)
  return jnp.asarray(np.sqrt(abar) * MU + np.sqrt(abar * S**2 + 1 - abar) * z, jnp.float32)


@functools.lru_cache(maxsize=None)
def jitted_sampler(method: str, mean_type: str, var_type: str, options: tuple):
  """jit(rng, mu, s) -> samples of MOMENT_SHAPE from the exact model of N(mu, s^2): one
  compile per sampler configuration, shared by the moment and point-mass tests."""
  def run(rng, mu, s):
    fn = exact_output_fn(mu, s, mean_type, var_type in diffusion.LEARNED_VAR_TYPES)
    sampler = sampling.pc_sample if method == "pc" else sampling.annealed_langevin_sample
    return sampler(SCHED, fn, rng, MOMENT_SHAPE, model_mean_type=mean_type,
                   model_var_type=var_type, **dict(options))
  return jax.jit(run)


PC_ANCESTRAL = ("pc", (("predictor", "ancestral"), ("corrector_steps", 1), ("snr", 0.08),
                       ("clip_denoised", False)))
PC_DDIM = ("pc", (("predictor", "ddim"), ("num_steps", T), ("eta", 0.0),
                  ("corrector_steps", 1), ("snr", 0.08), ("clip_denoised", False)))
ANNEALED = ("annealed", (("num_steps", T), ("langevin_steps", 40),
                         ("langevin_step_size", 2e-3)))


def assert_moments(x, mu: float, s: float, *, label: str = "") -> None:
  x = np.asarray(x, np.float64)
  n = x.size
  assert abs(x.mean() - mu) < 5 * s / np.sqrt(n), f"{label} mean {x.mean():.4f} vs {mu}"
  assert abs(x.std() - s) < 5 * s / np.sqrt(2 * n), f"{label} std {x.std():.4f} vs {s}"


@pytest.mark.parametrize("mean_type", diffusion.MEAN_TYPES)
@pytest.mark.parametrize("var_type", ["fixedlarge", "learned_range"])
def test_score_matches_closed_form(mean_type, var_type):
  """grad log q(x_t) from each parameterisation's exact output, at every t; a learned
  variance's extra channels are ignored. Non-eps types equal -eps_hat / sqrt(1 - abar)."""
  t = np.arange(T, dtype=np.int32)
  x_t = q_t_samples(jax.random.key(0), t, (T, 2, 2, 3))
  learned = var_type == "learned_range"
  output = exact_output_fn(MU, S, mean_type, learned)(x_t, jnp.asarray(t))
  got = jax.jit(lambda o, x: diffusion.score(SCHED, o, x, jnp.asarray(t),
                                             model_mean_type=mean_type,
                                             model_var_type=var_type))(output, x_t)
  expected = closed_form_score(np.asarray(x_t, np.float64), t, MU, S)
  np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
  if mean_type != "eps":
    tt = jnp.asarray(t)
    mean_out = output[..., :3] if learned else output
    pred_xstart = diffusion.predict_xstart(SCHED, mean_out, x_t, tt, model_mean_type=mean_type)
    eps_hat = diffusion.predict_eps_from_xstart(SCHED, x_t, tt, pred_xstart)
    np.testing.assert_allclose(got, -eps_hat / jnp.sqrt(1 - _abar(tt, 4)), rtol=1e-3, atol=1e-3)


def test_corrector_step_formula():
  """step = 2 (1 - beta_t) (r ||z|| / ||s||)^2 per example; x + step s + sqrt(2 step) z."""
  x = jnp.ones((2, 4, 1, 1))
  t = jnp.array([3, 60], jnp.int32)
  noise = jnp.array([1.0, -1.0, 2.0, 0.0])[None, :, None, None] * jnp.array([1.0, 0.5])[:, None, None, None]
  eps = jnp.full_like(x, 0.7)  # Score -0.7 / sqrt(1 - abar_t) in every dimension.
  got = langevin.langevin_corrector_step(SCHED, eps, x, t, noise, snr=0.2,
                                         model_mean_type="eps")
  for b, t_ in enumerate([3, 60]):
    beta = float(schedules.get_beta_schedule("linear", T, beta_start=1e-3, beta_end=0.2)[t_])
    score = -0.7 / np.sqrt(1 - ABAR[t_]) * np.ones(4)
    z = np.asarray(noise[b]).ravel()
    step = 2 * (1 - beta) * (0.2 * np.linalg.norm(z) / np.linalg.norm(score)) ** 2
    np.testing.assert_allclose(np.asarray(got[b]).ravel(),
                               1.0 + step * score + np.sqrt(2 * step) * z, rtol=1e-5)
  # A zero score takes no step.
  zero = langevin.langevin_corrector_step(SCHED, jnp.zeros_like(x), x, t, noise, snr=0.2,
                                          model_mean_type="eps")
  np.testing.assert_array_equal(zero, x)


def test_corrector_leaves_q_t_invariant():
  """Three corrector steps (snr 0.16) with the exact score, started from exact draws of
  q(x_t) at t = 5, 50, 95: the moments stay those of q(x_t) (N = 8192 values per t)."""
  ts = np.repeat(np.array([5, 50, 95], np.int32), MOMENT_SHAPE[0])
  shape = (ts.size,) + MOMENT_SHAPE[1:]
  x = q_t_samples(jax.random.key(1), ts, shape)
  model = exact_output_fn(MU, S, "eps")

  @jax.jit
  def correct(x, rng):
    t = jnp.asarray(ts)
    for j in range(3):  # Unrolled on purpose: three steps, outside any sampler.
      noise = jax.random.normal(jax.random.fold_in(rng, j), shape)
      x = langevin.langevin_corrector_step(SCHED, model(x, t), x, t, noise, snr=0.16,
                                           model_mean_type="eps")
    return x

  out = np.asarray(correct(x, jax.random.key(2)))
  assert float(jnp.abs(out - x).mean()) > 1e-2  # The steps moved the samples.
  for i, t_ in enumerate([5, 50, 95]):
    group = out[i * MOMENT_SHAPE[0]:(i + 1) * MOMENT_SHAPE[0]]
    assert_moments(group, np.sqrt(ABAR[t_]) * MU, np.sqrt(ABAR[t_] * S**2 + 1 - ABAR[t_]),
                   label=f"t={t_}")


@pytest.mark.parametrize("sampler", [PC_ANCESTRAL, PC_DDIM], ids=["ancestral", "ddim"])
def test_pc_sampler_matches_gaussian_data(sampler):
  """1 corrector step (snr 0.08) per level before each ancestral (fixedlarge) or DDIM
  (T levels, eta 0) step: N = 8192 values within 5 SE of N(0.2, 0.5^2). The corrector's
  own stationary excess, (1 - beta) r^2 in variance, is 0.6% at r = 0.08: under 1 SE of
  the std here."""
  method, options = sampler
  x = jitted_sampler(method, "eps", "fixedlarge", options)(jax.random.key(3), MU, S)
  assert_moments(x, MU, S)


def test_annealed_langevin_matches_gaussian_data():
  """100 levels x 40 steps, NCSN step size 2e-3 (2x the lowest level's sigma^2 ~ 1e-3).
  The final denoising step returns E[x_0 | x_t] at t = 0, whose std is s^2 / sqrt(s^2 +
  sigma_0^2) (0.2% under s); the float64 recursion of the same linear chain predicts
  +1.1% above that from the finite number of steps (1.4 SE)."""
  x = jitted_sampler(ANNEALED[0], "eps", "fixedlarge", ANNEALED[1])(jax.random.key(4), MU, S)
  sigma0_sq = (1 - ABAR[0]) / ABAR[0]
  assert_moments(x, MU, S**2 / np.sqrt(S**2 + sigma0_sq))


@pytest.mark.parametrize("sampler,mean_type,var_type", [
    (PC_ANCESTRAL, "eps", "fixedlarge"), (PC_ANCESTRAL, "xprev", "learned_range"),
    (PC_DDIM, "eps", "fixedlarge"), (ANNEALED, "eps", "fixedlarge"),
    (ANNEALED, "v", "learned"),
], ids=["pc_ancestral", "pc_ancestral_xprev", "pc_ddim", "annealed", "annealed_v"])
def test_point_mass_model_returns_the_point(sampler, mean_type, var_type):
  """The exact model of the point mass at -0.4: every sampler returns the point (the last
  predictor step or the final denoising step returns the exact x_0 estimate)."""
  method, options = sampler
  x = jitted_sampler(method, mean_type, var_type, options)(jax.random.key(5), -0.4, 0.0)
  np.testing.assert_allclose(x, -0.4, atol=1e-4)


def test_pc_without_corrector_is_the_predictor_draw_for_draw():
  """Same rng: the same x_T and predictor noise as sampling.sample / ddim_sample (the
  corrector's noise comes from a stream of its own)."""
  fn = exact_output_fn(MU, S, "eps")
  rng = jax.random.key(6)
  kw = dict(model_mean_type="eps", model_var_type="fixedlarge")
  anc = sampling.sample(SCHED, fn, rng, SHAPE, **kw)
  np.testing.assert_array_equal(
      sampling.pc_sample(SCHED, fn, rng, SHAPE, corrector_steps=0, **kw), anc)
  ddim = sampling.ddim_sample(SCHED, fn, rng, SHAPE, num_steps=20, eta=1.0, **kw)
  np.testing.assert_array_equal(
      sampling.pc_sample(SCHED, fn, rng, SHAPE, predictor="ddim", num_steps=20, eta=1.0,
                         corrector_steps=0, **kw), ddim)


@pytest.mark.parametrize("kwargs,levels", [
    (dict(method="pc", predictor="ancestral", corrector_steps=2), T),
    (dict(method="pc", predictor="ddim", num_steps=25, corrector_steps=1), 25),
    (dict(method="annealed_langevin", num_steps=10, langevin_steps=3), 10),
], ids=["pc_ancestral", "pc_ddim", "annealed"])
def test_one_scan_over_the_levels(kwargs, levels):
  fn = lambda x, t: 0.5 * x
  jaxpr = jax.make_jaxpr(lambda rng: sampling.generate(
      SCHED, fn, rng, SHAPE, model_mean_type="eps", model_var_type="fixedlarge",
      **kwargs))(jax.random.key(0)).jaxpr
  scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
  assert len(scans) == 1 and scans[0].params["length"] == levels
  assert len(jaxpr.eqns) < 60  # Unrolled levels would be thousands of equations.


@pytest.mark.parametrize("mean_type", diffusion.MEAN_TYPES)
def test_l_simple_is_weighted_denoising_score_matching(mean_type):
  """Per example, L_simple = w_t mean ||s_theta(x_t) + z / sigma_t||^2 (Vincent 2011) with
  sigma_t^2 = 1 - abar_t the VP marginal variance and w_t = sigma_t^2 for eps (Ho et al.
  §3.2), sigma_t^4 / abar_t for xstart, sigma_t^2 / abar_t for v and coef1_t^2 sigma_t^4 /
  abar_t for xprev. Any model works: the identity holds output by output."""
  shape = (16, 2, 2, 3)
  x0 = jax.random.uniform(jax.random.key(7), shape, minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.key(8), shape)
  t = jnp.linspace(0, T - 1, 16).astype(jnp.int32)
  model_fn = lambda x, t: 0.3 * x + jnp.sin(3 * x) + 0.01 * t.reshape(-1, 1, 1, 1)
  loss = diffusion.training_losses(SCHED, model_fn, x0, t, noise, model_mean_type=mean_type,
                                   model_var_type="fixedlarge", loss_type="mse")
  x_t = diffusion.q_sample(SCHED, x0, t, noise)
  score = diffusion.score(SCHED, model_fn(x_t, t), x_t, t, model_mean_type=mean_type)
  sigma_sq = 1 - ABAR[np.asarray(t)]
  dsm = np.mean(np.square(np.asarray(score + noise / jnp.sqrt(sigma_sq).reshape(-1, 1, 1, 1),
                                     np.float64)), axis=(1, 2, 3))
  abar = ABAR[np.asarray(t)]
  coef1 = np.asarray(SCHED.posterior_mean_coef1, np.float64)[np.asarray(t)]
  weight = {"eps": sigma_sq, "xstart": sigma_sq**2 / abar, "v": sigma_sq / abar,
            "xprev": coef1**2 * sigma_sq**2 / abar}[mean_type]
  np.testing.assert_allclose(loss, weight * dsm, rtol=2e-3)


def test_generate_dispatch_and_config_options(make_config):
  """generate runs the score-based samplers with its keywords; sampler_options maps each
  config method onto keywords generate takes (and what samples.npz records)."""
  fn = exact_output_fn(MU, S, "eps")
  kw = dict(model_mean_type="eps", model_var_type="fixedlarge")
  trace = lambda f: str(jax.make_jaxpr(f)(jax.random.key(9)))  # The same program, not run.
  assert trace(lambda rng: sampling.generate(
      SCHED, fn, rng, SHAPE, method="pc", predictor="ddim", num_steps=5, eta=0.5,
      ddim_skip="quad", corrector_steps=2, snr=0.1, clip_denoised=False, **kw)) == trace(
          lambda rng: sampling.pc_sample(SCHED, fn, rng, SHAPE, predictor="ddim", num_steps=5,
                                         eta=0.5, skip="quad", corrector_steps=2, snr=0.1,
                                         clip_denoised=False, **kw))
  assert trace(lambda rng: sampling.generate(
      SCHED, fn, rng, SHAPE, method="annealed_langevin", num_steps=5, ddim_skip="quad",
      langevin_steps=3, langevin_step_size=1e-3, **kw)) == trace(
          lambda rng: sampling.annealed_langevin_sample(
              SCHED, fn, rng, SHAPE, num_steps=5, skip="quad", langevin_steps=3,
              langevin_step_size=1e-3, **kw))
  accepted = set(inspect.signature(sampling.generate).parameters)
  for method, extra in [("pc", {}), ("pc", {"sampling.predictor": "ddim"}),
                        ("annealed_langevin", {})]:
    config = make_config(**{"sampling.method": method, "sampling.num_steps": 10, **extra})
    options = generation.sampler_options(config)
    assert options["method"] == method and set(options) <= accepted
  assert generation.sampler_options(make_config(**{"sampling.method": "pc"}))["corrector_steps"] == 1


@pytest.mark.parametrize("call,match", [
    (lambda: sampling.pc_sample(SCHED, None, jax.random.key(0), SHAPE, model_mean_type="eps",
                                model_var_type="fixedlarge", predictor="euler"), "euler"),
    (lambda: sampling.pc_sample(SCHED, None, jax.random.key(0), SHAPE, model_mean_type="eps",
                                model_var_type="fixedlarge", corrector_steps=-1), "corrector"),
    (lambda: sampling.pc_sample(SCHED, None, jax.random.key(0), SHAPE, model_mean_type="eps",
                                model_var_type="fixedlarge", snr=0.0), "snr=0.0"),
    (lambda: sampling.annealed_langevin_sample(SCHED, None, jax.random.key(0), SHAPE,
                                               num_steps=10, langevin_steps=0,
                                               model_mean_type="eps"), "langevin_steps=0"),
    (lambda: sampling.annealed_langevin_sample(SCHED, None, jax.random.key(0), SHAPE,
                                               num_steps=101, model_mean_type="eps"),
     r"num_steps=101 must lie in \[1, T=100\]"),
    (lambda: diffusion.score(SCHED, jnp.zeros((4, 2, 2, 6)), jnp.zeros(SHAPE),
                             jnp.zeros((4,), jnp.int32), model_mean_type="eps"),
     "needs a model output of the image's shape"),
])
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()
