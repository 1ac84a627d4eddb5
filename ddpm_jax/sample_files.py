"""The sample sets of a workdir: where --mode=sample writes them and how they are read back.

  samples/step_<k>[_<tag>]/samples.npz   key "samples": uint8 [N, H, W, C], and the settings
                                         of the sampler that made them (one key each)
  samples/step_<k>[_<tag>]/grid.png      the first 64 samples
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ddpm_jax import train_logging
from ddpm_jax import workdir as workdir_lib

SAMPLES_FILE = "samples.npz"
GRID_FILE = "grid.png"


def _set_name(step: int, tag: str) -> str:
  return f"step_{step}_{tag}" if tag else f"step_{step}"


def samples_path(workdir: str, step: int, tag: str = "") -> str:
  """workdir/samples/step_<step>[_<tag>]/samples.npz."""
  return os.path.join(workdir_lib.resolve(workdir), train_logging.SAMPLES_DIR,
                      _set_name(step, tag), SAMPLES_FILE)


def new_set_dir(workdir: str, step: int, tag: str = "") -> str:
  """workdir/samples/step_<step>[_<tag>], refused (ConfigError) if it already holds a set."""
  return workdir_lib.output_dir(workdir, train_logging.SAMPLES_DIR, _set_name(step, tag),
                                (SAMPLES_FILE, GRID_FILE))


def write(directory: str, samples: np.ndarray, settings: dict[str, Any]) -> str:
  """Writes samples.npz (with ``settings``) and grid.png into ``directory``; the npz path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, SAMPLES_FILE)
  np.savez(path, samples=samples, **settings)
  train_logging.save_png(os.path.join(directory, GRID_FILE),
                         train_logging.image_grid(samples[:64]))
  return path


def read(path: str) -> tuple[np.ndarray, dict[str, Any]]:
  """(uint8 samples, the settings stored with them) of a samples.npz."""
  with np.load(path) as saved:
    return saved["samples"], {k: saved[k].item() for k in saved.files if k != "samples"}
