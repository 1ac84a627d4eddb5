"""Logging of a training run: TensorBoard scalars and images (tensorboardX, no TensorFlow),
PNG sample grids (Pillow) and a console progress line with steps/s and the ETA."""

from __future__ import annotations

import datetime
import json
import os
import time

import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import utilization

TENSORBOARD_DIR = "tensorboard"
SAMPLES_DIR = "samples"


def image_grid(images: np.ndarray, *, ncols: int | None = None, pad: int = 2) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] grid."""
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8 or images.shape[0] == 0:
    raise ValueError(
      f"image_grid needs uint8 images [N>0, H, W, C]; got {images.dtype} {images.shape}."
    )
  n, h, w, c = images.shape
  ncols = ncols or int(np.ceil(np.sqrt(n)))
  nrows = -(-n // ncols)
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncols)
    top, left = pad + r * (h + pad), pad + col * (w + pad)
    grid[top : top + h, left : left + w] = img
  return grid


def save_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 [H, W, C] image (C = 1 or 3) as PNG, atomically."""
  from PIL import Image  # Pillow: imported here so that importing this module stays light.

  image = np.asarray(image)
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    pil.save(f, format="PNG")
  os.replace(tmp, path)


class Progress:
  """Steps/s, images/s and the ETA, measured between consecutive log steps."""

  def __init__(self, start_step: int, num_steps: int, global_batch: int):
    self.num_steps, self.global_batch = num_steps, global_batch
    self._last_step, self._last_time = start_step, time.perf_counter()

  def update(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    return dict(steps_per_sec=steps_per_s, images_per_sec=steps_per_s * self.global_batch)

  def line(self, step: int, metrics: dict[str, float]) -> str:
    eta = (self.num_steps - step) / max(metrics["steps_per_sec"], 1e-9)
    replica = (
      f"replica_grad_norm {metrics['replica_grad_norm']:.3f} "
      if "replica_grad_norm" in metrics
      else ""
    )
    return (
      f"step {step}/{self.num_steps} loss {metrics['loss']:.5f} "
      f"grad_norm {metrics['grad_norm']:.3f} {replica}"
      f"clipped {metrics['clip_fraction']:.0%} lr {metrics['learning_rate']:.3g} "
      f"{metrics['steps_per_sec']:.2f} steps/s {metrics['images_per_sec']:.1f} img/s "
      f"ETA {datetime.timedelta(seconds=int(eta))}"
    )


def read_scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} of the TensorBoard event files in ``folder``, in file order.

  Event files are TFRecord-framed (length, its CRC, an Event proto, its CRC); they are read
  with tensorboardX's protos, so neither TensorFlow nor TensorBoard is needed.
  """
  from tensorboardX.proto import event_pb2

  out: dict[str, list[tuple[int, float]]] = {}
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      length = int.from_bytes(data[pos : pos + 8], "little")
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


CPU_WARNING_HOURS = 12.0


def cpu_projection_warning(remaining_steps: int, steps_per_sec: float) -> str | None:
  """The warning for a run on the CPU backend that would take more than CPU_WARNING_HOURS:
  the projected time (remaining steps x measured step time) and how to get an accelerator."""
  seconds = remaining_steps / max(steps_per_sec, 1e-9)
  if seconds < CPU_WARNING_HOURS * 3600:
    return None
  return (
    f"Training on the CPU backend: {remaining_steps:,} more steps at "
    f"{1 / max(steps_per_sec, 1e-9):.2f} s/step (measured since the start, compilation "
    f"included) would take {datetime.timedelta(seconds=int(seconds))}. This config is "
    "meant for an accelerator: install `jax[cuda12]` (GPU) or `jax[tpu]` (TPU VM), or "
    "shorten it with --config.training.num_train_steps."
  )


class TrainLogger:
  """The console progress line, TensorBoard event files under workdir/tensorboard and PNG
  sample grids under workdir/samples. Files are written only where ``enabled`` (process 0);
  the console line is logged on every process.
  """

  def __init__(
    self,
    workdir: str,
    start_step: int,
    num_steps: int,
    global_batch: int,
    *,
    enabled: bool = True,
    backend: str = "",
    peak_tflops: float | None = None,
  ):
    self.samples_dir = os.path.join(workdir, SAMPLES_DIR)
    self.progress = Progress(start_step, num_steps, global_batch)
    self._check_backend = backend == "cpu"
    self._peak = peak_tflops
    self._writer = None
    if enabled:
      from tensorboardX import SummaryWriter

      os.makedirs(self.samples_dir, exist_ok=True)
      self._writer = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

  def write_hparams(self, config: ml_collections.ConfigDict, *, num_params: int) -> None:
    if self._writer is not None:
      text = json.dumps(config.to_dict(), indent=2, default=str)
      self._writer.add_text("config", f"```\n{text}\n```", 0)
      self._writer.add_scalar("num_params", num_params, 0)

  def log(
    self, step: int, metrics: dict[str, float], flops_per_device_step: float | None = None
  ) -> None:
    """Adds steps/s and images/s since the last call (and, given XLA's FLOPs of a step,
    TFLOP/s per device and MFU); logs the line and writes the scalars."""
    metrics = dict(metrics, **self.progress.update(step))
    if flops_per_device_step:
      metrics.update(utilization.rates(flops_per_device_step, metrics["steps_per_sec"], self._peak))
    logging.info("%s", self.progress.line(step, metrics))
    if self._check_backend:  # Once, at the first log step.
      self._check_backend = False
      warning = cpu_projection_warning(self.progress.num_steps - step, metrics["steps_per_sec"])
      if warning:
        logging.warning("%s", warning)
    if self._writer is not None:
      for name, value in metrics.items():
        self._writer.add_scalar(f"train/{name}", value, step)
      self._writer.flush()

  def write_images(self, step: int, images: np.ndarray) -> str | None:
    """Saves the grid of uint8 samples as samples/step_<8-digit step>.png and in TensorBoard."""
    if self._writer is None:
      return None
    grid = image_grid(images)
    path = os.path.join(self.samples_dir, f"step_{step:08d}.png")
    save_png(path, grid)
    self._writer.add_image("samples", grid, step, dataformats="HWC")
    self._writer.flush()
    return path

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
