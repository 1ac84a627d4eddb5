"""A 2-D convolution whose kernel gradient is one matmul per kernel tap (``conv_wgrad="taps"``).

dW[i, j] = sum_{b, h, w} x_pad[b, s*h + i, s*w + j, :]^T g[b, h, w, :]: kh*kw matmuls that
contract over batch and space. The forward pass and the input gradient are XLA's own
convolutions. On a 2-core AVX2 host, whose XLA:CPU ran the kernel gradient as one big
convolution at a few GFLOP/s, this made the CIFAR-10 step at batch 32 2.5x faster. On the
AVX-512 host of the current bench/NOTES.md, with ddpm_jax.xla_flags' defaults, XLA's own
kernel gradient is the faster at every batch measured, so ``"auto"`` uses XLA's and this
stays an option.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
Padding = tuple[tuple[int, int], tuple[int, int]]


def _conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Padding) -> jax.Array:
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DIMENSION_NUMBERS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_tap_wgrad(x: jax.Array, w: jax.Array, strides: tuple[int, int],
                   padding: Padding) -> jax.Array:
  """NHWC x HWIO convolution, explicit padding; same values as lax.conv_general_dilated."""
  return _conv(x, w, strides, padding)


def _forward(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Padding):
  return _conv(x, w, strides, padding), (x, w)


def kernel_gradient(x: jax.Array, g: jax.Array, kernel_shape: Sequence[int],
                    strides: tuple[int, int], padding: Padding) -> jax.Array:
  """dL/dW of y = conv(x, W) given g = dL/dy: one [C_in, C_out] matmul per kernel tap,
  accumulated in float32 and returned in x's dtype."""
  kh, kw = kernel_shape[0], kernel_shape[1]
  (sh, sw), (ho, wo) = strides, g.shape[1:3]
  x_pad = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  taps = []
  for i in range(kh):
    for j in range(kw):
      window = lax.slice(x_pad, (0, i, j, 0),
                         (x_pad.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1,
                          x_pad.shape[3]), (1, sh, sw, 1))
      taps.append(jnp.einsum("bhwi,bhwo->io", window, g,
                             preferred_element_type=jnp.float32))
  return jnp.stack(taps).reshape(tuple(kernel_shape)).astype(x.dtype)


def _backward(strides: tuple[int, int], padding: Padding, residuals: Any, g: jax.Array):
  x, w = residuals
  _, input_vjp = jax.vjp(lambda x_: _conv(x_, w, strides, padding), x)
  (dx,) = input_vjp(g)
  return dx, kernel_gradient(x, g, w.shape, strides, padding).astype(w.dtype)


conv_tap_wgrad.defvjp(_forward, _backward)


def flax_conv_general_dilated(inputs: jax.Array, kernel: jax.Array, window_strides: Sequence[int],
                              padding: Any, lhs_dilation: Any = None, rhs_dilation: Any = None,
                              dimension_numbers: Any = None, feature_group_count: int = 1,
                              precision: Any = None) -> jax.Array:
  """Drop-in for ``nn.Conv(conv_general_dilated=...)``: explicit padding, no dilation, no
  feature groups, NHWC/HWIO (what the U-Net uses); anything else is a ValueError."""
  if any(d not in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ())):
    raise ValueError(f"conv_tap_wgrad supports no dilation; got {lhs_dilation}, {rhs_dilation}.")
  if feature_group_count != 1 or isinstance(padding, str) or inputs.ndim != 4:
    raise ValueError(f"conv_tap_wgrad needs 4-D NHWC inputs, explicit padding and one feature "
                     f"group; got ndim={inputs.ndim}, padding={padding!r}, "
                     f"feature_group_count={feature_group_count}.")
  del dimension_numbers, precision  # Flax passes NHWC/HWIO defaults and no precision here.
  return conv_tap_wgrad(inputs, kernel, tuple(int(s) for s in window_strides),
                        tuple((int(lo), int(hi)) for lo, hi in padding))
