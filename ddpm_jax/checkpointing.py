"""Verified Orbax checkpoints of a TrainState: save, keep the last k, restore with fallback.

Checkpoints live in workdir/checkpoints/<step>/ with two items: "state" (the TrainState as
NumPy, unreplicated) and "fingerprint" (sha256 of every leaf). Orbax writes each checkpoint
under a temporary name and renames it when complete, so a process killed mid-save leaves a
``<step>.orbax-checkpoint-tmp-*`` folder that is never listed as a step. Orbax does not
checksum array bytes, hence the fingerprint: it is written inside the checkpoint before
Orbax finalises it and checked on every restore. Checkpoints that fail verification are
moved to workdir/checkpoints_corrupt/ by training (never deleted); sampling and evaluation
open the store read-only and only skip them.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, TypeVar

import flax.serialization
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from ddpm_jax import hosts
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.errors import ConfigError, NonFiniteError

CORRUPT_DIR = "checkpoints_corrupt"
STATE_ITEM, FINGERPRINT_ITEM = "state", "fingerprint"

T = TypeVar("T")


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
  """NonFiniteError naming the first leaf of ``state_dict`` holding a NaN or inf."""
  for path, leaf in _flat_leaves(state_dict).items():
    if np.issubdtype(leaf.dtype, np.inexact) and not np.all(np.isfinite(leaf)):
      raise NonFiniteError(
        f"The state of step {step} holds non-finite values in {path}; not saving it."
      )


class Checkpointer:
  """Orbax CheckpointManager for a flax.struct TrainState, saved unreplicated as NumPy.

  Every save stores a fingerprint of the state; every restore verifies it. With no explicit
  step, a checkpoint that fails (unreadable, files missing, fingerprint mismatch) is
  reported with a warning and the next older one is tried. ``read_only=True`` (sampling,
  evaluation) never saves, prunes or moves anything; training passes ``keep``, the number
  of checkpoints kept.
  """

  def __init__(
    self, workdir: str, *, keep: int | None = None, keep_every: int = 0, read_only: bool = False
  ):
    """``keep``: the newest checkpoints kept; ``keep_every`` > 0 also keeps every step that
    is a multiple of it, permanently (the checkpoints a minimum-FID sweep scores)."""
    if read_only == (keep is not None):
      raise ValueError("Checkpointer needs either keep=k (training) or read_only=True")
    self.workdir = workdir
    self.read_only = read_only
    self.directory = os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)
    # Synchronous saves: save() waits for the write anyway (a returned save is on disk).
    # Read-only: no folder is created and nothing is ever pruned (max_to_keep=None); save()
    # refuses. (Orbax's own read_only option would log a warning on every open.) Not
    # lightweight_initialize: it gives existing steps a naive datetime.min, which Orbax's own
    # bookkeeping then fails to compare with aware datetimes when a pod saves on preemption.
    policies = [ocp.checkpoint_managers.LatestN(keep)] if keep else []
    if keep_every:
      policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
    options = ocp.CheckpointManagerOptions(
      create=not read_only,
      enable_async_checkpointing=False,
      preservation_policy=(
        ocp.checkpoint_managers.AnyPreservationPolicy(policies) if policies else None
      ),
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=(STATE_ITEM, FINGERPRINT_ITEM)
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any) -> bool:
    """Saves ``state`` (unreplicated) at ``step``; a step already saved is left as it is.

    NonFiniteError, before anything is written, if a leaf holds a NaN or inf.
    """
    if self.read_only:
      raise ValueError(f"this Checkpointer of {self.directory!r} is read-only")
    if step in self._manager.all_steps():
      return False
    state_dict = flax.serialization.to_state_dict(jax.device_get(state))
    check_finite(state_dict, step)
    args = ocp.args.Composite(
      **{
        STATE_ITEM: ocp.args.StandardSave(state_dict),
        FINGERPRINT_ITEM: ocp.args.JsonSave(fingerprint(state_dict)),
      }
    )
    saved = self._manager.save(step, args=args, force=True)
    self._manager.wait_until_finished()
    return bool(saved)

  def _restore_verified(self, step: int, abstract: Any | None) -> Any:
    """The state dict of ``step``, its fingerprint checked; raises on any failure."""
    step_dir = os.path.join(self.directory, str(step))
    if not os.path.isdir(os.path.join(step_dir, FINGERPRINT_ITEM)):
      old = os.path.isdir(os.path.join(step_dir, "default"))
      raise ValueError(
        "no fingerprint item"
        + (" (an unverifiable checkpoint of an older ddpm_jax)" if old else "")
      )
    state_args = ocp.args.StandardRestore(abstract)
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(**{STATE_ITEM: state_args, FINGERPRINT_ITEM: ocp.args.JsonRestore()}),
    )
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

  def _find_intact(
    self, step: int | None, abstract: Any | None
  ) -> tuple[Any, int, list[tuple[int, str, str]]] | None:
    """(state dict, its step, the failures of newer steps): ``step`` exactly, or the newest
    intact one when ``step`` is None; None when there is no checkpoint at all."""
    available = self.all_steps()
    if step is not None:
      if step not in available:
        raise ConfigError(
          f"No checkpoint at step {step} in {self.directory!r}; available: {available}."
        )
      try:
        return self._restore_verified(step, abstract), step, []
      except jax.errors.JaxRuntimeError:
        raise  # A failed collective of Orbax's (a lost host), not a bad checkpoint.
      except Exception as e:
        raise ConfigError(
          f"Checkpoint {os.path.join(self.directory, str(step))} is corrupt or "
          f"unreadable ({_one_line(e)}); choose another step of {available}."
        ) from e
    failures = []
    for candidate in sorted(available, reverse=True):
      try:
        return self._restore_verified(candidate, abstract), candidate, failures
      except jax.errors.JaxRuntimeError:
        raise  # As above: every host must not give up a good checkpoint for a lost peer.
      except Exception as e:  # Broad on purpose: any failure: try the next.
        path = os.path.join(self.directory, str(candidate))
        failures.append((candidate, path, _one_line(e)))
        logging.warning(
          "Checkpoint step %d (%s) is corrupt or unreadable: %s; trying the previous one.",
          candidate,
          path,
          _one_line(e),
        )
    if failures:
      raise ConfigError(
        f"No intact checkpoint in {self.directory!r}: "
        + "; ".join(f"step {s}: {why}" for s, _, why in failures)
        + ". Nothing was moved or deleted."
      )
    return None

  def _restore_with_fallback(
    self, step: int | None, abstract: Any | None
  ) -> tuple[Any, int] | None:
    """`_find_intact` on every host, which must all find the same step; then (unless
    read-only) process 0 moves the corrupt newer steps aside while the others wait, so no
    host reads a folder that is being moved."""
    found = hosts.agree(lambda: self._find_intact(step, abstract))
    chosen = hosts.gather(np.array([-1 if found is None else found[1]], np.int32))
    if len(set(chosen.tolist())) > 1:
      raise ConfigError(
        f"The hosts found different intact checkpoints in {self.directory!r} "
        f"({chosen.tolist()} by process); is the workdir shared?"
      )
    if found is None:
      return None
    state_dict, step, failures = found
    if failures and not self.read_only:
      hosts.barrier("checkpoints_restored")
      if hosts.is_chief():
        for bad_step, path, _ in failures:
          logging.warning(
            "Moved the corrupt checkpoint of step %d from %s to %s (kept for "
            "inspection; delete it yourself).",
            bad_step,
            path,
            self._move_aside(bad_step),
          )
      hosts.barrier("corrupt_checkpoints_moved")
      self._manager.reload()
    if failures:
      logging.warning(
        "Restored step %d instead of the corrupt step(s) %s.", step, [s for s, _, _ in failures]
      )
    return state_dict, step

  def restore(self, target: T, step: int | None = None) -> T | None:
    """Restores ``step`` (default: the newest intact one) into the structure of ``target``
    (arrays or jax.ShapeDtypeStructs); returns NumPy leaves, or None if there is no
    checkpoint. Corrupt checkpoints newer than the one restored are moved aside to
    workdir/checkpoints_corrupt/ with a warning (unless read-only); an explicit bad ``step``
    is a ConfigError."""
    abstract = flax.serialization.to_state_dict(
      jax.tree.map(lambda x: np.zeros(np.shape(x), x.dtype), target)
    )
    found = self._restore_with_fallback(step, abstract)
    return None if found is None else flax.serialization.from_state_dict(target, found[0])

  def restore_params(self, step: int = -1, *, which: str = "ema_params") -> tuple[Any, int]:
    """(the ``which`` parameters of ``step`` (-1: the newest intact one) as NumPy trees, the
    step). Needs no model: the saved tree is read as it is. ConfigError if there is none."""
    if not self.all_steps():
      raise ConfigError(f"No checkpoint in {self.directory!r}; train first (--mode=train).")
    state_dict, step = self._restore_with_fallback(None if step == -1 else int(step), None)
    return state_dict[which], step

  def reached_preemption(self, step: int) -> bool:
    """Multi-host preemption sync point (JAX's preemption notifier); False on one process."""
    return jax.process_count() > 1 and self._manager.reached_preemption(step)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_ema_params(
  config: ml_collections.ConfigDict, workdir: str, step: int
) -> tuple[Any, int]:
  """(EMA parameters of ``step`` (-1: the latest intact one), that step) of a workdir
  whose config.json fits ``config``, for sampling and evaluation; nothing is written."""
  workdir = workdir_lib.resolve(workdir)
  workdir_lib.check_or_write_config(config, workdir, write=False)
  checkpointer = Checkpointer(workdir, read_only=True)
  try:
    return checkpointer.restore_params(step)
  finally:
    checkpointer.close()


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the workdir's checkpoints (read-only)."""
  checkpointer = Checkpointer(workdir_lib.resolve(workdir), read_only=True)
  try:
    return checkpointer.all_steps()
  finally:
    checkpointer.close()


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return f"{type(e).__name__}: {text[:300]}"
