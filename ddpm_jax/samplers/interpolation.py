"""Interpolation in the latent space of the reverse process (paper §4.3, Fig. 8)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion
from ddpm_jax.samplers.ancestral import AncestralOptions, ancestral_loop
from ddpm_jax.samplers.base import ModelFn, ModelSpec


def slerp(z1: jnp.ndarray, z2: jnp.ndarray, alpha: jnp.ndarray) -> jnp.ndarray:
  """Spherical interpolation between Gaussian latents z1, z2 (per example), alpha in [0, 1].

  Keeps the norm of N(0, I) draws, unlike the linear mix (which shrinks it mid-way).
  """
  axes = tuple(range(1, z1.ndim))
  cos = jnp.sum(z1 * z2, axis=axes, keepdims=True) / (
    jnp.linalg.norm(z1.reshape(z1.shape[0], -1), axis=1).reshape((-1,) + (1,) * len(axes))
    * jnp.linalg.norm(z2.reshape(z2.shape[0], -1), axis=1).reshape((-1,) + (1,) * len(axes))
  )
  theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
  alpha = jnp.reshape(alpha, (-1,) + (1,) * len(axes))
  sin = jnp.maximum(jnp.sin(theta), 1e-7)
  return (jnp.sin((1 - alpha) * theta) * z1 + jnp.sin(alpha * theta) * z2) / sin


def interpolate(
  schedule: diffusion.DiffusionSchedule,
  model_fn: ModelFn,
  rng: jax.Array,
  x_a: jnp.ndarray,
  x_b: jnp.ndarray,
  lambdas: jnp.ndarray,
  *,
  t: int,
  model_mean_type: str,
  model_var_type: str,
  **options,
) -> jnp.ndarray:
  """Interpolation of two images in the latent space at step t (paper §4.3, Fig. 8).

  Encodes x_a, x_b [H, W, C] with the stochastic encoder q(x_t | x_0) (shared noise), mixes
  x_t = (1 - lambda) x_t^a + lambda x_t^b for each of ``lambdas`` [K], and decodes with the
  reverse process from t (``options``: `AncestralOptions` fields). Returns [K, H, W, C].
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
  x_0, _ = ancestral_loop(
    schedule,
    model_fn,
    dec_key,
    mixed.shape,
    ModelSpec(model_mean_type, model_var_type),
    AncestralOptions(**options),
    x_init=mixed,
    start_t=t,
  )
  return x_0
