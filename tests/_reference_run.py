"""The reference run of the fault-injection tests (tests/test_main.py, test_checkpointing.py,
test_train.py): configs/test_tiny.py for REF_STEPS steps at batch 16, checkpoints every 8
steps, trained once per session in-process (conftest.py's `reference_run` fixture), and the
helpers that compare other runs and damaged copies with it.

Every run of these tests uses the same learning rate and batch, so all share the compiled
train step: conftest.py's persistent compile cache reaches the processes forked by
tests/_fault_tools.py's server through the environment.
"""

from __future__ import annotations

import logging
import os
import shutil

import jax
import numpy as np

from ddpm_jax import checkpointing, train
from tests import _fault_tools as ft
from tests.conftest import tiny_config

REF_STEPS = 24
REF_FLAGS = (
  f"--config.training.num_train_steps={REF_STEPS}",
  "--config.training.checkpoint_every_steps=8",
  "--config.training.log_every_steps=1",
  "--config.training.sample_every_steps=0",
)
KEPT = [REF_STEPS - 16, REF_STEPS - 8, REF_STEPS]  # The reference run's checkpoints (keep 3).
NO_PERIODIC_SAVES = ("--config.training.checkpoint_every_steps=1000",)


def config(**overrides):
  """configs/test_tiny.py with REF_FLAGS applied, then ``overrides`` ("group.field": value)."""
  ref = dict(flag[len("--config.") :].split("=") for flag in REF_FLAGS)
  return tiny_config(**{**{k: int(v) for k, v in ref.items()}, **overrides})


def main_args(workdir, *flags):
  """main.py's arguments for a run of configs/test_tiny.py in ``workdir``."""
  return [
    "--config",
    os.path.join(ft.REPO, "configs", "test_tiny.py"),
    "--workdir",
    str(workdir),
    *flags,
  ]


def assert_same_bits(a, b) -> None:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def restore(workdir, target, step=None):
  """The TrainState of ``workdir`` at ``step`` (None: the newest intact one)."""
  checkpointer = checkpointing.Checkpointer(str(workdir), keep=100)
  try:
    return checkpointer.restore(target, step)
  finally:
    checkpointer.close()


def corrupt(step_dir: str, how: str) -> None:
  """Damages a checkpoint step folder: 'flip' bits, 'truncate' its largest file, or remove
  its data ('remove_data') or its fingerprint ('remove_fingerprint')."""
  if how == "flip":  # Orbax reads it back without complaint: only the fingerprint sees it.
    ft.flip_bytes(ft.largest_file(os.path.join(step_dir, checkpointing.STATE_ITEM)))
  elif how == "truncate":
    path = ft.largest_file(os.path.join(step_dir, checkpointing.STATE_ITEM))
    os.truncate(path, os.path.getsize(path) // 2)
  elif how == "remove_data":
    shutil.rmtree(os.path.join(step_dir, checkpointing.STATE_ITEM, "ocdbt.process_0"))
  elif how == "remove_fingerprint":
    shutil.rmtree(os.path.join(step_dir, checkpointing.FINGERPRINT_ITEM))
  else:
    raise AssertionError(how)


class _Lines(logging.Handler):
  """Collects the messages of the absl logger (train.py's progress lines, warnings)."""

  def __init__(self):
    super().__init__(logging.INFO)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def train_reference(workdir):
  """The uninterrupted run: (workdir, final TrainState, {step: loss}) on 8 devices."""
  lines, absl_logger = _Lines(), logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.addHandler(lines)
  absl_logger.setLevel(logging.INFO)
  try:
    state = train.train(config(), str(workdir))
  finally:
    absl_logger.removeHandler(lines)
    absl_logger.setLevel(level)
  return workdir, state, ft.step_losses("\n".join(lines.messages))
