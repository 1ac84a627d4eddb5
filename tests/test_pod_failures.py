"""A host of a pod dies: kill -9 of one of 2 processes (2 CPU devices each, jax.distributed
on loopback through main.py's flags) at five points of a run.

Each time the other process must end within the heartbeat timeout + 15 s with exit status
75 and one ``error:`` line (naming the lost process, the newest complete checkpoint and
the restart command), with JAX's C++ abort kept off its console; each restart resumes from
that checkpoint, and the run that lived through all the kills ends bit-identical to the
same run uninterrupted. The processes are forked from tests/_fault_tools.py's server;
kills inside a function are planted there (`plant_kill`) before the run starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import time

import chex
import numpy as np
import pytest

from ddpm_jax import checkpointing, supervisor
from tests import _fault_tools as ft

STEPS = 16
HEARTBEAT = 5  # Seconds: --heartbeat_timeout_seconds of every run here.
# A U-Net of one resolution without attention (half the compile time of test_tiny's:
# every life compiles anew, as main.py's pods run without the persistent cache on CPU).
FLAGS = (
  f"--config.training.num_train_steps={STEPS}",
  "--config.training.log_every_steps=1",
  "--config.training.checkpoint_every_steps=4",
  "--config.training.sample_every_steps=8",
  "--config.training.keep_checkpoints=10",
  "--config.eval.num_examples=16",
  "--config.model.ch_mult=(1,)",
  "--config.model.attn_resolutions=()",
  f"--heartbeat_timeout_seconds={HEARTBEAT}",
)
NO_GRIDS = ("--config.training.sample_every_steps=0",)  # Grids change no parameter.
EVAL = ("--mode=eval", "--config.eval.fid_num_samples=0")  # Bits/dim only.
LOSS_STEP = re.compile(r"step (\d+)/\d+ loss")


@dataclasses.dataclass(frozen=True)
class KillPoint:
  """Where one host of a pod run dies by SIGKILL: ``target`` is a function it dies in
  (`ft.plant_kill`: ``after`` seconds into its first call; "mid_save" as Orbax is about to
  rename the save's complete temporary folder); no target: the test kills the process from outside
  after its loss line of step 6."""

  name: str
  victim: int
  target: str = ""
  after: float = 0.0
  mode: str = "train"


_CHECKPOINTER = "ddpm_jax.checkpointing:Checkpointer"
_ORBAX_COMMIT = "orbax.checkpoint._src.path.atomicity:AtomicRenameTemporaryPath.finalize"
KILL_POINTS = (  # In the order of the run's lives.
  KillPoint("mid_step", victim=1),
  KillPoint("mid_restore", victim=1, target=f"{_CHECKPOINTER}._restore_verified"),
  # Orbax's commit of a written save: the temporary folder is complete, not yet renamed.
  # Deterministic, where watching for the folder could miss a fast save.
  KillPoint("mid_save", victim=0, target=f"{_ORBAX_COMMIT}"),
  KillPoint("mid_sample_grid", victim=1, target="ddpm_jax.train:SampleGrids.write", after=0.5),
  KillPoint(
    "mid_eval", victim=0, target="ddpm_jax.evaluation.bpd:compute_bpd", after=0.5, mode="eval"
  ),
)


@dataclasses.dataclass
class Outcome:
  """One life: the survivor's result, and the workdir once both hosts have ended."""

  survivor: ft.Result
  victim_rc: int
  seconds_after_kill: float
  steps_after: list[int]  # Finalised checkpoints.
  tmps_after: list[str]  # Orbax temporary folders.
  eval_files: list[str]  # What workdir/eval/step_<STEPS>/ holds.
  resumed_from: int | None = None  # The step that the next start to get there restored.


def _args(workdir, *flags) -> list[str]:
  return [
    "--config",
    os.path.join("configs", "test_tiny.py"),
    f"--workdir={workdir}",
    *FLAGS,
    *flags,
  ]


def _run_pod(server, workdir, *flags, name: str) -> list[ft.Result]:
  return [server.wait(pid, 300) for pid in ft.start_pod(server, _args(workdir, *flags), name=name)]


def _life(server, workdir, point: KillPoint, flags: tuple[str, ...]) -> Outcome:
  """One pod run of ``flags`` in which ``point.victim`` dies at ``point``."""
  marker = str(workdir) + f".{point.name}.killed"  # Holds the wall time of the kill.
  preludes = ["", ""]
  if point.target:
    preludes[point.victim] = (
      f"from tests import _fault_tools as ft; ft.plant_kill({point.target!r}, "
      f"after={point.after}, marker={marker!r})"
    )
  pids = ft.start_pod(server, _args(workdir, *flags), name=point.name, preludes=preludes)
  if not point.target:
    deadline = time.monotonic() + 300
    while max(map(int, LOSS_STEP.findall(server.stderr_so_far(pids[point.victim]))), default=0) < 6:
      assert time.monotonic() < deadline, server.stderr_so_far(pids[point.victim])[-3000:]
      time.sleep(0.02)
    os.kill(pids[point.victim], signal.SIGKILL)
    with open(marker, "w") as f:
      f.write(repr(time.time()))
  survivor = server.wait(pids[1 - point.victim], timeout=300)
  ended = time.time()
  victim = server.wait(pids[point.victim], timeout=60)
  with open(marker) as f:
    killed = float(f.read())
  eval_dir = workdir / "eval" / f"step_{STEPS}"
  return Outcome(
    survivor,
    victim.rc,
    ended - killed,
    *ft.step_dirs(str(workdir / "checkpoints")),
    sorted(os.listdir(eval_dir)) if eval_dir.is_dir() else [],
  )


def _resumed_from(results: list[ft.Result]) -> int | None:
  found = {
    int(m)
    for r in results
    for m in re.findall(r"Resumed from the checkpoint at step (\d+)", r.stderr)
  }
  assert len(found) <= 1, found
  return found.pop() if found else None


@pytest.fixture(scope="module")
def kills(tmp_path_factory):
  """The run lived through KILL_POINTS: each "train" point ends one life, then a start
  trains to the end (no grids), then --mode=eval dies at "mid_eval" and runs again; and
  the same training uninterrupted. Returns ({point name: Outcome}, the workdir, the
  uninterrupted workdir, {what: results of the runs that were not killed})."""
  server = ft.MainServer(str(tmp_path_factory.mktemp("pod_failure_logs")))
  reference = tmp_path_factory.mktemp("uninterrupted") / "wd"
  workdir = tmp_path_factory.mktemp("killed") / "wd"
  outcomes, pending = {}, []

  def resumed(results: list[ft.Result]) -> None:
    """Tells the lives waiting for it the step that a start got through restoring."""
    step = _resumed_from(results)
    if step is not None:
      for name in pending:
        outcomes[name].resumed_from = step
      pending.clear()

  try:
    clean = {"uninterrupted": _run_pod(server, reference, *NO_GRIDS, name="uninterrupted")}
    for point in KILL_POINTS:
      if point.mode == "eval" and "train" not in clean:
        clean["train"] = _run_pod(server, workdir, *NO_GRIDS, name="train_to_the_end")
        resumed(clean["train"])
      outcomes[point.name] = outcome = _life(
        server, workdir, point, () if point.mode == "train" else EVAL
      )
      resumed([outcome.survivor])
      if point.mode == "train":
        pending.append(point.name)
    clean["eval"] = _run_pod(server, workdir, *EVAL, name="eval_again")
  finally:
    server.close()
  return outcomes, workdir, reference, clean


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS, ids=lambda p: f"{p.name}_p{p.victim}")
def test_a_host_killed_stops_the_other_with_one_line_and_status_75(kills, point):
  """The survivor ends within the heartbeat timeout + 15 s with exit status 75 and one
  ``error:`` line naming the lost process, the newest complete checkpoint and the restart
  command; JAX's C++ abort (stack dump, Python thread dumps) goes only to the log file."""
  outcome = kills[0][point.name]
  survivor, text = outcome.survivor, outcome.survivor.stderr
  assert outcome.victim_rc == -signal.SIGKILL
  assert survivor.rc == supervisor.EXIT_HOST_LOST, text[-3000:]
  assert outcome.seconds_after_kill < HEARTBEAT + 15
  lines = text.splitlines()
  assert [line for line in lines if line.startswith("error:")] == lines[-1:], text[-3000:]
  for dump in (
    "Check failure",
    "Terminating process",
    "Fatal Python error",
    "Thread 0x",
    "Traceback",
    "coordination_service",
  ):
    assert dump not in text, (dump, text[-3000:])
  who = (
    "the coordinator (process 0)"
    if point.victim == 0
    else f"process {point.victim} of this run stopped sending heartbeats"
  )
  assert who in lines[-1]
  assert f"newest complete checkpoint is step {max(outcome.steps_after)}" in lines[-1]
  assert f"same command: python {ft.MAIN} " in lines[-1]
  assert f"--process_id={1 - point.victim}" in lines[-1]
  log = re.search(r"full output: (\S+)$", lines[-1]).group(1)
  with open(log) as f:
    assert "Terminating process because" in f.read()
  if point.mode == "train":  # The next start resumes from the newest complete checkpoint.
    assert outcome.resumed_from == max(outcome.steps_after)
  if point.name == "mid_save":  # The save under way is left as a temporary folder only.
    assert outcome.tmps_after and max(outcome.steps_after) == 4
  if point.name == "mid_eval":  # Killed while computing: nothing written yet.
    assert outcome.eval_files == []


@pytest.mark.slow
def test_a_pod_restarted_after_kills_ends_like_the_uninterrupted_run(kills):
  """After the four training lives, the last start trains to the end: params and EMA
  bit-identical to the uninterrupted pod run; the killed eval then runs again in full."""
  _, workdir, reference, clean = kills
  for result in (r for results in clean.values() for r in results):
    assert result.rc == 0, result.stderr[-3000:]
  for which in ("params", "ema_params"):
    restarted, uninterrupted = (_params(w, which) for w in (workdir, reference))
    assert restarted[1] == uninterrupted[1] == STEPS
    chex.assert_trees_all_equal(restarted[0], uninterrupted[0])
  with open(workdir / "eval" / f"step_{STEPS}" / "bpd.json") as f:
    assert np.isfinite(json.load(f)["total_bpd"])


def _params(workdir, which: str):
  """(the ``which`` tree of the newest checkpoint, its step)."""
  checkpointer = checkpointing.Checkpointer(str(workdir), read_only=True)
  try:
    return checkpointer.restore_params(-1, which=which)
  finally:
    checkpointer.close()
