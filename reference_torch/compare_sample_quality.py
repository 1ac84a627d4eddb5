"""Sample quality of ddpm_jax against diffusers/PyTorch: one layout, recipe, step count and data
order.

  # The full comparison (25-35 min per side alone on a 2-core CPU; --sides=jax or torch
  # runs one side, --seed=S another training seed):
  python -m reference_torch.compare_sample_quality --workdir=/tmp/sq_full --ema_warmup
  # The same with one set of draws (ddpm_jax's init, t, noise and x_T on both sides):
  python -m reference_torch.compare_sample_quality --workdir=/tmp/sq_same --ema_warmup \
      --torch_draws=ddpm_jax
  # Smoke run (minutes): proves both sides end to end.
  python -m reference_torch.compare_sample_quality --workdir=/tmp/sq_smoke --steps=30 \
      --num_samples=64

Both sides train the Fashion-MNIST layout of bench/common.layout_flags (ch 32, ch_mult
1,2,2, one res block, attention only in the middle, dropout 0) with one recipe: Adam lr 2e-4
with 100 linear warm-up steps, batch 64, EMA 0.999 (constant, or warmed up with
--ema_warmup), clipping at global norm 1.0, T=1000 linear betas 1e-4..0.02, L_simple,
--steps steps (default 2,035), on the same batches: the torch side reads ddpm_jax's input
pipeline for (training.seed, step). Random flips are off on both sides
(--random_flip=False); the initial weights, t, the noise and x_T are drawn by each side's
own generator, or with --torch_draws=ddpm_jax the torch side takes ddpm_jax's
(reference_torch/jax_to_torch.py), so only the implementations differ. Then each side draws
--num_samples samples from its EMA weights with DDIM (100 steps on the grid 0, 10, ..., 990,
eta 0, x0 not clipped, as the DDIM reference code, unless --clip_x0), quantized as
round((x + 1) * 127.5), and both are scored with the project's classifier-feature FID and
IS (ddpm_jax.evaluation.sample_quality, classifier and reference statistics cached under
--cache_dir).

  ddpm_jax: python main.py --mode=train, then --mode=sample (each a child process; the
            workdir is <workdir>/jax); samples/step_<steps>/samples.json (its shards).
  torch:    python -m reference_torch.torch_reference --mode=train_sample (a child process, the same
            config flags); <workdir>/torch/samples.npz.

Prints one JSON line per side: fid, inception_score, the class histogram of the samples
under the classifier (fraction per class), the settings, and wall times (train and sample
processes; ddpm_jax's include start-up and compilation). --ema_warmup sets
training.ema_warmup on both sides. Nothing is asserted.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from absl import app, flags, logging

from bench import common

SIDES = ("jax", "torch")
flags.DEFINE_string(
  "workdir", None, "Parent folder of <workdir>/jax and <workdir>/torch (neither may exist yet)."
)
flags.DEFINE_list("sides", list(SIDES), "Sides to run, in this order.")
flags.DEFINE_integer("steps", 2035, "Train steps of each side.")
flags.DEFINE_integer("num_samples", 1000, "Samples of each side.")
flags.DEFINE_integer("sample_batch", 100, "Sampler batch of each side.")
flags.DEFINE_integer("batch_size", 64, "Train batch.")
flags.DEFINE_float("learning_rate", 2e-4, "Adam learning rate (after warm-up).")
flags.DEFINE_integer("warmup_steps", 100, "Linear learning-rate warm-up steps.")
flags.DEFINE_float("ema_decay", 0.999, "EMA decay.")
flags.DEFINE_bool(
  "ema_warmup",
  False,
  "training.ema_warmup on both sides: EMA decay "
  "min(decay, (1 + k) / (10 + k)) at update k (tf.train.ExponentialMovingAverage "
  "with num_updates, diffusers' EMAModel) instead of a constant decay.",
)
flags.DEFINE_float("grad_clip", 1.0, "Global-norm gradient clipping.")
flags.DEFINE_integer("seed", 0, "training.seed: the data order (both sides) and each side's RNG.")
flags.DEFINE_integer("sample_seed", 0, "sampling.seed.")
flags.DEFINE_integer("ddim_steps", 100, "DDIM steps (grid 0, T/S, 2T/S, ...).")
flags.DEFINE_float("eta", 0.0, "DDIM eta.")
flags.DEFINE_bool(
  "clip_x0",
  False,
  "Clip the x0 estimate to [-1, 1] in DDIM (both sides; the DDIM reference code does not).",
)
flags.DEFINE_bool("random_flip", False, "Random horizontal flips (both sides, different draws).")
flags.DEFINE_integer("num_groups", 8, "GroupNorm groups (both sides).")
flags.DEFINE_enum(
  "torch_sampler",
  "own",
  ("own", "diffusers"),
  "own: reference_torch/torch_sampling.py's DDIM; diffusers: DDIMScheduler.",
)
flags.DEFINE_enum(
  "torch_init",
  "ddpm",
  ("ddpm", "torch"),
  "ddpm: ddpm_jax's initialisation on the torch side; torch: diffusers' default.",
)
flags.DEFINE_enum(
  "torch_draws",
  "own",
  ("own", "ddpm_jax"),
  "own: the torch side draws its init (--torch_init), t, noise and x_T from "
  "torch generators; ddpm_jax: it takes ddpm_jax's initial parameters and "
  "ddpm_jax's t, noise and x_T for the same seeds, so only the "
  "implementations differ (reference_torch/jax_to_torch.py).",
)
flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads of the torch side.")
flags.DEFINE_string(
  "cache_dir",
  "~/.cache/ddpm_jax/fashion_mnist_eval",
  "Cache of the FID classifier and reference statistics.",
)
flags.DEFINE_string("out", "", "Also append the JSON lines to this file.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def config_flags() -> list[str]:
  """The config flags both sides read (main.py and torch_reference.py)."""
  steps = FLAGS.steps
  return common.layout_flags("fashion_mnist", FLAGS.num_groups) + [
    f"--config.data.random_flip={FLAGS.random_flip}",
    "--config.diffusion.beta_schedule=linear",
    "--config.diffusion.beta_start=0.0001",
    "--config.diffusion.beta_end=0.02",
    "--config.diffusion.num_timesteps=1000",
    "--config.diffusion.model_mean_type=eps",
    "--config.diffusion.loss_type=mse",
    f"--config.training.batch_size={FLAGS.batch_size}",
    f"--config.training.learning_rate={FLAGS.learning_rate}",
    f"--config.training.warmup_steps={FLAGS.warmup_steps}",
    f"--config.training.ema_decay={FLAGS.ema_decay}",
    f"--config.training.ema_warmup={FLAGS.ema_warmup}",
    f"--config.training.grad_clip={FLAGS.grad_clip}",
    f"--config.training.seed={FLAGS.seed}",
    f"--config.training.num_train_steps={steps}",
    f"--config.training.checkpoint_every_steps={steps}",
    f"--config.training.log_every_steps={min(50, steps)}",
    "--config.training.sample_every_steps=0",
    "--config.sampling.method=ddim",
    f"--config.sampling.ddim.num_steps={FLAGS.ddim_steps}",
    f"--config.sampling.ddim.eta={FLAGS.eta}",
    f"--config.sampling.ddim.clip_denoised={FLAGS.clip_x0}",
    f"--config.sampling.num_samples={FLAGS.num_samples}",
    f"--config.sampling.batch_size={min(FLAGS.sample_batch, FLAGS.num_samples)}",
    f"--config.sampling.seed={FLAGS.sample_seed}",
  ]


def load_config(argv: list[str]) -> Any:
  """The ConfigDict these flags give (parsed as main.py parses them)."""
  from ml_collections import config_flags as ml_config_flags

  full_argv = ["compare_sample_quality"] + argv
  values = flags.FlagValues()
  ml_config_flags.DEFINE_config_file(
    "config", None, "", flag_values=values, lock_config=True, sys_argv=full_argv
  )
  values(full_argv)
  return values.config


# ----------------------------------------------------------------------------- ddpm_jax adapters


def jax_samples_path(workdir: str, step: int) -> str:
  """Adapter (main.py --mode=sample's output layout): the index samples/step_<k>/samples.json
  of the set's shards."""
  return os.path.join(workdir, "samples", f"step_{step}", "samples.json")


def read_samples(path: str) -> np.ndarray:
  """Adapter (ddpm_jax.sample_files.read): uint8 [N, H, W, C] of a set's index or of a
  single samples.npz (the torch side's)."""
  from ddpm_jax import sample_files

  return sample_files.read(path)[0]


def score_samples(samples: np.ndarray, config: Any, cache_dir: str) -> dict[str, Any]:
  """Adapter (ddpm_jax.evaluation.sample_quality.evaluate_samples): FID / IS record."""
  from ddpm_jax.evaluation import sample_quality

  return sample_quality.evaluate_samples(samples, config, cache_dir=cache_dir)


def classifier_logits(samples: np.ndarray, config: Any, cache_dir: str) -> np.ndarray:
  """Adapter (ddpm_jax.evaluation: the cached classifier feature network): class logits
  [N, K] of the samples under the classifier that scores them."""
  from ddpm_jax.evaluation import features as features_lib
  from ddpm_jax.evaluation import sample_quality

  extractor = sample_quality.get_feature_extractor(config, cache_dir=cache_dir)
  _, logits = features_lib.extract_features(extractor, samples, int(config.eval.batch_size))
  return logits


# ----------------------------------------------------------------------------- the sides


def run_jax(workdir: str, argv: list[str]) -> tuple[str, dict[str, Any]]:
  main_py = os.path.join(common.REPO_ROOT, "main.py")
  train_s = common.run_child([main_py, f"--workdir={workdir}", "--mode=train"] + argv)
  sample_s = common.run_child([main_py, f"--workdir={workdir}", "--mode=sample"] + argv)
  facts = {
    "ema_schedule": "warmup" if FLAGS.ema_warmup else "constant",
    "sampler": "ddpm_jax ddim",
    "init": "ddpm_jax",
    "draws": "own",
    "train_process_s": train_s,
    "sample_process_s": sample_s,
  }
  return jax_samples_path(workdir, FLAGS.steps), facts


def run_torch(workdir: str, argv: list[str]) -> tuple[str, dict[str, Any]]:
  record, wall = common.run_json_child(
    [
      *common.TORCH_REFERENCE,
      "--mode=train_sample",
      f"--workdir={workdir}",
      f"--sampler={FLAGS.torch_sampler}",
      f"--init={FLAGS.torch_init}",
      f"--draws={FLAGS.torch_draws}",
      f"--threads={FLAGS.torch_threads}",
    ]
    + argv
  )
  facts = {
    key: record[key]
    for key in (
      "ema_schedule",
      "sampler",
      "init",
      "draws",
      "adam_impl",
      "num_params",
      "final_loss_mean_last_50",
      "torch",
      "diffusers",
      "torch_threads",
    )
  }
  facts.update(train_loop_s=record["train_s"], sample_loop_s=record["sample_s"], process_s=wall)
  return record["samples_path"], facts


def class_histogram(logits: np.ndarray) -> list[float]:
  counts = np.bincount(np.argmax(logits, axis=-1), minlength=logits.shape[-1])
  return [round(float(c) / logits.shape[0], 4) for c in counts]


def run_side(side: str, config: Any, argv: list[str]) -> dict[str, Any]:
  workdir = os.path.join(os.path.abspath(FLAGS.workdir), side)
  if os.path.exists(workdir):
    raise app.UsageError(f"{workdir} exists: give a new --workdir (runs are never resumed).")
  load_start = common.load_avg()
  path, facts = (run_jax if side == "jax" else run_torch)(workdir, argv)
  samples = read_samples(path)
  started = time.perf_counter()
  cache_dir = os.path.expanduser(FLAGS.cache_dir)
  scores = score_samples(samples, config, cache_dir)
  histogram = class_histogram(classifier_logits(samples, config, cache_dir))
  return {
    "bench": "sample_quality_vs_torch",
    "side": side,
    "steps": FLAGS.steps,
    "seed": FLAGS.seed,
    "sample_seed": FLAGS.sample_seed,
    "num_samples": int(samples.shape[0]),
    "fid": scores["fid"],
    "inception_score": scores["inception_score"],
    "inception_score_std": scores["inception_score_std"],
    "class_histogram": histogram,
    "feature_extractor": scores["feature_extractor"],
    "classifier_test_accuracy": scores["classifier_test_accuracy"],
    "num_reference": scores["num_reference"],
    "samples_path": path,
    "ddim_steps": FLAGS.ddim_steps,
    "eta": FLAGS.eta,
    "clip_x0": FLAGS.clip_x0,
    "random_flip": FLAGS.random_flip,
    "num_groups": FLAGS.num_groups,
    "batch_size": FLAGS.batch_size,
    "ema_decay": FLAGS.ema_decay,
    **facts,
    "score_s": time.perf_counter() - started,
    "load_avg_start": load_start,
    "load_avg_end": common.load_avg(),
  }


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  unknown = sorted(set(FLAGS.sides) - set(SIDES))
  if unknown or not FLAGS.sides:
    raise app.UsageError(f"--sides={FLAGS.sides}: choose from {SIDES}.")
  if FLAGS.steps < 1 or FLAGS.num_samples < 2:
    raise app.UsageError("--steps must be >= 1 and --num_samples >= 2 (FID needs 2).")
  argv = config_flags()
  config = load_config(argv)
  logging.info("Config flags of both sides: %s", " ".join(argv))
  for side in FLAGS.sides:
    common.emit(run_side(side, config, argv), FLAGS.out)


if __name__ == "__main__":
  app.run(main)
