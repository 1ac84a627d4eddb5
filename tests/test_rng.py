"""Named random streams (ddpm_jax/rng.py): every stream is deterministic given its seed and
indices, and distinct streams never share keys."""

import enum

import jax
import numpy as np
import pytest

from ddpm_jax import rng as rng_lib


def _data(key: jax.Array) -> np.ndarray:
  return np.asarray(jax.random.key_data(key))


def test_step_keys_are_deterministic_and_distinct_per_step_and_seed():
  """step_key(seed, s) is the same key every time it is derived, and no two (seed, step)
  pairs of a run share one: every train step draws fresh randomness."""
  state_rng = {seed: jax.random.key_data(jax.random.key(seed)) for seed in (0, 1)}
  keys = {
    (seed, s): _data(rng_lib.step_key(data, s))
    for seed, data in state_rng.items()
    for s in range(5)
  }
  np.testing.assert_array_equal(keys[0, 3], _data(rng_lib.step_key(state_rng[0], 3)))
  assert len({k.tobytes() for k in keys.values()}) == len(keys)


@pytest.mark.parametrize("tags", [rng_lib.StepStream, rng_lib.ExampleStream, rng_lib.HostStream])
def test_the_tags_of_a_stream_family_are_distinct(tags: type[enum.IntEnum]):
  """No tag is an alias of another (IntEnum would silently merge equal values), so the
  streams of one family are independent."""
  assert len({int(t) for t in tags}) == len(tags.__members__)


def test_the_streams_of_a_step_are_distinct_and_differ_from_the_step_key():
  key = rng_lib.step_key(jax.random.key_data(jax.random.key(0)), 7)
  keys = [_data(key)] + [_data(rng_lib.stream(key, tag)) for tag in rng_lib.StepStream]
  assert len({k.tobytes() for k in keys}) == len(keys)


def test_example_keys_depend_on_the_global_index_only():
  """The key of example i is the same whichever batch slice (device) derives it, so the
  timesteps and noise of a global batch do not depend on how it is split."""
  key = jax.random.key(3)
  whole = _data(rng_lib.example_keys(key, 0, 8))
  halves = np.concatenate(
    [_data(rng_lib.example_keys(key, 0, 4)), _data(rng_lib.example_keys(key, 4, 4))]
  )
  np.testing.assert_array_equal(whole, halves)
  assert len({k.tobytes() for k in whole}) == 8


def test_batch_keys_differ_per_batch_and_seed_and_from_the_init_key():
  keys = [_data(rng_lib.batch_key(seed, i)) for seed in (0, 1) for i in range(4)]
  keys += [_data(rng_lib.init_key(0)), _data(rng_lib.init_key(1))]
  assert len({k.tobytes() for k in keys}) == len(keys)
  np.testing.assert_array_equal(_data(rng_lib.batch_key(1, 2)), keys[6])  # Deterministic.


def test_host_generators_are_deterministic_and_distinct_per_entropy():
  """host_rng draws the same numbers from the same (seed, tag, ...) tuple, and different
  ones when any entry changes (the epoch, the tag, the seed)."""

  def draw(*entropy):
    return rng_lib.host_rng(*entropy).integers(0, 2**62, 4)

  perm = rng_lib.HostStream.PERMUTATION
  np.testing.assert_array_equal(draw(0, perm, 1), draw(0, perm, 1))
  variants = [
    draw(0, perm, 1),
    draw(0, perm, 2),
    draw(1, perm, 1),
    draw(0, rng_lib.HostStream.SHUFFLE, 1),
    draw(np.int64(0), perm, 1),
  ]
  assert len({v.tobytes() for v in variants[:4]}) == 4
  np.testing.assert_array_equal(variants[4], variants[0])  # NumPy integers count as ints.
