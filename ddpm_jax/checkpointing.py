"""Workdir bookkeeping and verified Orbax checkpoints: save, keep the last k, restore.

Workdir layout::

  workdir/config.json           the resolved config of the first start (kept once a
                                checkpoint exists)
  workdir/train.lock            held (fcntl.flock) by the one training process of the workdir
  workdir/checkpoints/<step>/   Orbax checkpoints: item "state" (the TrainState as NumPy,
                                unreplicated) and item "fingerprint" (sha256 of every leaf)
  workdir/checkpoints_corrupt/<step>/   checkpoints that failed verification, moved aside
  workdir/tensorboard/          TensorBoard event files
  workdir/samples/              PNG sample grids

Re-running the same command resumes from the latest intact checkpoint; a config that
changes what the checkpoint means (the network, the diffusion process, the data shape) is
refused. Orbax writes each checkpoint under a temporary name and renames it when complete,
so a process killed mid-save leaves a ``<step>.orbax-checkpoint-tmp-*`` folder that is never
listed as a step. Orbax does not checksum array bytes, hence the fingerprint: it is written
inside the checkpoint before Orbax finalises it and checked on every restore.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import tempfile
from typing import Any, TypeVar

import flax.serialization
from flax import traverse_util
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"
LOCK_FILE = "train.lock"
STATE_ITEM, FINGERPRINT_ITEM = "state", "fingerprint"
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


def _has_checkpoint(workdir: str) -> bool:
  ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
  return os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))


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
  if os.path.exists(path) and (_has_checkpoint(workdir) or not write):
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


def check_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The check of check_or_write_config(write=True) without its write (before the lock)."""
  if _has_checkpoint(workdir):
    check_or_write_config(config, workdir, write=False)


class WorkdirLock:
  """An exclusive fcntl.flock on workdir/train.lock for the whole training run.

  A second training process on the same workdir gets a ValueError naming the workdir and
  the PID that holds the lock. The kernel drops the lock when its holder dies (also on
  kill -9), so a restart never finds a stale lock; the file itself is kept. flock works on
  local disks and on NFSv4; a filesystem without locks (some FUSE mounts) gets a warning
  and no lock. Object stores (gs://) have no locks at all: there only one job may be
  pointed at a workdir. Pods take the lock on process 0 only (``enabled``).
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.workdir = workdir
    self.enabled = enabled and "://" not in workdir
    self._file = None

  def __enter__(self) -> "WorkdirLock":
    if not self.enabled:
      return self
    f = open(self.path, "a+")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "unknown"
      f.close()
      raise ValueError(f"workdir {self.workdir!r} is in use by another training process "
                       f"(PID {holder}, lock {self.path}); wait for it or stop it first.") from None
    except OSError as e:
      f.close()
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise
      logging.warning("Cannot lock %s (%s): nothing stops a second training process on this "
                      "workdir.", self.path, e.strerror)
      return self
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    self._file = f
    return self

  def __exit__(self, *exc: Any) -> None:
    if self._file is not None:
      fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def _flat_leaves(state_dict: Any) -> dict[str, np.ndarray]:
  """'/'-joined key paths of a nested state dict -> its leaves as NumPy arrays."""
  flat = traverse_util.flatten_dict(state_dict, sep="/") if state_dict else {}
  return {k: np.asarray(v) for k, v in flat.items() if not isinstance(v, dict)}


def fingerprint(state_dict: Any) -> dict[str, str]:
  """sha256 of the dtype, shape and bytes of every leaf, keyed by the leaf's path."""
  out = {}
  for path, leaf in sorted(_flat_leaves(state_dict).items()):
    h = hashlib.sha256(f"{leaf.dtype.str}{leaf.shape}".encode())
    h.update(np.ascontiguousarray(leaf).tobytes())
    out[path] = h.hexdigest()
  return out


def check_finite(state_dict: Any, step: int) -> None:
  """FloatingPointError naming the first leaf of ``state_dict`` holding a NaN or inf."""
  for path, leaf in _flat_leaves(state_dict).items():
    if np.issubdtype(leaf.dtype, np.inexact) and not np.all(np.isfinite(leaf)):
      raise FloatingPointError(f"The state of step {step} holds non-finite values in {path}; "
                               "not saving it.")


class Checkpointer:
  """Orbax CheckpointManager for a flax.struct TrainState, saved unreplicated as NumPy.

  Every save stores a fingerprint of the state; every restore verifies it. With no explicit
  step, a checkpoint that fails (unreadable, files missing, fingerprint mismatch) is
  reported with a warning and the next older one is tried.
  """

  def __init__(self, workdir: str, *, keep: int):
    if keep < 1:
      raise ValueError(f"training.keep_checkpoints={keep} must be >= 1.")
    self.workdir = workdir
    self.directory = os.path.join(workdir, CHECKPOINT_DIR)
    # Synchronous saves: save() waits for the write anyway (a returned save is on disk).
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           lightweight_initialize=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE_ITEM, FINGERPRINT_ITEM))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any) -> bool:
    """Saves ``state`` (unreplicated) at ``step``; a step already saved is left as it is.

    FloatingPointError, before anything is written, if a leaf holds a NaN or inf.
    """
    if step in self._manager.all_steps():
      return False
    state_dict = flax.serialization.to_state_dict(jax.device_get(state))
    check_finite(state_dict, step)
    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state_dict),
                                 FINGERPRINT_ITEM: ocp.args.JsonSave(fingerprint(state_dict))})
    saved = self._manager.save(step, args=args, force=True)
    self._manager.wait_until_finished()
    return bool(saved)

  def _restore_verified(self, step: int, abstract: Any | None) -> Any:
    """The state dict of ``step``, its fingerprint checked; raises on any failure."""
    step_dir = os.path.join(self.directory, str(step))
    if not os.path.isdir(os.path.join(step_dir, FINGERPRINT_ITEM)):
      old = os.path.isdir(os.path.join(step_dir, "default"))
      raise ValueError("no fingerprint item" + (" (an unverifiable checkpoint of an older "
                                                "ddpm_jax)" if old else ""))
    state_args = ocp.args.StandardRestore(abstract)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        **{STATE_ITEM: state_args, FINGERPRINT_ITEM: ocp.args.JsonRestore()}))
    expected, state_dict = restored[FINGERPRINT_ITEM], restored[STATE_ITEM]
    actual = fingerprint(state_dict)
    if not isinstance(expected, dict) or expected != actual:
      expected = expected if isinstance(expected, dict) else {}
      bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
      raise ValueError(f"fingerprint mismatch in {len(bad)} leaves, e.g. {bad[:3]}")
    return state_dict

  def _move_aside(self, step: int) -> str:
    """Renames checkpoints/<step> to checkpoints_corrupt/<step>[.n]; returns the new path."""
    target_dir = os.path.join(self.workdir, CORRUPT_DIR)
    os.makedirs(target_dir, exist_ok=True)
    target, n = os.path.join(target_dir, str(step)), 0
    while os.path.exists(target):
      n += 1
      target = os.path.join(target_dir, f"{step}.{n}")
    os.rename(os.path.join(self.directory, str(step)), target)
    return target

  def _restore_with_fallback(self, step: int | None, abstract: Any | None, *,
                             move_bad: bool) -> tuple[Any, int] | None:
    """(state dict, step): ``step`` exactly, or the newest intact one when ``step`` is None."""
    available = self.all_steps()
    if step is not None:
      if step not in available:
        raise ValueError(f"No checkpoint at step {step} in {self.directory!r}; "
                         f"available: {available}.")
      try:
        return self._restore_verified(step, abstract), step
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"Checkpoint {os.path.join(self.directory, str(step))} is corrupt or "
                         f"unreadable ({_one_line(e)}); choose another step of {available}."
                         ) from e
    failures = []
    for candidate in sorted(available, reverse=True):
      try:
        state_dict = self._restore_verified(candidate, abstract)
      except Exception as e:  # pylint: disable=broad-except  (any failure: try the next)
        path = os.path.join(self.directory, str(candidate))
        failures.append((candidate, path, _one_line(e)))
        logging.warning("Checkpoint step %d (%s) is corrupt or unreadable: %s; trying the "
                        "previous one.", candidate, path, _one_line(e))
        continue
      for bad_step, path, _ in failures:
        if move_bad and jax.process_index() == 0:
          logging.warning("Moved the corrupt checkpoint of step %d from %s to %s (kept for "
                          "inspection; delete it yourself).", bad_step, path,
                          self._move_aside(bad_step))
      if failures and move_bad:
        self._manager.reload()
      if failures:
        logging.warning("Restored step %d instead of the corrupt step(s) %s.", candidate,
                        [s for s, _, _ in failures])
      return state_dict, candidate
    if failures:
      raise ValueError(f"No intact checkpoint in {self.directory!r}: " + "; ".join(
          f"step {s}: {why}" for s, _, why in failures) + ". Nothing was moved or deleted.")
    return None

  def restore(self, target: T, step: int | None = None) -> T | None:
    """Restores ``step`` (default: the newest intact one) into the structure of ``target``
    (arrays or jax.ShapeDtypeStructs); returns NumPy leaves, or None if there is no
    checkpoint. Corrupt checkpoints newer than the one restored are moved aside to
    workdir/checkpoints_corrupt/ with a warning; an explicit bad ``step`` is a ValueError."""
    abstract = flax.serialization.to_state_dict(
        jax.tree.map(lambda x: np.zeros(np.shape(x), x.dtype), target))
    found = self._restore_with_fallback(step, abstract, move_bad=True)
    return None if found is None else flax.serialization.from_state_dict(target, found[0])

  def restore_params(self, step: int | None = None, *, which: str = "ema_params"
                     ) -> tuple[Any, int]:
    """(the ``which`` parameters of ``step`` (None or -1: the newest intact one) as NumPy
    trees, the step). Needs no model: the saved tree is read as it is. Read-only: a corrupt
    checkpoint is skipped with a warning but not moved. ValueError if there is none."""
    if step is not None and int(step) < -1:
      raise ValueError(f"sampling.checkpoint_step={step} must be a step >= 0 or -1 (latest).")
    if not self.all_steps():
      raise ValueError(f"No checkpoint in {self.directory!r}; train first (--mode=train).")
    step = None if step is None or int(step) == -1 else int(step)
    state_dict, step = self._restore_with_fallback(step, None, move_bad=False)
    return state_dict[which], step

  def reached_preemption(self, step: int) -> bool:
    """Multi-host preemption sync point (JAX's preemption notifier); False on one process."""
    return jax.process_count() > 1 and self._manager.reached_preemption(step)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return f"{type(e).__name__}: {text[:300]}"
