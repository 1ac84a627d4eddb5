"""How often gradient clipping bound in a training run, from its TensorBoard scalars.

  python -m bench.clip_stats WORKDIR [WORKDIR ...] [--windows=100,500] [--out=FILE]

Reads train/clip_fraction (the share of replicas whose gradient exceeded grad_clip; for
clip_mode "global", whether the mean gradient did), falling back to train/grad_norm >
grad_clip for runs that predate the scalar (global mode only), and train/replica_grad_norm
where logged. Prints one JSON object per workdir: over all logged steps and within step
windows, the mean clip fraction (clipped replica-steps / replica-steps), the share of steps
where any replica clipped, the last such step and the mean norms. Every step is covered only
if the run logged every step (--config.training.log_every_steps=1); "logged_steps" says how
many were. Nothing is asserted.
"""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
from absl import app, flags

from bench import common
from ddpm_jax import train_logging

flags.DEFINE_list("windows", ["100", "500"], "Window edges: steps 1..a, a+1..b, ..., rest.")
flags.DEFINE_string("out", "", "Also append the JSON lines to this file.")
FLAGS = flags.FLAGS


def _series(scalars: dict, tag: str) -> dict[int, float]:
  return dict(scalars.get(tag, []))  # A resumed step: the last.


def clip_stats(workdir: str, edges: list[int]) -> dict:
  """The clipping statistics of one workdir (see the module docstring)."""
  with open(os.path.join(workdir, "config.json")) as f:
    training = json.load(f)["training"]
  scalars = train_logging.read_scalars(os.path.join(workdir, train_logging.TENSORBOARD_DIR))
  fraction = _series(scalars, "train/clip_fraction")
  grad_norm = _series(scalars, "train/grad_norm")
  source = "train/clip_fraction"
  if not fraction:
    if training["clip_mode"] != "global":
      raise ValueError(f"{workdir}: no train/clip_fraction scalars to read")
    fraction = {s: float(v > training["grad_clip"]) for s, v in grad_norm.items()}
    source = "train/grad_norm > grad_clip"
  replica = _series(scalars, "train/replica_grad_norm")
  steps = np.array(sorted(fraction))
  bounds = [0, *edges, int(steps.max())]

  def summary(lo: int, hi: int) -> dict:
    chosen = steps[(steps > lo) & (steps <= hi)]
    f = np.array([fraction[s] for s in chosen])
    out = {
      "steps": f"{lo + 1}-{hi}",
      "logged_steps": len(chosen),
      "mean_clip_fraction": float(f.mean()),
      "steps_with_clipping": float((f > 0).mean()),
      "mean_grad_norm": float(np.mean([grad_norm[s] for s in chosen])),
    }
    if replica:
      out["mean_replica_grad_norm"] = float(np.mean([replica[s] for s in chosen]))
    return out

  clipped = steps[np.array([fraction[s] > 0 for s in steps])]
  return {
    "bench": "clip_stats",
    "workdir": workdir,
    "clip_mode": training["clip_mode"],
    "clip_replicas": training.get("clip_replicas"),
    "grad_clip": training["grad_clip"],
    "batch_size": training["batch_size"],
    "source": source,
    "last_clipped_step": int(clipped.max()) if len(clipped) else None,
    "all": summary(0, int(steps.max())),
    "windows": [summary(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo],
  }


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError("Pass one or more workdirs.")
  edges = sorted(int(e) for e in FLAGS.windows)
  for workdir in argv[1:]:
    common.emit(clip_stats(workdir, edges), FLAGS.out)


if __name__ == "__main__":
  app.run(main)
