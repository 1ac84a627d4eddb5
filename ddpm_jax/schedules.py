"""Variance (beta) schedules of the forward process and the tables derived from them.

The paper (Ho et al. 2020, §4) uses T=1000 betas increasing linearly from 1e-4 to 0.02;
the official code also ships quad, const, jsd, warmup10 and warmup50, reproduced here with
the same semantics. `cosine` is the schedule of Nichol & Dhariwal (2021, Eq. 17). Betas and
every table of `DiffusionSchedule` are computed in float64 NumPy and stored as float32.
"""

from __future__ import annotations

import math

import flax.struct
import jax.numpy as jnp
import numpy as np

SCHEDULE_NAMES = ("linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine")


def _warmup_betas(
  beta_start: float, beta_end: float, num_timesteps: int, warmup_frac: float
) -> np.ndarray:
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


def get_beta_schedule(
  name: str, num_timesteps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
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
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
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


@flax.struct.dataclass
class DiffusionSchedule:
  """Every table of the forward process and its posterior, one entry per timestep.

  Computed in float64 by `from_betas` and stored as float32 arrays of shape [T]. Names
  follow the paper and the official code; abar_t = alphas_cumprod[t].
  """

  betas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  alphas_cumprod_prev: jnp.ndarray
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray
  log_one_minus_alphas_cumprod: jnp.ndarray
  sqrt_recip_alphas_cumprod: jnp.ndarray
  sqrt_recipm1_alphas_cumprod: jnp.ndarray
  posterior_variance: jnp.ndarray
  posterior_log_variance_clipped: jnp.ndarray
  posterior_mean_coef1: jnp.ndarray
  posterior_mean_coef2: jnp.ndarray
  # 'fixedlarge' model variance: beta_t, with log-variance log(beta~_1) at t=0.
  fixedlarge_log_variance: jnp.ndarray
  log_betas: jnp.ndarray

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  @classmethod
  def from_betas(cls, betas: np.ndarray) -> DiffusionSchedule:
    """Derives every table from betas (paper Eq. 4, 6, 7), in float64, stored as float32.

    Args:
      betas: shape [T], T >= 1, each in (0, 1]. A beta of exactly 1 (the last step of the
        `jsd` schedule) is allowed, as in the official code.
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 1:
      raise ValueError(f"betas must be a 1-D array with T >= 1 entries, got shape {betas.shape}")
    if not np.all((betas > 0.0) & (betas <= 1.0)):
      bad = betas[~((betas > 0.0) & (betas <= 1.0))][0]
      raise ValueError(f"betas must lie in (0, 1], found {bad!r}")
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    with np.errstate(divide="ignore"):
      # Eq. 7: beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t); beta~_1 = 0.
      posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
      # log(0) at t=0 is replaced by log(beta~ at the paper's t=2); with T=1 there is no
      # such entry and beta_1 stands in.
      first = posterior_variance[1] if betas.shape[0] > 1 else betas[0]
      posterior_log_variance_clipped = np.log(np.append(first, posterior_variance[1:]))
      fixedlarge_log_variance = np.log(np.append(first, betas[1:]))
      tables = dict(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        # Eq. 7: mu~_t = coef1 x_0 + coef2 x_t.
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        fixedlarge_log_variance=fixedlarge_log_variance,
        log_betas=np.log(betas),
      )
    return cls(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()})
