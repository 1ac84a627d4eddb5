"""The PyTorch reference's noise schedule and DDIM sampler (reference_torch/torch_reference.py).

The grid and formulas are those of ddpm_jax.sampling.ddim_sample: timesteps 0, T/S, 2T/S,
..., final alpha 1, x0 optionally clipped with eps re-derived from it; samples quantized
as round((x + 1) * 127.5). diffusers' DDIMScheduler is kept as a cross-check.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def alphas_cumprod(diffusion: Any) -> torch.Tensor:
  """abar_t of the linear schedule (the paper's), computed in float64."""
  if diffusion.beta_schedule != "linear":
    raise ValueError(f"diffusion.beta_schedule={diffusion.beta_schedule!r}: only 'linear'.")
  if diffusion.model_mean_type != "eps" or diffusion.loss_type != "mse":
    raise ValueError("only model_mean_type='eps' with loss_type='mse' (L_simple) is mapped.")
  betas = np.linspace(
    float(diffusion.beta_start),
    float(diffusion.beta_end),
    int(diffusion.num_timesteps),
    dtype=np.float64,
  )
  return torch.from_numpy(np.cumprod(1.0 - betas))


def ddim_grid(num_timesteps: int, num_steps: int) -> list[int]:
  """0, k, 2k, ... (k = T // S, S values): range(0, T, T // S) when S divides T."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"DDIM num_steps={num_steps} must lie in [1, T={num_timesteps}].")
  return [i * (num_timesteps // num_steps) for i in range(num_steps)]


@torch.no_grad()
def ddim_own(
  model: torch.nn.Module,
  x: torch.Tensor,
  abar: torch.Tensor,
  num_steps: int,
  eta: float,
  clip_x0: bool,
  generator: torch.Generator,
) -> torch.Tensor:
  """DDIM (Song et al. 2021, Eq. 12) from x_T = x over the grid; with clip_x0 the x0
  estimate is clipped to [-1, 1] and eps re-derived from it (as ddpm_jax.sampling)."""
  grid = ddim_grid(abar.shape[0], num_steps)
  for i in reversed(range(len(grid))):
    a_t = float(abar[grid[i]])
    a_s = float(abar[grid[i - 1]]) if i > 0 else 1.0
    eps = model(x, torch.full((x.shape[0],), grid[i], dtype=torch.long)).sample
    x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    if clip_x0:
      x0 = x0.clamp(-1.0, 1.0)
      eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1.0 - a_t)
    sigma = eta * math.sqrt((1.0 - a_s) / (1.0 - a_t)) * math.sqrt(1.0 - a_t / a_s)
    x = math.sqrt(a_s) * x0 + math.sqrt(max(1.0 - a_s - sigma**2, 0.0)) * eps
    if sigma > 0:
      x = x + sigma * torch.randn(x.shape, generator=generator)
  return x


@torch.no_grad()
def ddim_diffusers(
  model: torch.nn.Module,
  x: torch.Tensor,
  diffusion: Any,
  num_steps: int,
  eta: float,
  clip_x0: bool,
  generator: torch.Generator,
) -> torch.Tensor:
  """The same DDIM through diffusers' DDIMScheduler ('leading' grid 0, k, ..., final
  alpha 1, eps re-derived from the clipped x0)."""
  from diffusers import DDIMScheduler

  scheduler = DDIMScheduler(
    num_train_timesteps=int(diffusion.num_timesteps),
    beta_start=float(diffusion.beta_start),
    beta_end=float(diffusion.beta_end),
    beta_schedule="linear",
    clip_sample=clip_x0,
    set_alpha_to_one=True,
    steps_offset=0,
    prediction_type="epsilon",
    timestep_spacing="leading",
  )
  scheduler.set_timesteps(num_steps)
  for t in scheduler.timesteps:
    eps = model(x, t.expand(x.shape[0])).sample
    x = scheduler.step(
      eps, t, x, eta=eta, use_clipped_model_output=clip_x0, generator=generator
    ).prev_sample
  return x


def to_uint8(x: torch.Tensor) -> np.ndarray:
  """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C], round((x + 1) * 127.5) clipped."""
  pixels = torch.clamp(torch.round((x + 1.0) * 127.5), 0, 255).to(torch.uint8)
  return pixels.permute(0, 2, 3, 1).numpy()


def generate(
  model: torch.nn.Module,
  config: Any,
  sampler: str,
  x_init: Callable[[int], torch.Tensor] | None = None,
) -> np.ndarray:
  """config.sampling.num_samples uint8 samples, in batches of sampling.batch_size; x_T of
  batch i is x_init(i) (jax_to_torch.sample_init) if given, else from a torch generator."""
  smp, data = config.sampling, config.data
  if smp.method != "ddim":
    raise ValueError(f"sampling.method={smp.method!r}: this reference samples with 'ddim'.")
  abar = alphas_cumprod(config.diffusion)
  generator = torch.Generator().manual_seed(int(smp.seed))
  shape = (int(data.num_channels), int(data.image_size), int(data.image_size))
  out, remaining = [], int(smp.num_samples)
  while remaining > 0:
    n = min(remaining, int(smp.batch_size))
    x = torch.randn((n,) + shape, generator=generator) if x_init is None else x_init(len(out))[:n]
    if sampler == "own":
      x = ddim_own(
        model,
        x,
        abar,
        int(smp.ddim.num_steps),
        float(smp.ddim.eta),
        bool(smp.ddim.clip_denoised),
        generator,
      )
    else:
      x = ddim_diffusers(
        model,
        x,
        config.diffusion,
        int(smp.ddim.num_steps),
        float(smp.ddim.eta),
        bool(smp.ddim.clip_denoised),
        generator,
      )
    out.append(to_uint8(x))
    remaining -= n
  return np.concatenate(out)
