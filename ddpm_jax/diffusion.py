"""The pure-functional diffusion core of DDPM (Ho, Jain, Abbeel 2020).

Every function takes a `DiffusionSchedule` (a pytree of precomputed tables) and arrays,
and is safe under jit, vmap, pmap, grad and scan. Timesteps `t` are int32 of shape [B] in
[0, T): t=0 is the paper's t=1. Images are float NHWC (any rank >= 1 per example works).
Argument validation happens at trace time, from static shapes and names only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ddpm_jax.likelihoods import (  # noqa: F401 (re-export)
  approx_standard_normal_cdf,
  discretized_gaussian_log_likelihood,
  mean_flat,
  normal_kl,
)
from ddpm_jax.schedules import DiffusionSchedule

MEAN_TYPES = ("eps", "xstart", "xprev", "v")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LOSS_TYPES = ("mse", "kl", "hybrid")
LEARNED_VAR_TYPES = ("learned", "learned_range")

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def _check_choice(kind: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(allowed)}")


def _check_t(t: jnp.ndarray, x: jnp.ndarray) -> None:
  if t.ndim != 1 or t.shape[0] != x.shape[0]:
    raise ValueError(
      f"t must have shape [B]=[{x.shape[0]}] to match x of shape {x.shape}, got {t.shape}"
    )
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise ValueError(f"t must be an integer array (int32 timesteps in [0, T)), got {t.dtype}")


def _check_same_shape(name_a: str, a: jnp.ndarray, name_b: str, b: jnp.ndarray) -> None:
  if a.shape != b.shape:
    raise ValueError(f"{name_a} shape {a.shape} must equal {name_b} shape {b.shape}")


def _extract(table: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
  """table[t] reshaped to [B, 1, ..., 1] so it broadcasts against a rank-`ndim` batch."""
  return table[t].reshape(t.shape + (1,) * (ndim - 1))


def q_mean_variance(
  schedule: DiffusionSchedule, x_start: jnp.ndarray, t: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Mean, variance and log-variance of q(x_t | x_0) = N(sqrt(abar_t) x_0, (1-abar_t) I) (Eq. 4)."""
  _check_t(t, x_start)
  mean = _extract(schedule.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
  variance = jnp.broadcast_to(
    _extract(1.0 - schedule.alphas_cumprod, t, x_start.ndim), x_start.shape
  )
  log_variance = jnp.broadcast_to(
    _extract(schedule.log_one_minus_alphas_cumprod, t, x_start.ndim), x_start.shape
  )
  return mean, variance, log_variance


def q_sample(
  schedule: DiffusionSchedule, x_start: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray
) -> jnp.ndarray:
  """Draws x_t ~ q(x_t | x_0) by reparameterisation: sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
  (Eq. 4)."""
  _check_t(t, x_start)
  _check_same_shape("noise", noise, "x_start", x_start)
  return (
    _extract(schedule.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
    + _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise
  )


def q_posterior_mean_variance(
  schedule: DiffusionSchedule, x_start: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Eq. 6-7)."""
  _check_same_shape("x_start", x_start, "x_t", x_t)
  _check_t(t, x_t)
  mean = (
    _extract(schedule.posterior_mean_coef1, t, x_t.ndim) * x_start
    + _extract(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t
  )
  variance = jnp.broadcast_to(_extract(schedule.posterior_variance, t, x_t.ndim), x_t.shape)
  log_variance = jnp.broadcast_to(
    _extract(schedule.posterior_log_variance_clipped, t, x_t.ndim), x_t.shape
  )
  return mean, variance, log_variance


def predict_xstart_from_eps(
  schedule: DiffusionSchedule, x_t: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray
) -> jnp.ndarray:
  """x_0 = (x_t - sqrt(1-abar_t) eps) / sqrt(abar_t), the inverse of Eq. 4 (cf. Eq. 15)."""
  _check_same_shape("eps", eps, "x_t", x_t)
  _check_t(t, x_t)
  return (
    _extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
    - _extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
  )


def predict_eps_from_xstart(
  schedule: DiffusionSchedule, x_t: jnp.ndarray, t: jnp.ndarray, pred_xstart: jnp.ndarray
) -> jnp.ndarray:
  """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1/abar_t - 1), Eq. 4 solved for eps."""
  _check_same_shape("pred_xstart", pred_xstart, "x_t", x_t)
  _check_t(t, x_t)
  return (_extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - pred_xstart) / _extract(
    schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim
  )


def predict_xstart_from_xprev(
  schedule: DiffusionSchedule, x_t: jnp.ndarray, t: jnp.ndarray, xprev: jnp.ndarray
) -> jnp.ndarray:
  """x_0 = (mu~_t - coef2 x_t) / coef1: Eq. 7 solved for x_0, given the posterior mean."""
  _check_same_shape("xprev", xprev, "x_t", x_t)
  _check_t(t, x_t)
  return (
    _extract(1.0 / schedule.posterior_mean_coef1, t, x_t.ndim) * xprev
    - _extract(schedule.posterior_mean_coef2 / schedule.posterior_mean_coef1, t, x_t.ndim) * x_t
  )


def predict_xstart_from_v(
  schedule: DiffusionSchedule, x_t: jnp.ndarray, t: jnp.ndarray, v: jnp.ndarray
) -> jnp.ndarray:
  """x_0 = sqrt(abar_t) x_t - sqrt(1-abar_t) v, for v = sqrt(abar_t) eps - sqrt(1-abar_t) x_0.

  The v-parameterisation of Salimans & Ho (2022, §4).
  """
  _check_same_shape("v", v, "x_t", x_t)
  _check_t(t, x_t)
  return (
    _extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
    - _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v
  )


def v_target(
  schedule: DiffusionSchedule, x_start: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray
) -> jnp.ndarray:
  """v = sqrt(abar_t) eps - sqrt(1-abar_t) x_0 (Salimans & Ho 2022, §4)."""
  _check_same_shape("noise", noise, "x_start", x_start)
  _check_t(t, x_start)
  return (
    _extract(schedule.sqrt_alphas_cumprod, t, x_start.ndim) * noise
    - _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * x_start
  )


def predict_xstart(
  schedule: DiffusionSchedule,
  mean_output: jnp.ndarray,
  x_t: jnp.ndarray,
  t: jnp.ndarray,
  *,
  model_mean_type: str,
) -> jnp.ndarray:
  """The x_0 implied by the network's mean output for each parameterisation (unclipped).

  eps: Eq. 4 inverted (cf. Eq. 15); xstart: the output itself; xprev: Eq. 7 inverted; v:
  Salimans & Ho (2022). The one dispatch on model_mean_type used by the posterior, the
  losses and DDIM.
  """
  _check_choice("model_mean_type", model_mean_type, MEAN_TYPES)
  if model_mean_type == "eps":
    return predict_xstart_from_eps(schedule, x_t, t, mean_output)
  if model_mean_type == "xstart":
    return mean_output
  if model_mean_type == "xprev":
    return predict_xstart_from_xprev(schedule, x_t, t, mean_output)
  return predict_xstart_from_v(schedule, x_t, t, mean_output)


def mean_target(
  schedule: DiffusionSchedule,
  x_start: jnp.ndarray,
  x_t: jnp.ndarray,
  t: jnp.ndarray,
  noise: jnp.ndarray,
  *,
  model_mean_type: str,
) -> jnp.ndarray:
  """What the network's mean output should be at (x_t, t): the target of L_simple (Eq. 14).

  The mirror of `predict_xstart`: eps, x_0, the posterior mean mu~_t (Eq. 7) or v.
  """
  _check_choice("model_mean_type", model_mean_type, MEAN_TYPES)
  if model_mean_type == "eps":
    return noise
  if model_mean_type == "xstart":
    return x_start
  if model_mean_type == "xprev":
    return q_posterior_mean_variance(schedule, x_start, x_t, t)[0]
  return v_target(schedule, x_start, t, noise)


def split_model_output(
  model_output: jnp.ndarray, x_t: jnp.ndarray, *, model_var_type: str
) -> tuple[jnp.ndarray, jnp.ndarray | None]:
  """Splits the network output into its mean part and (for learned variances) variance part.

  Learned variance types need twice the image channels on the last axis: [mean | variance].
  """
  _check_choice("model_var_type", model_var_type, VAR_TYPES)
  channels = x_t.shape[-1]
  if model_var_type in LEARNED_VAR_TYPES:
    expected = x_t.shape[:-1] + (2 * channels,)
    if model_output.shape != expected:
      raise ValueError(
        f"model_var_type {model_var_type!r} needs a model output of shape "
        f"{expected} (2x the {channels} image channels), got {model_output.shape}"
      )
    return model_output[..., :channels], model_output[..., channels:]
  if model_output.shape != x_t.shape:
    raise ValueError(
      f"model_var_type {model_var_type!r} needs a model output of the image's "
      f"shape {x_t.shape}, got {model_output.shape}"
    )
  return model_output, None


def score(
  schedule: DiffusionSchedule,
  model_output: jnp.ndarray,
  x_t: jnp.ndarray,
  t: jnp.ndarray,
  *,
  model_mean_type: str,
  model_var_type: str = "fixedlarge",
) -> jnp.ndarray:
  """The score grad_x log q(x_t) that the network output implies (Song et al. 2021, §4.3).

  eps: s = -eps_theta / sqrt(1 - abar_t), since x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
  makes eps_theta a scaled score (Ho et al. 2020 §3.2; Vincent 2011). Every other mean type
  goes through its x_0 estimate and Tweedie's formula, E[x_0 | x_t] = (x_t + (1 - abar_t)
  s) / sqrt(abar_t): s = (sqrt(abar_t) x0_theta - x_t) / (1 - abar_t), which for xstart is
  the output itself, for v is s = -x_t - sqrt(abar_t / (1 - abar_t)) v, and for xprev uses
  Eq. 7 inverted (defined at every t: coef1_t > 0). This form equals -predict_eps_from_xstart
  / sqrt(1 - abar_t) and stays finite where abar_t = 0 (the jsd schedule's last step).

  A learned-variance output [mean | variance] (2C channels) is split by ``model_var_type``
  and its variance part ignored: the score of the marginal q(x_t) does not involve the
  reverse-process variance. The x_0 estimate is not clipped.
  """
  _check_choice("model_mean_type", model_mean_type, MEAN_TYPES)
  _check_t(t, x_t)
  mean_out, _ = split_model_output(model_output, x_t, model_var_type=model_var_type)
  if model_mean_type == "eps":  # Exact for the paper's parameterisation, no round trip.
    return -mean_out / _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
  pred_xstart = predict_xstart(schedule, mean_out, x_t, t, model_mean_type=model_mean_type)
  return (_extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * pred_xstart - x_t) / _extract(
    jnp.square(schedule.sqrt_one_minus_alphas_cumprod), t, x_t.ndim
  )


def _model_log_variance(
  schedule: DiffusionSchedule,
  var_values: jnp.ndarray | None,
  x_t: jnp.ndarray,
  t: jnp.ndarray,
  model_var_type: str,
) -> jnp.ndarray:
  """log Sigma_theta(x_t, t) for each variance type (paper §3.2; Nichol & Dhariwal Eq. 15)."""
  if model_var_type == "learned":
    return var_values
  if model_var_type == "learned_range":
    # Interpolate in log space between beta~_t (clipped) and beta_t; v in [-1, 1].
    min_log = _extract(schedule.posterior_log_variance_clipped, t, x_t.ndim)
    max_log = _extract(schedule.log_betas, t, x_t.ndim)
    frac = (var_values + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log
  table = (
    schedule.fixedlarge_log_variance
    if model_var_type == "fixedlarge"
    else schedule.posterior_log_variance_clipped
  )
  return jnp.broadcast_to(_extract(table, t, x_t.ndim), x_t.shape)


def p_mean_variance(
  schedule: DiffusionSchedule,
  model_output: jnp.ndarray,
  x_t: jnp.ndarray,
  t: jnp.ndarray,
  *,
  model_mean_type: str,
  model_var_type: str,
  clip_denoised: bool,
) -> dict[str, jnp.ndarray]:
  """Mean and variance of the reverse step p_theta(x_{t-1} | x_t) (paper Eq. 1, §3.2).

  Args:
    model_output: the network's output at (x_t, t): eps, x_0, mu (xprev) or v, with the
      variance channels appended for the learned variance types.
    clip_denoised: clip the implied x_0 to [-1, 1] before forming the posterior mean.

  Returns:
    dict with `mean`, `variance`, `log_variance` and `pred_xstart`, each shaped like x_t.
    For 'fixedlarge' the variance is beta_t, and its log uses beta~ at t=0 (official code).
  """
  _check_choice("model_mean_type", model_mean_type, MEAN_TYPES)
  _check_t(t, x_t)
  mean_out, var_values = split_model_output(model_output, x_t, model_var_type=model_var_type)
  log_variance = _model_log_variance(schedule, var_values, x_t, t, model_var_type)
  if model_var_type in LEARNED_VAR_TYPES:
    variance = jnp.exp(log_variance)
  else:
    # Fixed variances: beta_t ('fixedlarge') or beta~_t ('fixedsmall', 0 at t=0); only
    # their logs are clipped at t=0.
    table = schedule.betas if model_var_type == "fixedlarge" else schedule.posterior_variance
    variance = jnp.broadcast_to(_extract(table, t, x_t.ndim), x_t.shape)

  def process_xstart(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.clip(x, -1.0, 1.0) if clip_denoised else x

  pred_xstart = process_xstart(
    predict_xstart(schedule, mean_out, x_t, t, model_mean_type=model_mean_type)
  )
  if model_mean_type == "xprev":  # The network outputs the mean itself.
    mean = mean_out
  else:
    mean, _, _ = q_posterior_mean_variance(schedule, pred_xstart, x_t, t)
  return dict(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart)


def vb_terms_bpd(
  schedule: DiffusionSchedule,
  model_output: jnp.ndarray,
  x_start: jnp.ndarray,
  x_t: jnp.ndarray,
  t: jnp.ndarray,
  *,
  model_mean_type: str,
  model_var_type: str,
  clip_denoised: bool,
) -> dict[str, jnp.ndarray]:
  """One term of the variational bound, in bits per dimension (paper Eq. 5, §3.3).

  For t > 0: KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) (L_{t-1}); for t = 0: the
  discretized Gaussian decoder NLL -log p_theta(x_0 | x_1) (L_0, Eq. 13). Each is averaged
  over dimensions and divided by ln 2.

  Returns:
    dict with `output` [B] (bits/dim) and `pred_xstart`.
  """
  _check_same_shape("x_start", x_start, "x_t", x_t)
  true_mean, _, true_log_variance = q_posterior_mean_variance(schedule, x_start, x_t, t)
  out = p_mean_variance(
    schedule,
    model_output,
    x_t,
    t,
    model_mean_type=model_mean_type,
    model_var_type=model_var_type,
    clip_denoised=clip_denoised,
  )
  kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
  decoder_nll = -mean_flat(
    discretized_gaussian_log_likelihood(
      x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
    )
  )
  output = jnp.where(t == 0, decoder_nll, kl) / math.log(2.0)
  return dict(output=output, pred_xstart=out["pred_xstart"])


def prior_bpd(schedule: DiffusionSchedule, x_start: jnp.ndarray) -> jnp.ndarray:
  """The prior term L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, shape [B] (paper Eq. 5)."""
  t = jnp.full((x_start.shape[0],), schedule.num_timesteps - 1, dtype=jnp.int32)
  mean, _, log_variance = q_mean_variance(schedule, x_start, t)
  kl = normal_kl(mean, log_variance, jnp.zeros_like(mean), jnp.zeros_like(log_variance))
  return mean_flat(kl) / math.log(2.0)


def training_losses(
  schedule: DiffusionSchedule,
  model_fn: ModelFn,
  x_start: jnp.ndarray,
  t: jnp.ndarray,
  noise: jnp.ndarray,
  *,
  model_mean_type: str,
  model_var_type: str,
  loss_type: str,
  vb_weight: float = 0.001,
) -> jnp.ndarray:
  """Per-example training loss [B] at timesteps t (paper Algorithm 1, Eq. 14).

  loss_type:
    'mse': L_simple, the unweighted MSE between the model output and its target (eps,
      x_0, the posterior mean, or v). Not defined for learned variances (use 'hybrid').
    'kl': the true VLB term L_{t-1} (L_0 at t=0) in bits/dim, as the official code.
    'hybrid': L_simple + vb_weight * T * L_{t-1}, where the VLB term sees the mean output
      through a stop-gradient so it trains only the variance (Nichol & Dhariwal 2021, §3.1;
      T * L_{t-1} estimates the whole bound, so vb_weight is their lambda = 0.001).
  """
  _check_choice("loss_type", loss_type, LOSS_TYPES)
  _check_choice("model_mean_type", model_mean_type, MEAN_TYPES)
  _check_choice("model_var_type", model_var_type, VAR_TYPES)
  if loss_type == "mse" and model_var_type in LEARNED_VAR_TYPES:
    raise ValueError(
      f"loss_type 'mse' cannot train model_var_type {model_var_type!r}; "
      "use loss_type 'hybrid' or 'kl'"
    )
  x_t = q_sample(schedule, x_start, t, noise)
  model_output = model_fn(x_t, t)
  mean_out, var_values = split_model_output(model_output, x_t, model_var_type=model_var_type)

  def vb_term(output: jnp.ndarray) -> jnp.ndarray:
    return vb_terms_bpd(
      schedule,
      output,
      x_start,
      x_t,
      t,
      model_mean_type=model_mean_type,
      model_var_type=model_var_type,
      clip_denoised=False,
    )["output"]

  if loss_type == "kl":
    return vb_term(model_output)

  target = mean_target(schedule, x_start, x_t, t, noise, model_mean_type=model_mean_type)
  mse = mean_flat(jnp.square(target - mean_out))
  if loss_type == "mse":
    return mse
  frozen = jax.lax.stop_gradient(mean_out)
  frozen_output = frozen if var_values is None else jnp.concatenate([frozen, var_values], -1)
  return mse + vb_weight * schedule.num_timesteps * vb_term(frozen_output)


def calc_bpd_loop(
  schedule: DiffusionSchedule,
  model_fn: ModelFn,
  x_start: jnp.ndarray,
  rng: jax.Array,
  *,
  model_mean_type: str,
  model_var_type: str,
  clip_denoised: bool,
) -> dict[str, jnp.ndarray]:
  """The full variational bound of a batch in bits/dim, every one of the T terms (Table 2).

  One lax.scan over t = T-1, ..., 0; at each t a fresh x_t ~ q(x_t | x_0) is drawn with
  noise from fold_in(rng, t), so memory stays that of one step plus the [B, T] outputs.

  Returns:
    dict with `total_bpd` [B] (prior + sum of terms), `prior_bpd` [B], `terms_bpd` [B, T]
    (index t holds L_{t-1}; index 0 the decoder NLL L_0), and `mse` [B, T], the mean
    squared error of pred_xstart at each t.
  """
  batch = x_start.shape[0]

  def step(carry: None, t_: jnp.ndarray) -> tuple[None, tuple[jnp.ndarray, jnp.ndarray]]:
    t = jnp.full((batch,), t_, dtype=jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(rng, t_), x_start.shape, x_start.dtype)
    x_t = q_sample(schedule, x_start, t, noise)
    out = vb_terms_bpd(
      schedule,
      model_fn(x_t, t),
      x_start,
      x_t,
      t,
      model_mean_type=model_mean_type,
      model_var_type=model_var_type,
      clip_denoised=clip_denoised,
    )
    return carry, (out["output"], mean_flat(jnp.square(out["pred_xstart"] - x_start)))

  timesteps = jnp.arange(schedule.num_timesteps - 1, -1, -1, dtype=jnp.int32)
  _, (terms_tb, mse_tb) = jax.lax.scan(step, None, timesteps)
  # Scan outputs run from t=T-1 down to 0: flip to index by t.
  terms_bpd = jnp.flip(terms_tb, axis=0).T
  mse = jnp.flip(mse_tb, axis=0).T
  prior = prior_bpd(schedule, x_start)
  return dict(
    total_bpd=jnp.sum(terms_bpd, axis=1) + prior, prior_bpd=prior, terms_bpd=terms_bpd, mse=mse
  )
