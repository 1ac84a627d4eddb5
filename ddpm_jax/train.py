"""--mode=train: trains to training.num_train_steps, resuming from the workdir's latest
checkpoint (paper Algorithm 1 with the recipe of App. B).

The story: build the model, check the workdir, lock it, restore or create the train state,
then a short loop of pmapped train steps (train_step.py) that logs, checkpoints, writes
EMA sample grids and stops cleanly on preemption. Everything the loop consults is a small
named object below: the step plan, the non-finite guard and the sample grids.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import (
  checkpointing,
  data_sources,
  factories,
  generation,
  hosts,
  input_pipeline,
  parallel,
  train_logging,
  utilization,
)
from ddpm_jax import rng as rng_lib
from ddpm_jax import train_state as train_state_lib
from ddpm_jax import train_step as train_step_lib
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.errors import NonFiniteError
from ddpm_jax.models import unet as unet_lib
from ddpm_jax.train_state import TrainState

PROFILE_DIR = "profile"


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """Which steps one call runs and at which steps the loop logs, saves and samples.

  A call runs k = training.steps_per_call steps when it starts on a multiple of k (so every
  log, checkpoint and sample step, all multiples of k, ends a call) and single steps to
  align a resumed run or finish the last few. The last step always logs, saves and samples.
  """

  num_steps: int
  steps_per_call: int
  log_every: int
  checkpoint_every: int
  sample_every: int  # 0: never.

  @classmethod
  def from_config(cls, training: ml_collections.ConfigDict) -> StepPlan:
    return cls(
      int(training.num_train_steps),
      int(training.steps_per_call),
      int(training.log_every_steps),
      int(training.checkpoint_every_steps),
      int(training.sample_every_steps),
    )

  def chunk(self, step: int) -> int:
    k = self.steps_per_call
    return k if step % k == 0 and step + k <= self.num_steps else 1

  def chunks(self, start: int) -> Iterator[int]:
    step = start
    while step < self.num_steps:
      yield self.chunk(step)
      step += self.chunk(step)

  def due(self, step: int, every: int) -> bool:
    return bool(every) and (step % every == 0 or step == self.num_steps)


class NonFiniteGuard:
  """Brings the metrics of a step to the host and acts on the steps whose loss or gradients
  were not finite since the last check (train_step skipped their updates): raises
  NonFiniteError (training.nonfinite="raise") or warns ("skip")."""

  def __init__(
    self, mode: str, step: int, nonfinite_steps: int, checkpointer: checkpointing.Checkpointer
  ):
    self.mode, self.checkpointer = mode, checkpointer
    self.checked_step, self.checked_count = step, nonfinite_steps

  def fetch(self, p_metrics: dict, p_state: TrainState, step: int) -> dict[str, float]:
    metrics = {k: float(v) for k, v in parallel.unreplicate(p_metrics).items()}
    total = int(metrics["nonfinite_steps"])
    new, first = total - self.checked_count, self.checked_step + 1
    self.checked_step, self.checked_count = step, total
    if new > 0:
      last = int(parallel.unreplicate(p_state.last_nonfinite_step))
      if self.mode == "raise":
        raise NonFiniteError(
          f"Non-finite loss or gradients at step {last} ({new} such step(s) among steps "
          f"{first}..{step}); nothing after step {self.checkpointer.latest_step()} was "
          "saved. Lower training.learning_rate or check the data, or pass "
          "--config.training.nonfinite=skip to skip such steps."
        )
      logging.warning(
        "Skipped the update of %d step(s) with a non-finite loss or gradients "
        "among steps %d..%d, the latest at step %d (%d skipped since step 0).",
        new,
        first,
        step,
        last,
        total,
      )
    return metrics


class SampleGrids:
  """EMA samples of config.sampling at training.num_grid_samples, written as a PNG grid and
  to TensorBoard; the noise of step s comes from fold_in(key(sampling.seed), s)."""

  def __init__(self, config: ml_collections.ConfigDict, model: unet_lib.UNet, schedule: Any):
    per_device = int(config.training.num_grid_samples) // jax.device_count()
    self.seed = int(config.sampling.seed)
    self._sampler = generation.make_pmapped_sampler(config, model, schedule, per_device)

  def write(self, step: int, p_ema_params: Any, logger: train_logging.TrainLogger) -> None:
    images = np.asarray(self._sampler(p_ema_params, rng_lib.batch_key(self.seed, step)))
    logger.write_images(step, hosts.gather(images.reshape((-1,) + images.shape[2:])))


class TrainSteps:
  """The pmapped train step of each call size (1 or training.steps_per_call steps), and
  XLA's FLOP count of one step on one device, from the lowered program of the first call
  (for the TFLOP/s and MFU scalars; XLA counts a scan's body once, so the k-step program
  counts one step). The pmapped functions compile on their first call, as usual."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    model: unet_lib.UNet,
    schedule: Any,
    tx: Any,
    sizes: set[int],
  ):
    self._fns = {
      n: train_step_lib.make_p_train_step(config, model, schedule, tx, num_steps=n) for n in sizes
    }
    self.flops_per_device_step: float | None = None
    self._counted = False

  def __call__(self, n: int, p_state: TrainState, batch: Any) -> tuple[TrainState, dict]:
    if not self._counted:
      cost = self._fns[n].lower(p_state, batch).cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      self.flops_per_device_step = float(cost.get("flops", 0.0)) or None
      self._counted = True
    return self._fns[n](p_state, batch)


class ProfilerWindow:
  """A jax.profiler trace of the steps after ``start`` (training.profile_start_step) for
  ``num`` steps (training.profile_num_steps; 0: off), written to workdir/profile for
  TensorBoard's profile plugin. The trace ends after the device finished those steps."""

  def __init__(self, workdir: str, start: int, num: int):
    self.logdir = os.path.join(workdir, PROFILE_DIR)
    self.start, self.stop, self.active = start, start + num, False
    self.enabled = num > 0

  def after_step(self, step: int, p_state: TrainState) -> None:
    if not self.enabled:
      return
    if not self.active and self.start <= step < self.stop:
      jax.block_until_ready(p_state.step)  # Steps before the window stay out of it.
      jax.profiler.start_trace(self.logdir)
      self.active = True
      logging.info("Profiling steps %d..%d into %s.", step + 1, self.stop, self.logdir)
    elif self.active and step >= self.stop:
      jax.block_until_ready(p_state.step)
      jax.profiler.stop_trace()
      self.active, self.enabled = False, False


def _batches(config: ml_collections.ConfigDict, start: int, plan: StepPlan) -> Iterator[Any]:
  """Device batches for each call of the plan: [devices, b, ...], or [devices, k, b, ...]
  stacked for a call of k steps."""
  it = input_pipeline.create_train_iterator(
    config.data,
    global_batch_size=int(config.training.batch_size),
    seed=int(config.training.seed),
    start_step=start,
  )
  stacked = (
    next(it) if n == 1 else np.stack([next(it) for _ in range(n)], axis=1)
    for n in plan.chunks(start)
  )
  return parallel.prefetch_to_device(stacked)


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains, resuming if the workdir holds a checkpoint; returns the final TrainState.

  Exits early, after saving, on SIGTERM. Nothing is compiled or written before the data
  are known to be readable and the workdir compatible; the workdir is then locked
  (workdir/train.lock) for the whole run.
  """
  hosts.agree(lambda: data_sources.prepare(config.data, [config.data.train_split]))
  model = factories.create_model(config)
  workdir = workdir_lib.prepare(workdir)
  workdir_lib.check_resumable(config, workdir)  # A refused resume writes nothing, no lock.
  with workdir_lib.WorkdirLock(workdir):
    logging.info(
      "JAX process %d/%d, %d local / %d global devices (%s).",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
      jax.default_backend(),
    )
    workdir_lib.check_or_write_config(config, workdir)
    tx = train_state_lib.create_optimizer(config.training)
    checkpointer = checkpointing.Checkpointer(
      workdir,
      keep=int(config.training.keep_checkpoints),
      keep_every=int(config.training.keep_every_steps),
    )
    try:
      state = checkpointer.restore(
        train_state_lib.create_train_state(config, model, tx, abstract=True)
      )
      if state is None:
        state = train_state_lib.create_train_state(config, model, tx)
      else:
        logging.info("Resumed from the checkpoint at step %d in %s.", int(state.step), workdir)
      if int(state.step) >= int(config.training.num_train_steps):
        logging.info("Step %d >= training.num_train_steps: nothing to train.", int(state.step))
        return state
      return _loop(config, workdir, model, tx, state, checkpointer)
    finally:
      checkpointer.close()


def _loop(
  config: ml_collections.ConfigDict,
  workdir: str,
  model: unet_lib.UNet,
  tx: Any,
  state: TrainState,
  checkpointer: checkpointing.Checkpointer,
) -> TrainState:
  """The train loop, from state.step to training.num_train_steps."""
  tr, start = config.training, int(state.step)
  plan = StepPlan.from_config(tr)
  schedule = factories.create_schedule(config.diffusion)
  steps = TrainSteps(config, model, schedule, tx, {plan.steps_per_call, 1})
  logger = train_logging.TrainLogger(
    workdir,
    start,
    plan.num_steps,
    int(tr.batch_size),
    enabled=hosts.is_chief(),
    backend=jax.default_backend(),
    peak_tflops=utilization.peak_tflops(
      jax.local_devices()[0], str(config.model.dtype), float(tr.peak_tflops)
    ),
  )
  profiler = ProfilerWindow(workdir, int(tr.profile_start_step), int(tr.profile_num_steps))
  if start == 0:
    logger.write_hparams(config, num_params=train_state_lib.num_params(state.params))
  guard = NonFiniteGuard(str(tr.nonfinite), start, int(state.nonfinite_steps), checkpointer)
  grids = (
    SampleGrids(config, model, schedule) if plan.sample_every and tr.num_grid_samples else None
  )
  batches = _batches(config, start, plan)
  p_state = parallel.replicate(state)
  del state
  step = start
  with workdir_lib.SigtermFlag() as sigterm:
    while step < plan.num_steps:
      n = plan.chunk(step)
      p_state, p_metrics = steps(n, p_state, next(batches))
      step += n
      profiler.after_step(step, p_state)
      if plan.due(step, plan.log_every):
        logger.log(step, guard.fetch(p_metrics, p_state, step), steps.flops_per_device_step)
      preempted = sigterm.received or checkpointer.reached_preemption(step)
      if preempted or plan.due(step, plan.checkpoint_every):
        guard.fetch(p_metrics, p_state, step)  # Never checkpoint a state made from inf/NaN.
        checkpointer.save(step, jax.device_get(parallel.unreplicate(p_state)))
      if preempted:
        logging.info("Saved the checkpoint of step %d after SIGTERM; exiting.", step)
        break
      if grids is not None and plan.due(step, plan.sample_every):
        grids.write(step, p_state.ema_params, logger)
  logger.close()
  return jax.device_get(parallel.unreplicate(p_state))
