"""What the processes of a multi-host run (a TPU pod slice, a multi-node GPU job) agree on.

Every function is a no-op or a plain call with one process. With several, decisions that
one host makes (the workdir lock, the config record, which checkpoint to resume) are made
the same on every host: a ConfigError raised on any host is raised on all of them with the
same message, so every process exits with the same status and the same one line instead
of the others hanging in the next collective. Host arrays are gathered with
jax.experimental.multihost_utils (collectives over all devices).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np

from ddpm_jax.errors import ConfigError

T = TypeVar("T")
_MESSAGE_BYTES = 4096


def is_chief() -> bool:
  """Process 0: the one that writes files."""
  return jax.process_index() == 0


def multi() -> bool:
  return jax.process_count() > 1


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier called ``name``."""
  if multi():
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _encode(message: str | None) -> np.ndarray:
  data = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
  if message is not None:
    raw = message.encode("utf-8")[:_MESSAGE_BYTES]
    data[0] = 1
    data[1 : 1 + len(raw)] = np.frombuffer(raw, np.uint8)
  return data


def _decode(data: np.ndarray) -> str:
  return bytes(data[1:]).rstrip(b"\0").decode("utf-8", errors="replace")


def agree(fn: Callable[[], T], *, chief_only: bool = False) -> T | None:
  """Calls ``fn`` on every process (or only on process 0) and raises, on every process, the
  ConfigError of the lowest-numbered process whose call raised one. Returns fn's result
  (None where it did not run)."""
  if not multi():
    return fn()
  result, message = None, None
  if is_chief() or not chief_only:
    try:
      result = fn()
    except ConfigError as e:
      message = str(e)
  from jax.experimental import multihost_utils

  gathered = np.asarray(multihost_utils.process_allgather(_encode(message)))
  failed = [row for row in gathered if row[0]]
  if failed:
    raise ConfigError(_decode(failed[0]))
  return result


def broadcast(value: np.ndarray) -> np.ndarray:
  """Process 0's ``value`` on every process (same shape and dtype everywhere)."""
  if not multi():
    return value
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.broadcast_one_to_all(value))


def gather(array: np.ndarray) -> np.ndarray:
  """Every process's ``array`` (same shape everywhere) concatenated along axis 0 in process
  order, on every process."""
  if not multi():
    return array
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def gather_tree(tree: Any) -> Any:
  """`gather` of every leaf of a pytree of host arrays."""
  return jax.tree.map(gather, tree)


def gather_float64(array: np.ndarray) -> np.ndarray:
  """Every process's float64 ``array`` (same shape everywhere), stacked [processes, ...]
  in process order, exactly: it travels as bytes, since the collectives carry no float64
  without jax_enable_x64."""
  array = np.ascontiguousarray(array, np.float64)
  if not multi():
    return array[None]
  raw = gather(array.reshape(1, -1).view(np.uint8))
  return raw.view(np.float64).reshape((-1,) + array.shape)


def my_slice(num: int) -> slice:
  """This process's contiguous share of ``num`` items split as evenly as possible."""
  p, count = jax.process_index(), jax.process_count()
  return slice(p * num // count, (p + 1) * num // count)
