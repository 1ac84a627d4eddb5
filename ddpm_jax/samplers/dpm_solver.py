"""Multistep DPM-Solver++ (orders 1-3) for a discrete-time DDPM.

DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095) integrates the probability-flow ODE in the
half-log-SNR lambda = log(alpha_t / sigma_t), where its linear part is exact and only the
data prediction x_0(x_lambda, lambda) is approximated by a polynomial, extrapolated from the
previous steps' model outputs (multistep). Order 1 is DDIM with eta = 0.

The discrete-time model becomes a continuous one as in DPM-Solver (Lu et al. 2022, arXiv
2206.00927, §3.4) and the authors' NoiseScheduleVP('discrete'): log alpha_{t_n} =
0.5 sum_{k<=n} log(1 - beta_k) at t_n = (n + 1) / N, linear in t between knots (knots where
lambda < -5.1, the noisy tail of e.g. the cosine schedule, are dropped there and here, so N
is the count of knots kept, T for the linear schedule). The solve runs from t = 1 to 1/N.
The network, trained on the integer indices n in [0, T), is evaluated at (t - 1/N) N, which
is n at t_n; the authors' code feeds 1000 (t - 1/N), the same number only when N = 1000.

Precision: the tables and step coefficients are computed in x_T's dtype. In float32 this
is enough because sigma^2 = -expm1(2 log alpha) and log(1 - beta) = log1p(-beta) keep
their relative precision near t = 1/N, where 1 - exp(2 log alpha) ~ 1e-4 (as the authors
compute it) would lose 3 of float32's 7 digits. Run under `jax.enable_x64(True)` with a
float64 x_T for float64 throughout.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax.samplers import base
from ddpm_jax.samplers.base import ModelFn, ModelSpec

SPACINGS = ("logSNR", "time_uniform", "time_quadratic")
ORDERS = (1, 2, 3)
# The D_2 weight of the third-order step: the authors' code, or the Taylor expansion's.
THIRD_ORDER_WEIGHTS = ("reference", "taylor")
MEAN_TYPES = ("eps", "xstart", "v")  # 'xprev' has no x_0 at non-integer t.
# Knots with lambda below this are dropped (the authors' numerical_clip_alpha).
LAMBDA_CLIP = -5.1
# lower_order_final acts only below this many steps, as in the authors' code.
LOWER_ORDER_FINAL_BELOW = 10


class ContinuousSchedule(NamedTuple):
  """log alpha_t at the knots t_n = (n + 1) / N, n < N; knots past N (dropped) are unused."""

  t_knots: jnp.ndarray  # [T]
  log_alpha_knots: jnp.ndarray  # [T], decreasing
  num_knots: jnp.ndarray  # N <= T, int32 scalar


def _log_sigma(log_alpha: jnp.ndarray) -> jnp.ndarray:
  """log sigma_t = 0.5 log(1 - alpha_t^2), through expm1 (variance preserving)."""
  return 0.5 * jnp.log(-jnp.expm1(2.0 * log_alpha))


def continuous_schedule(
  schedule: diffusion.DiffusionSchedule, dtype: jnp.dtype
) -> ContinuousSchedule:
  """The knots of DPM-Solver §3.4: log alpha_{t_n} = 0.5 log abar_n at t_n = (n + 1) / N.

  N counts the knots with lambda >= LAMBDA_CLIP (all of them for the paper's linear
  schedule); it is traced, so the schedule may be a jit argument.
  """
  betas = schedule.betas.astype(dtype)
  log_alpha = 0.5 * jnp.cumsum(jnp.log1p(-betas))
  lambdas = log_alpha - _log_sigma(log_alpha)
  num_knots = jnp.sum(lambdas >= LAMBDA_CLIP).astype(jnp.int32)
  t_knots = jnp.arange(1, betas.shape[0] + 1, dtype=dtype) / num_knots.astype(dtype)
  return ContinuousSchedule(t_knots, log_alpha, num_knots)


def _interpolate(
  x: jnp.ndarray, xp: jnp.ndarray, yp: jnp.ndarray, first: jnp.ndarray, last: jnp.ndarray
) -> jnp.ndarray:
  """The piecewise-linear y(x) through the knots xp[first..last] (ascending), extended past
  both ends by the outer segments (as the authors' interpolate_fn)."""
  k = jnp.clip(jnp.searchsorted(xp, x, side="right") - 1, first, last - 1)
  return yp[k] + (x - xp[k]) * (yp[k + 1] - yp[k]) / (xp[k + 1] - xp[k])


def marginal_log_alpha(cs: ContinuousSchedule, t: jnp.ndarray) -> jnp.ndarray:
  """log alpha_t, linear in t between the knots."""
  return _interpolate(t, cs.t_knots, cs.log_alpha_knots, 0, cs.num_knots - 1)


def marginal_lambda(cs: ContinuousSchedule, t: jnp.ndarray) -> jnp.ndarray:
  """lambda_t = log alpha_t - log sigma_t (DPM-Solver §3.1)."""
  log_alpha = marginal_log_alpha(cs, t)
  return log_alpha - _log_sigma(log_alpha)


def inverse_lambda(cs: ContinuousSchedule, lam: jnp.ndarray) -> jnp.ndarray:
  """t(lambda): log alpha = -0.5 log(1 + e^{-2 lambda}), then t by the same piecewise-linear
  map read backwards (log alpha decreases in t, so -log alpha is the ascending axis)."""
  log_alpha = -0.5 * jnp.logaddexp(0.0, -2.0 * lam)
  return _interpolate(-log_alpha, -cs.log_alpha_knots, cs.t_knots, 0, cs.num_knots - 1)


def model_time(cs: ContinuousSchedule, t: jnp.ndarray) -> jnp.ndarray:
  """The network input (t - 1/N) N: the index n at the knot t_n = (n + 1) / N."""
  n = cs.num_knots.astype(t.dtype)
  return (t - 1.0 / n) * n


def time_grid(cs: ContinuousSchedule, num_steps: int, spacing: str) -> jnp.ndarray:
  """t_0 = 1 > t_1 > ... > t_M = 1/N, M = num_steps (DPM-Solver §3.3).

  logSNR: uniform in lambda (the authors' choice at 32x32); time_uniform: uniform in t (their
  choice at high resolution); time_quadratic: uniform in sqrt(t), squared.
  """
  dtype = cs.t_knots.dtype
  t_end, t_start = 1.0 / cs.num_knots.astype(dtype), jnp.ones((), dtype)
  if spacing == "logSNR":
    lam = jnp.linspace(marginal_lambda(cs, t_start), marginal_lambda(cs, t_end), num_steps + 1)
    return inverse_lambda(cs, lam)
  if spacing == "time_uniform":
    return jnp.linspace(t_start, t_end, num_steps + 1)
  return jnp.linspace(jnp.sqrt(t_start), jnp.sqrt(t_end), num_steps + 1) ** 2


def step_orders(order: int, num_steps: int, lower_order_final: bool) -> np.ndarray:
  """The order of steps 1..M: warm-up min(order, i) (the history holds i outputs), and with
  `lower_order_final` below LOWER_ORDER_FINAL_BELOW steps also min(order, M + 1 - i), as
  the authors' code (their stabilisation for few steps)."""
  i = np.arange(1, num_steps + 1)
  orders = np.minimum(order, i)
  if lower_order_final and num_steps < LOWER_ORDER_FINAL_BELOW:
    orders = np.minimum(orders, num_steps + 1 - i)
  return orders.astype(np.int32)


def first_order_weights(h: jnp.ndarray, alpha_t: jnp.ndarray) -> jnp.ndarray:
  """DPM-Solver++(1), i.e. DDIM: x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D_0,
  D_0 the data prediction at s (DPM-Solver++ §4, the exact solution with x_0 held fixed).

  Returns the weights of (m_0, m_1, m_2), the data predictions at the last three times.
  """
  zero = jnp.zeros_like(h)
  return jnp.stack([-alpha_t * jnp.expm1(-h), zero, zero], axis=-1)


def second_order_weights(h: jnp.ndarray, h_0: jnp.ndarray, alpha_t: jnp.ndarray) -> jnp.ndarray:
  """DPM-Solver++(2M) (DPM-Solver++ Alg. 2): D = (1 + 1/(2r)) m_0 - 1/(2r) m_1, r = h_0 / h,
  in place of D_0 in the first-order update."""
  half_over_r = 0.5 * h / h_0
  w = -alpha_t * jnp.expm1(-h)
  return jnp.stack([w * (1.0 + half_over_r), -w * half_over_r, jnp.zeros_like(h)], axis=-1)


def third_order_weights(
  h: jnp.ndarray, h_0: jnp.ndarray, h_1: jnp.ndarray, alpha_t: jnp.ndarray, d2_factor: float
) -> jnp.ndarray:
  """DPM-Solver++(3M): the second-order Taylor expansion of x_0 in lambda about s,
  integrated exactly against e^lambda (DPM-Solver++ §4, DPM-Solver §3.2):

    x_t = (sigma_t/sigma_s) x_s - alpha_t phi_1 m_0 + alpha_t phi_2 D_1 - c alpha_t phi_3 D_2,

  phi_1 = e^{-h} - 1, phi_2 = phi_1/h + 1, phi_3 = phi_2/h - 1/2; D_1 ~ h x_0' and
  D_2 ~ h^2 x_0''/2 are divided differences of m_0, m_1, m_2 (step ratios r_k = h_k / h).
  c = ``d2_factor``: 2 is the Taylor coefficient, exact when x_0 is quadratic in lambda (a
  third-order method); the authors' code (3M is not in the paper) and diffusers use 1, half
  of it, which leaves an O(h^3) local error.
  """
  r_0, r_1 = h_0 / h, h_1 / h
  basis = jnp.eye(3, dtype=h.dtype)  # m_0, m_1, m_2 as weight vectors.
  d1_0 = (basis[0] - basis[1]) / r_0[..., None]
  d1_1 = (basis[1] - basis[2]) / r_1[..., None]
  d_1 = d1_0 + (r_0 / (r_0 + r_1))[..., None] * (d1_0 - d1_1)
  d_2 = (d1_0 - d1_1) / (r_0 + r_1)[..., None]
  phi_1 = jnp.expm1(-h)
  phi_2 = phi_1 / h + 1.0
  phi_3 = phi_2 / h - 0.5
  a = alpha_t[..., None]
  return (
    -a * phi_1[..., None] * basis[0]
    + a * phi_2[..., None] * d_1
    - d2_factor * a * phi_3[..., None] * d_2
  )


class _StepTables(NamedTuple):
  """Per step i = 1..M of the scan (from t_{i-1} to t_i)."""

  model_time: jnp.ndarray  # [M] network input at t_{i-1}
  alpha_s: jnp.ndarray  # [M] alpha_{t_{i-1}}
  sigma_s: jnp.ndarray  # [M] sigma_{t_{i-1}}
  ratio: jnp.ndarray  # [M] sigma_{t_i} / sigma_{t_{i-1}}
  weights: jnp.ndarray  # [M, order] weights of (m_0, ..., m_{order-1})


def _step_tables(
  cs: ContinuousSchedule, t: jnp.ndarray, orders: np.ndarray, order: int, d2_factor: float
) -> _StepTables:
  """The coefficients of every step, computed before the scan from the grid t [M + 1].

  Two lambdas before t_0 are extrapolated so that the (unused) higher-order weights of the
  warm-up steps stay finite.
  """
  log_alpha = marginal_log_alpha(cs, t)
  lam = log_alpha - _log_sigma(log_alpha)
  alpha, sigma = jnp.exp(log_alpha), jnp.exp(_log_sigma(log_alpha))
  pad = lam[0] - (lam[1] - lam[0]) * jnp.arange(2, 0, -1, dtype=lam.dtype)
  h_all = jnp.diff(jnp.concatenate([pad, lam]))  # h_all[i + 1] = lam_i - lam_{i-1}
  h, h_0, h_1, alpha_t = h_all[2:], h_all[1:-1], h_all[:-2], alpha[1:]
  by_order = (
    first_order_weights(h, alpha_t),
    second_order_weights(h, h_0, alpha_t),
    third_order_weights(h, h_0, h_1, alpha_t, d2_factor),
  )
  o = jnp.asarray(orders)[:, None]
  weights = jnp.where(o == 1, by_order[0], jnp.where(o == 2, by_order[1], by_order[2]))
  return _StepTables(
    model_time(cs, t[:-1]), alpha[:-1], sigma[:-1], sigma[1:] / sigma[:-1], weights[:, :order]
  )


def to_data_prediction(
  mean_output: jnp.ndarray,
  x_t: jnp.ndarray,
  alpha_t: jnp.ndarray,
  sigma_t: jnp.ndarray,
  model_mean_type: str,
) -> jnp.ndarray:
  """x_0 from the network's mean output at continuous t, x_t = alpha_t x_0 + sigma_t eps.

  eps: (x_t - sigma_t eps) / alpha_t; xstart: the output; v (Salimans & Ho 2022, §4):
  alpha_t x_t - sigma_t v.
  """
  if model_mean_type == "eps":
    return (x_t - sigma_t * mean_output) / alpha_t
  if model_mean_type == "xstart":
    return mean_output
  if model_mean_type == "v":
    return alpha_t * x_t - sigma_t * mean_output
  raise ValueError(_mean_type_error(model_mean_type))


def _mean_type_error(model_mean_type: str) -> str:
  return (
    f"model_mean_type={model_mean_type!r} has no x_0 at the non-integer times "
    f"DPM-Solver visits; allowed: {', '.join(MEAN_TYPES)}."
  )


def dynamic_threshold(x0: jnp.ndarray, quantile: float, max_value: float) -> jnp.ndarray:
  """Dynamic thresholding (Saharia et al. 2022, §2.3; DPM-Solver++ §4): per example
  s = max(quantile of |x_0|, max_value), then x_0 = clip(x_0, -s, s) / s."""
  flat = jnp.abs(x0).reshape(x0.shape[0], -1)
  s = jnp.maximum(jnp.quantile(flat, quantile, axis=1), max_value)
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
  return jnp.clip(x0, -s, s) / s


@dataclasses.dataclass(frozen=True)
class DPMSolverOptions:
  """Multistep DPM-Solver++ (data prediction, the authors' 'dpmsolver' update type).

  num_steps: M solver steps, M network calls (none after the last step); order: 1-3, the
    first steps use lower orders while the history fills up; spacing: the time grid, one of
    SPACINGS; lower_order_final: lower orders in the last steps, only when M < 10 (as the
    authors' code); denoise_to_zero: one more call, returning the x_0 prediction at t = 1/N;
    thresholding: dynamic thresholding of every x_0 prediction at `threshold_quantile` of
    |x_0| with the floor `threshold_max`; third_order: the D_2 weight of order 3,
    "reference" (the authors' code and diffusers) or "taylor" (`third_order_weights`).
  """

  method: ClassVar[str] = "dpm_solver"
  num_steps: int = 20
  order: int = 2
  spacing: str = "logSNR"
  lower_order_final: bool = True
  denoise_to_zero: bool = False
  thresholding: bool = False
  threshold_quantile: float = 0.995
  threshold_max: float = 1.0
  third_order: str = "reference"

  def check(self, num_timesteps: int, spec: ModelSpec) -> None:
    """ValueError with one line naming the field, its value and what is allowed."""
    base.check_int("order", self.order, 1, max(ORDERS))
    base.check_int("num_steps", self.num_steps, 1)
    if self.num_steps < self.order:
      raise ValueError(
        f"num_steps={self.num_steps} must be >= order={self.order} (a "
        "multistep solver of order k needs k steps)."
      )
    base.check_choice("spacing", self.spacing, SPACINGS)
    base.check_choice("third_order", self.third_order, THIRD_ORDER_WEIGHTS)
    if not 0.0 < self.threshold_quantile <= 1.0:
      raise ValueError(f"threshold_quantile={self.threshold_quantile!r} must lie in (0, 1].")
    base.check_positive("threshold_max", self.threshold_max)
    if num_timesteps < 2:
      raise ValueError(
        f"DPM-Solver needs a schedule of T >= 2 timesteps (log alpha is "
        f"interpolated between them), got T={num_timesteps}."
      )
    if spec.mean_type not in MEAN_TYPES:
      raise ValueError(_mean_type_error(spec.mean_type))

  def nfe(self, num_timesteps: int) -> int:
    """Network evaluations per sample: num_steps, plus one for denoise_to_zero."""
    del num_timesteps
    return self.num_steps + int(self.denoise_to_zero)

  def sample(
    self,
    schedule: diffusion.DiffusionSchedule,
    model_fn: ModelFn,
    rng: jax.Array,
    shape: tuple[int, ...],
    spec: ModelSpec,
  ) -> jnp.ndarray:
    """Solves from x_T ~ N(0, I), drawn from rng's x_T stream (base.py)."""
    return self.solve(schedule, model_fn, base.initial_noise(rng, shape), spec)

  def solve(
    self,
    schedule: diffusion.DiffusionSchedule,
    model_fn: ModelFn,
    x_T: jnp.ndarray,
    spec: ModelSpec,
  ) -> jnp.ndarray:
    """Solves the probability-flow ODE from x_T at t = 1 to t = 1/N in one lax.scan.

    `model_fn(x, t)` gets t in x_T's float dtype, shape [B], on the scale of the training
    indices ((t - 1/N) N, see the module docstring). Returns x at t = 1/N, or the x_0
    prediction there with denoise_to_zero.
    """
    self.check(schedule.num_timesteps, spec)
    if x_T.ndim < 2 or not jnp.issubdtype(x_T.dtype, jnp.floating):
      raise ValueError(f"x_T must be a floating [B, ...] array, got {x_T.dtype} {x_T.shape}")
    dtype = x_T.dtype
    cs = continuous_schedule(schedule, dtype)
    t = time_grid(cs, self.num_steps, self.spacing)
    tables = _step_tables(
      cs,
      t,
      step_orders(self.order, self.num_steps, self.lower_order_final),
      self.order,
      2.0 if self.third_order == "taylor" else 1.0,
    )

    def data_prediction(x, t_model, alpha, sigma):
      out = model_fn(x, jnp.full((x.shape[0],), t_model, dtype))
      x0 = to_data_prediction(
        spec.mean_output(out, x).astype(dtype), x, alpha, sigma, spec.mean_type
      )
      if self.thresholding:
        x0 = dynamic_threshold(x0, self.threshold_quantile, self.threshold_max)
      return x0

    def step(carry, step_tables: _StepTables):
      x, history = carry  # history[k] = m_k, the data prediction k steps back.
      m = data_prediction(x, step_tables.model_time, step_tables.alpha_s, step_tables.sigma_s)
      history = jnp.concatenate([m[None], history[:-1]], axis=0)
      x = step_tables.ratio * x + jnp.tensordot(step_tables.weights, history, axes=1)
      return (x, history), None

    history = jnp.zeros((self.order,) + x_T.shape, dtype)
    (x, _), _ = jax.lax.scan(step, (x_T, history), tables)
    if self.denoise_to_zero:
      log_alpha = marginal_log_alpha(cs, t[-1])
      x = data_prediction(
        x, model_time(cs, t[-1]), jnp.exp(log_alpha), jnp.exp(_log_sigma(log_alpha))
      )
    return x


def dpm_solver_sample(
  schedule: diffusion.DiffusionSchedule,
  model_fn: ModelFn,
  x_T: jnp.ndarray,
  *,
  num_steps: int,
  model_mean_type: str = "eps",
  model_var_type: str = "fixedlarge",
  **options,
) -> jnp.ndarray:
  """Multistep DPM-Solver++ from x_T (t = 1) to t = 1/N; ``options`` are the other fields of
  `DPMSolverOptions` (order=2, spacing="logSNR", lower_order_final, denoise_to_zero,
  thresholding, threshold_quantile, threshold_max, third_order), with its defaults. A
  learned variance output [mean | var] is split off and ignored."""
  return DPMSolverOptions(num_steps=num_steps, **options).solve(
    schedule, model_fn, x_T, ModelSpec(model_mean_type, model_var_type)
  )
