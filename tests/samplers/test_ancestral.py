"""Ancestral sampling (paper Algorithm 2) on exact Gaussian models: shapes, determinism,
the point mass recovered for every parameterisation, trajectories and starting mid-chain."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, samplers
from tests.gaussian import SCHED, SHAPE, T, exact_output_fn


@pytest.fixture(scope="module")
def ancestral():
  return jax.jit(
    lambda rng: samplers.ancestral_sample(
      SCHED,
      exact_output_fn(0.3, 0.0),
      rng,
      SHAPE,
      model_mean_type="eps",
      model_var_type="fixedlarge",
    )
  )


def test_shape_dtype_range_and_determinism(ancestral):
  a = ancestral(jax.random.key(0))
  b = ancestral(jax.random.key(0))
  c = samplers.ancestral_sample(
    SCHED,
    lambda x, t: jax.random.normal(jax.random.key(1), x.shape) * 3,
    jax.random.key(2),
    SHAPE,
    model_mean_type="eps",
    model_var_type="fixedlarge",
  )
  chex.assert_shape([a, c], SHAPE)
  chex.assert_type([a, c], jnp.float32)
  np.testing.assert_array_equal(a, b)
  # x_0 is the posterior mean at t=0 = the clipped pred_xstart: inside [-1, 1] whatever the model.
  assert float(jnp.abs(c).max()) <= 1.0
  u8 = samplers.to_uint8(jnp.array([-1.0, -0.999, 0.0, 1.0, 1.5]))
  np.testing.assert_array_equal(u8, [0, 0, 128, 255, 255])


@pytest.mark.parametrize("mean_type", diffusion.MEAN_TYPES)
@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_point_mass_recovered(mean_type, var_type):
  x0 = samplers.ancestral_sample(
    SCHED,
    exact_output_fn(0.3, 0.0, mean_type),
    jax.random.key(3),
    SHAPE,
    model_mean_type=mean_type,
    model_var_type=var_type,
  )
  np.testing.assert_allclose(x0, 0.3, atol=1e-4)


def test_trajectory_records_chosen_timesteps():
  fn = exact_output_fn(0.3, 0.0)
  kw = dict(model_mean_type="eps", model_var_type="fixedlarge")
  x0, traj = samplers.ancestral_sample(
    SCHED,
    fn,
    jax.random.key(10),
    SHAPE,
    return_trajectory=True,
    trajectory_timesteps=[0, 50, 99, 10],
    **kw,
  )
  np.testing.assert_array_equal(traj["timesteps"], [99, 50, 10, 0])
  chex.assert_shape([traj["x_t"], traj["pred_xstart"]], (4,) + SHAPE)
  # Exact model: every x_0 estimate is the point itself.
  np.testing.assert_allclose(traj["pred_xstart"], 0.3, atol=1e-4)
  # The same rng without the trajectory gives the same sample.
  np.testing.assert_array_equal(
    x0, samplers.ancestral_sample(SCHED, fn, jax.random.key(10), SHAPE, **kw)
  )
  # x_T is unit Gaussian noise.
  assert 0.7 < float(traj["x_t"][0].std()) < 1.3
  full = samplers.ancestral_sample(
    SCHED, fn, jax.random.key(10), SHAPE, return_trajectory=True, **kw
  )[1]
  assert full["x_t"].shape[0] == T
  np.testing.assert_array_equal(full["x_t"][T - 1 - 10], traj["x_t"][2])


def test_start_mid_chain_from_a_given_x_t():
  """x_init at start_t runs the steps start_t..0 only: the result equals the tail of the
  recorded full chain continued from the same x_t with the same step noise."""
  fn = exact_output_fn(0.2, 0.5)
  kw = dict(model_mean_type="eps", model_var_type="fixedlarge")
  _, traj = samplers.ancestral_sample(
    SCHED, fn, jax.random.key(4), SHAPE, return_trajectory=True, trajectory_timesteps=[30], **kw
  )
  full = samplers.ancestral_sample(SCHED, fn, jax.random.key(4), SHAPE, **kw)
  tail = samplers.ancestral_sample(
    SCHED, fn, jax.random.key(4), SHAPE, x_init=traj["x_t"][0], start_t=30, **kw
  )
  np.testing.assert_allclose(tail, full, atol=1e-6)


@pytest.mark.parametrize(
  "shape,kwargs,match",
  [
    ((0, 2, 2, 3), {}, "positive"),
    (SHAPE, dict(return_trajectory=True, trajectory_timesteps=[100]), r"\[0, T=100\)"),
    (SHAPE, dict(start_t=100), r"start_t=100 must lie in \[0, T=100\)"),
    (SHAPE, dict(model_mean_type="epsilon"), "model_mean_type='epsilon' is unknown"),
    (SHAPE, dict(clip=True), "clip"),
  ],
)
def test_bad_input(shape, kwargs, match):
  kwargs = {"model_mean_type": "eps", "model_var_type": "fixedlarge", **kwargs}
  with pytest.raises((ValueError, TypeError), match=match):
    samplers.ancestral_sample(SCHED, None, jax.random.key(0), shape, **kwargs)
