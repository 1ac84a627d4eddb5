"""The run record and the workdir checks (ddpm_jax/workdir.py): config.json is written once,
frozen fields are refused once a checkpoint exists, and bad workdirs are refused."""

import json
import os

import pytest

from ddpm_jax import workdir as workdir_lib
from ddpm_jax.errors import ConfigError


def test_unwritable_or_file_workdir_is_refused(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ConfigError, match=r"workdir .* is not writable"):
    workdir_lib.prepare(str(blocker / "wd"))
  with pytest.raises(ConfigError, match="not a directory"):
    workdir_lib.prepare(str(blocker))
  assert blocker.read_text() == "not a directory"


def test_training_fields_may_change_on_resume(tmp_path, make_config):
  workdir = str(tmp_path)
  workdir_lib.check_or_write_config(make_config(), workdir)
  (tmp_path / "checkpoints" / "100").mkdir(parents=True)  # As if a step had been saved.
  changed = make_config(
    **{
      "training.learning_rate": 5e-4,
      "training.batch_size": 32,
      "model.dtype": "bfloat16",
      "training.log_every_steps": 7,
    }
  )
  workdir_lib.check_or_write_config(changed, workdir)  # No error.
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["training"]["learning_rate"] == 1e-3  # First start's config kept.


def test_config_of_a_start_that_saved_nothing_is_replaced(tmp_path, make_config):
  workdir = str(tmp_path)
  workdir_lib.check_or_write_config(make_config(), workdir)
  workdir_lib.check_or_write_config(make_config(**{"model.ch": 32}), workdir)  # No checkpoint.
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["ch"] == 32
  (tmp_path / "checkpoints" / "7").mkdir(parents=True)
  with pytest.raises(ConfigError, match=r"model.ch: 32 -> 16.*training.seed: 0 -> 5"):
    workdir_lib.check_or_write_config(make_config(**{"training.seed": 5}), workdir)


def test_output_dir_never_overwrites(tmp_path):
  out = workdir_lib.output_dir(str(tmp_path), "eval", "step_3", ("a.json",))
  assert out == os.path.join(str(tmp_path), "eval", "step_3")
  os.makedirs(out)
  (tmp_path / "eval" / "step_3" / "a.json").write_text("{}")
  with pytest.raises(ConfigError, match=r"already holds \['a.json'\]"):
    workdir_lib.output_dir(str(tmp_path), "eval", "step_3", ("a.json", "b.csv"))
