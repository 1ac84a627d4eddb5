"""Named random streams: every random number of a run derives from a user seed here.

JAX keys (device side): the train state holds key(training.seed). Its parameters come from
``init_key``; the randomness of train step s from ``step_key(rng, s)`` split into
``StepStream`` streams; example i's timestep and noise from ``example_key(key, i)`` and
``ExampleStream``. Sampling and bits/dim fold a batch index and then a device or example
index into key(sampling.seed) / key(eval.seed). NumPy generators (host side, the data
pipeline) are ``host_rng(seed, HostStream.X, ...)``. Changing any tag value changes every
run's numbers: the values are part of the reproducibility contract.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
import numpy as np

# fold_in(key(training.seed), INIT_TAG) initialises the parameters.
INIT_TAG = 0x1417


class StepStream(enum.IntEnum):
  """fold_in(step_key, tag): the independent streams of one train step."""

  NOISE = 0  # Per example (ExampleStream): t ~ U{0..T-1} and eps ~ N(0, I).
  DROPOUT = 1  # Then folded with the device index.
  FLIP = 2  # Per example: the random horizontal flip.


class ExampleStream(enum.IntEnum):
  """fold_in(example_key, tag): the timestep and the noise of one training example."""

  TIMESTEP = 0
  NOISE = 1


class HostStream(enum.IntEnum):
  """np.random.default_rng((seed, tag, ...)): the host-side streams of the data pipeline."""

  PERMUTATION = 1  # (seed, tag, epoch): the order of an in-memory epoch.
  # 2 was the retired host-side flip stream; flips are drawn on the device (StepStream.FLIP).
  SHUFFLE = 3  # (seed, tag, epoch): the tf.data shuffle seed of a streamed epoch.
  SYNTHETIC = 4  # (tag, split, index): the pixels of a synthetic image (no user seed).


def init_key(seed: int) -> jax.Array:
  """The key that initialises the parameters of a run with training.seed = ``seed``."""
  return jax.random.fold_in(jax.random.key(seed), INIT_TAG)


def step_key(rng_data: jax.Array, step: jax.Array) -> jax.Array:
  """The key of train step ``step`` from the raw key data held in the train state."""
  return jax.random.fold_in(jax.random.wrap_key_data(rng_data), step)


def stream(key: jax.Array, tag: enum.IntEnum) -> jax.Array:
  """The sub-stream ``tag`` of ``key``."""
  return jax.random.fold_in(key, int(tag))


def example_keys(key: jax.Array, first_index: jax.Array, count: int) -> jax.Array:
  """Keys of examples first_index .. first_index + count - 1 (global example indices)."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(first_index + jnp.arange(count))


def batch_key(seed: int, index: int) -> jax.Array:
  """The key of batch ``index`` of a sampling or evaluation pass seeded with ``seed``."""
  return jax.random.fold_in(jax.random.key(seed), index)


def host_rng(*entropy: int) -> np.random.Generator:
  """A NumPy generator seeded with a tuple such as (seed, HostStream.PERMUTATION, epoch)."""
  return np.random.default_rng(tuple(int(e) for e in entropy))
