"""--mode=sample: samples of a trained workdir's EMA parameters, written once to
samples/step_<k>[_<tag>]/ (sample_files.py), with the settings of the sampler that made them.

Each process streams its own images into its own shard; no image crosses hosts, and a host
holds one batch at a time. Process 0 writes the index and the grid once every shard is done.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import checkpointing, data_sources, generation, hosts, sample_files


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes sampling.num_samples samples as per-process shards, their index and a grid;
  returns the index path."""
  smp = config.sampling
  num, batch = int(smp.num_samples), int(smp.batch_size)
  params, step = checkpointing.restore_ema_params(config, workdir, int(smp.checkpoint_step))
  out = sample_files.new_set_dir(workdir, step, smp.tag)
  shape = data_sources.image_shape(config.data)
  process, count = jax.process_index(), jax.process_count()
  writer = sample_files.ShardWriter(
    out, process, count, generation.process_indices(num, batch, process, count), shape
  )
  with writer:
    for indices, images in generation.local_batches(config, params, num, seed=int(smp.seed)):
      writer.write(indices, images)
    writer.close()
  hosts.barrier("sample_shards_written")
  path = os.path.join(out, sample_files.INDEX_FILE)
  if hosts.is_chief():
    sample_files.write_index(out, num, shape, generation.sampler_settings(config), count)
    sample_files.write_grid(out, np.concatenate(writer.head))
    logging.info(
      "Wrote %d samples of step %d in %d shard(s), indexed by %s", num, step, count, path
    )
  hosts.barrier("samples_written")
  return path
