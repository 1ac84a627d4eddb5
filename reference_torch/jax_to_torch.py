"""ddpm_jax's parameters and random draws, carried over to the PyTorch reference.

With ``--draws=ddpm_jax`` reference_torch/torch_reference.py starts from ddpm_jax's initial
parameters for training.seed, trains on ddpm_jax's t, noise and flips of every step and
samples from ddpm_jax's x_T of every sampling batch. Both sides then run the same
computation on the same numbers, and what is left between them is the implementation
(operator order, float rounding), not the luck of the draws. ``equivalence`` measures that
directly: one set of parameters in both networks, the same inputs, compared outputs,
gradients and DDIM samples.

Imported only by the torch reference (it needs torch, diffusers and ddpm_jax).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from ddpm_jax import diffusion, factories, input_pipeline, pretrained, samplers
from ddpm_jax import rng as rng_lib
from ddpm_jax import train_state as train_state_lib
from ddpm_jax import train_step as train_step_lib


def torch_state_dict(params: Any, model: torch.nn.Module, config: Any) -> dict[str, torch.Tensor]:
  """ddpm_jax parameters (or any tree of their structure, e.g. gradients) as a state dict of
  ``model`` (a UNet2DModel of config's layout), by ddpm_jax.pretrained's mapping; every torch
  tensor is filled and every flax leaf used exactly once."""
  state = {k: torch.from_numpy(v) for k, v in pretrained.diffusers_tensors(params, config).items()}
  expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  if {k: tuple(v.shape) for k, v in state.items()} != expected:
    raise ValueError(
      f"ddpm_jax's tensors {sorted(set(state) ^ set(expected))[:3]} or their "
      "shapes do not match the torch model's"
    )
  return state


def load_into_torch(model: torch.nn.Module, params: Any, config: Any) -> None:
  model.load_state_dict(torch_state_dict(params, model, config), strict=True)


def initial_params(config: Any) -> Any:
  """The parameters main.py starts from for training.seed (train_state.create_train_state)."""
  state = train_state_lib.create_train_state(
    config, factories.create_model(config), train_state_lib.create_optimizer(config.training)
  )
  return jax.device_get(state.params)


def nhwc_to_torch(x: Any) -> torch.Tensor:
  return torch.from_numpy(np.array(x, np.float32)).permute(0, 3, 1, 2).contiguous()


class StepDraws:
  """t, noise and flips of each train step of main.py (train_step.example_noise and
  example_flips, keyed by (training.seed, step, global example index))."""

  def __init__(self, config: Any) -> None:
    size, channels = int(config.data.image_size), int(config.data.num_channels)
    batch, num_timesteps = int(config.training.batch_size), int(config.diffusion.num_timesteps)
    rng_data = jax.random.key_data(jax.random.key(int(config.training.seed)))

    def draw(step: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
      key = rng_lib.step_key(rng_data, step)
      t, noise = train_step_lib.example_noise(
        rng_lib.stream(key, rng_lib.StepStream.NOISE),
        jnp.int32(0),
        batch,
        (size, size, channels),
        num_timesteps,
      )
      flips = train_step_lib.example_flips(
        rng_lib.stream(key, rng_lib.StepStream.FLIP), jnp.int32(0), batch
      )
      return t, noise, flips

    self._draw = jax.jit(draw)

  def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t [B] long, noise [B, C, H, W] float32, flip [B] bool) of train step ``step``."""
    t, noise, flips = self._draw(jnp.int32(step))
    return (
      torch.from_numpy(np.array(t, np.int64)),
      nhwc_to_torch(noise),
      torch.from_numpy(np.array(flips)),
    )


def sample_init(config: Any, batch_index: int, num_devices: int) -> torch.Tensor:
  """x_T of sampling batch ``batch_index`` as generation.local_batches draws it on
  ``num_devices`` devices: device d takes fold_in(batch_key(seed, i), d), then the x_T key
  of samplers.base.noise_keys. Returns [sampling.batch_size, C, H, W]."""
  size, channels = int(config.data.image_size), int(config.data.num_channels)
  per_device = int(config.sampling.batch_size) // num_devices
  key = rng_lib.batch_key(int(config.sampling.seed), batch_index)
  parts = []
  for device in range(num_devices):
    init_key, _ = samplers.base.noise_keys(jax.random.fold_in(key, device))
    parts.append(jax.random.normal(init_key, (per_device, size, size, channels), jnp.float32))
  return nhwc_to_torch(np.concatenate(parts))


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def equivalence(
  config: Any,
  model: torch.nn.Module,
  params: Any,
  images: np.ndarray,
  ddim_batch: int,
  ddim_fn: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, Any]:
  """Loads ``params`` into ``model`` and compares, on the train batch ``images`` (uint8
  NHWC) with step 0's draws: the network outputs, the L_simple loss and its gradient
  (max abs difference, also relative to the largest gradient entry); then ``ddim_batch``
  DDIM samples (config.sampling's steps, eta 0, unclipped as the reference) from one x_T
  by ddpm_jax.sampling and by the torch DDIM ``ddim_fn(x_T)`` (NCHW)."""
  load_into_torch(model, params, config)
  jax_model = factories.create_model(config)

  def apply(p, x, t):
    return jax_model.apply({"params": p}, x, t, train=False)

  t, noise, _ = StepDraws(config)(0)
  schedule = factories.create_schedule(config.diffusion)
  x0 = np.asarray(input_pipeline.to_model_input(jnp.asarray(images)))
  t_np, noise_np = t.numpy().astype(np.int32), noise.permute(0, 2, 3, 1).numpy()
  x_t = np.asarray(
    diffusion.q_sample(schedule, jnp.asarray(x0), jnp.asarray(t_np), jnp.asarray(noise_np))
  )

  def jax_loss(p: Any) -> tuple[jnp.ndarray, jnp.ndarray]:
    out = apply(p, jnp.asarray(x_t), jnp.asarray(t_np))
    return jnp.mean((out - jnp.asarray(noise_np)) ** 2), out

  (loss_j, out_j), grads_j = jax.value_and_grad(jax_loss, has_aux=True)(params)
  model.train().zero_grad(set_to_none=True)
  out_t = model(nhwc_to_torch(x_t), t).sample
  loss_t = torch.nn.functional.mse_loss(out_t, noise)
  loss_t.backward()
  grads_t = {n: p.grad.numpy() for n, p in model.named_parameters()}
  grads_j = torch_state_dict(grads_j, model, config)
  grad_diff = max(_max_abs(grads_t[n], grads_j[n].numpy()) for n in grads_t)
  grad_scale = max(float(np.max(np.abs(g))) for g in grads_t.values())

  smp = config.sampling
  x_init = jax.random.normal(
    jax.random.key(int(smp.seed)), (ddim_batch,) + tuple(x0.shape[1:]), jnp.float32
  )
  x_jax = samplers.ddim_sample(
    schedule,
    lambda x, tt: apply(params, x, tt),
    jax.random.key(0),
    tuple(x_init.shape),
    num_steps=int(smp.ddim.num_steps),
    eta=0.0,
    model_mean_type="eps",
    clip_denoised=False,
    x_init=x_init,
  )
  model.eval()
  with torch.no_grad():
    x_torch = ddim_fn(nhwc_to_torch(x_init)).permute(0, 2, 3, 1).numpy()

  def to_uint8(x):
    return np.asarray(samplers.to_uint8(jnp.asarray(x)))

  return {
    "output_max_abs_diff": _max_abs(out_t.detach().permute(0, 2, 3, 1).numpy(), out_j),
    "output_max_abs": float(np.max(np.abs(np.asarray(out_j)))),
    "loss_jax": float(loss_j),
    "loss_torch": float(loss_t.detach()),
    "grad_max_abs_diff": grad_diff,
    "grad_max_abs": grad_scale,
    "grad_max_rel_diff": grad_diff / grad_scale,
    "ddim_samples": ddim_batch,
    "ddim_max_abs_diff": _max_abs(x_torch, x_jax),
    "ddim_mean_abs_diff": float(np.mean(np.abs(x_torch - np.asarray(x_jax)))),
    "ddim_uint8_pixels_differing": float(np.mean(to_uint8(x_torch) != to_uint8(x_jax))),
  }
