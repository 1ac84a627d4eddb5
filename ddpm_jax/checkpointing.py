"""Workdir bookkeeping and Orbax checkpoints: save, keep the last k, restore the latest.

Workdir layout::

  workdir/config.json           the resolved config of the first start (kept once a
                                checkpoint exists)
  workdir/checkpoints/<step>/   Orbax checkpoints of the TrainState (numpy, unreplicated)
  workdir/tensorboard/          TensorBoard event files
  workdir/samples/              PNG sample grids

Re-running the same command resumes from the latest checkpoint; a config that changes what
the checkpoint means (the network, the diffusion process, the data shape) is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, TypeVar

import flax.serialization
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
# Fields whose change makes an existing checkpoint mean something else. Everything else
# (training length, logging, learning rate, batch size, dtype, remat, ...) may change.
FROZEN_FIELDS = (
    "data.image_size", "data.num_channels",
    "model.ch", "model.ch_mult", "model.num_res_blocks", "model.attn_resolutions",
    "model.resamp_with_conv", "model.num_groups",
    "diffusion.beta_schedule", "diffusion.beta_start", "diffusion.beta_end",
    "diffusion.num_timesteps", "diffusion.model_mean_type", "diffusion.model_var_type",
    "training.seed",  # The rng of the state and the data order both derive from it.
)

T = TypeVar("T")


def prepare_workdir(workdir: str) -> str:
  """Creates the workdir if needed and checks it is a writable directory; returns its path."""
  if not workdir:
    raise ValueError("--workdir is empty; give a directory for checkpoints and logs.")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir!r} exists and is not a directory.")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test_"):
      pass
  except OSError as e:
    raise ValueError(f"workdir {workdir!r} is not writable: {e.strerror or e}.") from e
  return workdir


def _jsonable(value: Any) -> Any:
  if isinstance(value, (tuple, list)):
    return [_jsonable(v) for v in value]
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  return value


def _lookup(tree: dict, dotted: str) -> Any:
  node: Any = tree
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return "<absent>"
    node = node[part]
  return node


def check_or_write_config(config: ml_collections.ConfigDict, workdir: str, *,
                          write: bool = True) -> None:
  """Writes workdir/config.json on the first start; once a checkpoint exists, refuses changes.

  Raises ValueError naming every frozen field whose value differs from the saved config.
  While workdir/checkpoints holds no step (a first start that failed early), the file is
  rewritten with the new config: there is nothing it could mismatch. ``write=False``
  (processes other than 0, sampling and evaluation) only checks.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  new = _jsonable(config.to_dict())
  ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
  has_checkpoint = os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))
  if os.path.exists(path) and (has_checkpoint or not write):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"Cannot read the saved config {path!r} ({e}); fix or move it.") from e
    diffs = [f"{k}: {_lookup(old, k)!r} -> {_lookup(new, k)!r}" for k in FROZEN_FIELDS
             if _lookup(old, k) != _lookup(new, k)]
    if diffs:
      raise ValueError(f"Config incompatible with the run in {workdir!r} ({'; '.join(diffs)}); "
                       "use a new --workdir or the saved values.")
    return
  if write:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(new, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


class Checkpointer:
  """Orbax CheckpointManager for a flax.struct TrainState, saved unreplicated as NumPy."""

  def __init__(self, workdir: str, *, keep: int):
    if keep < 1:
      raise ValueError(f"training.keep_checkpoints={keep} must be >= 1.")
    self.directory = os.path.join(workdir, CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any) -> bool:
    """Saves ``state`` (unreplicated) at ``step``; a step already saved is left as it is."""
    if step in self._manager.all_steps():
      return False
    state_dict = flax.serialization.to_state_dict(jax.device_get(state))
    saved = self._manager.save(step, args=ocp.args.StandardSave(state_dict), force=True)
    self._manager.wait_until_finished()
    return bool(saved)

  def restore(self, target: T, step: int | None = None) -> T | None:
    """Restores ``step`` (default: the latest) into the structure of ``target`` (arrays or
    jax.ShapeDtypeStructs); returns NumPy leaves, or None if there is no checkpoint."""
    step = self._manager.latest_step() if step is None else step
    if step is None:
      return None
    if step not in self._manager.all_steps():
      raise ValueError(f"No checkpoint at step {step} in {self.directory!r}; "
                       f"available: {self.all_steps()}.")
    abstract = flax.serialization.to_state_dict(
        jax.tree.map(lambda x: np.zeros(np.shape(x), x.dtype), target))
    restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    return flax.serialization.from_state_dict(target, restored)

  def restore_params(self, step: int | None = None, *, which: str = "ema_params"
                     ) -> tuple[Any, int]:
    """(the ``which`` parameters of ``step`` (default: the latest) as NumPy trees, the step).

    Needs no model: the saved tree is read as it is. ValueError if there is no checkpoint.
    """
    available = self.all_steps()
    if not available:
      raise ValueError(f"No checkpoint in {self.directory!r}; train first (--mode=train).")
    step = max(available) if step is None or step < 0 else int(step)
    if step not in available:
      raise ValueError(f"No checkpoint at step {step} in {self.directory!r}; "
                       f"available: {available}.")
    restored = self._manager.restore(step, args=ocp.args.StandardRestore())
    return restored[which], step

  def reached_preemption(self, step: int) -> bool:
    """Multi-host preemption sync point (JAX's preemption notifier); False on one process."""
    return jax.process_count() > 1 and self._manager.reached_preemption(step)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
