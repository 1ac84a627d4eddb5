"""Entry point: python main.py --config=configs/cifar10.py --workdir=DIR [--mode=train|sample|eval].

Any config field can be overridden on the command line, e.g.
  --config.training.batch_size=64 --config.model.dtype=bfloat16
Re-running the same command resumes from the latest intact checkpoint in DIR.

Bad input (unknown flags or config fields, values of the wrong type or out of range, a
workdir that is a file or holds an incompatible run, a missing checkpoint, ...) ends the
process with exit status 2 and exactly one line ``error: ...`` on stderr, before anything
is compiled or written. On a pod, a host that stops because another host died ends
with exit status 75 and one ``error: ...`` line (docs/reliability.md).
"""

from __future__ import annotations

import importlib.util
import logging as logging_std
import os
import re
import sys
from typing import Any, NoReturn

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import xla_flags

FLAGS = flags.FLAGS
MODES = ("train", "sample", "eval")
EXIT_BAD_INPUT = 2

config_flags.DEFINE_config_file(
  "config", None, "Config file (a get_config() module).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "train", MODES, "What to run.")
flags.DEFINE_bool(
  "multihost",
  None,
  "Call jax.distributed.initialize() first, with the "
  "cluster auto-detected (Cloud TPU pod slices, Slurm, Open MPI); defaults to "
  "config.multihost. Implied by any of the four flags below.",
)
flags.DEFINE_string(
  "coordinator_address",
  None,
  "jax.distributed.initialize's coordinator_address, host:port of process 0, e.g. 10.0.0.1:1234.",
)
flags.DEFINE_integer("num_processes", None, "jax.distributed.initialize's num_processes.")
flags.DEFINE_integer(
  "process_id", None, "jax.distributed.initialize's process_id (0 .. num_processes - 1)."
)
flags.DEFINE_integer(
  "heartbeat_timeout_seconds",
  None,
  "jax.distributed.initialize's "
  "heartbeat_timeout_seconds: a host silent this long counts as dead and "
  "the others stop (exit status 75); defaults to "
  "config.heartbeat_timeout_seconds.",
)
flags.DEFINE_list(
  "local_device_ids",
  None,
  "jax.distributed.initialize's local_device_ids: the accelerators this process uses, e.g. 0,1.",
)
flags.DEFINE_string(
  "compile_cache",
  "~/.cache/ddpm_jax/xla",
  "JAX persistent compilation "
  'cache directory ("" disables it): restarts and resumes skip compiling.',
)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax(logging_std.Filter):
  """Drops Orbax's per-save INFO chatter from the console; warnings and errors still show."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or "orbax" not in record.pathname


def fail(message: Any) -> NoReturn:
  """Prints ``error: <message>`` as one line on stderr and exits with status 2."""
  print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
  sys.exit(EXIT_BAD_INPUT)


def _config_path(argv: list[str]) -> str | None:
  """The --config file named in argv, without config_flags' optional ':<args>' suffix."""
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith("--config="):
      return arg[len("--config=") :].split(":")[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":")[0]
  return None


def explain_config_error(argv: list[str], error: Exception) -> str:
  """A one-line account of an exception raised while loading --config or its overrides."""
  path = _config_path(argv)
  if path is None or not os.path.isfile(path):
    return f"--config={path}: no such file."
  try:
    spec = importlib.util.spec_from_file_location("_ddpm_jax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
  except Exception as e:  # Broad on purpose: the user's file: report anything.
    return f"--config={path} cannot be loaded: {type(e).__name__}: {e}"
  for arg in argv[1:]:
    match = re.match(r"--config\.([\w.]+)", arg)
    if not match:
      continue
    node, walked = config, []
    for part in match.group(1).split("."):
      if not hasattr(node, "keys") or part not in node:
        where = "config." + ".".join(walked) if walked else "the config"
        known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "no sub-fields"
        return f"unknown config field in {arg!r}: {where} has {known}."
      walked.append(part)
      node = node[part]
  return f"--config={path}: {type(error).__name__}: {error}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing in which every error is one ``error:`` line on stderr (exit 2)."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.keys()  # An unloadable config file raises only when the config is used.
  except flags.Error as e:
    fail(e)
  except Exception as e:  # Broad on purpose: raised by the config file.
    fail(explain_config_error(argv, e))
  if len(rest) > 1:
    fail(
      f"unexpected arguments {rest[1:]}; every option is a --flag, e.g. "
      "--config.training.batch_size=64."
    )
  workdir = os.path.expanduser(FLAGS.workdir)
  if not workdir.strip():
    fail("--workdir is empty; give a directory for checkpoints and logs.")
  if "://" in workdir:
    fail(
      f"--workdir={FLAGS.workdir!r}: object-store URLs are not supported; give a local "
      "folder, or on a pod one shared by every host at the same path (NFS, Filestore, a "
      "gcsfuse mount)."
    )
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    fail(f"--workdir={FLAGS.workdir!r} exists and is not a directory.")
  return rest


def distributed_args() -> dict[str, Any]:
  """jax.distributed.initialize's arguments given on the command line (none: auto-detect)."""
  args = dict(
    coordinator_address=FLAGS.coordinator_address,
    num_processes=FLAGS.num_processes,
    process_id=FLAGS.process_id,
  )
  if FLAGS.local_device_ids is not None:
    try:
      args["local_device_ids"] = [int(i) for i in FLAGS.local_device_ids]
    except ValueError:
      fail(f"--local_device_ids={','.join(FLAGS.local_device_ids)}: give device numbers, e.g. 0,1.")
  args = {k: v for k, v in args.items() if v is not None}
  if args and (FLAGS.num_processes is None) != (FLAGS.process_id is None):
    fail("--num_processes and --process_id go together (with --coordinator_address).")
  if FLAGS.num_processes is not None and not 0 <= FLAGS.process_id < FLAGS.num_processes:
    fail(f"--process_id={FLAGS.process_id} must lie in [0, --num_processes={FLAGS.num_processes}).")
  return args


def main(argv: list[str]) -> None:
  del argv  # parse_flags refused positional arguments.
  xla_flags.apply_cpu_defaults()  # Before JAX's backends start (the first computation).
  config = FLAGS.config
  logging.get_absl_handler().addFilter(_QuietOrbax())
  # JAX probes every platform at its first use and logs each one missing (INFO "Unable to
  # initialize backend 'tpu'"); a bad-input error must stay the only line on stderr.
  for name in ("jax._src.xla_bridge", "jax._src.distributed"):  # INFO chatter at start-up.
    logging_std.getLogger(name).setLevel(logging_std.WARNING)
  if FLAGS.compile_cache and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compile_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  distributed = distributed_args()
  multihost = config.multihost if FLAGS.multihost is None else FLAGS.multihost
  if multihost or distributed:
    from ddpm_jax import config_checks, supervisor
    from ddpm_jax.errors import ConfigError

    if FLAGS.heartbeat_timeout_seconds is not None:
      config.heartbeat_timeout_seconds = FLAGS.heartbeat_timeout_seconds
    try:
      heartbeat = config_checks.check_distributed(config)
    except ConfigError as e:
      fail(e)
    # A host that loses another stops with one line and exit status 75 (supervisor.py).
    supervisor.supervise(FLAGS.workdir, heartbeat)
    jax.distributed.initialize(**distributed, heartbeat_timeout_seconds=heartbeat)
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
      # CPU cache keys differ between processes and only process 0 writes entries, so with
      # a warm cache process 0 would skip compilations the others still do, and the CPU
      # collectives (gloo) give up on a peer that is 30 s late.
      jax.config.update("jax_enable_compilation_cache", False)
  # After distributed initialisation: the checks need the global device count.
  from ddpm_jax import config_checks, evaluate, sample, train
  from ddpm_jax.errors import ConfigError, NonFiniteError

  modes = dict(train=train.train, sample=sample.run, eval=evaluate.run)
  try:
    config_checks.check_config(config, FLAGS.mode)
    modes[FLAGS.mode](config, FLAGS.workdir)
  except (ConfigError, NonFiniteError) as e:  # Bad input, or a diverged run.
    fail(e)


def run() -> None:
  """The command line (also what tests/_fault_tools.py runs in forked processes)."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
