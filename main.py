"""Entry point: python main.py --config=configs/cifar10.py --workdir=DIR [--mode=train|sample|eval].

Any config field can be overridden on the command line, e.g.
  --config.training.batch_size=64 --config.model.dtype=bfloat16
Re-running the same command resumes from the latest checkpoint in DIR.
"""

import logging as logging_std
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

FLAGS = flags.FLAGS
MODES = ("train", "sample", "eval")

config_flags.DEFINE_config_file("config", None, "Config file (a get_config() module).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "train", MODES, "What to run.")
flags.DEFINE_bool("multihost", None, "Call jax.distributed.initialize() first (Cloud TPU pod "
                  "slices); defaults to config.multihost.")
flags.DEFINE_string("compile_cache", "~/.cache/ddpm_jax/xla", "JAX persistent compilation "
                    "cache directory (\"\" disables it): restarts and resumes skip compiling.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax(logging_std.Filter):
  """Drops Orbax's per-save INFO chatter from the console; warnings and errors still show."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or "orbax" not in record.pathname


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if FLAGS.compile_cache and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compile_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  multihost = config.multihost if FLAGS.multihost is None else FLAGS.multihost
  if multihost:
    jax.distributed.initialize()
  logging.info("JAX process %d/%d, %d local / %d global devices (%s).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  from ddpm_jax import evaluate, train  # After distributed initialisation.
  try:
    if FLAGS.mode == "train":
      train.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
      evaluate.run_sample(config, FLAGS.workdir)
    else:
      evaluate.run_eval(config, FLAGS.workdir)
  except (ValueError, FloatingPointError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
