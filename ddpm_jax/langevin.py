"""The score view of DDPM: Langevin dynamics driven by the score a trained DDPM implies.

`diffusion.score` turns any model output into grad_x log q(x_t); for the paper's eps model it
is -eps_theta(x_t, t) / sqrt(1 - abar_t). On top of it, as pure functions of
(schedule, model_fn, rng, shape) with one lax.scan over the noise levels:

- `langevin_corrector_step`: one step of the Langevin corrector of Song et al. (2021, App.
  G, Algorithm 5), its step size set by a target signal-to-noise ratio.
- `pc_sample`: predictor-corrector sampling of the discrete VP chain: at each level the
  corrector's Langevin steps, then one ancestral (Algorithm 2) or DDIM step.
- `annealed_langevin_sample`: the annealed Langevin dynamics of NCSN (Song & Ermon 2019,
  Algorithm 1) over a ladder of DDPM noise levels, then one denoising step.

Random streams: x_T and the predictor's noise are those of `sampling.sample` and
`sampling.ddim_sample` (from ``split(rng)``), so the same rng gives the same draws; the
Langevin noise of the i-th level visited (i = 0 at the top) and its j-th step is
``normal(fold_in(fold_in(fold_in(rng, LANGEVIN_STREAM), i), j))``. Keying by the level's
position, not its timestep, keeps a repeated level of the "quad" grid on fresh noise.
`sampling` re-exports the public names and dispatches to them; both build on the single
steps and conventions of reverse_steps.py, so the samplers cannot drift apart.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax import reverse_steps

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
PREDICTORS = ("ancestral", "ddim")
# fold_in(rng, LANGEVIN_STREAM): the Langevin noise, apart from split(rng)'s x_T and
# predictor streams. Part of the reproducibility contract: changing it changes the samples.
LANGEVIN_STREAM = 0x5C0E


def _per_example_norm(a: jnp.ndarray) -> jnp.ndarray:
  """||a_b||_2 of each example, shaped [B, 1, ..., 1] to broadcast against a."""
  norm = jnp.sqrt(jnp.sum(jnp.square(a.reshape(a.shape[0], -1)), axis=1))
  return norm.reshape((-1,) + (1,) * (a.ndim - 1))


def _langevin_update(x: jnp.ndarray, score: jnp.ndarray, step_size: jnp.ndarray,
                     noise: jnp.ndarray) -> jnp.ndarray:
  """x + step * score + sqrt(2 step) z: Langevin dynamics with step 2 * step_size in the
  x <- x + (eps/2) grad log p(x) + sqrt(eps) z form (Song & Ermon 2019, Eq. 4)."""
  return x + step_size * score + jnp.sqrt(2.0 * step_size) * noise


def langevin_corrector_step(schedule: diffusion.DiffusionSchedule, model_output: jnp.ndarray,
                            x_t: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray, *,
                            snr: float | jnp.ndarray, model_mean_type: str,
                            model_var_type: str = "fixedlarge") -> jnp.ndarray:
  """One Langevin corrector step at noise level t (Song et al. 2021, Algorithm 5, VP).

  With s = diffusion.score(model_output) and z = ``noise`` ~ N(0, I), per example
  step = 2 alpha_t (snr ||z|| / ||s||)^2 with alpha_t = 1 - beta_t, and
  x <- x + step * s + sqrt(2 step) z. In norm the drift step * s is then sqrt(alpha_t) r
  times the noise sqrt(2 step) z: r = ``snr`` is the target signal-to-noise ratio. A zero
  score (||s|| = 0) takes no step. With the exact score it leaves q(x_t) invariant up to the
  Langevin discretisation error, relative O(r^2).
  """
  s = diffusion.score(schedule, model_output, x_t, t, model_mean_type=model_mean_type,
                      model_var_type=model_var_type)
  alpha = (1.0 - schedule.betas[t]).reshape((-1,) + (1,) * (x_t.ndim - 1))
  score_norm = _per_example_norm(s)
  ratio = snr * _per_example_norm(noise) / jnp.where(score_norm > 0, score_norm, 1.0)
  step_size = jnp.where(score_norm > 0, 2.0 * alpha * jnp.square(ratio), 0.0)
  return _langevin_update(x_t, s, step_size, noise)


def _langevin_steps(x: jnp.ndarray, key: jax.Array, num: int,
                    update: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]) -> jnp.ndarray:
  """``num`` Langevin steps x <- update(x, z_j), z_j ~ N(0, I) from fold_in(key, j), as a
  loop nested in the caller's scan (one network evaluation per step)."""
  if num == 0:
    return x

  def body(j: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    return update(x, jax.random.normal(jax.random.fold_in(key, j), x.shape, jnp.float32))

  return jax.lax.fori_loop(0, num, body, x)


def pc_sample(schedule: diffusion.DiffusionSchedule, model_fn: ModelFn, rng: jax.Array,
              shape: tuple[int, ...], *, model_mean_type: str, model_var_type: str,
              predictor: str = "ancestral", corrector_steps: int = 1, snr: float = 0.16,
              num_steps: int = 0, eta: float = 0.0, skip: str = "uniform",
              clip_denoised: bool = True) -> jnp.ndarray:
  """Predictor-corrector sampling of the discrete VP chain (Song et al. 2021, Algorithm 5).

  From x_T ~ N(0, I), at each noise level t (high to low): ``corrector_steps`` Langevin
  corrector steps at t (`langevin_corrector_step`, target ``snr``), then the predictor:
  ``"ancestral"``, one step of Algorithm 2 (`reverse_steps.p_sample`) over all T levels, or
  ``"ddim"``, one DDIM step (`reverse_steps.ddim_step`, ``eta``) over the ``num_steps`` levels of
  ``ddim_timesteps(T, num_steps, skip)``. ``clip_denoised`` is the predictor's. The
  correction comes before the prediction at each level (score_sde's loop order; the paper's
  Algorithm 5 corrects after each prediction): the x_0 the last predictor returns has no
  noise level left to correct at. Network evaluations per sample: levels x
  (1 + corrector_steps). With corrector_steps=0 it is `sampling.sample` (or
  `sampling.ddim_sample`) draw for draw.
  """
  shape = reverse_steps.check_shape(shape)
  if predictor not in PREDICTORS:
    raise ValueError(f"unknown predictor {predictor!r}; allowed: {', '.join(PREDICTORS)}")
  corrector_steps = int(corrector_steps)
  if corrector_steps < 0:
    raise ValueError(f"corrector_steps={corrector_steps} must be >= 0.")
  if corrector_steps and not float(snr) > 0:
    raise ValueError(f"snr={snr} must be > 0.")
  num_timesteps = schedule.num_timesteps
  if predictor == "ancestral":
    levels = jnp.arange(num_timesteps - 1, -1, -1, dtype=jnp.int32)
    targets = levels - 1
  else:
    if not 0.0 <= float(eta):
      raise ValueError(f"DDIM eta={eta} must be >= 0.")
    levels, targets = reverse_steps.ddim_pairs(
        num_timesteps, int(num_steps), skip)
  init_key, step_key = reverse_steps.noise_keys(rng)
  langevin_key = jax.random.fold_in(rng, LANGEVIN_STREAM)
  x_init = jax.random.normal(init_key, shape, jnp.float32)

  def level(x: jnp.ndarray, inputs: tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]):
    i, t_, s_ = inputs
    t = jnp.full((shape[0],), t_, jnp.int32)
    x = _langevin_steps(
        x, jax.random.fold_in(langevin_key, i), corrector_steps,
        lambda x, z: langevin_corrector_step(schedule, model_fn(x, t), x, t, z, snr=snr,
                                             model_mean_type=model_mean_type,
                                             model_var_type=model_var_type))
    noise = jax.random.normal(jax.random.fold_in(step_key, t_), shape, jnp.float32)
    if predictor == "ancestral":
      x, _ = reverse_steps.p_sample(schedule, model_fn(x, t), x, t, noise,
                               model_mean_type=model_mean_type, model_var_type=model_var_type,
                               clip_denoised=clip_denoised)
    else:
      s = jnp.full((shape[0],), s_, jnp.int32)
      x, _ = reverse_steps.ddim_step(schedule, model_fn(x, t), x, t, s, noise, eta=eta,
                                model_mean_type=model_mean_type,
                                model_var_type=model_var_type, clip_denoised=clip_denoised)
    return x, None

  index = jnp.arange(levels.shape[0], dtype=jnp.int32)
  x_0, _ = jax.lax.scan(level, x_init, (index, levels, targets))
  return x_0


def annealed_langevin_sample(schedule: diffusion.DiffusionSchedule, model_fn: ModelFn,
                             rng: jax.Array, shape: tuple[int, ...], *, num_steps: int,
                             langevin_steps: int = 2, langevin_step_size: float = 2e-5,
                             model_mean_type: str, model_var_type: str = "fixedlarge",
                             skip: str = "uniform") -> jnp.ndarray:
  """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) on the DDPM noise levels.

  The ladder is the ``num_steps`` levels of ``reverse_steps.ddim_timesteps(T, num_steps, skip)``,
  visited from the top, ``langevin_steps`` steps each, starting from x ~ N(0, I).

  NCSN in the VP parameterisation: x_t = sqrt(abar_t) (x_0 + sigma_t z) with
  sigma_t^2 = (1 - abar_t) / abar_t, so y = x_t / sqrt(abar_t) is NCSN's perturbed x + sigma
  z and grad_y log p = sqrt(abar_t) grad_x log q(x_t). NCSN's step y <- y + (a_i/2) grad_y
  log p + sqrt(a_i) z with a_i = eps sigma_i^2 / sigma_L^2 is, multiplied by sqrt(abar_t),
  x <- x + (d_t/2) s + sqrt(d_t) z with d_t = abar_t a_i = eps (1 - abar_t) / sigma_L^2,
  sigma_L that of the ladder's lowest level: the step is a fixed fraction eps / sigma_L^2 of
  the level's VP noise variance 1 - abar_t. NCSN carries y from one level to the next, so
  x is rescaled by sqrt(abar_t / abar_u) on entering level t from level u. ``langevin_step_size``
  is NCSN's eps (2e-5 with sigma_L = 0.01 in Song & Ermon; the linear T=1000 schedule's
  sigma at t=1 is 0.01 too).

  After the last level, one denoising step returns Tweedie's x_0 estimate
  (x_t + (1 - abar_t) s) / sqrt(abar_t), i.e. `diffusion.predict_xstart`, unclipped: the
  standard final step of NCSNv2 (Song & Ermon 2020) and score_sde (``denoise=True``).
  Network evaluations per sample: num_steps x langevin_steps + 1. Every level needs
  abar_t > 0.
  """
  shape = reverse_steps.check_shape(shape)
  langevin_steps = int(langevin_steps)
  if langevin_steps < 1:
    raise ValueError(f"langevin_steps={langevin_steps} must be >= 1.")
  if not float(langevin_step_size) > 0:
    raise ValueError(f"langevin_step_size={langevin_step_size} must be > 0.")
  ladder = reverse_steps.ddim_timesteps(schedule.num_timesteps, int(num_steps), skip)[::-1]
  entered_from = np.concatenate([ladder[:1], ladder[:-1]])  # The top level: itself.
  init_key, _ = reverse_steps.noise_keys(rng)
  langevin_key = jax.random.fold_in(rng, LANGEVIN_STREAM)
  abar = schedule.alphas_cumprod
  one_minus_abar = jnp.square(schedule.sqrt_one_minus_alphas_cumprod)
  lowest = int(ladder[-1])
  sigma_lowest_sq = one_minus_abar[lowest] / abar[lowest]

  def level(x: jnp.ndarray, inputs: tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]):
    i, t_, u_ = inputs
    t = jnp.full((shape[0],), t_, jnp.int32)
    x = x * jnp.where(t_ == u_, 1.0, jnp.sqrt(abar[t_] / abar[u_]))
    half_step = 0.5 * langevin_step_size * one_minus_abar[t_] / sigma_lowest_sq
    x = _langevin_steps(
        x, jax.random.fold_in(langevin_key, i), langevin_steps,
        lambda x, z: _langevin_update(
            x, diffusion.score(schedule, model_fn(x, t), x, t, model_mean_type=model_mean_type,
                               model_var_type=model_var_type), half_step, z))
    return x, None

  x_init = jax.random.normal(init_key, shape, jnp.float32)
  index = jnp.arange(ladder.shape[0], dtype=jnp.int32)
  x, _ = jax.lax.scan(level, x_init, (index, jnp.asarray(ladder), jnp.asarray(entered_from)))
  t = jnp.full((shape[0],), lowest, jnp.int32)
  mean_out, _ = diffusion.split_model_output(model_fn(x, t), x, model_var_type=model_var_type)
  return diffusion.predict_xstart(schedule, mean_out, x, t, model_mean_type=model_mean_type)
