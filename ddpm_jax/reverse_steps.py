"""Single steps of the reverse process and the conventions every sampler shares.

`p_sample` is one step of the paper's Algorithm 2; `ddim_step` one update of DDIM (Song et
al. 2021, Eq. 12) on the timestep grid of `ddim_timesteps`. Samplers draw x_T from
``split(rng)[0]`` and a step's noise from ``split(rng)[1]`` (`noise_keys`), so samplers
built from these steps (sampling.py, langevin.py) give the same draws for the same rng.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion


def check_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The sample shape as ints; ValueError unless it is [B, ...] with positive sizes."""
  shape = tuple(int(s) for s in shape)
  if len(shape) < 2 or any(s <= 0 for s in shape):
    raise ValueError(f"Sample shape {shape} must be [B, ...] with positive sizes.")
  return shape


def noise_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(key of x_T, base key of the per-step noise)."""
  init_key, step_key = jax.random.split(rng)
  return init_key, step_key


def p_sample(schedule: diffusion.DiffusionSchedule, model_output: jnp.ndarray,
             x_t: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray, *, model_mean_type: str,
             model_var_type: str, clip_denoised: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
  """One step of Algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z, no noise at t=0.

  Returns (x_{t-1}, pred_xstart).
  """
  out = diffusion.p_mean_variance(schedule, model_output, x_t, t,
                                  model_mean_type=model_mean_type,
                                  model_var_type=model_var_type, clip_denoised=clip_denoised)
  nonzero = (t != 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
  x_prev = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise
  return x_prev, out["pred_xstart"]


DDIM_SKIPS = ("uniform", "quad")


def ddim_timesteps(num_timesteps: int, num_steps: int, skip: str = "uniform") -> np.ndarray:
  """The S = ``num_steps`` timesteps DDIM visits (Song et al. 2021, App. D.2), ascending.

  "uniform": 0, k, 2k, ..., (S-1) k with k = T // S: exactly S steps (the reference code's
  range(0, T, k) has one more when k does not divide T, e.g. T=1000, S=3). "quad": the
  quadratic grid int(linspace(0, sqrt(0.8 T), S)^2) of the reference code's CIFAR-10 runs
  (FID 4.16 at S=100); for large S its first entries repeat (those steps leave x unchanged
  when eta=0 but still evaluate the network), as in the reference code.
  """
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"DDIM num_steps={num_steps} must lie in [1, T={num_timesteps}].")
  if skip == "uniform":
    return np.arange(num_steps, dtype=np.int32) * (num_timesteps // num_steps)
  if skip == "quad":
    return (np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2).astype(np.int32)
  raise ValueError(f"unknown DDIM skip {skip!r}; allowed: {', '.join(DDIM_SKIPS)}")


def ddim_step(schedule: diffusion.DiffusionSchedule, model_output: jnp.ndarray,
              x_t: jnp.ndarray, t: jnp.ndarray, s: jnp.ndarray, noise: jnp.ndarray, *,
              eta: float, model_mean_type: str, model_var_type: str = "fixedlarge",
              clip_denoised: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
  """One DDIM update (Song, Meng, Ermon 2021, Eq. 12) from timestep t to s < t, both [B].

  x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z with
  sigma = eta sqrt((1-abar_s)/(1-abar_t)) sqrt(1 - abar_t/abar_s); s = -1 means x_0
  (abar_s = 1). Returns (x_s, x0_hat); see `ddim_sample` for the clipping rule.
  """
  mean_out, _ = diffusion.split_model_output(model_output, x_t, model_var_type=model_var_type)
  pred_xstart = diffusion.predict_xstart(schedule, mean_out, x_t, t,
                                         model_mean_type=model_mean_type)
  if clip_denoised:
    pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
  if model_mean_type == "eps" and not clip_denoised:
    eps = mean_out
  else:
    eps = diffusion.predict_eps_from_xstart(schedule, x_t, t, pred_xstart)
  abar = schedule.alphas_cumprod
  per_example = (-1,) + (1,) * (x_t.ndim - 1)
  abar_t = abar[t].reshape(per_example)
  abar_s = jnp.where(s >= 0, abar[jnp.maximum(s, 0)], 1.0).reshape(per_example)
  sigma = eta * jnp.sqrt((1 - abar_s) / (1 - abar_t)) * jnp.sqrt(1 - abar_t / abar_s)
  x_s = (jnp.sqrt(abar_s) * pred_xstart
         + jnp.sqrt(jnp.maximum(1 - abar_s - sigma**2, 0.0)) * eps + sigma * noise)
  return x_s, pred_xstart


def ddim_pairs(num_timesteps: int, num_steps: int,
                skip: str) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(t, s) of each DDIM step in sampling order: the grid descending and the step it
  lands on (-1 after the last)."""
  steps = ddim_timesteps(num_timesteps, num_steps, skip)
  prev_steps = np.concatenate([[-1], steps[:-1]]).astype(np.int32)
  return jnp.asarray(steps[::-1]), jnp.asarray(prev_steps[::-1])
