"""The watcher of one host of a multi-host run: when another host dies, this one stops with
one ``error:`` line and exit status 75 instead of JAX's abort.

JAX (0.10.2) ends a process whose peer stopped sending heartbeats, or whose coordinator
vanished, from a C++ thread of its coordination-service client: LOG(FATAL), a C++ stack
dump, Python thread dumps and SIGABRT (exit status 134). The client's
``missed_heartbeat_callback`` cannot be given from Python in this version (the call fails
with std::bad_cast and aborts), and a Python thread that sees the dead coordinator itself
loses the race against that abort about half the time, and JAX's fatal line shows even
when it wins (docs/reliability.md has the experiments). So `supervise`, called by main.py
before jax.distributed.initialize, forks:

* the child returns and runs JAX as usual, its stderr on a pipe; it is killed with its
  parent (PR_SET_PDEATHSIG), so ``kill -9`` of the PID a scheduler started ends both;
* the parent never starts a JAX backend or the distributed client. It copies the child's
  stderr to its own; from the moment the stream shows the coordination service's fatal
  error it copies nothing more to the console and keeps the full text for a log file in
  the workdir; when the child has ended it prints one line naming the lost process, the
  newest complete checkpoint and the restart command, and exits with EXIT_HOST_LOST. Any
  other end is passed on as it is: the child's exit status, or its death by the same
  signal. SIGTERM and SIGHUP are forwarded to the child (JAX's preemption notifier handles
  SIGTERM there); SIGINT is ignored, as a terminal's Ctrl-C reaches the child directly.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import re
import select
import shlex
import signal
import socket
import sys
import time
from typing import NoReturn

# EX_TEMPFAIL of sysexits.h, "temporary failure, retry": distinct from success (0), an
# uncaught error (1), bad input (2) and the 128 + N of a death by signal N.
EXIT_HOST_LOST = 75
LOG_DIR = "logs"
# The coordination service's fatal error, in the order its lines appear.
_INCIDENT = re.compile(
  r"Use error polling to propagate|Polled an error from coordination "
  r"service|Terminating process because"
)
# Warnings of the distributed runtime that precede an incident by moments (a lost
# coordinator is seen first by the preemption notifier): held back briefly.
_RUNTIME_LINE = re.compile(
  r"^[WE]\d{4} [\d:.]+\s+\d+ (preemption_sync_manager|"
  r"preemption_notifier|coordination_service(_agent)?|client)\."
)
_HEARTBEAT_TASKS = re.compile(r"stopped sending heartbeats\):\s*\n((?:[^\n]*\d+\s*\n)+)")
_TASK = re.compile(r"^\s*(?:/job:\w+/replica:\d+/task:)?(\d+)\s*$")
_TASK_TIMEOUT = re.compile(r"Task (\d+) heartbeat timeout")
_STATUS = re.compile(r"absl::Status: ([^\n]*)")
_HOLD_SECONDS = 2.0
_RECENT_LINES = 5000


class StderrFilter:
  """Decides where each line of the child's stderr goes: the console, or (from the first
  line of a coordination-service fatal error on) only the log.

  Distributed-runtime warnings, and every line after one, are held for _HOLD_SECONDS
  before reaching the console, and a Python traceback (and what follows) for the heartbeat
  timeout more, so that those announcing (or caused by) a fatal error never show.
  """

  def __init__(self, console_fd: int, heartbeat_timeout: int):
    self.console_fd = console_fd
    self.traceback_hold = heartbeat_timeout + _HOLD_SECONDS
    self.recent: collections.deque[str] = collections.deque(maxlen=_RECENT_LINES)
    self.incident: list[str] | None = None
    self._held: list[str] = []
    self._release_at = 0.0

  def feed(self, line: str, now: float) -> None:
    if self.incident is not None:
      self.incident.append(line)
      return
    if _INCIDENT.search(line):
      self.incident = [line]
      self._held.clear()
      return
    self.recent.append(line)
    if line.startswith("Traceback (most recent call last)"):
      # A collective that lost its peer raises in Python before JAX aborts, which it does
      # within the heartbeat timeout (a bug's traceback shows after that).
      self._release_at = now + self.traceback_hold
    elif not self._held and _RUNTIME_LINE.match(line):
      self._release_at = now + _HOLD_SECONDS
    elif not self._held:
      self._write(line)
      return
    self._held.append(line)

  def tick(self, now: float) -> None:
    """Releases held lines whose time is up."""
    if self._held and now >= self._release_at:
      self.flush()

  def flush(self) -> None:
    held, self._held = self._held, []
    for line in held:
      self._write(line)

  def _write(self, line: str) -> None:
    if self.console_fd < 0:
      return
    try:
      os.write(self.console_fd, line.encode("utf-8", errors="replace"))
    except OSError:  # The console is gone (a closed pipe): the run goes on without it.
      self.console_fd = -1

  def log_text(self) -> str:
    return "".join(self.recent) + "".join(self.incident or [])


def lost_processes(incident: str) -> tuple[list[int], bool]:
  """(the process ids the service reports as having stopped sending heartbeats, whether
  the coordinator itself is unreachable) from the text of a fatal error."""
  match = _HEARTBEAT_TASKS.search(incident)
  if match:
    ids = []
    for line in match.group(1).splitlines():
      task = _TASK.match(line)
      if not task:
        break
      ids.append(int(task.group(1)))
    if ids:
      return ids, False
  ids = sorted({int(i) for i in _TASK_TIMEOUT.findall(incident)})
  if ids:
    return ids, False
  coordinator = (
    re.search(
      r"UNAVAILABLE|Socket closed|Connection reset|failed to connect|"
      r"DEADLINE_EXCEEDED",
      incident,
    )
    is not None
  )
  return [], coordinator


def describe(
  incident: str,
  *,
  heartbeat_timeout: int,
  checkpoint_step: int | None,
  restart: str,
  log_path: str | None,
) -> str:
  """The one line of a host stopped because another host of the run died."""
  ids, coordinator = lost_processes(incident)
  if ids:
    who = "process" + ("es " if len(ids) > 1 else " ") + ", ".join(map(str, ids))
    what = (
      f"{who} of this run stopped sending heartbeats for {heartbeat_timeout} s "
      "(killed, out of memory, or its host is down)"
    )
  elif coordinator:
    what = (
      "the coordinator (process 0) of this run stopped answering (killed, out of "
      "memory, or its host is down)"
    )
  else:
    status = _STATUS.search(incident)
    what = "the JAX distributed service reported a fatal error: " + (
      status.group(1).strip() if status else "see the log"
    )
  saved = (
    "no checkpoint yet"
    if checkpoint_step is None
    else f"the newest complete checkpoint is step {checkpoint_step}"
  )
  where = f"; full output: {log_path}" if log_path else ""
  return (
    f"error: {what}, so this process stopped too (exit status {EXIT_HOST_LOST}); "
    f"{saved}; restart every process with the same command: {restart}{where}"
  )


def _write_log(workdir: str, text: str, pid: int) -> str | None:
  """workdir/logs/<host>.<pid>.log holding ``text``; None if it cannot be written."""
  path = os.path.join(workdir, LOG_DIR, f"host_stop.{socket.gethostname()}.{pid}.log")
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(text)
  except OSError:
    return None
  return path


def _die_with_parent(parent: int) -> None:
  """In the child: SIGKILL when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
  try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))
  except (OSError, AttributeError):  # Not Linux: the parent's death leaves the child.
    return
  if os.getppid() != parent:  # The parent died before prctl.
    os._exit(1)


def supervise(workdir: str, heartbeat_timeout: int) -> None:
  """Forks; returns in the child, which runs JAX with its stderr on a pipe to the parent.
  The parent watches the child and exits as described in the module docstring."""
  sys.stdout.flush()
  sys.stderr.flush()
  read_fd, write_fd = os.pipe()
  parent = os.getpid()
  child = os.fork()
  if child == 0:
    os.close(read_fd)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    _die_with_parent(parent)
    return
  os.close(write_fd)
  _watch(child, read_fd, workdir, heartbeat_timeout)


def _watch(child: int, read_fd: int, workdir: str, heartbeat_timeout: int) -> NoReturn:
  def forward(signum: int, _) -> None:
    with contextlib.suppress(ProcessLookupError):  # Ended already: its status is coming.
      os.kill(child, signum)

  for signum in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(signum, forward)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  stream = StderrFilter(console_fd=2, heartbeat_timeout=heartbeat_timeout)
  status, pending, eof = None, b"", False
  while status is None or not eof:
    if not eof:
      ready, _, _ = select.select([read_fd], [], [], 0.2 if status is None else 0.0)
      if not ready and status is not None:
        break  # The child is gone; whatever still holds the pipe is not ours to wait for.
      if ready:
        chunk = os.read(read_fd, 1 << 16)
        eof = not chunk
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
          stream.feed(line.decode("utf-8", errors="replace") + "\n", time.monotonic())
    stream.tick(time.monotonic())
    if status is None:
      done, wait_status = os.waitpid(child, 0 if eof else os.WNOHANG)
      status = wait_status if done else None
  if pending:
    stream.feed(pending.decode("utf-8", errors="replace"), time.monotonic())
  if stream.incident is None:
    stream.flush()
  code = os.waitstatus_to_exitcode(status)
  if stream.incident is not None and code != 0:
    # Imported here, not at the top: workdir.py imports JAX, which a watcher never needs
    # before a failure (main.py's parent has it loaded anyway).
    from ddpm_jax import workdir as workdir_lib

    workdir = workdir_lib.resolve(workdir)
    steps = workdir_lib.checkpoint_steps(workdir)
    line = describe(
      "".join(stream.incident),
      heartbeat_timeout=heartbeat_timeout,
      checkpoint_step=max(steps) if steps else None,
      restart="python " + shlex.join(sys.argv),
      log_path=_write_log(workdir, stream.log_text(), child),
    )
    os.write(2, (line + "\n").encode())
    os._exit(EXIT_HOST_LOST)
  if code < 0:  # Killed by a signal: die by the same one.
    if -code not in (signal.SIGKILL, signal.SIGSTOP):
      signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
    code = 128 - code
  os._exit(code)
