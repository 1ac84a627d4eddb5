"""What every sampler shares: the meaning of the network's output, the sample shape, the
random streams, the options interface and the quantisation of samples to pixels.

Random streams (a reproducibility contract: changing one changes the samples): a sampler
draws x_T from ``split(rng)[0]`` and the noise of its step at timestep t from
``fold_in(split(rng)[1], t)``, so the same rng gives the same draws however the loop is
compiled, and samplers built from the same single steps give the same samples.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion
from ddpm_jax.diffusion import ModelFn


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What the network's output means (paper §3.2): its mean parameterisation (eps, xstart,
  xprev or v) and its variance type; learned variances append C channels [mean | var].

  The one object that carries the pair through the samplers; its methods call the core
  functions of `ddpm_jax.diffusion` with it.
  """

  mean_type: str = "eps"
  var_type: str = "fixedlarge"

  def __post_init__(self) -> None:
    check_choice("model_mean_type", self.mean_type, diffusion.MEAN_TYPES)
    check_choice("model_var_type", self.var_type, diffusion.VAR_TYPES)

  def p_mean_variance(
    self,
    schedule: diffusion.DiffusionSchedule,
    model_output: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    *,
    clip_denoised: bool,
  ) -> dict[str, jnp.ndarray]:
    """`diffusion.p_mean_variance`: the reverse step p_theta(x_{t-1} | x_t)."""
    return diffusion.p_mean_variance(
      schedule,
      model_output,
      x_t,
      t,
      model_mean_type=self.mean_type,
      model_var_type=self.var_type,
      clip_denoised=clip_denoised,
    )

  def mean_output(self, model_output: jnp.ndarray, x_t: jnp.ndarray) -> jnp.ndarray:
    """The mean part of the output (a learned variance's channels dropped)."""
    return diffusion.split_model_output(model_output, x_t, model_var_type=self.var_type)[0]

  def pred_xstart(
    self,
    schedule: diffusion.DiffusionSchedule,
    model_output: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
  ) -> jnp.ndarray:
    """The x_0 the output implies at integer t, unclipped (`diffusion.predict_xstart`)."""
    return diffusion.predict_xstart(
      schedule, self.mean_output(model_output, x_t), x_t, t, model_mean_type=self.mean_type
    )

  def score(
    self,
    schedule: diffusion.DiffusionSchedule,
    model_output: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
  ) -> jnp.ndarray:
    """grad_x log q(x_t) implied by the output (`diffusion.score`)."""
    return diffusion.score(
      schedule, model_output, x_t, t, model_mean_type=self.mean_type, model_var_type=self.var_type
    )


class SamplerOptions(Protocol):
  """One sampling method's settings, a frozen dataclass whose field defaults are the
  method's defaults (written once, there). ``method`` is its name in config.sampling.method;
  a field holding another method's options (the predictor of "pc") is configured by that
  method's name and group."""

  method: ClassVar[str]

  def check(self, num_timesteps: int, spec: ModelSpec) -> None:
    """ValueError naming the first bad field, its value and what is allowed (or what of
    the model ``spec`` the method cannot sample)."""

  def nfe(self, num_timesteps: int) -> int:
    """Network evaluations per sample."""

  def sample(
    self,
    schedule: diffusion.DiffusionSchedule,
    model_fn: ModelFn,
    rng: jax.Array,
    shape: tuple[int, ...],
    spec: ModelSpec,
  ) -> jnp.ndarray:
    """Samples x_0 of ``shape`` from x_T drawn from ``rng`` (the streams above)."""


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is unknown; allowed: {', '.join(allowed)}.")


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
  """An int in [minimum, maximum] (no upper bound when None); bools are refused."""
  ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if ok and value >= minimum and (maximum is None or value <= maximum):
    return
  what = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
  raise ValueError(f"{name}={value!r} must be an integer {what}.")


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
  """A real number > 0 (or >= 0)."""
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
  if not ok or not (value >= 0 if allow_zero else value > 0):
    raise ValueError(f"{name}={value!r} must be {'>=' if allow_zero else '>'} 0.")


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


def initial_noise(
  rng: jax.Array, shape: tuple[int, ...], x_init: jnp.ndarray | None = None
) -> jnp.ndarray:
  """x_T ~ N(0, I) from rng's x_T stream, or ``x_init`` (checked against ``shape``)."""
  if x_init is None:
    return jax.random.normal(noise_keys(rng)[0], shape, jnp.float32)
  if tuple(x_init.shape) != shape:
    raise ValueError(f"x_init shape {tuple(x_init.shape)} != sample shape {shape}.")
  return jnp.asarray(x_init, jnp.float32)


def step_noise(step_key: jax.Array, t: jnp.ndarray, shape: tuple[int, ...]) -> jnp.ndarray:
  """z ~ N(0, I) of the step at timestep t (a scalar, traced inside the loop)."""
  return jax.random.normal(jax.random.fold_in(step_key, t), shape, jnp.float32)


def batch_timesteps(t: jnp.ndarray, batch: int) -> jnp.ndarray:
  """The scalar timestep t as the int32 [B] array the model and the core take."""
  return jnp.full((batch,), t, jnp.int32)


def to_uint8(x: jnp.ndarray) -> jnp.ndarray:
  """Quantizes samples in [-1, 1] to uint8 pixels, round((x + 1) * 127.5) clipped to 0..255."""
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
