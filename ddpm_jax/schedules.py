"""Variance (beta) schedules of the forward process, computed in float64 NumPy.

The paper (Ho et al. 2020, §4) uses T=1000 betas increasing linearly from 1e-4 to 0.02;
the official code also ships quad, const, jsd, warmup10 and warmup50, reproduced here with
the same semantics. `cosine` is the schedule of Nichol & Dhariwal (2021, Eq. 17).
"""

from __future__ import annotations

import math

import numpy as np

SCHEDULE_NAMES = ("linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine")


def _warmup_betas(beta_start: float, beta_end: float, num_timesteps: int,
                  warmup_frac: float) -> np.ndarray:
  """beta_end everywhere, after a linear warm-up over the first `warmup_frac` of steps."""
  betas = np.full(num_timesteps, beta_end, dtype=np.float64)
  warmup_time = int(num_timesteps * warmup_frac)
  betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
  return betas


def _cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal (2021) Eq. 17: abar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2).

  beta_t = 1 - abar(t+1)/abar(t), clipped at `max_beta` to avoid the singularity at t=T.
  """
  steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  alphas_cumprod = np.cos((steps + s) / (1.0 + s) * math.pi / 2.0) ** 2
  betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
  return np.minimum(betas, max_beta)


def get_beta_schedule(name: str, num_timesteps: int, *, beta_start: float = 1e-4,
                      beta_end: float = 0.02) -> np.ndarray:
  """Returns the betas beta_1..beta_T of the forward process q(x_t|x_{t-1}) (paper Eq. 2).

  Args:
    name: one of SCHEDULE_NAMES. `linear` is the paper's schedule; `jsd` is
      1/T, 1/(T-1), ..., 1 (its last beta is exactly 1, as in the official code);
      `beta_start`/`beta_end` are ignored by `jsd` and `cosine`, and `const` uses `beta_end`.
    num_timesteps: T >= 1.
    beta_start, beta_end: endpoints of the linear-type schedules, in (0, 1].

  Returns:
    float64 array of shape [T], every value in (0, 1].
  """
  if name not in SCHEDULE_NAMES:
    raise ValueError(f"unknown beta schedule {name!r}; allowed: {', '.join(SCHEDULE_NAMES)}")
  if isinstance(num_timesteps, bool) or int(num_timesteps) != num_timesteps or num_timesteps < 1:
    raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
  num_timesteps = int(num_timesteps)
  for arg, value in (("beta_start", beta_start), ("beta_end", beta_end)):
    if not 0.0 < value <= 1.0:
      raise ValueError(f"{arg} must be in (0, 1], got {value!r}")

  if name == "linear":
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  elif name == "quad":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64)**2
  elif name == "const":
    betas = np.full(num_timesteps, beta_end, dtype=np.float64)
  elif name == "jsd":
    betas = 1.0 / np.linspace(num_timesteps, 1, num_timesteps, dtype=np.float64)
  elif name == "warmup10":
    betas = _warmup_betas(beta_start, beta_end, num_timesteps, 0.1)
  elif name == "warmup50":
    betas = _warmup_betas(beta_start, beta_end, num_timesteps, 0.5)
  else:  # cosine
    betas = _cosine_betas(num_timesteps)
  assert betas.shape == (num_timesteps,) and betas.dtype == np.float64
  return betas
