"""--mode=sample: samples of a trained workdir's EMA parameters, written once to
samples/step_<k>[_<tag>]/ (sample_files.py), with the settings of the sampler that made them.
"""

from __future__ import annotations

import ml_collections
from absl import logging

from ddpm_jax import checkpointing
from ddpm_jax import generation
from ddpm_jax import hosts
from ddpm_jax import sample_files


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes sampling.num_samples samples and their grid (made on every process, written by
  process 0); returns the npz path."""
  smp = config.sampling
  params, step = checkpointing.restore_ema_params(config, workdir, int(smp.checkpoint_step))
  out = sample_files.new_set_dir(workdir, step, smp.tag)
  samples = generation.generate_samples(config, params, int(smp.num_samples),
                                        seed=int(smp.seed))
  path = sample_files.samples_path(workdir, step, smp.tag)
  if hosts.is_chief():
    sample_files.write(out, samples, generation.sampler_settings(config))
    logging.info("Wrote %d samples of step %d to %s", len(samples), step, path)
  hosts.barrier("samples_written")
  return path
