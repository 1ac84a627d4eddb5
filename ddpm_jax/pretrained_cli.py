"""``python -m ddpm_jax.pretrained``: released DDPM weights into a workdir, and out again.

Import: an official TF1 checkpoint or a diffusers UNet2DModel folder becomes an ordinary
workdir (config.json, a checkpoint at the file's step) that --mode=sample, --mode=eval and
--mode=train (fine-tuning, with a fresh optimizer state) use unchanged::

  python -m ddpm_jax.pretrained --input=diffusion_cifar10_model/model.ckpt-790000 \
      --config=configs/cifar10.py --workdir=DIR

Export: a workdir's EMA weights as a UNet2DModel folder (the config: --config, or the
workdir's config.json)::

  python -m ddpm_jax.pretrained --export=diffusers --workdir=DIR --output=OUT

Bad input ends with one ``error: ...`` line and exit status 2, before any weight is read
or anything written; an existing checkpoint or output folder is never overwritten.
"""

from __future__ import annotations

import json
import os
import sys
from typing import NoReturn

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import checkpointing, config_checks, pretrained
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.errors import ConfigError

FLAGS = flags.FLAGS
EXIT_BAD_INPUT = 2

config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file (a get_config() module) whose U-Net the weights are loaded into.",
  lock_config=True,
)
flags.DEFINE_string(
  "input",
  None,
  "Import: an official TF1 checkpoint prefix "
  "(.../model.ckpt-790000) or a diffusers UNet2DModel folder.",
)
flags.DEFINE_enum("source", "auto", pretrained.SOURCES, "What --input is (auto: detected).")
flags.DEFINE_enum(
  "weights",
  "ema",
  pretrained.WEIGHTS,
  "Official checkpoints: 'ema' takes the "
  "ExponentialMovingAverage shadows, 'raw' the raw training weights.",
)
flags.DEFINE_string("workdir", None, "Import: the new workdir. Export: the workdir to export.")
flags.DEFINE_integer(
  "step",
  -1,
  "Import: the step of the checkpoint written (-1: the step "
  "the file records; a diffusers folder records none: 0). Export: the "
  "checkpoint exported (-1: the latest).",
)
flags.DEFINE_enum("export", "", ["", "diffusers"], "Export --workdir instead of importing.")
flags.DEFINE_string("output", None, "Export: the UNet2DModel folder to write (new).")
flags.mark_flags_as_required(["workdir"])


def fail(message: object) -> NoReturn:
  """``error: <message>`` as one line on stderr, exit status 2 (main.py's convention)."""
  print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
  sys.exit(EXIT_BAD_INPUT)


def parse_flags(argv: list[str]) -> list[str]:
  try:
    rest = FLAGS(argv)
    if FLAGS.config is not None:
      FLAGS.config.keys()  # An unloadable config file raises only when it is used.
  except flags.Error as e:
    fail(e)
  except Exception as e:  # Broad on purpose: raised by the config file.
    fail(f"--config cannot be loaded: {type(e).__name__}: {e}")
  if len(rest) > 1:
    fail(f"unexpected arguments {rest[1:]}; every option is a --flag.")
  return rest


def import_weights(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--input into a new workdir; returns the checkpoint folder written."""
  workdir = workdir_lib.resolve(workdir)
  if workdir_lib.has_checkpoint(workdir):
    raise ConfigError(
      f"workdir {workdir!r} already holds checkpoints; import into a new --workdir."
    )
  weights = pretrained.load(FLAGS.input, config, source=FLAGS.source, weights=FLAGS.weights)
  step = FLAGS.step if FLAGS.step >= 0 else (weights.step or 0)
  path = pretrained.write_workdir(weights, config, workdir, step)
  logging.info(
    "Wrote the %s weights of %s as the checkpoint %s (%s; fresh optimizer state).",
    FLAGS.weights if weights.source == "official" else "diffusers",
    weights.path,
    path,
    "raw weights as params" if weights.raw_params is not None else "params = the EMA weights",
  )
  return path


def workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """--config if given (checked against the workdir's record), else the record itself."""
  if FLAGS.config is not None:
    workdir_lib.check_or_write_config(FLAGS.config, workdir, write=False)
    return FLAGS.config
  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"Cannot read {path!r} ({e}); pass --config.") from e


def export_weights(workdir: str) -> str:
  """The EMA weights of --workdir's checkpoint --step as the diffusers folder --output."""
  workdir = workdir_lib.resolve(workdir)
  config = workdir_config(workdir)
  checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
  try:
    params, step = checkpointer.restore_params(FLAGS.step)
  finally:
    checkpointer.close()
  out = pretrained.export_diffusers(params, config, os.path.abspath(FLAGS.output))
  logging.info(
    "Wrote the EMA weights of step %d of %s as the UNet2DModel folder %s.", step, workdir, out
  )
  return out


def check_flags() -> None:
  """The flags each direction needs, checked before anything is read."""
  if FLAGS.step < -1:
    fail(f"--step={FLAGS.step} must be a step >= 0, or -1.")
  if FLAGS.export:
    if not FLAGS.output:
      fail("--export=diffusers needs --output, the folder to write.")
    if FLAGS.input:
      fail("--input is for importing; --export reads --workdir.")
    return
  if not FLAGS.input:
    fail(
      "give --input (an official TF1 checkpoint or a diffusers folder) to import, or "
      "--export=diffusers with --output."
    )
  if FLAGS.config is None:
    fail(
      "importing needs --config, the config whose U-Net the weights fit, e.g. "
      "--config=configs/cifar10.py."
    )
  if FLAGS.output:
    fail("--output is for --export.")


def main(argv: list[str]) -> None:
  del argv
  check_flags()
  try:
    if FLAGS.export:
      export_weights(FLAGS.workdir)
    else:
      config_checks.check_model(FLAGS.config)
      config_checks.check_diffusion(FLAGS.config.diffusion)
      import_weights(FLAGS.config, FLAGS.workdir)
  except ConfigError as e:
    fail(e)


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
