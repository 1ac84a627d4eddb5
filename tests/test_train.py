"""The train loop end to end (ddpm_jax/train.py) on the tiny config: it learns, writes the
workdir it documents, runs k steps per call with the results of single steps, and refuses
an incompatible resume without touching anything.

Resume exactness across kill -9, SIGTERM and corrupt checkpoints, 1 vs 8 devices, the
workdir lock, NaNs and the command line's bad-input handling: tests/test_reliability.py.
"""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import diffusion
from ddpm_jax import factories
from ddpm_jax import input_pipeline
from ddpm_jax import train
from ddpm_jax import train_logging
from ddpm_jax import train_state
from ddpm_jax.errors import ConfigError


def _eval_loss(config, params, n: int = 64) -> float:
  """Mean L_simple on a fixed batch, t spread evenly over [0, T), fixed noise."""
  model, schedule = factories.create_model(config), factories.create_schedule(config.diffusion)
  images = next(input_pipeline.create_eval_iterator(config.data, global_batch_size=n))[0]
  x = input_pipeline.to_model_input(jnp.asarray(images.reshape((-1,) + images.shape[2:])))
  t = jnp.linspace(0, schedule.num_timesteps - 1, x.shape[0]).astype(jnp.int32)
  noise = jax.random.normal(jax.random.key(123), x.shape)

  @jax.jit
  def loss(params):
    return jnp.mean(diffusion.training_losses(
        schedule, factories.model_fn(model, params), x, t, noise, model_mean_type="eps",
        model_var_type="fixedlarge", loss_type="mse"))
  return float(loss(params))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_config):
  config = make_config(**{"training.num_train_steps": 300, "training.log_every_steps": 50,
                          "training.checkpoint_every_steps": 100,
                          "training.keep_checkpoints": 2, "training.sample_every_steps": 300})
  workdir = str(tmp_path_factory.mktemp("trained"))
  state = train.train(config, workdir)
  return config, workdir, state


def test_loss_falls_and_ema_tracks(trained):
  config, _, state = trained
  assert int(state.step) == 300
  model = factories.create_model(config)
  initial = train_state.create_train_state(config, model,
                                           train_state.create_optimizer(config.training))
  loss_init = _eval_loss(config, initial.params)
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


def test_incompatible_resume_is_refused_and_nothing_changes(trained, make_config):
  _, workdir, _ = trained
  before = {p: os.path.getmtime(os.path.join(workdir, p)) for p in ("config.json", "checkpoints")}
  bad = make_config(**{"model.ch": 32, "diffusion.beta_end": 0.03})
  with pytest.raises(ConfigError, match=r"model.ch: 16 -> 32.*diffusion.beta_end: 0.02 -> 0.03"):
    train.train(bad, workdir)
  after = {p: os.path.getmtime(os.path.join(workdir, p)) for p in before}
  assert before == after
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["200", "300"]


def test_steps_per_call_gives_the_results_of_single_steps(tmp_path, make_config):
  """training.steps_per_call=4 runs steps 0-3 and 4-7 as two scanned calls and 8, 9 as single
  steps; the run ends where 10 single-step calls end (random flips on)."""
  common = {"training.num_train_steps": 10, "training.log_every_steps": 4,
            "training.checkpoint_every_steps": 8, "training.sample_every_steps": 0,
            "data.random_flip": True}
  ref = train.train(make_config(**common), str(tmp_path / "one"))
  got = train.train(make_config(**common, **{"training.steps_per_call": 4}),
                    str(tmp_path / "four"))
  assert int(got.step) == int(ref.step) == 10
  # The attention key biases get zero gradients (softmax is shift invariant), so Adam moves
  # them by reduction-order noise of ~1e-7; real updates here are ~1e-3.
  chex.assert_trees_all_close(got.params, ref.params, rtol=1e-5, atol=2e-6)
  chex.assert_trees_all_close(got.ema_params, ref.ema_params, rtol=1e-5, atol=2e-6)


def test_step_plan_aligns_calls_to_the_intervals():
  plan = train.StepPlan(num_steps=10, steps_per_call=4, log_every=4, checkpoint_every=8,
                        sample_every=0)
  assert list(plan.chunks(0)) == [4, 4, 1, 1]
  assert list(plan.chunks(5)) == [1, 1, 1, 1, 1]  # A resume at 5 realigns by single steps.
  assert [s for s in range(1, 11) if plan.due(s, plan.log_every)] == [4, 8, 10]
  assert not any(plan.due(s, plan.sample_every) for s in range(1, 11))


def test_profiler_window_and_utilization_scalars(tmp_path, make_config):
  """training.profile_num_steps writes a jax.profiler trace of the window into
  workdir/profile; every log step writes TFLOP/s per device and MFU (XLA's FLOPs of the
  compiled step, the peak given by training.peak_tflops)."""
  config = make_config(**{"training.num_train_steps": 6, "training.log_every_steps": 2,
                          "training.checkpoint_every_steps": 6,
                          "training.sample_every_steps": 0, "training.profile_start_step": 2,
                          "training.profile_num_steps": 2, "training.peak_tflops": 0.157})
  train.train(config, str(tmp_path))
  traces = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "profile") for f in files
            if f.endswith(".xplane.pb")]
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  scalars = train_logging.read_scalars(str(tmp_path / "tensorboard"))
  tflops, mfu = scalars["train/tflops_per_device"], scalars["train/mfu"]
  assert [step for step, _ in mfu] == [2, 4, 6]
  assert [step for step, _ in scalars["train/clip_fraction"]] == [2, 4, 6]
  assert all(value > 0 for _, value in tflops)
  np.testing.assert_allclose([v for _, v in mfu], np.array([v for _, v in tflops]) / 0.157,
                             rtol=1e-5)


