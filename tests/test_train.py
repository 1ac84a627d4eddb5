"""The train loop end to end (ddpm_jax/train.py) on the tiny config: it learns, writes the
workdir it documents, runs k steps per call with the results of single steps, refuses an
incompatible resume without touching anything, stops on (or skips) non-finite steps as
training.nonfinite says, and gives the same run on 1 device as on 8.

Resume exactness across kill -9, SIGTERM and corrupt checkpoints, the workdir lock and the
command line's bad-input handling: tests/test_main.py; checkpoint fallback:
tests/test_checkpointing.py.
"""

import json
import logging
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import (
  checkpointing,
  diffusion,
  factories,
  input_pipeline,
  train,
  train_logging,
  train_state,
)
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.errors import ConfigError, NonFiniteError
from ddpm_jax.train_state import TrainState
from tests import _fault_tools as ft
from tests import _reference_run as rr
from tests._reference_run import NO_PERIODIC_SAVES, REF_FLAGS, REF_STEPS


def _eval_loss(config, params, n: int = 64) -> float:
  """Mean L_simple on a fixed batch, t spread evenly over [0, T), fixed noise."""
  model, schedule = factories.create_model(config), factories.create_schedule(config.diffusion)
  images = next(input_pipeline.create_eval_iterator(config.data, global_batch_size=n))[0]
  x = input_pipeline.to_model_input(jnp.asarray(images.reshape((-1,) + images.shape[2:])))
  t = jnp.linspace(0, schedule.num_timesteps - 1, x.shape[0]).astype(jnp.int32)
  noise = jax.random.normal(jax.random.key(123), x.shape)

  @jax.jit
  def loss(params):
    return jnp.mean(
      diffusion.training_losses(
        schedule,
        factories.model_fn(model, params),
        x,
        t,
        noise,
        model_mean_type="eps",
        model_var_type="fixedlarge",
        loss_type="mse",
      )
    )

  return float(loss(params))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_config):
  config = make_config(
    **{
      "training.num_train_steps": 300,
      "training.log_every_steps": 50,
      "training.checkpoint_every_steps": 100,
      "training.keep_checkpoints": 2,
      "training.sample_every_steps": 300,
    }
  )
  workdir = str(tmp_path_factory.mktemp("trained"))
  state = train.train(config, workdir)
  return config, workdir, state


@pytest.mark.slow
def test_loss_falls_and_ema_tracks(trained):
  config, _, state = trained
  assert int(state.step) == 300
  model = factories.create_model(config)
  initial = train_state.create_train_state(
    config, model, train_state.create_optimizer(config.training)
  )
  loss_init = _eval_loss(config, initial.params)
  loss_raw = _eval_loss(config, state.params)
  loss_ema = _eval_loss(config, state.ema_params)
  assert 0.9 < loss_init < 1.1  # Zero-initialised output: E||eps||^2 / d = 1.
  assert loss_raw < 0.75 * loss_init
  assert loss_ema < 0.75 * loss_init
  # With decay 0.99 (a ~100-step average) the EMA lags behind, but not far.
  diffs = jax.tree.leaves(
    jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params, state.ema_params)
  )
  assert max(diffs) > 0


@pytest.mark.slow
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


@pytest.mark.slow
def test_incompatible_resume_is_refused_and_nothing_changes(trained, make_config):
  _, workdir, _ = trained
  before = {p: os.path.getmtime(os.path.join(workdir, p)) for p in ("config.json", "checkpoints")}
  bad = make_config(**{"model.ch": 32, "diffusion.beta_end": 0.03})
  with pytest.raises(ConfigError, match=r"model.ch: 16 -> 32.*diffusion.beta_end: 0.02 -> 0.03"):
    train.train(bad, workdir)
  after = {p: os.path.getmtime(os.path.join(workdir, p)) for p in before}
  assert before == after
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["200", "300"]


@pytest.mark.slow
def test_steps_per_call_gives_the_results_of_single_steps(tmp_path, make_config):
  """training.steps_per_call=4 runs steps 0-3 and 4-7 as two scanned calls and 8, 9 as single
  steps; the run ends where 10 single-step calls end (random flips on)."""
  common = {
    "training.num_train_steps": 10,
    "training.log_every_steps": 4,
    "training.checkpoint_every_steps": 8,
    "training.sample_every_steps": 0,
    "data.random_flip": True,
  }
  ref = train.train(make_config(**common), str(tmp_path / "one"))
  got = train.train(make_config(**common, **{"training.steps_per_call": 4}), str(tmp_path / "four"))
  assert int(got.step) == int(ref.step) == 10
  # The attention key biases get zero gradients (softmax is shift invariant), so Adam moves
  # them by reduction-order noise of ~1e-7; real updates here are ~1e-3.
  chex.assert_trees_all_close(got.params, ref.params, rtol=1e-5, atol=2e-6)
  chex.assert_trees_all_close(got.ema_params, ref.ema_params, rtol=1e-5, atol=2e-6)


def test_step_plan_aligns_calls_to_the_intervals():
  plan = train.StepPlan(
    num_steps=10, steps_per_call=4, log_every=4, checkpoint_every=8, sample_every=0
  )
  assert list(plan.chunks(0)) == [4, 4, 1, 1]
  assert list(plan.chunks(5)) == [1, 1, 1, 1, 1]  # A resume at 5 realigns by single steps.
  assert [s for s in range(1, 11) if plan.due(s, plan.log_every)] == [4, 8, 10]
  assert not any(plan.due(s, plan.sample_every) for s in range(1, 11))


@pytest.mark.slow
def test_profiler_window_and_utilization_scalars(tmp_path, make_config):
  """training.profile_num_steps writes a jax.profiler trace of the window into
  workdir/profile; every log step writes TFLOP/s per device and MFU (XLA's FLOPs of the
  compiled step, the peak given by training.peak_tflops)."""
  config = make_config(
    **{
      "training.num_train_steps": 6,
      "training.log_every_steps": 2,
      "training.checkpoint_every_steps": 6,
      "training.sample_every_steps": 0,
      "training.profile_start_step": 2,
      "training.profile_num_steps": 2,
      "training.peak_tflops": 0.157,
    }
  )
  train.train(config, str(tmp_path))
  traces = [
    os.path.join(d, f)
    for d, _, files in os.walk(tmp_path / "profile")
    for f in files
    if f.endswith(".xplane.pb")
  ]
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  scalars = train_logging.read_scalars(str(tmp_path / "tensorboard"))
  tflops, mfu = scalars["train/tflops_per_device"], scalars["train/mfu"]
  assert [step for step, _ in mfu] == [2, 4, 6]
  assert [step for step, _ in scalars["train/clip_fraction"]] == [2, 4, 6]
  assert all(value > 0 for _, value in tflops)
  np.testing.assert_allclose(
    [v for _, v in mfu], np.array([v for _, v in tflops]) / 0.157, rtol=1e-5
  )


@pytest.fixture(scope="module")
def blown_up(reference_run, tmp_path_factory):
  """A workdir whose checkpoint (step REF_STEPS) holds weights that blew up: x1e30, still
  finite, so the next step's loss and gradients overflow to inf / NaN."""
  workdir = tmp_path_factory.mktemp("blown_up")
  shutil.copy(reference_run[0] / workdir_lib.CONFIG_FILE, workdir)
  state = reference_run[1]
  huge = state.replace(params=jax.tree.map(lambda p: p * np.float32(1e30), state.params))
  checkpointer = checkpointing.Checkpointer(str(workdir), keep=3)
  checkpointer.save(REF_STEPS, huge)
  checkpointer.close()
  return workdir, huge


def _nan_config(mode: str):
  return rr.config(
    **{
      "training.num_train_steps": REF_STEPS + 3,
      "training.checkpoint_every_steps": 1000,
      "training.nonfinite": mode,
    }
  )


def _checkpoints(workdir, target) -> dict[int, TrainState]:
  steps = ft.step_dirs(str(workdir / workdir_lib.CHECKPOINT_DIR))[0]
  return {s: rr.restore(workdir, target, s) for s in steps}


def _all_finite(tree) -> bool:
  return all(
    np.all(np.isfinite(x))
    for x in jax.tree.leaves(tree)
    if np.issubdtype(np.asarray(x).dtype, np.inexact)
  )


@pytest.mark.slow
def test_nonfinite_raise_names_the_step_and_saves_no_nan(blown_up, tmp_path):
  """The default switch: stop with an error naming the step; nothing saved."""
  workdir = tmp_path / "wd"
  shutil.copytree(blown_up[0], workdir)
  with pytest.raises(
    NonFiniteError,
    match=rf"Non-finite loss or gradients at step "
    rf"{REF_STEPS + 1} .*nothing after step {REF_STEPS} was saved"
    r".*nonfinite=skip",
  ):
    train.train(_nan_config("raise"), str(workdir))
  assert list(_checkpoints(workdir, blown_up[1])) == [REF_STEPS]


@pytest.mark.slow
def test_nonfinite_skip_counts_and_keeps_the_state(blown_up, tmp_path, caplog):
  """training.nonfinite='skip': such steps leave the state as it was and are counted in
  the state (persisted in checkpoints) and in the logs; no checkpoint holds a NaN."""
  workdir = tmp_path / "wd"
  shutil.copytree(blown_up[0], workdir)
  with caplog.at_level(logging.WARNING):
    state = train.train(_nan_config("skip"), str(workdir))
  assert (int(state.step), int(state.nonfinite_steps), int(state.last_nonfinite_step)) == (
    REF_STEPS + 3,
    3,
    REF_STEPS + 3,
  )
  assert "Skipped the update of 1 step(s)" in caplog.text
  assert "(3 skipped since step 0)" in caplog.text
  saved = _checkpoints(workdir, blown_up[1])
  assert list(saved) == [REF_STEPS, REF_STEPS + 3] and _all_finite(saved[REF_STEPS + 3])
  assert int(saved[REF_STEPS + 3].nonfinite_steps) == 3
  last = saved[REF_STEPS + 3]
  rr.assert_same_bits(
    (last.params, last.ema_params, last.opt_state),
    (blown_up[1].params, blown_up[1].ema_params, blown_up[1].opt_state),
  )


@pytest.mark.slow
def test_one_device_gives_the_eight_device_loss_trajectory(main_server, reference_run, tmp_path):
  """The same run in a process with 1 CPU device, at the same global batch,
  has the loss trajectory and the final state of the 8-device run up to float rounding."""
  workdir = tmp_path / "wd"
  result = main_server.run(
    rr.main_args(workdir, *REF_FLAGS, *NO_PERIODIC_SAVES),
    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
    name="one_device",
    timeout=240,
  )
  assert result.rc == 0, result.stderr[-3000:]
  assert "1 local / 1 global devices" in result.stderr
  one, eight = ft.step_losses(result.stderr), reference_run[2]
  assert sorted(one) == sorted(eight) == list(range(1, REF_STEPS + 1))
  np.testing.assert_allclose(
    [one[s] for s in sorted(one)], [eight[s] for s in sorted(one)], rtol=1e-4, atol=2e-5
  )
  final, ref_state = rr.restore(workdir, reference_run[1]), reference_run[1]
  assert int(final.step) == REF_STEPS
  # After 24 Adam steps the largest difference seen is ~3e-6 (params of magnitude ~0.3).
  chex.assert_trees_all_close(
    (final.params, final.ema_params, final.opt_state),
    (ref_state.params, ref_state.ema_params, ref_state.opt_state),
    rtol=1e-4,
    atol=1e-5,
  )
