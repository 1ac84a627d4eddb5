"""Checkpoints (ddpm_jax/checkpointing.py) that are damaged or hold non-finite values: a
restore falls back to the newest intact one and moves the damaged one aside (training) or
leaves it (sample / eval); nothing corrupt is ever read as good, nothing non-finite written.

The checkpoints are those of tests/_reference_run.py's run (conftest.py's `reference_run`);
the tests that need it are marked slow (training it takes ~20 s).
"""

import logging
import shutil

import numpy as np
import pytest

from ddpm_jax import checkpointing
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.errors import ConfigError, NonFiniteError
from tests import _fault_tools as ft
from tests import _reference_run as rr
from tests._reference_run import KEPT, REF_STEPS


@pytest.fixture
def corrupted(reference_run, tmp_path, request):
  """A copy of the reference workdir whose latest checkpoint is damaged (request.param)."""
  workdir = tmp_path / "wd"
  shutil.copytree(reference_run[0], workdir)
  rr.corrupt(str(workdir / workdir_lib.CHECKPOINT_DIR / str(REF_STEPS)), request.param)
  return workdir


# After a failed read (truncate) Orbax leaves a TensorStore callback aimed at its closed
# asyncio loop; Python reports it when the loop is collected. Nothing is lost or left open.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
  "corrupted", ["flip", "truncate", "remove_data", "remove_fingerprint"], indirect=True
)
def test_corrupt_latest_falls_back_and_is_moved_aside(corrupted, reference_run, caplog):
  """Restore warns naming the bad step, restores the newest intact one and
  moves the bad one (byte for byte) to checkpoints_corrupt/, never deleting it."""
  ref_dir, ref_state, _ = reference_run
  bad = corrupted / workdir_lib.CHECKPOINT_DIR / str(REF_STEPS)
  before = ft.snapshot(str(bad))
  with caplog.at_level(logging.WARNING):
    state = rr.restore(corrupted, ref_state)
  assert int(state.step) == KEPT[1]
  rr.assert_same_bits(state, rr.restore(ref_dir, ref_state, KEPT[1]))
  moved = corrupted / checkpointing.CORRUPT_DIR / str(REF_STEPS)
  assert not bad.exists() and ft.snapshot(str(moved)) == before
  assert f"Checkpoint step {REF_STEPS} ({bad}) is corrupt" in caplog.text
  assert f"to {moved}" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("corrupted", ["flip"], indirect=True)
def test_sample_eval_restore_skips_corrupt_without_moving(corrupted, reference_run, caplog):
  """restore_params (sample / eval) falls back too, read-only; an explicit bad step fails."""
  ref_dir, ref_state, _ = reference_run
  before = ft.snapshot(str(corrupted))
  checkpointer = checkpointing.Checkpointer(str(corrupted), read_only=True)
  with caplog.at_level(logging.WARNING):
    params, step = checkpointer.restore_params(-1)
  assert step == KEPT[1] and f"Checkpoint step {REF_STEPS}" in caplog.text
  with pytest.raises(ConfigError, match=f"Checkpoint .*{REF_STEPS} is corrupt or unreadable"):
    checkpointer.restore_params(REF_STEPS)
  checkpointer.close()
  assert ft.snapshot(str(corrupted)) == before
  rr.assert_same_bits(params, rr.restore(ref_dir, ref_state, KEPT[1]).ema_params)


@pytest.mark.slow
def test_all_checkpoints_corrupt_is_an_error_and_moves_nothing(reference_run, tmp_path):
  workdir = tmp_path / "wd"
  shutil.copytree(reference_run[0], workdir)
  for step in ft.step_dirs(str(workdir / workdir_lib.CHECKPOINT_DIR))[0]:
    rr.corrupt(str(workdir / workdir_lib.CHECKPOINT_DIR / str(step)), "flip")
  before = ft.snapshot(str(workdir))
  with pytest.raises(ConfigError, match=r"No intact checkpoint.*Nothing was moved"):
    rr.restore(workdir, reference_run[1])
  assert ft.snapshot(str(workdir)) == before


def test_a_nonfinite_state_is_never_written(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=3)
  state = {"params": {"w": np.array([1.0, np.inf], np.float32)}, "step": np.int32(7)}
  with pytest.raises(NonFiniteError, match="step 7 holds non-finite values in params/w"):
    checkpointer.save(7, state)
  checkpointer.close()
  assert ft.step_dirs(str(tmp_path / workdir_lib.CHECKPOINT_DIR)) == ([], [])
