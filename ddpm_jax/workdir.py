"""The workdir of a run: its record (config.json), its lock and preemption.

Layout::

  workdir/config.json           the resolved config of the first start (kept once a
                                checkpoint exists)
  workdir/train.lock            held (fcntl.flock) by the one training process of the workdir
  workdir/checkpoints/          Orbax checkpoints (checkpointing.py)
  workdir/checkpoints_corrupt/  checkpoints that failed verification, moved aside
  workdir/tensorboard/          TensorBoard event files
  workdir/samples/              PNG sample grids, and sample sets of --mode=sample
  workdir/eval/                 results of --mode=eval
  workdir/logs/                 the full output of a pod host stopped by another's death
                                (supervisor.py)

A config that changes what an existing checkpoint means (the network, the diffusion
process, the data shape, the seed) is refused; everything else may change on resume.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import tempfile
import uuid
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import hosts
from ddpm_jax.errors import ConfigError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = "train.lock"
# Fields whose change makes an existing checkpoint mean something else. Everything else
# (training length, logging, learning rate, batch size, dtype, remat, ...) may change.
FROZEN_FIELDS = (
  "data.image_size",
  "data.num_channels",
  "model.ch",
  "model.ch_mult",
  "model.num_res_blocks",
  "model.attn_resolutions",
  "model.resamp_with_conv",
  "model.num_groups",
  "diffusion.beta_schedule",
  "diffusion.beta_start",
  "diffusion.beta_end",
  "diffusion.num_timesteps",
  "diffusion.model_mean_type",
  "diffusion.model_var_type",
  "training.seed",  # The rng of the state and the data order both derive from it.
)


def resolve(workdir: str) -> str:
  """The absolute path of ``workdir`` (``~`` expanded)."""
  return os.path.abspath(os.path.expanduser(workdir))


def _make_writable_dir(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"workdir {workdir!r} exists and is not a directory.")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test_"):
      pass
  except OSError as e:
    raise ConfigError(f"workdir {workdir!r} is not writable: {e.strerror or e}.") from e


def prepare(workdir: str) -> str:
  """Creates the workdir if needed and checks it is a writable directory; returns its path.

  On several hosts it must also be ONE folder that every host sees (shared storage):
  process 0 writes a marker file and every host must find it, else a ConfigError on all.
  """
  workdir = resolve(workdir)
  hosts.agree(lambda: _make_writable_dir(workdir))
  if hosts.multi():
    marker = os.path.join(
      workdir,
      ".hosts_"
      + hosts.broadcast(np.frombuffer(uuid.uuid4().bytes, np.uint8).copy()).tobytes().hex(),
    )
    if hosts.is_chief():
      open(marker, "w").close()
    hosts.barrier("workdir_marker_written")

    def check_marker() -> None:
      if not os.path.exists(marker):
        raise ConfigError(
          f"workdir {workdir!r} is not shared: process {jax.process_index()} does not see "
          "the file process 0 wrote there. Every host of a pod must see the same folder "
          "at the same path (NFS, Filestore, a gcsfuse mount)."
        )

    try:
      hosts.agree(check_marker)
    finally:
      hosts.barrier("workdir_marker_checked")
      if hosts.is_chief():
        os.remove(marker)
  return workdir


def output_dir(workdir: str, kind: str, name: str, files: tuple[str, ...]) -> str:
  """workdir/<kind>/<name>/; refuses (ConfigError) if any of ``files`` is already there."""
  out = os.path.join(resolve(workdir), kind, name)
  existing = [f for f in files if os.path.exists(os.path.join(out, f))]
  if existing:
    raise ConfigError(f"{out} already holds {existing}; move them away to recompute.")
  return out


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


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of workdir/checkpoints that Orbax finalised (renamed from their temporary
  name), from the folder names alone: nothing is opened or verified."""
  ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
  names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
  return sorted(int(d) for d in names if d.isdigit())


def has_checkpoint(workdir: str) -> bool:
  return bool(checkpoint_steps(workdir))


def check_or_write_config(
  config: ml_collections.ConfigDict, workdir: str, *, write: bool = True
) -> None:
  """Writes workdir/config.json on the first start; once a checkpoint exists, refuses changes.

  Raises ConfigError naming every frozen field whose value differs from the saved config.
  While workdir/checkpoints holds no step (a first start that failed early), the file is
  rewritten with the new config: there is nothing it could mismatch. ``write=False``
  (sampling and evaluation) only checks; processes other than 0 never write. Every host
  ends with the same outcome.
  """
  hosts.agree(lambda: _check_or_write_config(config, workdir, write=write and hosts.is_chief()))


def _check_or_write_config(config: ml_collections.ConfigDict, workdir: str, *, write: bool) -> None:
  path = os.path.join(workdir, CONFIG_FILE)
  new = _jsonable(config.to_dict())
  if os.path.exists(path) and (has_checkpoint(workdir) or not write):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ConfigError(f"Cannot read the saved config {path!r} ({e}); fix or move it.") from e
    diffs = [
      f"{k}: {_lookup(old, k)!r} -> {_lookup(new, k)!r}"
      for k in FROZEN_FIELDS
      if _lookup(old, k) != _lookup(new, k)
    ]
    if diffs:
      raise ConfigError(
        f"Config incompatible with the run in {workdir!r} ({'; '.join(diffs)}); "
        "use a new --workdir or the saved values."
      )
    return
  if write:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(new, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The check of check_or_write_config without its write: run before the lock is taken."""
  if has_checkpoint(workdir):
    check_or_write_config(config, workdir, write=False)


class WorkdirLock:
  """An exclusive fcntl.flock on workdir/train.lock for the whole training run.

  A second training process on the same workdir gets a ConfigError naming the workdir and
  the PID that holds the lock. The kernel drops the lock when its holder dies (also on
  kill -9), so a restart never finds a stale lock; the file itself is kept. flock works on
  local disks and on NFSv4; a filesystem without locks (some FUSE mounts) gets a warning
  and no lock. Pods take the lock on process 0 only, and every host gets its outcome.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.workdir = workdir
    self._file = None

  def __enter__(self) -> WorkdirLock:
    hosts.agree(self._acquire, chief_only=True)
    return self

  def _acquire(self) -> None:
    f = open(self.path, "a+")  # noqa: SIM115  (held open, locked, until release())
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "unknown"
      f.close()
      raise ConfigError(
        f"workdir {self.workdir!r} is in use by another training process "
        f"(PID {holder}, lock {self.path}); wait for it or stop it first."
      ) from None
    except OSError as e:
      f.close()
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise
      logging.warning(
        "Cannot lock %s (%s): nothing stops a second training process on this workdir.",
        self.path,
        e.strerror,
      )
      return
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    self._file = f

  def __exit__(self, *exc: Any) -> None:
    if self._file is not None:
      fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
      self._file.close()
      self._file = None


class SigtermFlag:
  """Records SIGTERM (TPU preemption, `kill`) so the loop can checkpoint and exit cleanly.

  On pods JAX's preemption notifier (jax.distributed) owns SIGTERM and the hosts agree on
  the step through Checkpointer.reached_preemption; a local flag would desync them, so none
  is installed there.
  """

  def __init__(self) -> None:
    self.received = False
    self._previous = None

  def __enter__(self) -> SigtermFlag:
    if jax.process_count() > 1:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: no handler, rely on periodic checkpoints.
      self._previous = None
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    logging.warning("SIGTERM received: saving a checkpoint at the current step, then exiting.")
    self.received = True

  def __exit__(self, *exc: Any) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
