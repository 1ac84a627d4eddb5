"""Samplers as single lax.scan loops: ancestral (paper Algorithm 2) and DDIM, and
`generate`, the dispatch on the config's sampling.method. Their single steps live in
reverse_steps.py and the score-based samplers (predictor-corrector, annealed Langevin) in
langevin.py; the public names of both are importable from here too.

All are pure functions of (schedule, model_fn, rng, shape): jit, pmap and vmap compose
over them; x_T comes from ``split(rng)[0]`` and the noise of step t from
``fold_in(split(rng)[1], t)``, so the same rng gives
the same samples however the loop is compiled. ``model_fn(x_t, t) -> model_output`` is any
callable (a closure over the network's parameters); t is 0-based (t=0 is the paper's t=1).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax.langevin import (LANGEVIN_STREAM, PREDICTORS,  # noqa: F401 (public here too)
                               annealed_langevin_sample, langevin_corrector_step, pc_sample)
from ddpm_jax.reverse_steps import (DDIM_SKIPS, check_shape, ddim_pairs,  # noqa: F401
                                    ddim_step, ddim_timesteps, noise_keys, p_sample)

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
SAMPLING_METHODS = ("ancestral", "ddim", "pc", "annealed_langevin")


def _trajectory_slots(num_timesteps: int, start_t: int,
                      timesteps: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
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


def sample(schedule: diffusion.DiffusionSchedule, model_fn: ModelFn, rng: jax.Array,
           shape: tuple[int, ...], *, model_mean_type: str, model_var_type: str,
           clip_denoised: bool = True, return_trajectory: bool = False,
           trajectory_timesteps: Sequence[int] | None = None, x_init: jnp.ndarray | None = None,
           start_t: int | None = None):
  """Ancestral sampling (paper Algorithm 2) from x_T ~ N(0, I) down to x_0, in one lax.scan.

  Args:
    return_trajectory: also return the progressive generation (paper §4.3, Fig. 6): a dict
      with ``timesteps`` [K] (descending), ``x_t`` [K, *shape] (the input of those steps) and
      ``pred_xstart`` [K, *shape] (the model's x_0 estimate there), K = T unless
      ``trajectory_timesteps`` picks fewer (memory K * batch, recorded inside the scan).
    x_init, start_t: start the reverse process from a given x_t at timestep ``start_t``
      (default: fresh N(0, I) noise at t = T-1), e.g. to decode an interpolated latent.

  Returns x_0 [*shape] (and the trajectory dict).
  """
  shape = check_shape(shape)
  num_timesteps = schedule.num_timesteps
  start_t = num_timesteps - 1 if start_t is None else int(start_t)
  if not 0 <= start_t < num_timesteps:
    raise ValueError(f"start_t={start_t} must lie in [0, T={num_timesteps}).")
  init_key, step_key = noise_keys(rng)
  if x_init is None:
    x_init = jax.random.normal(init_key, shape, jnp.float32)
  elif tuple(x_init.shape) != shape:
    raise ValueError(f"x_init shape {tuple(x_init.shape)} != sample shape {shape}.")
  timesteps = jnp.arange(start_t, -1, -1, dtype=jnp.int32)
  if return_trajectory:
    slots_np, traj_ts = _trajectory_slots(num_timesteps, start_t, trajectory_timesteps)
    slots = jnp.asarray(slots_np)
    traj_init = (jnp.zeros((traj_ts.size,) + shape, jnp.float32),) * 2
  else:
    traj_init = None

  def step(carry, t_: jnp.ndarray):
    x_t, traj = carry
    t = jnp.full((shape[0],), t_, jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(step_key, t_), shape, jnp.float32)
    x_prev, pred_xstart = p_sample(schedule, model_fn(x_t, t), x_t, t, noise,
                                   model_mean_type=model_mean_type,
                                   model_var_type=model_var_type, clip_denoised=clip_denoised)
    if return_trajectory:
      # Steps that are not recorded write slot 0's current content back onto itself.
      slot = jnp.maximum(slots[t_], 0)
      traj = tuple(jax.lax.dynamic_update_index_in_dim(
          buf, jnp.where(slots[t_] >= 0, val, jax.lax.dynamic_index_in_dim(buf, slot, 0, False)),
          slot, 0) for buf, val in zip(traj, (x_t, pred_xstart)))
    return (x_prev, traj), None

  (x_0, traj), _ = jax.lax.scan(step, (x_init.astype(jnp.float32), traj_init), timesteps)
  if return_trajectory:
    return x_0, dict(timesteps=jnp.asarray(traj_ts), x_t=traj[0], pred_xstart=traj[1])
  return x_0


def slerp(z1: jnp.ndarray, z2: jnp.ndarray, alpha: jnp.ndarray) -> jnp.ndarray:
  """Spherical interpolation between Gaussian latents z1, z2 (per example), alpha in [0, 1].

  Keeps the norm of N(0, I) draws, unlike the linear mix (which shrinks it mid-way).
  """
  axes = tuple(range(1, z1.ndim))
  cos = jnp.sum(z1 * z2, axis=axes, keepdims=True) / (
      jnp.linalg.norm(z1.reshape(z1.shape[0], -1), axis=1).reshape((-1,) + (1,) * len(axes))
      * jnp.linalg.norm(z2.reshape(z2.shape[0], -1), axis=1).reshape((-1,) + (1,) * len(axes)))
  theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
  alpha = jnp.reshape(alpha, (-1,) + (1,) * len(axes))
  sin = jnp.maximum(jnp.sin(theta), 1e-7)
  return (jnp.sin((1 - alpha) * theta) * z1 + jnp.sin(alpha * theta) * z2) / sin


def interpolate(schedule: diffusion.DiffusionSchedule, model_fn: ModelFn, rng: jax.Array,
                x_a: jnp.ndarray, x_b: jnp.ndarray, lambdas: jnp.ndarray, *, t: int,
                model_mean_type: str, model_var_type: str,
                clip_denoised: bool = True) -> jnp.ndarray:
  """Interpolation of two images in the latent space at step t (paper §4.3, Fig. 8).

  Encodes x_a, x_b [H, W, C] with the stochastic encoder q(x_t | x_0) (shared noise), mixes
  x_t = (1 - lambda) x_t^a + lambda x_t^b for each of ``lambdas`` [K], and decodes with the
  reverse process from t. Returns [K, H, W, C].
  """
  lambdas = jnp.asarray(lambdas, jnp.float32)
  k = lambdas.shape[0]
  enc_key, dec_key = jax.random.split(rng)
  noise = jax.random.normal(enc_key, x_a.shape, jnp.float32)
  tt = jnp.full((1,), t, jnp.int32)
  x_t_a = diffusion.q_sample(schedule, x_a[None], tt, noise[None])[0]
  x_t_b = diffusion.q_sample(schedule, x_b[None], tt, noise[None])[0]
  lam = lambdas.reshape((k,) + (1,) * x_a.ndim)
  mixed = (1 - lam) * x_t_a[None] + lam * x_t_b[None]
  return sample(schedule, model_fn, dec_key, mixed.shape, model_mean_type=model_mean_type,
                model_var_type=model_var_type, clip_denoised=clip_denoised, x_init=mixed,
                start_t=t)


def ddim_sample(schedule: diffusion.DiffusionSchedule, model_fn: ModelFn, rng: jax.Array,
                shape: tuple[int, ...], *, num_steps: int, eta: float = 0.0,
                model_mean_type: str, model_var_type: str = "fixedlarge",
                clip_denoised: bool = True, skip: str = "uniform",
                x_init: jnp.ndarray | None = None) -> jnp.ndarray:
  """DDIM sampling (Song, Meng, Ermon 2021, Eq. 12) over the ``num_steps`` timesteps of
  ``ddim_timesteps(T, num_steps, skip)``.

  x_{s} = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z with
  sigma = eta sqrt((1-abar_s)/(1-abar_t)) sqrt(1 - abar_t/abar_s); eta=0 is deterministic,
  and eta=1 with num_steps=T is ancestral sampling with the 'fixedsmall' variance. Any
  mean type is converted to (x0_hat, eps_hat). Without ``clip_denoised`` an eps model's
  output is used as it is, as in the DDIM reference code; with it x0_hat is clipped to
  [-1, 1] and eps_hat recomputed from it (improved-diffusion's variant). A learned variance
  output is ignored. ``x_init`` replaces the x_T drawn from ``rng`` (with eta=0 the map
  x_T -> x_0 is deterministic: DDIM's latent space).
  """
  shape = check_shape(shape)
  if not 0.0 <= float(eta):
    raise ValueError(f"DDIM eta={eta} must be >= 0.")
  steps, prev_steps = ddim_pairs(schedule.num_timesteps, int(num_steps), skip)
  init_key, step_key = noise_keys(rng)
  if x_init is None:
    x_init = jax.random.normal(init_key, shape, jnp.float32)
  elif tuple(x_init.shape) != shape:
    raise ValueError(f"x_init shape {tuple(x_init.shape)} != sample shape {shape}.")

  def step(x_t: jnp.ndarray, ts: tuple[jnp.ndarray, jnp.ndarray]):
    t_, s_ = ts
    t, s = jnp.full((shape[0],), t_, jnp.int32), jnp.full((shape[0],), s_, jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(step_key, t_), shape, jnp.float32)
    x_s, _ = ddim_step(schedule, model_fn(x_t, t), x_t, t, s, noise, eta=eta,
                       model_mean_type=model_mean_type, model_var_type=model_var_type,
                       clip_denoised=clip_denoised)
    return x_s, None

  x_0, _ = jax.lax.scan(step, x_init.astype(jnp.float32), (steps, prev_steps))
  return x_0


def generate(schedule: diffusion.DiffusionSchedule, model_fn: ModelFn, rng: jax.Array,
             shape: tuple[int, ...], *, method: str, model_mean_type: str, model_var_type: str,
             clip_denoised: bool = True, num_steps: int = 0, eta: float = 0.0,
             ddim_skip: str = "uniform", predictor: str = "ancestral",
             corrector_steps: int = 1, snr: float = 0.16, langevin_steps: int = 2,
             langevin_step_size: float = 2e-5) -> jnp.ndarray:
  """Dispatches on ``method`` (one of SAMPLING_METHODS, the config's sampling.method); the
  keyword arguments a method does not use are ignored.

  "pc" is `langevin.pc_sample` (``predictor``, ``corrector_steps``, ``snr``; the DDIM
  predictor also takes num_steps, eta and ddim_skip) and "annealed_langevin" is
  `langevin.annealed_langevin_sample` (num_steps levels of ddim_skip's grid,
  ``langevin_steps`` each, NCSN's step size ``langevin_step_size``).
  """
  if method == "ancestral":
    return sample(schedule, model_fn, rng, shape, model_mean_type=model_mean_type,
                  model_var_type=model_var_type, clip_denoised=clip_denoised)
  if method == "ddim":
    return ddim_sample(schedule, model_fn, rng, shape, num_steps=num_steps, eta=eta,
                       model_mean_type=model_mean_type, model_var_type=model_var_type,
                       clip_denoised=clip_denoised, skip=ddim_skip)
  if method == "pc":
    return pc_sample(schedule, model_fn, rng, shape, model_mean_type=model_mean_type,
                              model_var_type=model_var_type, predictor=predictor,
                              corrector_steps=corrector_steps, snr=snr, num_steps=num_steps,
                              eta=eta, skip=ddim_skip, clip_denoised=clip_denoised)
  if method == "annealed_langevin":
    return annealed_langevin_sample(
        schedule, model_fn, rng, shape, num_steps=num_steps, langevin_steps=langevin_steps,
        langevin_step_size=langevin_step_size, model_mean_type=model_mean_type,
        model_var_type=model_var_type, skip=ddim_skip)
  raise ValueError(f"Unknown sampling method {method!r}; allowed: {SAMPLING_METHODS}.")


def to_uint8(x: jnp.ndarray) -> jnp.ndarray:
  """Quantizes samples in [-1, 1] to uint8 pixels, round((x + 1) * 127.5) clipped to 0..255."""
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
