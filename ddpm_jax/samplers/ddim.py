"""DDIM (Song, Meng, Ermon 2021): the non-Markovian reverse process of Eq. 12 on a subset of
the timesteps, deterministic at eta = 0 (the probability-flow ODE's first-order solver)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax.samplers import base
from ddpm_jax.samplers.base import ModelFn, ModelSpec

DDIM_SKIPS = ("uniform", "quad")


@dataclasses.dataclass(frozen=True)
class DDIMOptions:
  """DDIM over ``num_steps`` timesteps of the ``skip`` grid (num_steps network evaluations).

  ``clip_denoised`` clips x0_hat to [-1, 1] and recomputes eps_hat from it (improved-
  diffusion's variant); without it an eps model's output is used as it is, as in the DDIM
  reference code. eta = 0 is deterministic; eta = 1 with num_steps = T is ancestral sampling
  with the 'fixedsmall' variance.
  """

  method: ClassVar[str] = "ddim"
  num_steps: int = 100
  eta: float = 0.0
  skip: str = "uniform"  # The timestep grid: "uniform" or "quad" (DDIM's CIFAR-10 grid).
  clip_denoised: bool = True

  def check(self, num_timesteps: int, spec: ModelSpec) -> None:
    del spec  # Every mean type has its x_0 and eps estimates.
    base.check_positive("eta", self.eta, allow_zero=True)
    ddim_timesteps(num_timesteps, self.num_steps, self.skip)

  def nfe(self, num_timesteps: int) -> int:
    del num_timesteps
    return self.num_steps

  def sample(
    self,
    schedule: diffusion.DiffusionSchedule,
    model_fn: ModelFn,
    rng: jax.Array,
    shape: tuple[int, ...],
    spec: ModelSpec,
  ) -> jnp.ndarray:
    return ddim_loop(schedule, model_fn, rng, shape, spec, self)


def ddim_timesteps(num_timesteps: int, num_steps: int, skip: str = "uniform") -> np.ndarray:
  """The S = ``num_steps`` timesteps DDIM visits (Song et al. 2021, App. D.2), ascending.

  "uniform": 0, k, 2k, ..., (S-1) k with k = T // S: exactly S steps (the reference code's
  range(0, T, k) has one more when k does not divide T, e.g. T=1000, S=3). "quad": the
  quadratic grid int(linspace(0, sqrt(0.8 T), S)^2) of the reference code's CIFAR-10 runs
  (FID 4.16 at S=100); for large S its first entries repeat (those steps leave x unchanged
  when eta=0 but still evaluate the network), as in the reference code.
  """
  base.check_int("num_steps", num_steps, 1, num_timesteps)
  base.check_choice("skip", skip, DDIM_SKIPS)
  if skip == "uniform":
    return np.arange(num_steps, dtype=np.int32) * (num_timesteps // num_steps)
  return (np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2).astype(np.int32)


def ddim_pairs(num_timesteps: int, num_steps: int, skip: str) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(t, s) of each DDIM step in sampling order: the grid descending and the step it
  lands on (-1 after the last)."""
  steps = ddim_timesteps(num_timesteps, num_steps, skip)
  prev_steps = np.concatenate([[-1], steps[:-1]]).astype(np.int32)
  return jnp.asarray(steps[::-1]), jnp.asarray(prev_steps[::-1])


def ddim_step(
  schedule: diffusion.DiffusionSchedule,
  model_output: jnp.ndarray,
  x_t: jnp.ndarray,
  t: jnp.ndarray,
  s: jnp.ndarray,
  noise: jnp.ndarray,
  *,
  spec: ModelSpec,
  eta: float,
  clip_denoised: bool,
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """One DDIM update (Song, Meng, Ermon 2021, Eq. 12) from timestep t to s < t, both [B].

  x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z with
  sigma = eta sqrt((1-abar_s)/(1-abar_t)) sqrt(1 - abar_t/abar_s); s = -1 means x_0
  (abar_s = 1). Any mean type is converted to (x0_hat, eps_hat); a learned variance output
  is ignored. Returns (x_s, x0_hat); `DDIMOptions` gives the clipping rule.
  """
  mean_out = spec.mean_output(model_output, x_t)
  pred_xstart = diffusion.predict_xstart(schedule, mean_out, x_t, t, model_mean_type=spec.mean_type)
  if clip_denoised:
    pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
  if spec.mean_type == "eps" and not clip_denoised:
    eps = mean_out
  else:
    eps = diffusion.predict_eps_from_xstart(schedule, x_t, t, pred_xstart)
  abar = schedule.alphas_cumprod
  per_example = (-1,) + (1,) * (x_t.ndim - 1)
  abar_t = abar[t].reshape(per_example)
  abar_s = jnp.where(s >= 0, abar[jnp.maximum(s, 0)], 1.0).reshape(per_example)
  sigma = eta * jnp.sqrt((1 - abar_s) / (1 - abar_t)) * jnp.sqrt(1 - abar_t / abar_s)
  x_s = (
    jnp.sqrt(abar_s) * pred_xstart
    + jnp.sqrt(jnp.maximum(1 - abar_s - sigma**2, 0.0)) * eps
    + sigma * noise
  )
  return x_s, pred_xstart


def ddim_loop(
  schedule: diffusion.DiffusionSchedule,
  model_fn: ModelFn,
  rng: jax.Array,
  shape: tuple[int, ...],
  spec: ModelSpec,
  options: DDIMOptions,
  *,
  x_init: jnp.ndarray | None = None,
) -> jnp.ndarray:
  """DDIM from x_T (drawn from rng, or ``x_init``) to x_0 over the options' grid, one scan."""
  shape = base.check_shape(shape)
  options.check(schedule.num_timesteps, spec)
  steps, prev_steps = ddim_pairs(schedule.num_timesteps, options.num_steps, options.skip)
  x_start = base.initial_noise(rng, shape, x_init)
  _, step_key = base.noise_keys(rng)

  def step(x_t: jnp.ndarray, ts: tuple[jnp.ndarray, jnp.ndarray]):
    t_, s_ = ts
    t, s = base.batch_timesteps(t_, shape[0]), base.batch_timesteps(s_, shape[0])
    x_s, _ = ddim_step(
      schedule,
      model_fn(x_t, t),
      x_t,
      t,
      s,
      base.step_noise(step_key, t_, shape),
      spec=spec,
      eta=options.eta,
      clip_denoised=options.clip_denoised,
    )
    return x_s, None

  x_0, _ = jax.lax.scan(step, x_start, (steps, prev_steps))
  return x_0


def ddim_sample(
  schedule: diffusion.DiffusionSchedule,
  model_fn: ModelFn,
  rng: jax.Array,
  shape: tuple[int, ...],
  *,
  model_mean_type: str,
  model_var_type: str = "fixedlarge",
  x_init: jnp.ndarray | None = None,
  **options,
) -> jnp.ndarray:
  """DDIM sampling (Song, Meng, Ermon 2021, Eq. 12); ``options`` are `DDIMOptions` fields
  (num_steps, eta, skip, clip_denoised). ``x_init`` replaces the x_T drawn from ``rng``
  (with eta=0 the map x_T -> x_0 is deterministic: DDIM's latent space)."""
  return ddim_loop(
    schedule,
    model_fn,
    rng,
    shape,
    ModelSpec(model_mean_type, model_var_type),
    DDIMOptions(**options),
    x_init=x_init,
  )
