"""The score view of DDPM: Langevin dynamics driven by the score a trained DDPM implies.

`ModelSpec.score` turns any model output into grad_x log q(x_t); for the paper's eps model
it is -eps_theta(x_t, t) / sqrt(1 - abar_t). On top of it, with one lax.scan over the noise
levels:

- `langevin_corrector_step`: one step of the Langevin corrector of Song et al. (2021, App.
  G, Algorithm 5), its step size set by a target signal-to-noise ratio.
- predictor-corrector sampling (`PCOptions`, `pc_sample`) of the discrete VP chain: at each
  level the corrector's Langevin steps, then one ancestral (Algorithm 2) or DDIM step.
- annealed Langevin dynamics (`AnnealedLangevinOptions`, `annealed_langevin_sample`) of NCSN
  (Song & Ermon 2019, Algorithm 1) over a ladder of DDPM noise levels, then one denoising
  step.

Random streams: x_T and the predictor's noise are those of the ancestral and DDIM samplers
(base.py), so the same rng gives the same draws; the Langevin noise of the i-th level
visited (i = 0 at the top) and its j-th step is
``normal(fold_in(fold_in(fold_in(rng, LANGEVIN_STREAM), i), j))``. Keying by the level's
position, not its timestep, keeps a repeated level of the "quad" grid on fresh noise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax.samplers import base
from ddpm_jax.samplers.ancestral import AncestralOptions, ancestral_step
from ddpm_jax.samplers.base import ModelFn, ModelSpec
from ddpm_jax.samplers.ddim import DDIMOptions, ddim_pairs, ddim_step, ddim_timesteps

# fold_in(rng, LANGEVIN_STREAM): the Langevin noise, apart from split(rng)'s x_T and
# predictor streams. Part of the reproducibility contract: changing it changes the samples.
LANGEVIN_STREAM = 0x5C0E
PREDICTORS = {o.method: o for o in (AncestralOptions, DDIMOptions)}


@dataclasses.dataclass(frozen=True)
class PCOptions:
  """Predictor-corrector sampling: at each noise level ``corrector_steps`` Langevin steps at
  target signal-to-noise ratio ``snr`` (score_sde's 0.16), then one ``predictor`` step.
  Network evaluations per sample: levels x (1 + corrector_steps), the levels being the
  predictor's (T for ancestral, num_steps for DDIM)."""

  method: ClassVar[str] = "pc"
  predictor: AncestralOptions | DDIMOptions = dataclasses.field(default_factory=AncestralOptions)
  corrector_steps: int = 1
  snr: float = 0.16

  def check(self, num_timesteps: int, spec: ModelSpec) -> None:
    if not isinstance(self.predictor, tuple(PREDICTORS.values())):
      raise ValueError(
        f"predictor={self.predictor!r} is unknown; allowed: {', '.join(PREDICTORS)}."
      )
    self.predictor.check(num_timesteps, spec)
    base.check_int("corrector_steps", self.corrector_steps, 0)
    if self.corrector_steps:
      base.check_positive("snr", self.snr)

  def nfe(self, num_timesteps: int) -> int:
    return self.predictor.nfe(num_timesteps) * (1 + self.corrector_steps)

  def sample(
    self,
    schedule: diffusion.DiffusionSchedule,
    model_fn: ModelFn,
    rng: jax.Array,
    shape: tuple[int, ...],
    spec: ModelSpec,
  ) -> jnp.ndarray:
    return pc_loop(schedule, model_fn, rng, shape, spec, self)


@dataclasses.dataclass(frozen=True)
class AnnealedLangevinOptions:
  """NCSN's annealed Langevin dynamics on ``num_steps`` DDPM noise levels of the ``skip``
  grid, ``langevin_steps`` steps each with NCSN's step size ``langevin_step_size`` (epsilon
  at the lowest level of the ladder; Song & Ermon 2019 use 2e-5 with sigma_L = 0.01, the
  DDPM sigma at t = 1), then one denoising step: num_steps x langevin_steps + 1 network
  evaluations per sample. With ~100 evaluations 2e-5 is too small: Fashion-MNIST needed
  1e-4 to 2e-4."""

  method: ClassVar[str] = "annealed_langevin"
  num_steps: int = 100
  skip: str = "uniform"
  langevin_steps: int = 2
  langevin_step_size: float = 2e-5

  def check(self, num_timesteps: int, spec: ModelSpec) -> None:
    del spec  # Every mean type implies a score.
    ddim_timesteps(num_timesteps, self.num_steps, self.skip)
    base.check_int("langevin_steps", self.langevin_steps, 1)
    base.check_positive("langevin_step_size", self.langevin_step_size)

  def nfe(self, num_timesteps: int) -> int:
    del num_timesteps
    return self.num_steps * self.langevin_steps + 1

  def sample(
    self,
    schedule: diffusion.DiffusionSchedule,
    model_fn: ModelFn,
    rng: jax.Array,
    shape: tuple[int, ...],
    spec: ModelSpec,
  ) -> jnp.ndarray:
    return annealed_langevin_loop(schedule, model_fn, rng, shape, spec, self)


def _per_example_norm(a: jnp.ndarray) -> jnp.ndarray:
  """||a_b||_2 of each example, shaped [B, 1, ..., 1] to broadcast against a."""
  norm = jnp.sqrt(jnp.sum(jnp.square(a.reshape(a.shape[0], -1)), axis=1))
  return norm.reshape((-1,) + (1,) * (a.ndim - 1))


def _langevin_update(
  x: jnp.ndarray, score: jnp.ndarray, step_size: jnp.ndarray, noise: jnp.ndarray
) -> jnp.ndarray:
  """x + step * score + sqrt(2 step) z: Langevin dynamics with step 2 * step_size in the
  x <- x + (eps/2) grad log p(x) + sqrt(eps) z form (Song & Ermon 2019, Eq. 4)."""
  return x + step_size * score + jnp.sqrt(2.0 * step_size) * noise


def langevin_corrector_step(
  schedule: diffusion.DiffusionSchedule,
  model_output: jnp.ndarray,
  x_t: jnp.ndarray,
  t: jnp.ndarray,
  noise: jnp.ndarray,
  *,
  spec: ModelSpec,
  snr: float | jnp.ndarray,
) -> jnp.ndarray:
  """One Langevin corrector step at noise level t (Song et al. 2021, Algorithm 5, VP).

  With s the score of ``model_output`` and z = ``noise`` ~ N(0, I), per example
  step = 2 alpha_t (snr ||z|| / ||s||)^2 with alpha_t = 1 - beta_t, and
  x <- x + step * s + sqrt(2 step) z. In norm the drift step * s is then sqrt(alpha_t) r
  times the noise sqrt(2 step) z: r = ``snr`` is the target signal-to-noise ratio. A zero
  score (||s|| = 0) takes no step. With the exact score it leaves q(x_t) invariant up to the
  Langevin discretisation error, relative O(r^2).
  """
  s = spec.score(schedule, model_output, x_t, t)
  alpha = (1.0 - schedule.betas[t]).reshape((-1,) + (1,) * (x_t.ndim - 1))
  score_norm = _per_example_norm(s)
  ratio = snr * _per_example_norm(noise) / jnp.where(score_norm > 0, score_norm, 1.0)
  step_size = jnp.where(score_norm > 0, 2.0 * alpha * jnp.square(ratio), 0.0)
  return _langevin_update(x_t, s, step_size, noise)


def _langevin_steps(
  x: jnp.ndarray,
  key: jax.Array,
  num: int,
  update: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
) -> jnp.ndarray:
  """``num`` Langevin steps x <- update(x, z_j), z_j ~ N(0, I) from fold_in(key, j), as a
  loop nested in the caller's scan (one network evaluation per step)."""
  if num == 0:
    return x

  def body(j: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    return update(x, jax.random.normal(jax.random.fold_in(key, j), x.shape, jnp.float32))

  return jax.lax.fori_loop(0, num, body, x)


def pc_loop(
  schedule: diffusion.DiffusionSchedule,
  model_fn: ModelFn,
  rng: jax.Array,
  shape: tuple[int, ...],
  spec: ModelSpec,
  options: PCOptions,
) -> jnp.ndarray:
  """Predictor-corrector sampling of the discrete VP chain (Song et al. 2021, Algorithm 5).

  From x_T ~ N(0, I), at each noise level t (high to low): the corrector's Langevin steps
  at t, then the predictor: one step of Algorithm 2 over all T levels, or one DDIM step
  over the levels of its grid. The correction comes before the prediction at each level
  (score_sde's loop order; the paper's Algorithm 5 corrects after each prediction): the
  x_0 the last predictor returns has no noise level left to correct at. With
  corrector_steps=0 it is the predictor's sampler draw for draw.
  """
  shape = base.check_shape(shape)
  options.check(schedule.num_timesteps, spec)
  predictor = options.predictor
  if isinstance(predictor, AncestralOptions):
    levels = jnp.arange(schedule.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    targets = levels - 1
  else:
    levels, targets = ddim_pairs(schedule.num_timesteps, predictor.num_steps, predictor.skip)
  init_key, step_key = base.noise_keys(rng)
  langevin_key = jax.random.fold_in(rng, LANGEVIN_STREAM)
  x_init = jax.random.normal(init_key, shape, jnp.float32)

  def correct(x: jnp.ndarray, t: jnp.ndarray, z: jnp.ndarray) -> jnp.ndarray:
    return langevin_corrector_step(schedule, model_fn(x, t), x, t, z, spec=spec, snr=options.snr)

  def level(x: jnp.ndarray, inputs: tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]):
    i, t_, s_ = inputs
    t = base.batch_timesteps(t_, shape[0])
    x = _langevin_steps(
      x, jax.random.fold_in(langevin_key, i), options.corrector_steps, lambda x, z: correct(x, t, z)
    )
    noise = base.step_noise(step_key, t_, shape)
    if isinstance(predictor, AncestralOptions):
      x, _ = ancestral_step(
        schedule, model_fn(x, t), x, t, noise, spec=spec, clip_denoised=predictor.clip_denoised
      )
    else:
      x, _ = ddim_step(
        schedule,
        model_fn(x, t),
        x,
        t,
        base.batch_timesteps(s_, shape[0]),
        noise,
        spec=spec,
        eta=predictor.eta,
        clip_denoised=predictor.clip_denoised,
      )
    return x, None

  index = jnp.arange(levels.shape[0], dtype=jnp.int32)
  x_0, _ = jax.lax.scan(level, x_init, (index, levels, targets))
  return x_0


def annealed_langevin_loop(
  schedule: diffusion.DiffusionSchedule,
  model_fn: ModelFn,
  rng: jax.Array,
  shape: tuple[int, ...],
  spec: ModelSpec,
  options: AnnealedLangevinOptions,
) -> jnp.ndarray:
  """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) on the DDPM noise levels.

  The ladder is the options' ``num_steps`` levels of ``ddim_timesteps(T, num_steps, skip)``,
  visited from the top, ``langevin_steps`` steps each, starting from x ~ N(0, I).

  NCSN in the VP parameterisation: x_t = sqrt(abar_t) (x_0 + sigma_t z) with
  sigma_t^2 = (1 - abar_t) / abar_t, so y = x_t / sqrt(abar_t) is NCSN's perturbed x + sigma
  z and grad_y log p = sqrt(abar_t) grad_x log q(x_t). NCSN's step y <- y + (a_i/2) grad_y
  log p + sqrt(a_i) z with a_i = eps sigma_i^2 / sigma_L^2 is, multiplied by sqrt(abar_t),
  x <- x + (d_t/2) s + sqrt(d_t) z with d_t = abar_t a_i = eps (1 - abar_t) / sigma_L^2,
  sigma_L that of the ladder's lowest level: the step is a fixed fraction eps / sigma_L^2 of
  the level's VP noise variance 1 - abar_t. NCSN carries y from one level to the next, so
  x is rescaled by sqrt(abar_t / abar_u) on entering level t from level u.

  After the last level, one denoising step returns Tweedie's x_0 estimate
  (x_t + (1 - abar_t) s) / sqrt(abar_t), i.e. `diffusion.predict_xstart`, unclipped: the
  standard final step of NCSNv2 (Song & Ermon 2020) and score_sde (``denoise=True``).
  Every level needs abar_t > 0.
  """
  shape = base.check_shape(shape)
  options.check(schedule.num_timesteps, spec)
  ladder = ddim_timesteps(schedule.num_timesteps, options.num_steps, options.skip)[::-1]
  entered_from = np.concatenate([ladder[:1], ladder[:-1]])  # The top level: itself.
  init_key, _ = base.noise_keys(rng)
  langevin_key = jax.random.fold_in(rng, LANGEVIN_STREAM)
  abar = schedule.alphas_cumprod
  one_minus_abar = jnp.square(schedule.sqrt_one_minus_alphas_cumprod)
  lowest = int(ladder[-1])
  sigma_lowest_sq = one_minus_abar[lowest] / abar[lowest]

  def level(x: jnp.ndarray, inputs: tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]):
    i, t_, u_ = inputs
    t = base.batch_timesteps(t_, shape[0])
    x = x * jnp.where(t_ == u_, 1.0, jnp.sqrt(abar[t_] / abar[u_]))
    half_step = 0.5 * options.langevin_step_size * one_minus_abar[t_] / sigma_lowest_sq
    x = _langevin_steps(
      x,
      jax.random.fold_in(langevin_key, i),
      options.langevin_steps,
      lambda x, z: _langevin_update(x, spec.score(schedule, model_fn(x, t), x, t), half_step, z),
    )
    return x, None

  x_init = jax.random.normal(init_key, shape, jnp.float32)
  index = jnp.arange(ladder.shape[0], dtype=jnp.int32)
  x, _ = jax.lax.scan(level, x_init, (index, jnp.asarray(ladder), jnp.asarray(entered_from)))
  t = base.batch_timesteps(lowest, shape[0])
  return spec.pred_xstart(schedule, model_fn(x, t), x, t)


def pc_sample(
  schedule: diffusion.DiffusionSchedule,
  model_fn: ModelFn,
  rng: jax.Array,
  shape: tuple[int, ...],
  *,
  model_mean_type: str,
  model_var_type: str,
  predictor: str = AncestralOptions.method,
  **options,
) -> jnp.ndarray:
  """Predictor-corrector sampling (`pc_loop`): ``predictor`` "ancestral" or "ddim";
  ``options`` are `PCOptions` fields (corrector_steps, snr) and the predictor's own
  (`AncestralOptions` / `DDIMOptions` fields)."""
  if predictor not in PREDICTORS:
    raise ValueError(f"predictor={predictor!r} is unknown; allowed: {', '.join(PREDICTORS)}.")
  own = {f.name: options.pop(f.name) for f in dataclasses.fields(PCOptions) if f.name in options}
  pc = PCOptions(PREDICTORS[predictor](**options), **own)
  return pc_loop(schedule, model_fn, rng, shape, ModelSpec(model_mean_type, model_var_type), pc)


def annealed_langevin_sample(
  schedule: diffusion.DiffusionSchedule,
  model_fn: ModelFn,
  rng: jax.Array,
  shape: tuple[int, ...],
  *,
  model_mean_type: str,
  model_var_type: str = "fixedlarge",
  **options,
) -> jnp.ndarray:
  """Annealed Langevin dynamics (`annealed_langevin_loop`); ``options`` are
  `AnnealedLangevinOptions` fields (num_steps, skip, langevin_steps, langevin_step_size)."""
  return annealed_langevin_loop(
    schedule,
    model_fn,
    rng,
    shape,
    ModelSpec(model_mean_type, model_var_type),
    AnnealedLangevinOptions(**options),
  )
