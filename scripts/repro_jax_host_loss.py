"""What JAX does to the survivor when one process of a job dies, and what Python can change.

  python scripts/repro_jax_host_loss.py --trials=6

Runs jobs of 2 processes x 2 CPU devices on loopback (jax.distributed, heartbeat timeout
--heartbeat_timeout s): both loop over a pmapped psum, and one of them SIGKILLs itself
after 300 iterations. Four ways of running the survivor:

  plain        jax.distributed.initialize as it is;
  callback     the client made with a Python missed_heartbeat_callback (jaxlib's
               get_distributed_runtime_client takes one; jax.distributed does not pass it);
  recoverable  jax_enable_recoverability=True (the service does not fail the other tasks);
  watchdog     a Python thread blocked in a key-value get on the coordinator, which writes
               a line and os._exit(75)s when the get fails (the coordinator is gone).

For each, prints one JSON line per trial: which process died, the survivor's exit status
(-6: SIGABRT), its seconds from the kill to its end (capped by --limit), and whether its
stderr holds JAX's C++ fatal error and stack. Nothing is asserted. docs/reliability.md
reports a run; ddpm_jax/supervisor.py is the answer it led to.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

flags.DEFINE_integer("trials", 3, "Jobs per (mode, dead process).")
flags.DEFINE_integer("heartbeat_timeout", 5, "heartbeat_timeout_seconds of the jobs.")
flags.DEFINE_integer("limit", 40, "Seconds a survivor may take before it is killed.")
flags.DEFINE_list("modes", ["plain", "callback", "recoverable", "watchdog"], "What to run.")
flags.DEFINE_string("child", "", "Internal: run one process of a job (id,port,mode,victim,hb).")
FLAGS = flags.FLAGS
ITERATIONS_BEFORE_DEATH = 300


def _process(process_id: int, port: int, mode: str, victim: int, heartbeat: int) -> None:
  """One process of a job (run as `python scripts/repro_jax_host_loss.py --child=...`)."""
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  import jax
  from jax._src import distributed
  from jax._src.lib import _jax

  if mode == "callback":
    make_client = _jax.get_distributed_runtime_client

    def exit_75(*_) -> None:
      os._exit(75)

    def with_callback(*args, **kwargs):
      return make_client(*args, missed_heartbeat_callback=exit_75, **kwargs)

    _jax.get_distributed_runtime_client = with_callback
  if mode == "recoverable":
    jax.config.update("jax_enable_recoverability", True)
  jax.distributed.initialize(
    f"127.0.0.1:{port}", 2, process_id, heartbeat_timeout_seconds=heartbeat
  )
  if mode == "watchdog":

    def watch() -> None:
      try:
        distributed.global_state.client.blocking_key_value_get("never_set", 3_600_000)
      except Exception:  # Broad on purpose: the coordinator is gone.
        os.write(2, b"watchdog: the coordinator is gone\n")
        os._exit(75)

    threading.Thread(target=watch, daemon=True).start()
  psum = jax.pmap(lambda x: jax.lax.psum(x, "i"), "i")
  x = jax.numpy.ones((2,))
  for i in range(10**7):
    psum(x).block_until_ready()
    if process_id == victim and i == ITERATIONS_BEFORE_DEATH:
      print("died at", time.time(), flush=True)  # For the parent (gloo prints here too).
      os.kill(os.getpid(), signal.SIGKILL)


def _job(mode: str, victim: int) -> dict:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  with tempfile.TemporaryDirectory() as tmp:
    errs = [open(os.path.join(tmp, f"p{i}.err"), "w+") for i in range(2)]  # noqa: SIM115  (closed below)
    procs = [
      subprocess.Popen(
        [
          sys.executable,
          os.path.abspath(__file__),
          f"--child={i},{port},{mode},{victim},{FLAGS.heartbeat_timeout}",
        ],
        stdout=subprocess.PIPE,
        stderr=errs[i],
        text=True,
      )
      for i in range(2)
    ]
    died = float("nan")
    for line in procs[victim].stdout:
      if line.startswith("died at "):
        died = float(line.split()[-1])
        break
    survivor = procs[1 - victim]
    try:
      rc = survivor.wait(timeout=FLAGS.limit)
    except subprocess.TimeoutExpired:
      survivor.kill()
      rc = f"still running after {FLAGS.limit} s (killed)"
    ended = time.time()
    procs[victim].wait()
    errs[1 - victim].seek(0)
    text = errs[1 - victim].read()
    for f in errs:
      f.close()
  return dict(
    mode=mode,
    dead_process=victim,
    survivor_status=rc,
    seconds_after_death=round(ended - died, 2),
    cpp_fatal_error="Terminating process because" in text,
    cpp_stack="Check failure stack trace" in text,
    bad_cast="std::bad_cast" in text,
    watchdog_won="watchdog:" in text,
  )


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.child:
    process_id, port, mode, victim, heartbeat = FLAGS.child.split(",")
    _process(int(process_id), int(port), mode, int(victim), int(heartbeat))
    return
  for mode in FLAGS.modes:
    for victim in (1, 0):
      for _ in range(FLAGS.trials if mode == "watchdog" else 1):
        print(json.dumps(_job(mode, victim)), flush=True)


if __name__ == "__main__":
  app.run(main)
