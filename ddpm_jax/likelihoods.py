"""Gaussian KL divergences and the discretized Gaussian decoder likelihood.

These are the closed-form pieces of the variational bound (Ho et al. 2020, Eq. 5 and
§3.3). Everything is elementwise; `mean_flat` reduces over all non-batch axes.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

# Data are integers 0..255 mapped to [-1, 1]: bins have width 2/255 (paper §3.3).
_HALF_BIN = 1.0 / 255.0
# Images at or beyond these values fall in the open-ended edge bins (paper Eq. 13).
_EDGE = 0.999
# Lower bound inside logs, as the official implementation.
_LOG_FLOOR = 1e-12


def mean_flat(x: jnp.ndarray) -> jnp.ndarray:
  """Mean over every axis but the first (batch) axis."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(
  mean1: jnp.ndarray, logvar1: jnp.ndarray, mean2: jnp.ndarray, logvar2: jnp.ndarray
) -> jnp.ndarray:
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats, elementwise.

  The closed form used for every L_{t-1} term of the bound (paper Eq. 5):
  0.5 * (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2)).
  """
  return 0.5 * (
    -1.0
    + logvar2
    - logvar1
    + jnp.exp(logvar1 - logvar2)
    + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
  )


def approx_standard_normal_cdf(x: jnp.ndarray) -> jnp.ndarray:
  """Fast approximation of the standard normal CDF, as used by the official code.

  0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); kept (rather than the exact erf) so that
  bits/dim are computed exactly as the paper's reported numbers were.
  """
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * jnp.power(x, 3))))


def discretized_gaussian_log_likelihood(
  x: jnp.ndarray, *, means: jnp.ndarray, log_scales: jnp.ndarray
) -> jnp.ndarray:
  """log p(x) of data x under a Gaussian discretized to the 256 pixel bins (paper Eq. 13).

  Bins are [x - 1/255, x + 1/255] on data scaled to [-1, 1]; the first bin extends to -inf
  and the last to +inf, so the 256 probabilities sum to one for any mean and scale.

  Args:
    x: data in [-1, 1] on the 256-level grid.
    means: Gaussian means, same shape as x.
    log_scales: log standard deviations, broadcastable to x.

  Returns:
    Elementwise log-likelihood in nats, shape of x.
  """
  if x.shape != means.shape:
    raise ValueError(f"x shape {x.shape} and means shape {means.shape} must match")
  centered_x = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + _HALF_BIN))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - _HALF_BIN))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, _LOG_FLOOR))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, _LOG_FLOOR))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, _LOG_FLOOR))
  return jnp.where(
    x < -_EDGE, log_cdf_plus, jnp.where(x > _EDGE, log_one_minus_cdf_min, log_cdf_delta)
  )
