"""What the processes of a multi-host run agree on (ddpm_jax/hosts.py). With one process
every helper is a plain call; the multi-process paths run here as process 0 of two, the
other process's side of each collective given by the test."""

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils

from ddpm_jax import hosts
from ddpm_jax.errors import ConfigError


def test_one_process_is_the_chief_and_every_helper_is_a_plain_call():
  assert hosts.is_chief() and not hosts.multi()
  hosts.barrier("unused")
  x = np.arange(6.0).reshape(2, 3)
  assert hosts.agree(lambda: 7) == 7 and hosts.agree(lambda: 8, chief_only=True) == 8
  for fn in (hosts.broadcast, hosts.gather):
    assert fn(x) is x
  np.testing.assert_array_equal(hosts.gather_float64(x), x[None])
  assert hosts.my_slice(10) == slice(0, 10)
  with pytest.raises(ConfigError, match="bad input"):
    hosts.agree(lambda: (_ for _ in ()).throw(ConfigError("bad input")))


def _as_process(monkeypatch, index: int, count: int) -> None:
  monkeypatch.setattr(jax, "process_index", lambda: index)
  monkeypatch.setattr(jax, "process_count", lambda: count)


@pytest.mark.parametrize("num, count", [(10, 3), (7, 4), (3, 5), (16, 2)])
def test_my_slice_splits_the_items_exactly_and_evenly(monkeypatch, num, count):
  """The processes' slices, in process order, tile [0, num) and differ in size by <= 1."""
  slices = []
  for p in range(count):
    _as_process(monkeypatch, p, count)
    slices.append(hosts.my_slice(num))
  covered = np.concatenate([np.arange(num)[s] for s in slices])
  np.testing.assert_array_equal(covered, np.arange(num))
  sizes = [s.stop - s.start for s in slices]
  assert max(sizes) - min(sizes) <= 1


def _other_process_sends(monkeypatch, other: np.ndarray) -> None:
  """process_allgather as process 0 of two sees it: its row, then process 1's."""

  def allgather(x, tiled=False):
    x = np.asarray(x)
    return np.concatenate([x, other]) if tiled else np.stack([x, other])

  monkeypatch.setattr(hosts, "multi", lambda: True)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)


@pytest.mark.parametrize(
  "mine, theirs, expected",
  [
    (None, None, None),
    (None, "process 1: no checkpoint", "process 1: no checkpoint"),
    ("process 0: bad flag", "process 1: no checkpoint", "process 0: bad flag"),
  ],
)
def test_agree_raises_the_lowest_processs_error_everywhere(monkeypatch, mine, theirs, expected):
  """Process 0 raises the ConfigError of the lowest-numbered process whose call failed,
  with its message (UTF-8 intact), also when its own call succeeded; with none it
  returns its own result."""

  def fn():
    if mine is not None:
      raise ConfigError(mine + " é")
    return "result"

  _other_process_sends(monkeypatch, hosts._encode(None if theirs is None else theirs + " é"))
  if expected is None:
    assert hosts.agree(fn) == "result"
  else:
    with pytest.raises(ConfigError) as raised:
      hosts.agree(fn)
    assert str(raised.value) == expected + " é"


def test_a_long_message_is_cut_to_the_buffer_not_lost(monkeypatch):
  long = "x" * (hosts._MESSAGE_BYTES + 100)
  _other_process_sends(monkeypatch, hosts._encode(long))
  with pytest.raises(ConfigError) as raised:
    hosts.agree(lambda: None)
  assert str(raised.value) == long[: hosts._MESSAGE_BYTES]


def test_gather_float64_is_exact_across_processes(monkeypatch):
  """float64 values that float32 cannot hold arrive bit for bit, stacked in process order."""
  mine, theirs = np.array([1 / 3, np.pi, 1e-300]), np.array([2 / 3, np.e, -1e300])
  _other_process_sends(monkeypatch, theirs.reshape(1, -1).view(np.uint8))
  gathered = hosts.gather_float64(mine)
  assert gathered.dtype == np.float64 and gathered.shape == (2, 3)
  np.testing.assert_array_equal(gathered, np.stack([mine, theirs]))
