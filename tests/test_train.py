"""Tests of training end to end (ddpm_jax/train.py, checkpointing.py, train_logging.py, main.py).

The tiny config (configs/test_tiny.py: synthetic 8x8x3 data, 16-channel U-Net) runs on the
8 CPU devices of conftest.py. Compiled programs are shared across tests through the
persistent compilation cache that conftest.py configures. Resume exactness (across kill -9,
SIGTERM and corrupt checkpoints), 1 vs 8 devices, the workdir lock, NaNs and main.py's
bad-input handling: tests/test_reliability.py.
"""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import test_tiny
from ddpm_jax import checkpointing
from ddpm_jax import diffusion
from ddpm_jax import input_pipeline
from ddpm_jax import train


def _config(**overrides):
  config = test_tiny.get_config()
  for dotted, value in overrides.items():
    group, field = dotted.split(".")
    config[group][field] = value
  return config


def _batch(config, step: int = 0) -> np.ndarray:
  it = input_pipeline.create_train_iterator(
      config.data, global_batch_size=config.training.batch_size, seed=0, start_step=step)
  return next(it)


def _eval_loss(config, params, n: int = 64) -> float:
  """Mean L_simple on a fixed batch, t spread evenly over [0, T), fixed noise."""
  model, schedule = train.create_model(config), train.create_schedule(config.diffusion)
  images = next(input_pipeline.create_eval_iterator(config.data, global_batch_size=n))[0]
  x = input_pipeline.to_model_input(jnp.asarray(images.reshape((-1,) + images.shape[2:])))
  t = jnp.linspace(0, schedule.num_timesteps - 1, x.shape[0]).astype(jnp.int32)
  noise = jax.random.normal(jax.random.key(123), x.shape)

  @jax.jit
  def loss(params):
    fn = lambda x_t, t_: model.apply({"params": params}, x_t, t_, train=False)
    return jnp.mean(diffusion.training_losses(
        schedule, fn, x, t, noise, model_mean_type="eps", model_var_type="fixedlarge",
        loss_type="mse"))
  return float(loss(params))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  config = _config(**{"training.num_train_steps": 300, "training.log_every_steps": 50,
                      "training.checkpoint_every_steps": 100, "training.keep_checkpoints": 2,
                      "training.sample_every_steps": 300})
  workdir = str(tmp_path_factory.mktemp("trained"))
  state = train.train_and_evaluate(config, workdir)
  return config, workdir, state


@pytest.fixture(scope="module")
def initial():
  config = _config()
  model = train.create_model(config)
  tx = train.create_optimizer(config.training)
  schedule = train.create_schedule(config.diffusion)
  # On the host: the train step donates its input, which may alias device-0 buffers.
  return config, model, tx, schedule, jax.device_get(train.create_train_state(config, model, tx))


def test_loss_falls_and_ema_tracks(trained, initial):
  config, _, state = trained
  assert int(state.step) == 300
  loss_init = _eval_loss(config, initial[-1].params)
  loss_raw = _eval_loss(config, state.params)
  loss_ema = _eval_loss(config, state.ema_params)
  assert 0.9 < loss_init < 1.1  # Zero-initialised output: E||eps||^2 / d = 1.
  assert loss_raw < 0.75 * loss_init
  assert loss_ema < 0.75 * loss_init
  # With decay 0.99 (a ~100-step average) the EMA lags behind, but not far.
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                                       state.params, state.ema_params))
  assert max(diffs) > 0


def test_workdir_layout(trained):
  config, workdir, _ = trained
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["200", "300"]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["ch"] == config.model.ch
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  grid = np.asarray(Image.open(os.path.join(workdir, "samples", "step_00000300.png")))
  # 8 samples of 8x8 in a 3x3 grid with 2-pixel padding.
  assert grid.shape == (3 * 10 + 2, 3 * 10 + 2, 3)
  assert grid.std() > 0


def test_ema_update_is_exact(initial):
  config, model, tx, schedule, state0 = initial
  p_step = train.make_p_train_step(config, model, schedule, tx)
  state1, metrics = p_step(train.replicate(state0), _batch(config))
  state1 = jax.device_get(train.unreplicate(state1))
  d = config.training.ema_decay
  expected = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state0.ema_params, state1.params)
  chex.assert_trees_all_close(state1.ema_params, expected, atol=1e-7, rtol=1e-6)
  assert int(state1.step) == 1
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state0.params, state1.params)
  assert any(jax.tree.leaves(moved))
  assert float(metrics["learning_rate"][0]) == pytest.approx(1e-3)


def test_warmup_schedule():
  lr_fn = train.learning_rate_schedule(_config(**{"training.warmup_steps": 10}).training)
  np.testing.assert_allclose([float(lr_fn(s)) for s in (0, 5, 10, 50)],
                             [0.0, 5e-4, 1e-3, 1e-3], rtol=1e-6)


@pytest.mark.parametrize("overrides,match", [
    ({"training.batch_size": 12}, "batch_size=12.*8 devices"),
    ({"data.dataset": "imagenet"}, "imagenet"),
    ({"training.learning_rate": 0.0}, "learning_rate=0.0"),
    ({"training.learning_rate": -1e-4}, "learning_rate=-0.0001"),
    ({"training.num_train_steps": 0}, "num_train_steps=0"),
    ({"training.ema_decay": 1.0}, r"ema_decay=1.0 must lie in \[0, 1\)"),
    ({"data.image_size": 9}, "Image size 9"),
    ({"diffusion.loss_type": "l1"}, "loss_type 'l1'"),
    ({"sampling.method": "euler"}, "euler"),
    ({"data.dataset": "fashion_mnist_files", "data.image_size": 28, "data.num_channels": 1,
      "data.data_dir": "/nonexistent/fmnist"}, "/nonexistent/fmnist"),
])
def test_bad_config_fails_before_touching_workdir(tmp_path, overrides, match):
  workdir = tmp_path / "wd"
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(_config(**overrides), str(workdir))
  assert not workdir.exists()


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match="workdir"):
    train.train_and_evaluate(_config(), str(blocker / "wd"))
  with pytest.raises(ValueError, match="not a directory"):
    train.train_and_evaluate(_config(), str(blocker))
  assert blocker.read_text() == "not a directory"


def test_incompatible_resume_is_refused_and_nothing_changes(trained):
  config, workdir, _ = trained
  before = {p: os.path.getmtime(os.path.join(workdir, p)) for p in ("config.json", "checkpoints")}
  bad = _config(**{"model.ch": 32, "diffusion.beta_end": 0.03})
  with pytest.raises(ValueError, match=r"model.ch: 16 -> 32.*diffusion.beta_end: 0.02 -> 0.03"):
    train.train_and_evaluate(bad, workdir)
  after = {p: os.path.getmtime(os.path.join(workdir, p)) for p in before}
  assert before == after
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["200", "300"]


def test_training_fields_may_change_on_resume(tmp_path):
  workdir = str(tmp_path)
  checkpointing.check_or_write_config(_config(), workdir)
  (tmp_path / "checkpoints" / "100").mkdir(parents=True)  # As if a step had been saved.
  changed = _config(**{"training.learning_rate": 5e-4, "training.batch_size": 32,
                       "model.dtype": "bfloat16", "training.log_every_steps": 7})
  checkpointing.check_or_write_config(changed, workdir)  # No error.
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["training"]["learning_rate"] == 1e-3  # First start's config kept.


def test_config_of_a_start_that_saved_nothing_is_replaced(tmp_path):
  workdir = str(tmp_path)
  checkpointing.check_or_write_config(_config(), workdir)
  checkpointing.check_or_write_config(_config(**{"model.ch": 32}), workdir)  # No checkpoint.
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["ch"] == 32
  (tmp_path / "checkpoints" / "7").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"model.ch: 32 -> 16.*training.seed: 0 -> 5"):
    checkpointing.check_or_write_config(_config(**{"training.seed": 5}), workdir)
