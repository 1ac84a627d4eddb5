"""Fault injection: kill -9, SIGTERM, a second process, corrupt checkpoints, NaNs and bad
input lose nothing and leave nothing silently wrong (checkpointing.py, workdir.py, train.py,
main.py); a genuine bug keeps its traceback.

main.py runs in processes forked from tests/_fault_tools.py's server, which imported it
once (see there); the bad-input test checks two cases against a plain `python main.py`.
Every run is configs/test_tiny.py at batch 16 with the same learning rate, so all share
the compiled train step: conftest.py's persistent compile cache reaches the forked
processes through the environment. Determinism (same seed, same bits) is the chaos test's
last assertion: a run in other processes ends bit-identical to the in-process reference.
"""

import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from ddpm_jax import checkpointing
from ddpm_jax import train
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.errors import ConfigError, NonFiniteError
from ddpm_jax.train_state import TrainState
from tests import _fault_tools as ft
from tests.conftest import tiny_config

REF_STEPS = 24
REF_FLAGS = (f"--config.training.num_train_steps={REF_STEPS}",
             "--config.training.checkpoint_every_steps=8", "--config.training.log_every_steps=1",
             "--config.training.sample_every_steps=0")
KEPT = [REF_STEPS - 16, REF_STEPS - 8, REF_STEPS]  # The reference run's checkpoints (keep 3).
STEP_LINE = re.compile(r"step (\d+)/\d+ loss ([0-9.]+)")


def _config(**overrides):
  """configs/test_tiny.py with REF_FLAGS applied, then ``overrides`` ("group.field": value)."""
  ref = dict(flag[len("--config."):].split("=") for flag in REF_FLAGS)
  return tiny_config(**{**{k: int(v) for k, v in ref.items()}, **overrides})


def _args(workdir, *flags):
  return ["--config", os.path.join(ft.REPO, "configs", "test_tiny.py"), "--workdir",
          str(workdir), *flags]


def _losses(text: str) -> dict[int, float]:
  return {int(s): float(v) for s, v in STEP_LINE.findall(text)}


def _assert_same_bits(a, b) -> None:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _restore(workdir, target, step=None):
  checkpointer = checkpointing.Checkpointer(str(workdir), keep=100)
  try:
    return checkpointer.restore(target, step)
  finally:
    checkpointer.close()


class _Lines(logging.Handler):
  """Collects the messages of the absl logger (train.py's progress lines, warnings)."""

  def __init__(self):
    super().__init__(logging.INFO)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run: (workdir, final TrainState, {step: loss}) on 8 devices."""
  workdir = tmp_path_factory.mktemp("reference")
  lines, absl_logger = _Lines(), logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.addHandler(lines)
  absl_logger.setLevel(logging.INFO)
  try:
    state = train.train(_config(), str(workdir))
  finally:
    absl_logger.removeHandler(lines)
    absl_logger.setLevel(level)
  return workdir, state, _losses("\n".join(lines.messages))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  srv = ft.MainServer(str(tmp_path_factory.mktemp("main_logs")))
  yield srv
  srv.close()


def _exited(pid: int) -> bool:
  """True once ``pid`` has exited (a zombie until the server reaps it)."""
  with open(f"/proc/{pid}/stat") as f:
    return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def _wait_for(condition, pid: int, server, what: str, timeout: float = 120.0) -> None:
  deadline = time.monotonic() + timeout
  while not condition():
    if _exited(pid) or time.monotonic() > deadline:
      raise AssertionError(f"process {pid} ended or timed out before {what}:\n"
                           + server.stderr_so_far(pid)[-3000:])
    time.sleep(0.002)


CHAOS_FLAGS = (*REF_FLAGS, "--config.training.checkpoint_every_steps=2")
NO_PERIODIC_SAVES = ("--config.training.checkpoint_every_steps=1000",)
# The lives of one run and how each ends: 'lock' a second process started on the workdir
# once this one holds the lock is refused, then SIGTERM after this one's first step (this
# life makes no periodic saves); 'mid_save' kill -9 as soon as Orbax's temporary folder of
# its second save appears; 'startup' kill -9 at a random moment of its first seconds
# (backend, lock, restore, tracing, loading the compiled step).
LIVES = (("lock", NO_PERIODIC_SAVES), ("mid_save", ()), ("startup", ()), ("startup", ()),
         ("startup", ()), ("startup", ()))


def _end_life(server, pid: int, how: str, ckpt_dir: str, before: list[int], workdir,
              rng: random.Random) -> None:
  """Drives one life of the chaos run to its end (see LIVES)."""
  logged = lambda: max(_losses(server.stderr_so_far(pid)), default=0)
  if how == "startup":
    time.sleep(rng.uniform(0.1, 3.0))
    os.kill(pid, signal.SIGKILL)
    return
  if how == "lock":  # Refused with one line naming the workdir and the PID.
    _wait_for(lambda: "JAX process" in server.stderr_so_far(pid), pid, server, "the lock")
    second = server.run(_args(workdir, *CHAOS_FLAGS), name="second_process", timeout=60)
    assert second.rc == 2 and second.stderr.count("\n") == 1, second.stderr
    assert (f"workdir '{workdir}' is in use by another training process (PID {pid}, lock "
            in second.stderr)
    _wait_for(lambda: logged() > max(before), pid, server, "a step")  # Unharmed, it trains.
    os.kill(pid, signal.SIGTERM)
    return
  _wait_for(lambda: set(ft.step_dirs(ckpt_dir)[0]) - set(before), pid, server, "a save")
  tmps = set(ft.step_dirs(ckpt_dir)[1])
  _wait_for(lambda: set(ft.step_dirs(ckpt_dir)[1]) - tmps, pid, server, "a save under way")
  os.kill(pid, signal.SIGKILL)


def test_kill9_sigterm_lock_and_a_bit_flip_lose_nothing(server, reference, tmp_path):
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
    with server.started(_args(workdir, *CHAOS_FLAGS, *flags), name=f"life{i}_{how}") as pid:
      _end_life(server, pid, how, ckpt_dir, before, workdir, rng)
      sent = time.monotonic()
      result = server.wait(pid, timeout=60)
    where = f"life {i} ({how}):\n{result.stderr[-3000:]}"
    steps, tmps = ft.step_dirs(ckpt_dir)
    assert steps and max(steps) < REF_STEPS, where
    assert "Traceback" not in result.stderr and "corrupt" not in result.stderr, where
    resumed = re.search(r"Resumed from the checkpoint at step (\d+)", result.stderr)
    if resumed:  # Never a partial checkpoint: the newest finalised one.
      assert int(resumed.group(1)) == max(before), where
    if how == "lock":  # SIGTERM saves the step it is at and exits 0, promptly.
      assert result.rc == 0 and time.monotonic() - sent < 30, where
      assert max(steps) == max(_losses(result.stderr)) > max(before), where
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
  _corrupt(str(bad), "flip")
  flipped = ft.snapshot(str(bad))
  final = server.run(_args(workdir, *CHAOS_FLAGS, *NO_PERIODIC_SAVES), name="final",
                     timeout=180)
  assert final.rc == 0, final.stderr[-3000:]
  assert f"Checkpoint step {newest} ({bad}) is corrupt or unreadable" in final.stderr
  assert f"Resumed from the checkpoint at step {previous}" in final.stderr
  assert ft.snapshot(str(workdir / checkpointing.CORRUPT_DIR / str(newest))) == flipped
  assert max(ft.step_dirs(ckpt_dir)[0]) == REF_STEPS
  _assert_same_bits(_restore(workdir, reference[1]), reference[1])


def _corrupt(step_dir: str, how: str) -> None:
  if how == "flip":  # Orbax reads it back without complaint: only the fingerprint sees it.
    ft.flip_bytes(ft.largest_file(os.path.join(step_dir, checkpointing.STATE_ITEM)))
  elif how == "truncate":
    path = ft.largest_file(os.path.join(step_dir, checkpointing.STATE_ITEM))
    os.truncate(path, os.path.getsize(path) // 2)
  elif how == "remove_data":
    shutil.rmtree(os.path.join(step_dir, checkpointing.STATE_ITEM, "ocdbt.process_0"))
  elif how == "remove_fingerprint":
    shutil.rmtree(os.path.join(step_dir, checkpointing.FINGERPRINT_ITEM))
  else:
    raise AssertionError(how)


@pytest.fixture
def corrupted(reference, tmp_path, request):
  """A copy of the reference workdir whose latest checkpoint is damaged (request.param)."""
  workdir = tmp_path / "wd"
  shutil.copytree(reference[0], workdir)
  _corrupt(str(workdir / workdir_lib.CHECKPOINT_DIR / str(REF_STEPS)), request.param)
  return workdir


# After a failed read (truncate) Orbax leaves a TensorStore callback aimed at its closed
# asyncio loop; Python reports it when the loop is collected. Nothing is lost or left open.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupted", ["flip", "truncate", "remove_data", "remove_fingerprint"],
                         indirect=True)
def test_corrupt_latest_falls_back_and_is_moved_aside(corrupted, reference, caplog):
  """Restore warns naming the bad step, restores the newest intact one and
  moves the bad one (byte for byte) to checkpoints_corrupt/, never deleting it."""
  ref_dir, ref_state, _ = reference
  bad = corrupted / workdir_lib.CHECKPOINT_DIR / str(REF_STEPS)
  before = ft.snapshot(str(bad))
  with caplog.at_level(logging.WARNING):
    state = _restore(corrupted, ref_state)
  assert int(state.step) == KEPT[1]
  _assert_same_bits(state, _restore(ref_dir, ref_state, KEPT[1]))
  moved = corrupted / checkpointing.CORRUPT_DIR / str(REF_STEPS)
  assert not bad.exists() and ft.snapshot(str(moved)) == before
  assert f"Checkpoint step {REF_STEPS} ({bad}) is corrupt" in caplog.text
  assert f"to {moved}" in caplog.text


@pytest.mark.parametrize("corrupted", ["flip"], indirect=True)
def test_sample_eval_restore_skips_corrupt_without_moving(corrupted, reference, caplog):
  """restore_params (sample / eval) falls back too, read-only; an explicit bad step fails."""
  ref_dir, ref_state, _ = reference
  before = ft.snapshot(str(corrupted))
  checkpointer = checkpointing.Checkpointer(str(corrupted), read_only=True)
  with caplog.at_level(logging.WARNING):
    params, step = checkpointer.restore_params(-1)
  assert step == KEPT[1] and f"Checkpoint step {REF_STEPS}" in caplog.text
  with pytest.raises(ConfigError, match=f"Checkpoint .*{REF_STEPS} is corrupt or unreadable"):
    checkpointer.restore_params(REF_STEPS)
  checkpointer.close()
  assert ft.snapshot(str(corrupted)) == before
  _assert_same_bits(params, _restore(ref_dir, ref_state, KEPT[1]).ema_params)


def test_all_checkpoints_corrupt_is_an_error_and_moves_nothing(reference, tmp_path):
  workdir = tmp_path / "wd"
  shutil.copytree(reference[0], workdir)
  for step in ft.step_dirs(str(workdir / workdir_lib.CHECKPOINT_DIR))[0]:
    _corrupt(str(workdir / workdir_lib.CHECKPOINT_DIR / str(step)), "flip")
  before = ft.snapshot(str(workdir))
  with pytest.raises(ConfigError, match="No intact checkpoint.*Nothing was moved"):
    _restore(workdir, reference[1])
  assert ft.snapshot(str(workdir)) == before


@pytest.fixture(scope="module")
def blown_up(reference, tmp_path_factory):
  """A workdir whose checkpoint (step REF_STEPS) holds weights that blew up: x1e30, still
  finite, so the next step's loss and gradients overflow to inf / NaN."""
  workdir = tmp_path_factory.mktemp("blown_up")
  shutil.copy(reference[0] / workdir_lib.CONFIG_FILE, workdir)
  state = reference[1]
  huge = state.replace(params=jax.tree.map(lambda p: p * np.float32(1e30), state.params))
  checkpointer = checkpointing.Checkpointer(str(workdir), keep=3)
  checkpointer.save(REF_STEPS, huge)
  checkpointer.close()
  return workdir, huge


def _nan_config(mode: str):
  return _config(**{"training.num_train_steps": REF_STEPS + 3,
                    "training.checkpoint_every_steps": 1000, "training.nonfinite": mode})


def _checkpoints(workdir, target) -> dict[int, TrainState]:
  steps = ft.step_dirs(str(workdir / workdir_lib.CHECKPOINT_DIR))[0]
  return {s: _restore(workdir, target, s) for s in steps}


def _all_finite(tree) -> bool:
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.inexact))


def test_nonfinite_raise_names_the_step_and_saves_no_nan(blown_up, tmp_path):
  """The default switch: stop with an error naming the step; nothing saved."""
  workdir = tmp_path / "wd"
  shutil.copytree(blown_up[0], workdir)
  with pytest.raises(NonFiniteError, match=rf"Non-finite loss or gradients at step "
                     rf"{REF_STEPS + 1} .*nothing after step {REF_STEPS} was saved.*nonfinite=skip"):
    train.train(_nan_config("raise"), str(workdir))
  assert list(_checkpoints(workdir, blown_up[1])) == [REF_STEPS]


def test_nonfinite_skip_counts_and_keeps_the_state(blown_up, tmp_path, caplog):
  """training.nonfinite='skip': such steps leave the state as it was and are counted in
  the state (persisted in checkpoints) and in the logs; no checkpoint holds a NaN."""
  workdir = tmp_path / "wd"
  shutil.copytree(blown_up[0], workdir)
  with caplog.at_level(logging.WARNING):
    state = train.train(_nan_config("skip"), str(workdir))
  assert (int(state.step), int(state.nonfinite_steps), int(state.last_nonfinite_step)) == (
      REF_STEPS + 3, 3, REF_STEPS + 3)
  assert "Skipped the update of 1 step(s)" in caplog.text
  assert "(3 skipped since step 0)" in caplog.text
  saved = _checkpoints(workdir, blown_up[1])
  assert list(saved) == [REF_STEPS, REF_STEPS + 3] and _all_finite(saved[REF_STEPS + 3])
  assert int(saved[REF_STEPS + 3].nonfinite_steps) == 3
  last = saved[REF_STEPS + 3]
  _assert_same_bits((last.params, last.ema_params, last.opt_state),
                    (blown_up[1].params, blown_up[1].ema_params, blown_up[1].opt_state))


def test_a_nonfinite_state_is_never_written(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=3)
  state = {"params": {"w": np.array([1.0, np.inf], np.float32)}, "step": np.int32(7)}
  with pytest.raises(NonFiniteError, match="step 7 holds non-finite values in params/w"):
    checkpointer.save(7, state)
  checkpointer.close()
  assert ft.step_dirs(str(tmp_path / workdir_lib.CHECKPOINT_DIR)) == ([], [])


def test_one_device_gives_the_eight_device_loss_trajectory(server, reference, tmp_path):
  """The same run in a process with 1 CPU device, at the same global batch,
  has the loss trajectory and the final state of the 8-device run up to float rounding."""
  workdir = tmp_path / "wd"
  result = server.run(_args(workdir, *REF_FLAGS, *NO_PERIODIC_SAVES),
                      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
                      name="one_device", timeout=240)
  assert result.rc == 0, result.stderr[-3000:]
  assert "1 local / 1 global devices" in result.stderr
  one, eight = _losses(result.stderr), reference[2]
  assert sorted(one) == sorted(eight) == list(range(1, REF_STEPS + 1))
  np.testing.assert_allclose([one[s] for s in sorted(one)], [eight[s] for s in sorted(one)],
                             rtol=1e-4, atol=2e-5)
  final, ref_state = _restore(workdir, reference[1]), reference[1]
  assert int(final.step) == REF_STEPS
  # After 24 Adam steps the largest difference seen is ~3e-6 (params of magnitude ~0.3).
  chex.assert_trees_all_close((final.params, final.ema_params, final.opt_state),
                              (ref_state.params, ref_state.ema_params, ref_state.opt_state),
                              rtol=1e-4, atol=1e-5)


D = ("--config={tiny}", "--workdir={run}")  # A workdir holding a run, and its config.
BAD_INPUT = [  # (what, main.py arguments, the one stderr line must match)
    ("unknown flag", [*D, "--bogus=1"], r"Unknown command line flag 'bogus'"),
    ("unknown config field", [*D, "--config.training.bogus=1"],
     r"unknown config field in '--config.training.bogus=1': config.training has .*batch_size"),
    ("wrong type", [*D, "--config.training.batch_size=abc"],
     r"--config.training.batch_size=abc: invalid literal for int"),
    ("tuple of non-ints", [*D, "--config.model.ch_mult=(1,x)"], r"model.ch_mult=.*tuple of"),
    ("negative batch", [*D, "--config.training.batch_size=-16"],
     r"training.batch_size=-16 must be a positive integer"),
    ("batch vs devices", [*D, "--config.training.batch_size=12"],
     r"training.batch_size=12 .* not divisible by the 8 devices"),
    ("unknown dataset", [*D, "--config.data.dataset=imagenet"],
     r"data.dataset='imagenet' is unknown; allowed: cifar10"),
    ("bad split", [*D, "--config.data.train_split=validation"],
     r"data.train_split='validation' is not a split of 'synthetic'"),
    ("missing data_dir", [*D, "--config.data.data_dir=/nonexistent/data"],
     r"data.data_dir='/nonexistent/data' is not an existing folder"),
    ("unknown mode", [*D, "--mode=bogus"], r"--mode=bogus: value should be one of"),
    ("no --workdir", ["--config={tiny}"], r"--workdir must have a value"),
    ("no --config", ["--workdir={run}"], r"--config must have a value"),
    ("empty --workdir", ["--config={tiny}", "--workdir="], r"--workdir is empty"),
    ("workdir is a file", ["--config={tiny}", "--workdir={file}"],
     r"--workdir=.* exists and is not a directory"),
    ("config file missing", ["--config=configs/nope.py", "--workdir={run}"],
     r"--config=configs/nope.py: no such file"),
    ("config file not python", ["--config=README.md", "--workdir={run}"],
     r"--config=README.md cannot be loaded"),
    ("image size vs ch_mult", [*D, "--config.data.image_size=9"],
     r"Image size 9 must be a positive multiple of .* 2 for ch_mult=\(1, 2\)"),
    ("bad dtype", [*D, "--config.model.dtype=float64"],
     r"model config .*compute dtype 'float64'; allowed: \['bfloat16', 'float32'\]"),
    ("bad groups", [*D, "--config.model.num_groups=5"], r"model config .*num_groups=5"),
    ("bad beta schedule", [*D, "--config.diffusion.beta_schedule=cubic"],
     r"diffusion.beta_schedule='cubic' is unknown; allowed: linear"),
    ("beta_end <= beta_start", [*D, "--config.diffusion.beta_end=0.0001"],
     r"diffusion.beta_end=0.0001 must be > diffusion.beta_start=0.0001"),
    ("zero timesteps", [*D, "--config.diffusion.num_timesteps=0"],
     r"diffusion.num_timesteps=0 must be a positive integer"),
    ("negative lr", [*D, "--config.training.learning_rate=-1"],
     r"training.learning_rate=-1.0 must be > 0"),
    ("ema decay 1", [*D, "--config.training.ema_decay=1.0"], r"ema_decay=1.0 must lie in"),
    ("keep 0 checkpoints", [*D, "--config.training.keep_checkpoints=0"],
     r"training.keep_checkpoints=0 must be a positive integer"),
    ("bad nonfinite switch", [*D, "--config.training.nonfinite=ignore"],
     r"training.nonfinite='ignore' is unknown; allowed: raise, skip"),
    ("frozen field changed", [*D, "--config.model.ch=32"],
     r"Config incompatible with the run in .*model.ch: 16 -> 32"),
    ("sample: no such step", [*D, "--mode=sample", "--config.sampling.checkpoint_step=999"],
     rf"No checkpoint at step 999 .*available: \[{KEPT[0]}, {KEPT[1]}, {KEPT[2]}\]"),
    ("sample: step -5", [*D, "--mode=sample", "--config.sampling.checkpoint_step=-5"],
     r"sampling.checkpoint_step=-5 must be an integer >= 0 \(or -1\)"),
    ("sample: method", [*D, "--mode=sample", "--config.sampling.method=euler"],
     r"sampling.method='euler' is unknown; allowed: ancestral, ddim"),
    ("sample: ddim steps", [*D, "--mode=sample", "--config.sampling.method=ddim",
                            "--config.sampling.ddim.num_steps=5000"],
     r"sampling.ddim.num_steps=5000 must be an integer in \[1, 100\]"),
    ("sample: zero samples", [*D, "--mode=sample", "--config.sampling.num_samples=0"],
     r"sampling.num_samples=0 must be a positive integer"),
    ("eval: empty workdir", ["--config={tiny}", "--workdir={empty}", "--mode=eval"],
     r"No checkpoint in .*train first"),
    ("eval: batch vs devices", [*D, "--mode=eval", "--config.eval.batch_size=12"],
     r"eval.batch_size=12 \(a global batch\) is not divisible by the 8 devices"),
    ("extra argument", [*D, "extra"], r"unexpected arguments \['extra'\]"),
    ("pod: heartbeat timeout", [*D, "--multihost", "--heartbeat_timeout_seconds=1"],
     r"heartbeat_timeout_seconds=1 must be an integer >= 2"),
]


def test_bad_input_table(server, reference, tmp_path):
  """Each bad input exits 2 with one 'error:' line naming the problem, no
  traceback, before anything is compiled (JAX_LOG_COMPILES would add lines), within
  seconds, and every workdir is left byte for byte as it was."""
  paths = dict(run=tmp_path / "run", empty=tmp_path / "empty", file=tmp_path / "file")
  shutil.copytree(reference[0], paths["run"])
  paths["empty"].mkdir()
  paths["file"].write_text("not a directory")
  before = {k: ft.snapshot(str(v)) for k, v in paths.items()}
  fill = dict(paths, tiny=os.path.join("configs", "test_tiny.py"))
  arg_lists = [[a.format(**fill) for a in args] for _, args, _ in BAD_INPUT]
  # Two cases also through a plain `python main.py`: the forked runs say exactly the same.
  plain = {i: subprocess.Popen([sys.executable, ft.MAIN, *arg_lists[i]], cwd=ft.REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i, (name, _, _) in enumerate(BAD_INPUT) if name in ("unknown mode", "negative lr")}
  results = server.run_many(arg_lists, env={"JAX_LOG_COMPILES": "1"})
  for i, proc in plain.items():
    out, err = proc.communicate(timeout=120)
    assert (proc.returncode, out, err) == (results[i].rc, "", results[i].stderr)
  assert len(BAD_INPUT) >= 20 and len(plain) == 2
  for (name, _, pattern), args, result in zip(BAD_INPUT, arg_lists, results):
    where = f"{name}: main.py {' '.join(args)} ->\n{result.stderr}"
    assert result.rc == 2, where
    assert result.stdout == "" and "Traceback" not in result.stderr, where
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), where
    assert re.search(pattern, lines[0]), where
    assert result.seconds < 30, where
  assert {k: ft.snapshot(str(v)) for k, v in paths.items()} == before


def test_a_genuine_bug_keeps_its_traceback(server, tmp_path):
  """Only bad input (ConfigError) and a diverged run (NonFiniteError) become one line: a
  ValueError raised inside the model function is a bug and surfaces with its traceback."""
  plant = ("import ddpm_jax.diffusion as d\n"
           "def broken(*args, **kwargs):\n"
           "  raise ValueError('planted bug in the model function')\n"
           "d.training_losses = broken\n")
  result = server.run(_args(tmp_path / "wd", *REF_FLAGS), prelude=plant, name="planted",
                      timeout=120)
  assert result.rc == 1, result.stderr[-3000:]
  assert "Traceback (most recent call last)" in result.stderr
  assert "ValueError: planted bug in the model function" in result.stderr
  assert "error: planted" not in result.stderr


def test_cifar10_offline_stops_before_compute_with_one_line(server, tmp_path):
  """The main job on a fresh machine without the prepared dataset and without a network
  (every proxy points at a closed port) stops within seconds, before compiling or writing:
  exit 2, one line naming the dataset, the data_dir and what to do, and the workdir exactly
  as it was, whether it did not exist or held a file."""
  offline = {k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY",
                                                 "HTTPS_PROXY")}
  offline.update(no_proxy="", NO_PROXY="", JAX_LOG_COMPILES="1")
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "notes.txt").write_text("keep me")
  cifar = os.path.join("configs", "cifar10.py")
  for workdir in (tmp_path / "absent", existing):
    before = ft.snapshot(str(workdir)), ft.snapshot(str(data_dir))
    result = server.run([f"--config={cifar}", f"--workdir={workdir}",
                         f"--config.data.data_dir={data_dir}"], env=offline, timeout=60)
    assert result.rc == 2, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stdout == "", result.stderr[-3000:]
    assert re.fullmatch(
        rf"error: tfds dataset 'cifar10' is not prepared in data.data_dir='{data_dir}' and its "
        r"download site www.cs.toronto.edu cannot be reached \(.+\): run `tfds build cifar10 "
        r"--data_dir=DIR` on a machine with internet, .*configs/fashion_mnist.py.*", lines[0])
    assert result.seconds < 30, result.seconds
    assert (ft.snapshot(str(workdir)), ft.snapshot(str(data_dir))) == before
