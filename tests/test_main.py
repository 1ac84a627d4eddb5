"""The training command (main.py) under faults and bad input: kill -9, SIGTERM, a second
process on the workdir and a corrupt checkpoint lose nothing (the run ends bit-identical to
the uninterrupted one); bad input and an offline machine give one error line before any
compute and leave every workdir as it was; a genuine bug keeps its traceback.

main.py runs in processes forked from tests/_fault_tools.py's server (conftest.py's
`main_server`), which imported it once (see there); the bad-input test checks two cases
against a plain `python main.py`. The reference is tests/_reference_run.py's run
(conftest.py's `reference_run`). Checkpoint fallback in-process: test_checkpointing.py;
NaNs and 1 vs 8 devices: test_train.py.
"""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ddpm_jax import checkpointing
from ddpm_jax import workdir as workdir_lib
from tests import _fault_tools as ft
from tests import _reference_run as rr
from tests._reference_run import KEPT, NO_PERIODIC_SAVES, REF_FLAGS, REF_STEPS


def _exited(pid: int) -> bool:
  """True once ``pid`` has exited (a zombie until the server reaps it)."""
  with open(f"/proc/{pid}/stat") as f:
    return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def _wait_for(condition, pid: int, server, what: str, timeout: float = 120.0) -> None:
  deadline = time.monotonic() + timeout
  while not condition():
    if _exited(pid) or time.monotonic() > deadline:
      raise AssertionError(
        f"process {pid} ended or timed out before {what}:\n" + server.stderr_so_far(pid)[-3000:]
      )
    time.sleep(0.002)


CHAOS_FLAGS = (*REF_FLAGS, "--config.training.checkpoint_every_steps=2")
# The lives of one run and how each ends: 'lock' a second process started on the workdir
# once this one holds the lock is refused, then SIGTERM after this one's first step (this
# life makes no periodic saves); 'mid_save' kill -9 as soon as Orbax's temporary folder of
# its second save appears; 'startup' kill -9 at a random moment of its first seconds
# (backend, lock, restore, tracing, loading the compiled step).
LIVES = (
  ("lock", NO_PERIODIC_SAVES),
  ("mid_save", ()),
  ("startup", ()),
  ("startup", ()),
  ("startup", ()),
  ("startup", ()),
)


def _end_life(
  server, pid: int, how: str, ckpt_dir: str, before: list[int], workdir, rng: random.Random
) -> None:
  """Drives one life of the chaos run to its end (see LIVES)."""

  def logged():
    return max(ft.step_losses(server.stderr_so_far(pid)), default=0)

  if how == "startup":
    time.sleep(rng.uniform(0.1, 3.0))
    os.kill(pid, signal.SIGKILL)
    return
  if how == "lock":  # Refused with one line naming the workdir and the PID.
    _wait_for(lambda: "JAX process" in server.stderr_so_far(pid), pid, server, "the lock")
    second = server.run(rr.main_args(workdir, *CHAOS_FLAGS), name="second_process", timeout=60)
    assert second.rc == 2 and second.stderr.count("\n") == 1, second.stderr
    assert (
      f"workdir '{workdir}' is in use by another training process (PID {pid}, lock "
      in second.stderr
    )
    _wait_for(lambda: logged() > max(before), pid, server, "a step")  # Unharmed, it trains.
    os.kill(pid, signal.SIGTERM)
    return
  _wait_for(lambda: set(ft.step_dirs(ckpt_dir)[0]) - set(before), pid, server, "a save")
  tmps = set(ft.step_dirs(ckpt_dir)[1])
  _wait_for(lambda: set(ft.step_dirs(ckpt_dir)[1]) - tmps, pid, server, "a save under way")
  os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_kill9_sigterm_lock_and_a_bit_flip_lose_nothing(main_server, reference_run, tmp_path):
  """Kill -9, SIGTERM, the lock, a corrupt checkpoint and determinism, end to end. One run of
  REF_STEPS steps is killed
  5 times (once mid-save, at kill times drawn from a seeded rng), meets a second
  process and is preempted by SIGTERM; then a bit flips in its newest checkpoint. The last
  restart falls back past that one, and the run ends bit-identical to the uninterrupted
  in-process reference."""
  workdir = tmp_path / "wd"
  ckpt_dir = str(workdir / workdir_lib.CHECKPOINT_DIR)
  rng = random.Random(1234)
  kills, tmp_left = 0, []
  for i, (how, flags) in enumerate(LIVES):
    before, tmps_before = ft.step_dirs(ckpt_dir)
    before = before or [0]
    args = rr.main_args(workdir, *CHAOS_FLAGS, *flags)
    with main_server.started(args, name=f"life{i}_{how}") as pid:
      _end_life(main_server, pid, how, ckpt_dir, before, workdir, rng)
      sent = time.monotonic()
      result = main_server.wait(pid, timeout=60)
    where = f"life {i} ({how}):\n{result.stderr[-3000:]}"
    steps, tmps = ft.step_dirs(ckpt_dir)
    assert steps and max(steps) < REF_STEPS, where
    assert "Traceback" not in result.stderr and "corrupt" not in result.stderr, where
    resumed = re.search(r"Resumed from the checkpoint at step (\d+)", result.stderr)
    if resumed:  # Never a partial checkpoint: the newest finalised one.
      assert int(resumed.group(1)) == max(before), where
    if how == "lock":  # SIGTERM saves the step it is at and exits 0, promptly.
      assert result.rc == 0 and time.monotonic() - sent < 30, where
      assert max(steps) == max(ft.step_losses(result.stderr)) > max(before), where
      assert set(tmps) <= set(tmps_before), where  # Its save completed.
      assert f"Saved the checkpoint of step {max(steps)} after SIGTERM" in result.stderr
    else:
      assert result.rc == -signal.SIGKILL, where
      kills += 1
      if how == "mid_save":
        tmp_left.extend(set(tmps) - set(tmps_before))
  assert kills >= 5 and tmp_left, (kills, tmp_left)  # Some kills hit a save under way.
  *_, previous, newest = steps
  bad = workdir / workdir_lib.CHECKPOINT_DIR / str(newest)
  rr.corrupt(str(bad), "flip")
  flipped = ft.snapshot(str(bad))
  final = main_server.run(
    rr.main_args(workdir, *CHAOS_FLAGS, *NO_PERIODIC_SAVES), name="final", timeout=180
  )
  assert final.rc == 0, final.stderr[-3000:]
  assert f"Checkpoint step {newest} ({bad}) is corrupt or unreadable" in final.stderr
  assert f"Resumed from the checkpoint at step {previous}" in final.stderr
  assert ft.snapshot(str(workdir / checkpointing.CORRUPT_DIR / str(newest))) == flipped
  assert max(ft.step_dirs(ckpt_dir)[0]) == REF_STEPS
  rr.assert_same_bits(rr.restore(workdir, reference_run[1]), reference_run[1])


D = ("--config={tiny}", "--workdir={run}")  # A workdir holding a run, and its config.
BAD_INPUT = [  # (what, main.py arguments, the one stderr line must match)
  ("unknown flag", [*D, "--bogus=1"], r"Unknown command line flag 'bogus'"),
  (
    "unknown config field",
    [*D, "--config.training.bogus=1"],
    r"unknown config field in '--config.training.bogus=1': config.training has .*batch_size",
  ),
  (
    "wrong type",
    [*D, "--config.training.batch_size=abc"],
    r"--config.training.batch_size=abc: invalid literal for int",
  ),
  ("tuple of non-ints", [*D, "--config.model.ch_mult=(1,x)"], r"model.ch_mult=.*tuple of"),
  (
    "negative batch",
    [*D, "--config.training.batch_size=-16"],
    r"training.batch_size=-16 must be a positive integer",
  ),
  (
    "batch vs devices",
    [*D, "--config.training.batch_size=12"],
    r"training.batch_size=12 .* not divisible by the 8 devices",
  ),
  (
    "unknown dataset",
    [*D, "--config.data.dataset=imagenet"],
    r"data.dataset='imagenet' is unknown; allowed: cifar10",
  ),
  (
    "bad split",
    [*D, "--config.data.train_split=validation"],
    r"data.train_split='validation' is not a split of 'synthetic'",
  ),
  (
    "missing data_dir",
    [*D, "--config.data.data_dir=/nonexistent/data"],
    r"data.data_dir='/nonexistent/data' is not an existing folder",
  ),
  ("unknown mode", [*D, "--mode=bogus"], r"--mode=bogus: value should be one of"),
  ("no --workdir", ["--config={tiny}"], r"--workdir must have a value"),
  ("no --config", ["--workdir={run}"], r"--config must have a value"),
  ("empty --workdir", ["--config={tiny}", "--workdir="], r"--workdir is empty"),
  (
    "workdir is a file",
    ["--config={tiny}", "--workdir={file}"],
    r"--workdir=.* exists and is not a directory",
  ),
  (
    "config file missing",
    ["--config=configs/nope.py", "--workdir={run}"],
    r"--config=configs/nope.py: no such file",
  ),
  (
    "config file not python",
    ["--config=README.md", "--workdir={run}"],
    r"--config=README.md cannot be loaded",
  ),
  (
    "image size vs ch_mult",
    [*D, "--config.data.image_size=9"],
    r"Image size 9 must be a positive multiple of .* 2 for ch_mult=\(1, 2\)",
  ),
  (
    "bad dtype",
    [*D, "--config.model.dtype=float64"],
    r"model config .*compute dtype 'float64'; allowed: \['bfloat16', 'float32'\]",
  ),
  ("bad groups", [*D, "--config.model.num_groups=5"], r"model config .*num_groups=5"),
  (
    "bad beta schedule",
    [*D, "--config.diffusion.beta_schedule=cubic"],
    r"diffusion.beta_schedule='cubic' is unknown; allowed: linear",
  ),
  (
    "beta_end <= beta_start",
    [*D, "--config.diffusion.beta_end=0.0001"],
    r"diffusion.beta_end=0.0001 must be > diffusion.beta_start=0.0001",
  ),
  (
    "zero timesteps",
    [*D, "--config.diffusion.num_timesteps=0"],
    r"diffusion.num_timesteps=0 must be a positive integer",
  ),
  (
    "negative lr",
    [*D, "--config.training.learning_rate=-1"],
    r"training.learning_rate=-1.0 must be > 0",
  ),
  ("ema decay 1", [*D, "--config.training.ema_decay=1.0"], r"ema_decay=1.0 must lie in"),
  (
    "keep 0 checkpoints",
    [*D, "--config.training.keep_checkpoints=0"],
    r"training.keep_checkpoints=0 must be a positive integer",
  ),
  (
    "bad nonfinite switch",
    [*D, "--config.training.nonfinite=ignore"],
    r"training.nonfinite='ignore' is unknown; allowed: raise, skip",
  ),
  (
    "frozen field changed",
    [*D, "--config.model.ch=32"],
    r"Config incompatible with the run in .*model.ch: 16 -> 32",
  ),
  (
    "sample: no such step",
    [*D, "--mode=sample", "--config.sampling.checkpoint_step=999"],
    rf"No checkpoint at step 999 .*available: \[{KEPT[0]}, {KEPT[1]}, {KEPT[2]}\]",
  ),
  (
    "sample: step -5",
    [*D, "--mode=sample", "--config.sampling.checkpoint_step=-5"],
    r"sampling.checkpoint_step=-5 must be an integer >= 0 \(or -1\)",
  ),
  (
    "sample: method",
    [*D, "--mode=sample", "--config.sampling.method=euler"],
    r"sampling.method='euler' is unknown; allowed: ancestral, ddim",
  ),
  (
    "sample: ddim steps",
    [*D, "--mode=sample", "--config.sampling.method=ddim", "--config.sampling.ddim.num_steps=5000"],
    r"sampling.ddim.num_steps=5000 must be an integer in \[1, 100\]",
  ),
  (
    "sample: zero samples",
    [*D, "--mode=sample", "--config.sampling.num_samples=0"],
    r"sampling.num_samples=0 must be a positive integer",
  ),
  (
    "eval: empty workdir",
    ["--config={tiny}", "--workdir={empty}", "--mode=eval"],
    r"No checkpoint in .*train first",
  ),
  (
    "eval: batch vs devices",
    [*D, "--mode=eval", "--config.eval.batch_size=12"],
    r"eval.batch_size=12 \(a global batch\) is not divisible by the 8 devices",
  ),
  ("extra argument", [*D, "extra"], r"unexpected arguments \['extra'\]"),
  (
    "pod: heartbeat timeout",
    [*D, "--multihost", "--heartbeat_timeout_seconds=1"],
    r"heartbeat_timeout_seconds=1 must be an integer >= 2",
  ),
]


@pytest.mark.slow
def test_bad_input_table(main_server, reference_run, tmp_path):
  """Each bad input exits 2 with one 'error:' line naming the problem, no
  traceback, before anything is compiled (JAX_LOG_COMPILES would add lines), within
  seconds, and every workdir is left byte for byte as it was."""
  paths = dict(run=tmp_path / "run", empty=tmp_path / "empty", file=tmp_path / "file")
  shutil.copytree(reference_run[0], paths["run"])
  paths["empty"].mkdir()
  paths["file"].write_text("not a directory")
  before = {k: ft.snapshot(str(v)) for k, v in paths.items()}
  fill = dict(paths, tiny=os.path.join("configs", "test_tiny.py"))
  arg_lists = [[a.format(**fill) for a in args] for _, args, _ in BAD_INPUT]
  # Two cases also through a plain `python main.py`: the forked runs say exactly the same.
  plain = {
    i: subprocess.Popen(
      [sys.executable, ft.MAIN, *arg_lists[i]],
      cwd=ft.REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i, (name, _, _) in enumerate(BAD_INPUT)
    if name in ("unknown mode", "negative lr")
  }
  results = main_server.run_many(arg_lists, env={"JAX_LOG_COMPILES": "1"})
  for i, proc in plain.items():
    out, err = proc.communicate(timeout=120)
    assert (proc.returncode, out, err) == (results[i].rc, "", results[i].stderr)
  assert len(BAD_INPUT) >= 20 and len(plain) == 2
  for (name, _, pattern), args, result in zip(BAD_INPUT, arg_lists, results, strict=True):
    where = f"{name}: main.py {' '.join(args)} ->\n{result.stderr}"
    assert result.rc == 2, where
    assert result.stdout == "" and "Traceback" not in result.stderr, where
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), where
    assert re.search(pattern, lines[0]), where
    assert result.seconds < 30, where
  assert {k: ft.snapshot(str(v)) for k, v in paths.items()} == before


def test_a_genuine_bug_keeps_its_traceback(main_server, tmp_path):
  """Only bad input (ConfigError) and a diverged run (NonFiniteError) become one line: a
  ValueError raised inside the model function is a bug and surfaces with its traceback."""
  plant = (
    "import ddpm_jax.diffusion as d\n"
    "def broken(*args, **kwargs):\n"
    "  raise ValueError('planted bug in the model function')\n"
    "d.training_losses = broken\n"
  )
  result = main_server.run(
    rr.main_args(tmp_path / "wd", *REF_FLAGS), prelude=plant, name="planted", timeout=120
  )
  assert result.rc == 1, result.stderr[-3000:]
  assert "Traceback (most recent call last)" in result.stderr
  assert "ValueError: planted bug in the model function" in result.stderr
  assert "error: planted" not in result.stderr


def test_cifar10_offline_stops_before_compute_with_one_line(main_server, tmp_path):
  """The main job on a fresh machine without the prepared dataset and without a network
  (every proxy points at a closed port) stops within seconds, before compiling or writing:
  exit 2, one line naming the dataset, the data_dir and what to do, and the workdir exactly
  as it was, whether it did not exist or held a file."""
  offline = dict.fromkeys(
    ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"), "http://127.0.0.1:9"
  )
  offline.update(no_proxy="", NO_PROXY="", JAX_LOG_COMPILES="1")
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "notes.txt").write_text("keep me")
  cifar = os.path.join("configs", "cifar10.py")
  for workdir in (tmp_path / "absent", existing):
    before = ft.snapshot(str(workdir)), ft.snapshot(str(data_dir))
    result = main_server.run(
      [f"--config={cifar}", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"],
      env=offline,
      timeout=60,
    )
    assert result.rc == 2, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stdout == "", result.stderr[-3000:]
    assert re.fullmatch(
      rf"error: tfds dataset 'cifar10' is not prepared in data.data_dir='{data_dir}' and its "
      r"download site www.cs.toronto.edu cannot be reached \(.+\): run `tfds build cifar10 "
      r"--data_dir=DIR` on a machine with internet, .*configs/fashion_mnist.py.*",
      lines[0],
    )
    assert result.seconds < 30, result.seconds
    assert (ft.snapshot(str(workdir)), ft.snapshot(str(data_dir))) == before
