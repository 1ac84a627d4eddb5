"""Which images each process makes (ddpm_jax/generation.py): the global indices of every
process's share of a pass, and the settings recorded with a sample set."""

import numpy as np
import pytest

from ddpm_jax import generation
from tests.conftest import tiny_config


@pytest.mark.parametrize("num, batch, processes", [(16, 8, 2), (21, 8, 4), (5, 8, 1)])
def test_each_process_makes_a_block_of_every_global_batch(num, batch, processes):
  """Process blocks of a batch in process order are the batch (the order hosts.gather
  used to return), and the processes' indices partition [0, N)."""
  for i in range(-(-num // batch)):
    blocks = [generation.batch_share(i, batch, p, processes) for p in range(processes)]
    np.testing.assert_array_equal(np.concatenate(blocks), np.arange(i * batch, (i + 1) * batch))
  shares = [generation.process_indices(num, batch, p, processes) for p in range(processes)]
  assert all(np.all(np.diff(s) > 0) for s in shares)
  np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.arange(num))


@pytest.mark.parametrize("processes", [1, 2, 4, 8])
def test_the_maker_of_an_image_follows_from_its_index(processes):
  """Image g is made by process (g mod B) // (B / P) whatever P is: the index alone says
  which host holds it, and a pass over N images makes each of them exactly once."""
  num, batch = 45, 16
  owner = np.full(num, -1)
  for p in range(processes):
    indices = generation.process_indices(num, batch, p, processes)
    assert np.all(owner[indices] == -1)  # No image is made twice.
    owner[indices] = p
  np.testing.assert_array_equal(owner, (np.arange(num) % batch) // (batch // processes))


def test_a_share_is_one_block_of_local_devices_per_global_batch():
  """Process p's share of global batch i is B / P consecutive indices starting at
  i B + p B / P (so its devices' rows in order are those images)."""
  share = generation.batch_share(3, 16, 2, 4)
  np.testing.assert_array_equal(share, 3 * 16 + 2 * 4 + np.arange(4))
  assert share.dtype == np.int64


def test_sampler_settings_record_the_method_its_options_and_the_seed():
  """The record changes with the seed and with the method, so two sample sets made
  differently never carry the same settings."""
  base = generation.sampler_settings(tiny_config())
  assert base["seed"] == int(tiny_config().sampling.seed)
  reseeded = generation.sampler_settings(tiny_config(**{"sampling.seed": 5}))
  assert reseeded["seed"] == 5 and {k: v for k, v in reseeded.items() if k != "seed"} == {
    k: v for k, v in base.items() if k != "seed"
  }
  assert generation.sampler_settings(tiny_config(**{"sampling.method": "ddim"})) != base
