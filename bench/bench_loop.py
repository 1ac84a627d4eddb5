"""Train-loop overhead: steps/s of the real loop (ddpm_jax.train.train: data pipeline,
logging, checkpoints and sample grids at their configured intervals) over the bare pmapped
step timed as bench_train.py times it, in one process on the same machine.

  python -m bench.bench_loop --config=configs/test_tiny.py --loop_steps=300
  python -m bench.bench_loop --config=configs/cifar10.py --config.data.dataset=synthetic \\
      --config.training.batch_size=8 --config.training.log_every_steps=5 \\
      --config.training.sample_every_steps=0 --loop_steps=30 --bare_steps=5

(sample_every_steps=0: the last step would otherwise draw a 1000-step grid, for hours on a
CPU; it falls after the last log line, so it is never timed.)

The loop's rate is the step count over the wall time between its first and last log lines
(compilation, which happens before the first, is excluded); the bare rate is the median of
--bare_steps calls, each ended with block_until_ready. overhead = bare / loop - 1 (negative:
the loop overlaps host work with the device better than single blocking calls). Prints one
JSON line; nothing is asserted.
"""

from __future__ import annotations

import logging as logging_std
import re
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from bench import common
from ddpm_jax import config_checks, factories, parallel, train, train_state, train_step

config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
flags.DEFINE_integer(
  "loop_steps",
  200,
  "Steps the loop trains (its first log interval, which includes compilation, is not counted).",
)
flags.DEFINE_integer("bare_steps", 20, "Timed bare-step calls; the median is reported.")
flags.DEFINE_string("out", "", "Append the JSON line to this file.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS
_LINE = re.compile(r"step (\d+)/\d+ ")


class _LogTimes(logging_std.Handler):
  """(wall time, step) of every progress line of the train loop."""

  def __init__(self):
    super().__init__(logging_std.INFO)
    self.points: list[tuple[float, int]] = []

  def emit(self, record: logging_std.LogRecord) -> None:
    match = _LINE.match(record.getMessage())
    if match:
      self.points.append((time.perf_counter(), int(match.group(1))))


def bare_step_s(config) -> float:
  """Median seconds of one bare train step (bench_train.py's method)."""
  model, schedule = factories.create_model(config), factories.create_schedule(config.diffusion)
  tx = train_state.create_optimizer(config.training)
  p_state = parallel.replicate(train_state.create_train_state(config, model, tx))
  step = train_step.make_p_train_step(config, model, schedule, tx, num_steps=1)
  devices, batch = jax.local_device_count(), int(config.training.batch_size)
  size, channels = int(config.data.image_size), int(config.data.num_channels)
  images = np.random.default_rng(0).integers(
    0, 256, (devices, batch // devices, size, size, channels), dtype=np.uint8
  )
  images = next(parallel.prefetch_to_device(iter([images]), size=1))
  compiled = step.lower(p_state, images).compile()

  def call():
    nonlocal p_state
    p_state, metrics = compiled(p_state, images)
    return metrics

  jax.block_until_ready(call())
  return common.median_time(call, FLAGS.bare_steps)[0]


def loop_step_s(config) -> tuple[float, int]:
  """(seconds per step of train.train between its first and last log line, steps timed)."""
  config.training.num_train_steps = FLAGS.loop_steps
  handler, absl_logger = _LogTimes(), logging_std.getLogger("absl")
  absl_logger.addHandler(handler)
  absl_logger.setLevel(logging_std.INFO)
  try:
    with tempfile.TemporaryDirectory() as workdir:
      train.train(config, workdir)
  finally:
    absl_logger.removeHandler(handler)
  (t0, s0), (t1, s1) = handler.points[0], handler.points[-1]
  if s1 <= s0:
    raise app.UsageError(
      "The loop logged once: raise --loop_steps or lower --config.training.log_every_steps."
    )
  return (t1 - t0) / (s1 - s0), s1 - s0


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  config_checks.check_config(config, "train")
  bare = bare_step_s(config)
  loop, timed = loop_step_s(config)
  tr = config.training
  record = {
    "bench": "train_loop",
    "config": config_flags.get_config_filename(FLAGS["config"]),
    "global_batch": int(tr.batch_size),
    "steps_per_call": int(tr.steps_per_call),
    "log_every_steps": int(tr.log_every_steps),
    "checkpoint_every_steps": int(tr.checkpoint_every_steps),
    "sample_every_steps": int(tr.sample_every_steps),
    "loop_steps_timed": timed,
    "bare_step_s": bare,
    "loop_step_s": loop,
    "bare_steps_per_s": 1 / bare,
    "loop_steps_per_s": 1 / loop,
    "overhead": loop / bare - 1.0,
  }
  record.update(common.machine())
  common.emit(record, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
