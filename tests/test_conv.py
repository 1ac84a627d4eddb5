"""models/conv.py: the tap-matmul kernel gradient equals XLA's convolution gradient."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from configs import test_tiny
from ddpm_jax import factories
from ddpm_jax.models import conv as conv_lib
from ddpm_jax.models import unet as unet_lib

_DN = ("NHWC", "HWIO", "NHWC")


def _xla_conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN)


@pytest.mark.parametrize("shape,strides,padding", [
    ((2, 8, 8, 4), (1, 1), ((1, 1), (1, 1))),
    ((2, 8, 8, 4), (2, 2), ((0, 1), (0, 1))),  # TF-'SAME' stride-2 downsampling.
    ((1, 7, 5, 3), (1, 1), ((1, 1), (1, 1))),  # Odd, non-square.
    ((3, 6, 6, 2), (2, 1), ((2, 0), (1, 3))),  # Asymmetric everything.
])
def test_value_and_gradients_equal_xla(shape, strides, padding):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, shape)
  w = jax.random.normal(kw, (3, 3, shape[-1], 5))
  y_ref, vjp_ref = jax.vjp(lambda x, w: _xla_conv(x, w, strides, padding), x, w)
  y, vjp = jax.vjp(lambda x, w: conv_lib.conv_tap_wgrad(x, w, strides, padding), x, w)
  g = jax.random.normal(kg, y_ref.shape)
  chex.assert_trees_all_close(y, y_ref, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(vjp(g), vjp_ref(g), rtol=1e-5, atol=1e-5)


def test_bfloat16_gradient_dtype_and_accuracy():
  kx, kw, kg = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (2, 8, 8, 8), jnp.bfloat16)
  w = jax.random.normal(kw, (3, 3, 8, 8), jnp.bfloat16)
  g = jax.random.normal(kg, (2, 8, 8, 8), jnp.bfloat16)
  pad = ((1, 1), (1, 1))
  dw = jax.vjp(lambda w: conv_lib.conv_tap_wgrad(x, w, (1, 1), pad), w)[1](g)[0]
  ref = jax.vjp(lambda w: _xla_conv(x.astype(jnp.float32), w, (1, 1), pad),
                w.astype(jnp.float32))[1](g.astype(jnp.float32))[0]
  assert dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dw, np.float32), ref, rtol=2e-2, atol=5e-2)


def test_flax_adapter_rejects_what_it_does_not_implement():
  x, w = jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2))
  with pytest.raises(ValueError, match="dilation"):
    conv_lib.flax_conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), rhs_dilation=(2, 2))
  with pytest.raises(ValueError, match="explicit padding"):
    conv_lib.flax_conv_general_dilated(x, w, (1, 1), "SAME")


@pytest.mark.parametrize("block", ["res", "down", "up"])
def test_unet_blocks_gradients_same_with_taps_and_xla(block):
  """The Flax adapter inside the U-Net's own blocks (3x3 convs, stride-2 TF-'SAME' padding,
  up-sampling conv): parameter and input gradients equal XLA's."""
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 16))
  temb = jax.random.normal(jax.random.key(4), (2, 32))
  grads = {}
  for taps in (False, True):
    if block == "res":
      module = unet_lib.ResBlock(8, 4, 0.0, jnp.float32, taps)
      apply = lambda p, x: module.apply({"params": p}, x, temb, False)
    else:
      module = (unet_lib.Downsample if block == "down" else unet_lib.Upsample)(
          True, jnp.float32, taps)
      apply = lambda p, x: module.apply({"params": p}, x)
    params = module.init(jax.random.key(3), *((x, temb, False) if block == "res" else (x,)))
    params = jax.tree.map(lambda p: p + 0.05, params["params"])  # No zero-init layer left.
    grads[taps] = jax.jit(jax.grad(lambda p, x: jnp.sum(apply(p, x) ** 2), argnums=(0, 1)))(
        params, x)
  chex.assert_trees_all_close(grads[True], grads[False], rtol=1e-4, atol=1e-5)


def test_unknown_conv_wgrad_is_refused():
  config = test_tiny.get_config()
  config.model.conv_wgrad = "cudnn"
  with pytest.raises(ValueError, match="conv_wgrad='cudnn'; allowed"):
    factories.create_model(config)
