"""Speed features of the train step that must not change its results (ddpm_jax/train.py):
several steps per pmapped call (training.steps_per_call, a lax.scan) and random flips done
on the device instead of the host."""

import chex
import jax
import numpy as np
import pytest

from configs import test_tiny
from ddpm_jax import input_pipeline
from ddpm_jax import train

K = 4
# The attention key biases get zero gradients (softmax is shift invariant), so Adam moves
# them by reduction-order noise of ~1e-7; real updates here are ~1e-3.
ATOL = 2e-6


def _config(**overrides):
  config = test_tiny.get_config()
  config.data.random_flip = True
  for dotted, value in overrides.items():
    group, field = dotted.split(".")
    config[group][field] = value
  return config


def _batches(config, n: int) -> list[np.ndarray]:
  """n global batches without host flips, laid out for one device: [1, B, H, W, C]."""
  it = input_pipeline.create_train_iterator(config.data, global_batch_size=16, seed=0,
                                            random_flip=False)
  return [next(it).reshape((1, 16) + (8, 8, 3)) for _ in range(n)]


@pytest.fixture(scope="module")
def setup():
  config = _config()
  model = train.create_model(config)
  tx = train.create_optimizer(config.training)
  schedule = train.create_schedule(config.diffusion)
  state = jax.device_get(train.create_train_state(config, model, tx))
  return config, model, tx, schedule, state


def test_device_flip_equals_flipping_the_input(setup):
  config, model, tx, schedule, state = setup
  devices = jax.devices()[:1]
  images = _batches(config, 1)[0]
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)
  flips = np.asarray(train.example_flips(jax.random.fold_in(step_key, 2), 0, 16))
  assert 0 < flips.sum() < 16  # Both kinds occur in this batch.
  flipped = images.copy()
  flipped[0, flips] = flipped[0, flips, :, ::-1]
  on_device = train.make_p_train_step(config, model, schedule, tx, devices=devices, num_steps=1)
  s_dev, m_dev = on_device(train.replicate(state, devices), images)
  no_flip = _config(**{"data.random_flip": False})
  on_host = train.make_p_train_step(no_flip, model, schedule, tx, devices=devices, num_steps=1)
  s_host, m_host = on_host(train.replicate(state, devices), flipped)
  s_dev, s_host = (jax.device_get(train.unreplicate(s)) for s in (s_dev, s_host))
  np.testing.assert_array_equal(train.unreplicate(m_dev)["loss"],
                                train.unreplicate(m_host)["loss"])
  chex.assert_trees_all_equal(s_dev.params, s_host.params)


def test_train_loop_with_steps_per_call_matches_one_step_calls(tmp_path):
  common = {"training.num_train_steps": 10, "training.log_every_steps": 4,
            "training.checkpoint_every_steps": 8, "training.sample_every_steps": 0}
  ref = train.train_and_evaluate(_config(**common), str(tmp_path / "one"))
  # Steps 0-3 and 4-7 run as two 4-step calls, 8 and 9 as single steps.
  got = train.train_and_evaluate(_config(**common, **{"training.steps_per_call": K}),
                                 str(tmp_path / "four"))
  assert int(got.step) == int(ref.step) == 10
  chex.assert_trees_all_close(got.params, ref.params, rtol=1e-5, atol=ATOL)
  chex.assert_trees_all_close(got.ema_params, ref.ema_params, rtol=1e-5, atol=ATOL)


@pytest.mark.parametrize("overrides,match", [
    ({"training.steps_per_call": 0}, "steps_per_call=0 must be a positive integer"),
    ({"training.steps_per_call": 3}, "log_every_steps=20 must be a multiple of"),
])
def test_bad_steps_per_call_is_refused(overrides, match):
  with pytest.raises(ValueError, match=match):
    train.validate_config(_config(**overrides))
