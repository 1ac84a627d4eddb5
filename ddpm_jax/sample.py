"""--mode=sample: samples of a trained workdir's EMA parameters, written once.

  samples/step_<k>[_<tag>]/samples.npz   key "samples": uint8 [N, H, W, C], and the settings
                                         of the sampler that made them; plus grid.png
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import checkpointing
from ddpm_jax import generation
from ddpm_jax import hosts
from ddpm_jax import train_logging
from ddpm_jax import workdir as workdir_lib

SAMPLES_FILE = "samples.npz"
GRID_FILE = "grid.png"


def restore_ema_params(config: ml_collections.ConfigDict, workdir: str,
                       step: int | None = None) -> tuple[Any, int]:
  """EMA parameters of ``step`` (default sampling.checkpoint_step; -1: the latest intact
  one) and that step; nothing is written."""
  workdir = workdir_lib.resolve(workdir)
  workdir_lib.check_or_write_config(config, workdir, write=False)
  checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
  try:
    return checkpointer.restore_params(
        int(config.sampling.checkpoint_step) if step is None else step)
  finally:
    checkpointer.close()


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the workdir's checkpoints (read-only)."""
  checkpointer = checkpointing.Checkpointer(workdir_lib.resolve(workdir), read_only=True)
  try:
    return checkpointer.all_steps()
  finally:
    checkpointer.close()


def samples_path(workdir: str, step: int, tag: str = "") -> str:
  """workdir/samples/step_<step>[_<tag>]/samples.npz."""
  return os.path.join(workdir_lib.resolve(workdir), train_logging.SAMPLES_DIR,
                      _set_name(step, tag), SAMPLES_FILE)


def _set_name(step: int, tag: str) -> str:
  return f"step_{step}_{tag}" if tag else f"step_{step}"


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes sampling.num_samples samples and their grid (made on every process, written by
  process 0); returns the npz path."""
  smp = config.sampling
  params, step = restore_ema_params(config, workdir)
  out = workdir_lib.output_dir(workdir, train_logging.SAMPLES_DIR, _set_name(step, smp.tag),
                               (SAMPLES_FILE, GRID_FILE))
  samples = generation.generate_samples(config, params, int(smp.num_samples),
                                        seed=int(smp.seed))
  path = os.path.join(out, SAMPLES_FILE)
  if hosts.is_chief():
    os.makedirs(out, exist_ok=True)
    np.savez(path, samples=samples, **generation.sampler_settings(config))
    train_logging.save_png(os.path.join(out, GRID_FILE), train_logging.image_grid(samples[:64]))
    logging.info("Wrote %d samples of step %d to %s", len(samples), step, path)
  hosts.barrier("samples_written")
  return path
