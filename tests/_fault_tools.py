"""Fault-injection tools for tests/test_main.py, test_checkpointing.py, test_train.py,
test_multiprocess.py and test_pod_failures.py: a fork server for main.py's command line,
pods of its processes, workdir snapshots, checkpoint corruption and kills planted at a point
of a run.

`python main.py ARGS` spends ~2.5 s of CPU importing jax, flax and orbax before it even
parses ARGS. The server (`python -m tests._fault_tools`, from the repository root) pays
that once; every request then
forks a child that sets ``sys.argv = ["main.py", *ARGS]`` and calls ``main.run()``, the
code `python main.py ARGS` runs after its imports (absl flag parsing, validation, training,
exit status). The children are real processes: their own PID, signal handlers, JAX backend
(never initialised in the server), exit status and stdout/stderr files; kill -9 kills them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, "main.py")
TMP_MARK = ".orbax-checkpoint-tmp"
STEP_LINE = re.compile(r"step (\d+)/\d+ loss ([0-9.]+)")  # train.py's progress line.


@dataclasses.dataclass
class Result:
  """How a main.py process ended: exit status (negative: killed by that signal), its
  wall time from fork to exit, and what it wrote to stdout and stderr."""

  rc: int
  seconds: float
  stdout: str
  stderr: str


def free_port() -> int:
  """A TCP port of 127.0.0.1 free right now (for a pod's coordinator)."""
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def step_losses(text: str) -> dict[int, float]:
  """{step: loss} of the progress lines in a run's log ``text``."""
  return {int(s): float(v) for s, v in STEP_LINE.findall(text)}


def devices_env(count: int) -> dict[str, str]:
  """The environment of a process with ``count`` CPU devices and this process's other XLA
  flags (the tests' compile flags: runs compared with in-process ones compile alike)."""
  count_flag = "--xla_force_host_platform_device_count"
  others = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(count_flag)]
  return {"XLA_FLAGS": " ".join([f"{count_flag}={count}", *others])}


def start_pod(
  server: MainServer,
  args: list[str],
  *,
  name: str,
  processes: int = 2,
  devices: int = 2,
  preludes: tuple[str, ...] | None = None,
) -> list[int]:
  """Starts the processes of one pod run of `main.py *args` on loopback (a fresh
  coordinator port), each with ``devices`` CPU devices; returns their PIDs in process
  order. ``preludes``: one `MainServer.start` prelude per process."""
  port = free_port()
  return [
    server.start(
      [
        *args,
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={processes}",
        f"--process_id={i}",
      ],
      env=devices_env(devices),
      name=f"{name}_p{i}",
      prelude=preludes[i] if preludes else "",
    )
    for i in range(processes)
  ]


def snapshot(path: str) -> dict[str, str]:
  """Every file, folder and link under ``path`` (or the file ``path``) -> its sha256 / kind."""

  def entry(p: str) -> str:
    if os.path.islink(p):
      return "link:" + os.readlink(p)
    if os.path.isdir(p):
      return "dir"
    with open(p, "rb") as f:
      return "sha256:" + hashlib.sha256(f.read()).hexdigest()

  if not os.path.isdir(path):
    return {".": entry(path)} if os.path.lexists(path) else {}
  out = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      p = os.path.join(root, name)
      out[os.path.relpath(p, path)] = entry(p)
  return out


def step_dirs(ckpt_dir: str) -> tuple[list[int], list[str]]:
  """(finalised checkpoint steps, leftover Orbax temporary folders) in ``ckpt_dir``."""
  names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
  return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if TMP_MARK in n)


def flip_bytes(path: str, count: int = 8) -> None:
  """Inverts ``count`` bytes in the middle of the file."""
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    mid = len(data) // 2
    for i in range(mid, min(mid + count, len(data))):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(data)


def largest_file(folder: str) -> str:
  files = [os.path.join(r, n) for r, _, names in os.walk(folder) for n in names]
  return max(files, key=os.path.getsize)


def plant_kill(target: str, *, after: float = 0.0, marker: str, watch_dir: str = "") -> None:
  """Makes this process die by SIGKILL inside ``target`` ("module:Class.method" or
  "module:function"), which keeps running meanwhile: ``after`` seconds into its first
  call, or, with ``watch_dir``, as soon as an Orbax temporary folder appears there (a save
  under way). The wall time of the kill is written to ``marker`` first. Call it in a
  `MainServer.start` prelude: the patch reaches the process that runs JAX."""
  import importlib
  import signal
  import threading

  module_name, _, path = target.partition(":")
  owner = importlib.import_module(module_name)
  *parents, name = path.split(".")
  for parent in parents:
    owner = getattr(owner, parent)
  original = getattr(owner, name)

  def die() -> None:
    with open(marker, "w") as f:
      f.write(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)

  def watch(old: set[str]) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
      if set(step_dirs(watch_dir)[1]) - old:
        die()
      time.sleep(0.0005)

  def wrapper(*args: Any, **kwargs: Any) -> Any:
    setattr(owner, name, original)  # The first call only.
    if watch_dir:
      old = set(step_dirs(watch_dir)[1])
      threading.Thread(target=watch, args=(old,), daemon=True).start()
    elif after <= 0:
      die()
    else:
      threading.Timer(after, die).start()
    return original(*args, **kwargs)

  setattr(owner, name, wrapper)


class MainServer:
  """Client of the fork server: start / wait / kill main.py processes (see module doc)."""

  def __init__(self, log_dir: str, env: dict[str, str] | None = None):
    self.log_dir = log_dir
    os.makedirs(log_dir, exist_ok=True)
    self._count = 0
    self._prefix: dict[int, str] = {}
    self._reaped: dict[int, bool] = {}
    self._proc = subprocess.Popen(
      [sys.executable, "-m", "tests._fault_tools"],
      cwd=REPO,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      env={**os.environ, **(env or {})},
    )
    self._request(None)  # Waits for the imports.

  def _request(self, request: dict | None) -> dict:
    if request is not None:
      self._proc.stdin.write(json.dumps(request) + "\n")
      self._proc.stdin.flush()
    line = self._proc.stdout.readline()
    if not line:
      raise RuntimeError(f"fork server died (exit status {self._proc.wait()})")
    return json.loads(line)

  def start(
    self,
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    name: str | None = None,
    prelude: str = "",
  ) -> int:
    """Starts `main.py *args` in a fresh process; returns its PID. ``prelude`` is Python
    code the child runs first (e.g. to plant a fault in a module)."""
    self._count += 1
    prefix = os.path.join(self.log_dir, name or f"run{self._count}")
    reply = self._request(
      dict(op="start", args=list(args), prefix=prefix, env=env or {}, prelude=prelude)
    )
    self._prefix[reply["pid"]] = prefix
    return reply["pid"]

  def stderr_so_far(self, pid: int) -> str:
    with open(self._prefix[pid] + ".err") as f:
      return f.read()

  def wait(self, pid: int, timeout: float = 300.0) -> Result:
    """Waits for ``pid`` (kill -9 after ``timeout`` s: rc -9) and returns how it ended."""
    reply = self._request(dict(op="wait", pid=pid, timeout=timeout))
    self._reaped[pid] = True
    with open(self._prefix[pid] + ".out") as out, open(self._prefix[pid] + ".err") as err:
      return Result(reply["rc"], reply["seconds"], out.read(), err.read())

  @contextlib.contextmanager
  def started(self, args: list[str], **kwargs: Any) -> Iterator[int]:
    """start(); on leaving, a process still running is killed (a failed test leaves none)."""
    pid = self.start(args, **kwargs)
    try:
      yield pid
    finally:
      if not self._reaped.get(pid):
        with contextlib.suppress(ProcessLookupError):
          os.kill(pid, 9)
        self.wait(pid, timeout=60)

  def run(self, args: list[str], *, timeout: float = 300.0, **kwargs: Any) -> Result:
    return self.wait(self.start(args, **kwargs), timeout)

  def run_many(
    self,
    arg_lists: list[list[str]],
    *,
    parallel: int = 4,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
  ) -> list[Result]:
    """Runs every argument list, ``parallel`` processes at a time; results in order."""
    results: list[Result | None] = [None] * len(arg_lists)
    running: list[tuple[int, int]] = []
    for i, args in enumerate(arg_lists):
      running.append((i, self.start(args, env=env)))
      if len(running) == parallel:
        j, pid = running.pop(0)
        results[j] = self.wait(pid, timeout)
    for j, pid in running:
      results[j] = self.wait(pid, timeout)
    return results  # type: ignore[return-value]

  def close(self) -> None:
    if self._proc.poll() is None:
      self._proc.stdin.close()
      self._proc.wait(timeout=30)


def _child(args: list[str], prefix: str, env: dict[str, str], prelude: str) -> None:
  """In the forked process: redirect stdio, run main.py's command line, exit like it."""
  import atexit
  import traceback

  os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
  for fd, suffix in ((1, ".out"), (2, ".err")):
    os.dup2(os.open(prefix + suffix, os.O_WRONLY | os.O_APPEND), fd)
  code = 1
  try:
    os.environ.update(env)
    import jax

    if env.get("JAX_LOG_COMPILES"):
      jax.config.update("jax_log_compiles", True)
    import main

    exec(prelude, {})  # Test-only fault injection.
    sys.argv = [MAIN, *args]
    main.run()
    code = 0
  except SystemExit as e:
    if isinstance(e.code, str):
      print(e.code, file=sys.stderr)
    code = e.code if isinstance(e.code, int) else int(e.code is not None)
  except BaseException:  # As an uncaught exception would.
    traceback.print_exc()
  finally:
    try:
      atexit._run_exitfuncs()
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os._exit(code)


def _serve() -> None:
  """The server loop: JSON requests on stdin, one JSON reply line each on stdout."""
  # Imported before any fork, so each child starts with the modes loaded.
  import main  # noqa: F401  (loaded, not called here)
  from ddpm_jax import evaluate, sample, train  # noqa: F401  (loaded, not called here)

  def reply(obj):
    return (sys.stdout.write(json.dumps(obj) + "\n"), sys.stdout.flush())

  started: dict[int, float] = {}
  reply(dict(ready=True))
  for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "start":
      for suffix in (".out", ".err"):  # Before the fork: they exist once the reply is read.
        open(request["prefix"] + suffix, "w").close()
      sys.stdout.flush()
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:
        _child(request["args"], request["prefix"], request["env"], request.get("prelude", ""))
      started[pid] = time.monotonic()
      reply(dict(pid=pid))
    elif request["op"] == "wait":
      pid, deadline = request["pid"], time.monotonic() + request["timeout"]
      while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
          break
        if time.monotonic() > deadline:
          os.kill(pid, 9)
          _, status = os.waitpid(pid, 0)
          break
        time.sleep(0.005)
      reply(dict(rc=os.waitstatus_to_exitcode(status), seconds=time.monotonic() - started.pop(pid)))
  for pid in started:  # The client is gone (or failed): no child outlives the server.
    os.kill(pid, 9)
    os.waitpid(pid, 0)


if __name__ == "__main__":
  _serve()
