"""Builders shared by every mode: the diffusion schedule, the U-Net and its model_fn.

Training, sampling and evaluation all build the network and the schedule here, and call
the network through `model_fn`, the ``(x_t, t) -> output`` closure the core expects.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from ddpm_jax import diffusion, samplers, schedules
from ddpm_jax.models import unet as unet_lib


def create_schedule(diffusion_config: ml_collections.ConfigDict) -> schedules.DiffusionSchedule:
  """The tables of config.diffusion's beta schedule (paper §2, Eq. 4-7)."""
  betas = schedules.get_beta_schedule(
    diffusion_config.beta_schedule,
    int(diffusion_config.num_timesteps),
    beta_start=float(diffusion_config.beta_start),
    beta_end=float(diffusion_config.beta_end),
  )
  return schedules.DiffusionSchedule.from_betas(betas)


def create_model_spec(diffusion_config: ml_collections.ConfigDict) -> samplers.ModelSpec:
  """What the network of config.diffusion outputs: its mean and variance types."""
  return samplers.ModelSpec(
    str(diffusion_config.model_mean_type), str(diffusion_config.model_var_type)
  )


def create_model(config: ml_collections.ConfigDict) -> unet_lib.UNet:
  """The U-Net of config.model for config.data's images; 2C output channels when the
  variance is learned ([mean | variance])."""
  channels = int(config.data.num_channels)
  learned = config.diffusion.model_var_type in diffusion.LEARNED_VAR_TYPES
  return unet_lib.create_model(
    config.model,
    image_size=int(config.data.image_size),
    num_channels=channels,
    out_ch=channels * (2 if learned else 1),
  )


def model_fn(
  model: unet_lib.UNet, params: Any, *, dropout_rng: jax.Array | None = None
) -> diffusion.ModelFn:
  """``(x_t, t) -> model output`` of ``model`` with ``params``; training mode (dropout on,
  drawing from ``dropout_rng``) when a dropout key is given, inference mode otherwise."""
  if dropout_rng is None:
    return lambda x_t, t: model.apply({"params": params}, x_t, t, train=False)
  return lambda x_t, t: model.apply(
    {"params": params}, x_t, t, train=True, rngs={"dropout": dropout_rng}
  )
