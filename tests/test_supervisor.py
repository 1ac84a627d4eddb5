"""ddpm_jax/supervisor.py without JAX: how the watcher reads JAX's fatal errors (the texts
below are excerpts of what jaxlib 0.10.2 printed in tests/test_multiprocess.py's kills),
where each line of the child's stderr goes, and, with real forked processes in a bare
interpreter, the exit status and console of each way a child can end.

The real-pod behaviour (kill -9 of a host at five points) is tested in
tests/test_multiprocess.py.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ddpm_jax import supervisor

# A peer (process 1) died: what the coordinator's own process printed.
PEER_LOST = """\
E1203 10:11:10.248267   18041 coordination_service.cc:1549] [527170687807260502] Use error \
polling to propagate the following error to all tasks: UNAVAILABLE: The following tasks are \
unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. \
preemption, eviction) to debug further. [type.googleapis.com/tensorflow.CoordinationServiceError='']
E1203 10:11:10.249044   18054 coordination_service_agent.cc:289] Polled an error from \
coordination service (this can be an error from this or another task).
F1203 10:11:10.249188   18054 client.h:80] Terminating process because the JAX distributed \
service detected fatal errors. This most likely indicates that another task died; see the \
other task logs for more details. absl::Status: UNAVAILABLE: The following tasks are unhealthy \
(stopped sending heartbeats):
1
The tasks have crashed.
*** Check failure stack trace: ***
    @     0x7f6a9c640634  absl::lts_20260107::log_internal::LogMessage::SendToLog()
"""
# The same, seen first by a shutdown barrier (a peer's collective failed in Python before).
PEER_LOST_AT_SHUTDOWN = """\
F1203 10:13:37.864869   18655 client.h:80] Terminating process because the JAX distributed \
service detected fatal errors. absl::Status: INTERNAL: Shutdown barrier has failed.
Barrier result: 'INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 1 \
heartbeat timeout. This indicates that the remote task has failed, got preempted, or crashed.
"""
# The coordinator (process 0) died: what process 1 printed.
COORDINATOR_LOST = """\
E1203 10:15:03.044351   19420 coordination_service_agent.cc:289] Polled an error from \
coordination service (this can be an error from this or another task).
F1203 10:15:03.045502   19420 client.h:80] Terminating process because the JAX distributed \
service detected fatal errors. absl::Status: UNAVAILABLE: Failed to send RPC to coordination \
service. Either the leader task was preempted/died/restarted unexpectedly or this task is \
experiencing network issues.
Additional GRPC error information from remote target coordination_service while calling \
/xla.coordination.CoordinationService/PollForError:
:UNKNOWN:Error received from peer  {grpc_status:14, grpc_message:"Socket closed"}
"""
PREEMPTION_WARNING = (
  "W1203 09:37:58.162179    4464 preemption_sync_manager.cc:147] Failed to retrieve "
  "preemption notice from coordination service: UNAVAILABLE: Socket closed\n"
)


@pytest.mark.parametrize(
  "text, expected",
  [
    (PEER_LOST, ([1], False)),
    (PEER_LOST_AT_SHUTDOWN, ([1], False)),
    (COORDINATOR_LOST, ([], True)),
    (
      (
        "F0101 00:00:00.0 1 client.h:80] Terminating process because ... absl::Status: "
        "INTERNAL: something else\n"
      ),
      ([], False),
    ),
  ],
)
def test_the_lost_process_is_read_from_jaxs_fatal_error(text, expected):
  assert supervisor.lost_processes(text) == expected


def test_the_error_line_is_one_line_with_what_where_and_how_to_restart():
  line = supervisor.describe(
    PEER_LOST,
    heartbeat_timeout=45,
    checkpoint_step=20,
    restart="python main.py --workdir=/w",
    log_path="/w/logs/x.log",
  )
  assert "\n" not in line and line.startswith(
    "error: process 1 of this run stopped sending heartbeats for 45 s"
  )
  assert "exit status 75" in line and "newest complete checkpoint is step 20" in line
  assert line.endswith("same command: python main.py --workdir=/w; full output: /w/logs/x.log")
  line = supervisor.describe(
    COORDINATOR_LOST,
    heartbeat_timeout=45,
    checkpoint_step=None,
    restart="python main.py",
    log_path=None,
  )
  assert line.startswith("error: the coordinator (process 0) of this run stopped answering")
  assert "no checkpoint yet" in line and "full output" not in line
  line = supervisor.describe(
    "absl::Status: INTERNAL: boom\n",
    heartbeat_timeout=45,
    checkpoint_step=3,
    restart="python main.py",
    log_path=None,
  )
  assert "reported a fatal error: INTERNAL: boom," in line


def _filter(tmp_path):
  fd = os.open(tmp_path / "console", os.O_WRONLY | os.O_CREAT)
  return supervisor.StderrFilter(console_fd=fd, heartbeat_timeout=5), tmp_path / "console"


def test_lines_before_a_fatal_error_are_held_and_then_kept_from_the_console(tmp_path):
  stream, console = _filter(tmp_path)
  stream.feed("I0101 training.py:1] step 1\n", 0.0)
  stream.feed(PREEMPTION_WARNING, 0.1)  # Held: distributed-runtime warnings often precede...
  stream.feed("I0101 training.py:1] step 2\n", 0.2)  # ...and everything after them waits.
  assert console.read_text() == "I0101 training.py:1] step 1\n"
  for line in COORDINATOR_LOST.splitlines(keepends=True):  # ...a fatal error.
    stream.feed(line, 0.3)
  stream.tick(100.0)
  stream.flush()  # (What the watcher never does after a fatal error.)
  assert console.read_text() == "I0101 training.py:1] step 1\n"
  assert stream.log_text() == (
    "I0101 training.py:1] step 1\n"
    + PREEMPTION_WARNING
    + "I0101 training.py:1] step 2\n"
    + COORDINATOR_LOST
  )


def test_held_lines_reach_the_console_when_no_fatal_error_follows(tmp_path):
  stream, console = _filter(tmp_path)
  stream.feed(PREEMPTION_WARNING, 0.0)
  stream.tick(1.9)
  assert console.read_text() == ""
  stream.tick(2.0)
  assert console.read_text() == PREEMPTION_WARNING
  stream.feed("Traceback (most recent call last):\n", 10.0)  # Held for heartbeat + 2 s.
  stream.feed("ValueError: a bug\n", 10.0)
  stream.tick(16.9)
  assert console.read_text() == PREEMPTION_WARNING
  stream.tick(17.0)
  assert console.read_text().endswith("Traceback (most recent call last):\nValueError: a bug\n")


_CHILD = textwrap.dedent("""\
    import faulthandler, os, signal, sys, time
    from ddpm_jax import supervisor
    supervisor.supervise(sys.argv[1], heartbeat_timeout=5)
    faulthandler.enable()  # As absl does: a Python thread dump on SIGABRT.
    case = sys.argv[2]
    if case == "sigterm":
      signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(0)))
    print("child", os.getpid(), flush=True)
    sys.stderr.write("I0101 x.py:1] working\\n"); sys.stderr.flush()
    if case == "fatal":
      os.makedirs(os.path.join(sys.argv[1], "checkpoints", "12"))
      sys.stderr.write(os.environ["FATAL_TEXT"]); sys.stderr.flush()
      os.abort()
    if case == "exit3":
      sys.exit(3)
    if case == "sigkill":
      os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
    """)


def _start(tmp_path, case: str) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, "-c", _CHILD, str(tmp_path / "wd"), case],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env={**os.environ, "FATAL_TEXT": PEER_LOST},
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )


def _child_pid(proc: subprocess.Popen) -> int:
  return int(proc.stdout.readline().split()[1])


def test_a_fatal_error_becomes_one_line_and_status_75_and_a_log(tmp_path):
  """Also: the C++ stack and faulthandler's dump of the abort never reach the console."""
  proc = _start(tmp_path, "fatal")
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == supervisor.EXIT_HOST_LOST
  working, line = err.splitlines()
  assert working == "I0101 x.py:1] working"
  assert line.startswith("error: process 1 of this run stopped sending heartbeats for 5 s")
  assert "newest complete checkpoint is step 12" in line
  log = line.rsplit("full output: ", 1)[1]
  assert os.path.dirname(log) == str(tmp_path / "wd" / supervisor.LOG_DIR)
  with open(log) as f:
    text = f.read()
  assert text.startswith("I0101 x.py:1] working\n" + PEER_LOST)
  assert "Fatal Python error: Aborted" in text


@pytest.mark.parametrize("case, status", [("exit3", 3), ("sigkill", -signal.SIGKILL)])
def test_other_ends_are_passed_on_unchanged(tmp_path, case, status):
  proc = _start(tmp_path, case)
  _, err = proc.communicate(timeout=60)
  assert (proc.returncode, err) == (status, "I0101 x.py:1] working\n")
  assert not os.path.exists(tmp_path / "wd" / supervisor.LOG_DIR)


def test_sigterm_is_forwarded_and_the_child_dies_with_its_parent(tmp_path):
  proc = _start(tmp_path, "sigterm")
  _child_pid(proc)  # Printed once its SIGTERM handler is set.
  proc.send_signal(signal.SIGTERM)
  assert proc.stdout.readline() == "got SIGTERM\n"
  assert proc.wait(timeout=30) == 0
  proc = _start(tmp_path, "sleep")
  child = _child_pid(proc)
  proc.kill()
  proc.wait(timeout=30)
  deadline = time.monotonic() + 10
  while os.path.exists(f"/proc/{child}") and _state(child) != "Z":
    assert time.monotonic() < deadline, "the child outlived its parent"
    time.sleep(0.02)


def _state(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0]
  except FileNotFoundError:
    return "gone"
