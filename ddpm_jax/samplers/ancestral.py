"""Ancestral sampling, the paper's Algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z from
t = T-1 down to 0 (0-based), in one lax.scan, optionally recording the progressive
generation of §4.3 (Fig. 6)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax.samplers import base
from ddpm_jax.samplers.base import ModelFn, ModelSpec


@dataclasses.dataclass(frozen=True)
class AncestralOptions:
  """Algorithm 2 over all T steps (T network evaluations per sample)."""

  method: ClassVar[str] = "ancestral"
  # Clip the x_0 estimate to [-1, 1] before forming the posterior mean (official code).
  clip_denoised: bool = True

  def check(self, num_timesteps: int, spec: ModelSpec) -> None:
    del num_timesteps, spec  # Every T and model output has its chain.

  def nfe(self, num_timesteps: int) -> int:
    return num_timesteps

  def sample(
    self,
    schedule: diffusion.DiffusionSchedule,
    model_fn: ModelFn,
    rng: jax.Array,
    shape: tuple[int, ...],
    spec: ModelSpec,
  ) -> jnp.ndarray:
    return ancestral_loop(schedule, model_fn, rng, shape, spec, self)[0]


def ancestral_step(
  schedule: diffusion.DiffusionSchedule,
  model_output: jnp.ndarray,
  x_t: jnp.ndarray,
  t: jnp.ndarray,
  noise: jnp.ndarray,
  *,
  spec: ModelSpec,
  clip_denoised: bool,
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """One step of Algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z, no noise at t=0.

  Returns (x_{t-1}, pred_xstart).
  """
  out = spec.p_mean_variance(schedule, model_output, x_t, t, clip_denoised=clip_denoised)
  nonzero = (t != 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
  x_prev = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise
  return x_prev, out["pred_xstart"]


def _trajectory_slots(
  num_timesteps: int, start_t: int, timesteps: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray]:
  """(slot per t: the position of t among the recorded timesteps or -1, recorded timesteps).

  Recorded timesteps are the requested ones (default: all) that the loop from start_t
  visits, in sampling order (descending).
  """
  requested = range(start_t + 1) if timesteps is None else [int(t) for t in timesteps]
  if any(not 0 <= t < num_timesteps for t in requested):
    raise ValueError(f"trajectory_timesteps {list(requested)} must lie in [0, T={num_timesteps}).")
  ts = np.array(sorted({t for t in requested if t <= start_t}, reverse=True), np.int32)
  if ts.size == 0:
    raise ValueError(f"No trajectory_timesteps {list(requested)} at or below start_t={start_t}.")
  slots = np.full((num_timesteps,), -1, np.int32)
  slots[ts] = np.arange(ts.size, dtype=np.int32)
  return slots, ts


def ancestral_loop(
  schedule: diffusion.DiffusionSchedule,
  model_fn: ModelFn,
  rng: jax.Array,
  shape: tuple[int, ...],
  spec: ModelSpec,
  options: AncestralOptions,
  *,
  x_init: jnp.ndarray | None = None,
  start_t: int | None = None,
  trajectory_timesteps: Sequence[int] | bool | None = False,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray] | None]:
  """Algorithm 2 from x_{start_t} (default x_T ~ N(0, I) at t = T-1) down to x_0, one scan.

  ``trajectory_timesteps``: False records nothing; None records every step; a list records
  those timesteps (memory K * batch, written inside the scan). Returns (x_0, trajectory).
  """
  shape = base.check_shape(shape)
  num_timesteps = schedule.num_timesteps
  start_t = num_timesteps - 1 if start_t is None else int(start_t)
  if not 0 <= start_t < num_timesteps:
    raise ValueError(f"start_t={start_t} must lie in [0, T={num_timesteps}).")
  x_start = base.initial_noise(rng, shape, x_init)
  _, step_key = base.noise_keys(rng)
  record = trajectory_timesteps is not False
  if record:
    slots_np, traj_ts = _trajectory_slots(num_timesteps, start_t, trajectory_timesteps)
    slots = jnp.asarray(slots_np)
    traj_init = (jnp.zeros((traj_ts.size,) + shape, jnp.float32),) * 2
  else:
    traj_init = None

  def step(carry, t_: jnp.ndarray):
    x_t, traj = carry
    t = base.batch_timesteps(t_, shape[0])
    x_prev, pred_xstart = ancestral_step(
      schedule,
      model_fn(x_t, t),
      x_t,
      t,
      base.step_noise(step_key, t_, shape),
      spec=spec,
      clip_denoised=options.clip_denoised,
    )
    if record:
      # Steps that are not recorded write slot 0's current content back onto itself.
      slot = jnp.maximum(slots[t_], 0)
      traj = tuple(
        jax.lax.dynamic_update_index_in_dim(
          buf,
          jnp.where(slots[t_] >= 0, val, jax.lax.dynamic_index_in_dim(buf, slot, 0, False)),
          slot,
          0,
        )
        for buf, val in zip(traj, (x_t, pred_xstart), strict=True)
      )
    return (x_prev, traj), None

  timesteps = jnp.arange(start_t, -1, -1, dtype=jnp.int32)
  (x_0, traj), _ = jax.lax.scan(step, (x_start, traj_init), timesteps)
  if record:
    return x_0, dict(timesteps=jnp.asarray(traj_ts), x_t=traj[0], pred_xstart=traj[1])
  return x_0, None


def ancestral_sample(
  schedule: diffusion.DiffusionSchedule,
  model_fn: ModelFn,
  rng: jax.Array,
  shape: tuple[int, ...],
  *,
  model_mean_type: str,
  model_var_type: str,
  return_trajectory: bool = False,
  trajectory_timesteps: Sequence[int] | None = None,
  x_init: jnp.ndarray | None = None,
  start_t: int | None = None,
  **options,
) -> jnp.ndarray | tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Ancestral sampling (paper Algorithm 2) from x_T ~ N(0, I) down to x_0, in one lax.scan.

  Args:
    return_trajectory: also return the progressive generation (paper §4.3, Fig. 6): a dict
      with ``timesteps`` [K] (descending), ``x_t`` [K, *shape] (the input of those steps) and
      ``pred_xstart`` [K, *shape] (the model's x_0 estimate there), K = T unless
      ``trajectory_timesteps`` picks fewer.
    x_init, start_t: start the reverse process from a given x_t at timestep ``start_t``
      (default: fresh N(0, I) noise at t = T-1), e.g. to decode an interpolated latent.
    **options: `AncestralOptions` fields (clip_denoised).

  Returns x_0 [*shape] (and the trajectory dict).
  """
  x_0, traj = ancestral_loop(
    schedule,
    model_fn,
    rng,
    shape,
    ModelSpec(model_mean_type, model_var_type),
    AncestralOptions(**options),
    x_init=x_init,
    start_t=start_t,
    trajectory_timesteps=trajectory_timesteps if return_trajectory else False,
  )
  return (x_0, traj) if return_trajectory else x_0
