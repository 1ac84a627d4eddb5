"""The score-based samplers on exact Gaussian models: the Langevin corrector step's formula
and invariance, predictor-corrector and annealed Langevin sampling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import samplers
from tests.gaussian import (
  ABAR,
  BETAS,
  SCHED,
  SHAPE,
  T,
  assert_moments,
  exact_output_fn,
  q_t_samples,
)

MU, S = 0.2, 0.5
# N = 8192 values: 32 examples of 256 dimensions (the corrector's step uses per-example
# norms, which concentrate only in many dimensions, as for images).
MOMENT_SHAPE = (32, 16, 16, 1)
EPS = samplers.ModelSpec("eps", "fixedlarge")
PC_ANCESTRAL = samplers.PCOptions(
  samplers.AncestralOptions(clip_denoised=False), corrector_steps=1, snr=0.08
)
PC_DDIM = samplers.PCOptions(
  samplers.DDIMOptions(num_steps=T, eta=0.0, clip_denoised=False), corrector_steps=1, snr=0.08
)
ANNEALED = samplers.AnnealedLangevinOptions(num_steps=T, langevin_steps=40, langevin_step_size=2e-3)


@functools.cache
def jitted_sampler(options: samplers.SamplerOptions, spec: samplers.ModelSpec):
  """jit(rng, mu, s) -> samples of MOMENT_SHAPE from the exact model of N(mu, s^2): one
  compile per sampler configuration, shared by the moment and point-mass tests."""

  def run(rng, mu, s):
    fn = exact_output_fn(mu, s, spec.mean_type, spec.var_type in ("learned", "learned_range"))
    return samplers.generate(SCHED, fn, rng, MOMENT_SHAPE, options, spec=spec)

  return jax.jit(run)


def test_corrector_step_formula():
  """step = 2 (1 - beta_t) (r ||z|| / ||s||)^2 per example; x + step s + sqrt(2 step) z."""
  x = jnp.ones((2, 4, 1, 1))
  t = jnp.array([3, 60], jnp.int32)
  noise = (
    jnp.array([1.0, -1.0, 2.0, 0.0])[None, :, None, None]
    * jnp.array([1.0, 0.5])[:, None, None, None]
  )
  eps = jnp.full_like(x, 0.7)  # Score -0.7 / sqrt(1 - abar_t) in every dimension.
  got = samplers.langevin_corrector_step(SCHED, eps, x, t, noise, spec=EPS, snr=0.2)
  for b, t_ in enumerate([3, 60]):
    score = -0.7 / np.sqrt(1 - ABAR[t_]) * np.ones(4)
    z = np.asarray(noise[b]).ravel()
    step = 2 * (1 - BETAS[t_]) * (0.2 * np.linalg.norm(z) / np.linalg.norm(score)) ** 2
    np.testing.assert_allclose(
      np.asarray(got[b]).ravel(), 1.0 + step * score + np.sqrt(2 * step) * z, rtol=1e-5
    )
  # A zero score takes no step.
  zero = samplers.langevin_corrector_step(SCHED, jnp.zeros_like(x), x, t, noise, spec=EPS, snr=0.2)
  np.testing.assert_array_equal(zero, x)


def test_corrector_leaves_q_t_invariant():
  """Three corrector steps (snr 0.16) with the exact score, started from exact draws of
  q(x_t) at t = 5, 50, 95: the moments stay those of q(x_t) (N = 8192 values per t)."""
  ts = np.repeat(np.array([5, 50, 95], np.int32), MOMENT_SHAPE[0])
  shape = (ts.size,) + MOMENT_SHAPE[1:]
  x = q_t_samples(jax.random.key(1), ts, shape, MU, S)
  model = exact_output_fn(MU, S)

  @jax.jit
  def correct(x, rng):
    t = jnp.asarray(ts)
    for j in range(3):  # Unrolled on purpose: three steps, outside any sampler.
      noise = jax.random.normal(jax.random.fold_in(rng, j), shape)
      x = samplers.langevin_corrector_step(SCHED, model(x, t), x, t, noise, spec=EPS, snr=0.16)
    return x

  out = np.asarray(correct(x, jax.random.key(2)))
  assert float(jnp.abs(out - x).mean()) > 1e-2  # The steps moved the samples.
  for i, t_ in enumerate([5, 50, 95]):
    group = out[i * MOMENT_SHAPE[0] : (i + 1) * MOMENT_SHAPE[0]]
    assert_moments(
      group, np.sqrt(ABAR[t_]) * MU, np.sqrt(ABAR[t_] * S**2 + 1 - ABAR[t_]), label=f"t={t_}"
    )


@pytest.mark.parametrize("options", [PC_ANCESTRAL, PC_DDIM], ids=["ancestral", "ddim"])
def test_pc_sampler_matches_gaussian_data(options):
  """1 corrector step (snr 0.08) per level before each ancestral (fixedlarge) or DDIM
  (T levels, eta 0) step: N = 8192 values within 5 SE of N(0.2, 0.5^2). The corrector's
  own stationary excess, (1 - beta) r^2 in variance, is 0.6% at r = 0.08: under 1 SE of
  the std here."""
  assert_moments(jitted_sampler(options, EPS)(jax.random.key(3), MU, S), MU, S)


def test_annealed_langevin_matches_gaussian_data():
  """100 levels x 40 steps, NCSN step size 2e-3 (2x the lowest level's sigma^2 ~ 1e-3).
  The final denoising step returns E[x_0 | x_t] at t = 0, whose std is s^2 / sqrt(s^2 +
  sigma_0^2) (0.2% under s); the float64 recursion of the same linear chain predicts
  +1.1% above that from the finite number of steps (1.4 SE)."""
  x = jitted_sampler(ANNEALED, EPS)(jax.random.key(4), MU, S)
  sigma0_sq = (1 - ABAR[0]) / ABAR[0]
  assert_moments(x, MU, S**2 / np.sqrt(S**2 + sigma0_sq))


@pytest.mark.parametrize(
  "options,spec",
  [
    (PC_ANCESTRAL, EPS),
    (PC_ANCESTRAL, samplers.ModelSpec("xprev", "learned_range")),
    (PC_DDIM, EPS),
    (ANNEALED, EPS),
    (ANNEALED, samplers.ModelSpec("v", "learned")),
  ],
  ids=["pc_ancestral", "pc_ancestral_xprev", "pc_ddim", "annealed", "annealed_v"],
)
def test_point_mass_model_returns_the_point(options, spec):
  """The exact model of the point mass at -0.4: every sampler returns the point (the last
  predictor step or the final denoising step returns the exact x_0 estimate)."""
  x = jitted_sampler(options, spec)(jax.random.key(5), -0.4, 0.0)
  np.testing.assert_allclose(x, -0.4, atol=1e-4)


def test_pc_without_corrector_is_the_predictor_draw_for_draw():
  """Same rng: the same x_T and predictor noise as ancestral_sample / ddim_sample (the
  corrector's noise comes from a stream of its own)."""
  fn = exact_output_fn(MU, S)
  rng = jax.random.key(6)
  kw = dict(model_mean_type="eps", model_var_type="fixedlarge")
  anc = samplers.ancestral_sample(SCHED, fn, rng, SHAPE, **kw)
  np.testing.assert_array_equal(
    samplers.pc_sample(SCHED, fn, rng, SHAPE, corrector_steps=0, **kw), anc
  )
  ddim = samplers.ddim_sample(SCHED, fn, rng, SHAPE, num_steps=20, eta=1.0, **kw)
  np.testing.assert_array_equal(
    samplers.pc_sample(
      SCHED, fn, rng, SHAPE, predictor="ddim", num_steps=20, eta=1.0, corrector_steps=0, **kw
    ),
    ddim,
  )


def test_public_functions_build_the_options():
  """pc_sample / annealed_langevin_sample trace the same program as generate with the
  options object their keywords describe."""
  fn = exact_output_fn(MU, S)
  kw = dict(model_mean_type="eps", model_var_type="fixedlarge")

  def trace(f):
    return str(jax.make_jaxpr(f)(jax.random.key(9)))  # The same program, not run.

  pc = samplers.PCOptions(
    samplers.DDIMOptions(num_steps=5, eta=0.5, skip="quad", clip_denoised=False),
    corrector_steps=2,
    snr=0.1,
  )
  assert trace(lambda rng: samplers.generate(SCHED, fn, rng, SHAPE, pc, spec=EPS)) == trace(
    lambda rng: samplers.pc_sample(
      SCHED,
      fn,
      rng,
      SHAPE,
      predictor="ddim",
      num_steps=5,
      eta=0.5,
      skip="quad",
      corrector_steps=2,
      snr=0.1,
      clip_denoised=False,
      **kw,
    )
  )
  annealed = samplers.AnnealedLangevinOptions(
    num_steps=5, skip="quad", langevin_steps=3, langevin_step_size=1e-3
  )
  assert trace(lambda rng: samplers.generate(SCHED, fn, rng, SHAPE, annealed, spec=EPS)) == trace(
    lambda rng: samplers.annealed_langevin_sample(
      SCHED,
      fn,
      rng,
      SHAPE,
      num_steps=5,
      skip="quad",
      langevin_steps=3,
      langevin_step_size=1e-3,
      **kw,
    )
  )


_PC = {"model_var_type": "fixedlarge"}
_ANNEALED = {"num_steps": 10}


@pytest.mark.parametrize(
  "sample,kwargs,match",
  [
    (
      samplers.pc_sample,
      dict(_PC, predictor="euler"),
      "predictor='euler' is unknown; allowed: ancestral, ddim",
    ),
    (
      samplers.pc_sample,
      dict(_PC, corrector_steps=-1),
      "corrector_steps=-1 must be an integer >= 0",
    ),
    (samplers.pc_sample, dict(_PC, snr=0.0), "snr=0.0 must be > 0"),
    (
      samplers.annealed_langevin_sample,
      dict(_ANNEALED, langevin_steps=0),
      "langevin_steps=0 must be an integer >= 1",
    ),
    (
      samplers.annealed_langevin_sample,
      dict(num_steps=101),
      r"num_steps=101 must be an integer in \[1, 100\]",
    ),
  ],
  ids=["predictor", "corrector_steps", "snr", "langevin_steps", "num_steps"],
)
def test_bad_input(sample, kwargs, match):
  with pytest.raises(ValueError, match=match):
    sample(SCHED, None, jax.random.key(0), SHAPE, model_mean_type="eps", **kwargs)
