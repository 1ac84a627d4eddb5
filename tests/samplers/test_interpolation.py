"""Latent-space interpolation (paper §4.3): slerp keeps the norm, and decoding with the exact
point-mass model returns the point for every mixing weight."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import samplers
from tests.gaussian import SCHED, exact_output_fn


def test_slerp_end_points_and_norm():
  z1 = jax.random.normal(jax.random.key(11), (2, 4, 4, 3))
  z2 = jax.random.normal(jax.random.key(12), (2, 4, 4, 3))
  np.testing.assert_allclose(samplers.slerp(z1, z2, jnp.zeros(2)), z1, atol=1e-5)
  np.testing.assert_allclose(samplers.slerp(z1, z2, jnp.ones(2)), z2, atol=1e-5)
  mid = samplers.slerp(z1, z2, jnp.full((2,), 0.5))

  def norms(z):
    return jnp.linalg.norm(z.reshape(2, -1), axis=1)

  np.testing.assert_allclose(norms(mid), (norms(z1) + norms(z2)) / 2, rtol=0.1)


def test_interpolation_decodes_to_the_point_mass():
  x_a, x_b = jnp.full((2, 2, 3), -0.5), jnp.full((2, 2, 3), 0.5)
  out = samplers.interpolate(
    SCHED,
    exact_output_fn(0.1, 0.0),
    jax.random.key(13),
    x_a,
    x_b,
    jnp.linspace(0, 1, 3),
    t=50,
    model_mean_type="eps",
    model_var_type="fixedlarge",
  )
  chex.assert_shape(out, (3, 2, 2, 3))
  np.testing.assert_allclose(out, 0.1, atol=1e-4)
