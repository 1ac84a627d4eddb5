"""Pods for real: 2 processes x 2 CPU devices on loopback (jax.distributed through main.py's
--coordinator_address / --num_processes / --process_id) against 1 process x 4 devices.

Both processes of a run are forked from tests/_fault_tools.py's server, each with its own
XLA_FLAGS device count. Checked: the same losses and final parameters, a corrupt newest
checkpoint (all hosts fall back together, moved once) and SIGTERM to one host of a resumed
run (every host saves the same step and exits 0), a held lock (every host exits 2 with the
same one line), the complete sample grid, and --mode=sample / --mode=eval of an imported
checkpoint (ddpm_jax.pretrained) giving the same numbers as one process: per-process
sample shards and an index, read back share by share. tests/test_pod_failures.py kills
hosts.
"""

import fcntl
import json
import os
import re
import shutil
import signal
import time

import chex
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import checkpointing, generation, pretrained, sample_files
from ddpm_jax import fid as fid_cli
from tests import _fault_tools as ft
from tests import _released_weights as rw
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow  # Real processes: pods of main.py, minutes.

STEPS = 16
IMPORTED = 790
FLAGS = (
  f"--config.training.num_train_steps={STEPS}",
  "--config.training.log_every_steps=1",
  "--config.training.checkpoint_every_steps=4",
  "--config.training.sample_every_steps=8",
  "--config.training.keep_checkpoints=10",
  "--config.eval.num_examples=32",
  "--config.eval.fid_num_samples=16",
  "--config.sampling.num_samples=16",
  "--config.sampling.method=ddim",
  "--config.sampling.ddim.num_steps=5",
)
# The trained runs' U-Net: one resolution, no attention. Each process compiles anew, and
# this halves it; the imported weights keep their own layout.
SMALL_MODEL = ("--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()")


def _args(workdir, *flags, model: tuple[str, ...] = SMALL_MODEL) -> list[str]:
  return [
    "--config",
    os.path.join("configs", "test_tiny.py"),
    f"--workdir={workdir}",
    *FLAGS,
    *model,
    *flags,
  ]


def _start_pod(server, workdir, *flags, name: str, model=SMALL_MODEL) -> list[int]:
  """Starts the 2 processes of one pod run; returns their PIDs (process 0 first)."""
  return ft.start_pod(server, _args(workdir, *flags, model=model), name=name)


def _run_pod(server, workdir, *flags, name: str, timeout: float = 240, model=SMALL_MODEL):
  pids = _start_pod(server, workdir, *flags, name=name, model=model)
  return [server.wait(pid, timeout) for pid in pids]


def _state(workdir, step=None):
  checkpointer = checkpointing.Checkpointer(str(workdir), read_only=True)
  try:
    return checkpointer.restore_params(-1 if step is None else step, which="params")
  finally:
    checkpointer.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  srv = ft.MainServer(str(tmp_path_factory.mktemp("pod_logs")))
  yield srv
  srv.close()


@pytest.fixture(scope="module")
def runs(server, tmp_path_factory):
  """(one-process workdir and its losses, pod workdir and its losses), both uninterrupted."""
  one = tmp_path_factory.mktemp("one") / "wd"
  single = server.run(_args(one), env=ft.devices_env(4), name="one_process", timeout=240)
  assert single.rc == 0, single.stderr[-3000:]
  pod = tmp_path_factory.mktemp("pod") / "wd"
  results = _run_pod(server, pod, name="pod")
  for result in results:
    assert result.rc == 0, result.stderr[-3000:]
  assert "2 local / 4 global devices" in results[1].stderr
  return (one, ft.step_losses(single.stderr)), (pod, ft.step_losses(results[0].stderr))


def test_two_processes_train_like_one(runs):
  (one, one_losses), (pod, pod_losses) = runs
  assert sorted(one_losses) == sorted(pod_losses) == list(range(1, STEPS + 1))
  np.testing.assert_allclose(
    [pod_losses[s] for s in sorted(pod_losses)],
    [one_losses[s] for s in sorted(one_losses)],
    rtol=1e-4,
    atol=2e-5,
  )
  (params_one, step_one), (params_pod, step_pod) = _state(one), _state(pod)
  assert step_one == step_pod == STEPS
  chex.assert_trees_all_close(params_pod, params_one, rtol=1e-4, atol=1e-5)


def test_the_pod_sample_grid_holds_every_hosts_samples(runs):
  (one, _), (pod, _) = runs
  grids = [
    np.asarray(Image.open(os.path.join(w, "samples", f"step_{STEPS:08d}.png"))) for w in (one, pod)
  ]
  assert grids[0].shape == grids[1].shape == (32, 32, 3)  # 8 samples: a 3x3 grid.
  np.testing.assert_allclose(grids[1], grids[0], atol=2)  # uint8, float reduction order.
  blank = np.full((8, 8, 3), 255, np.uint8)
  cells = [
    grids[1][2 + 10 * r : 10 + 10 * r, 2 + 10 * c : 10 + 10 * c] for r in range(3) for c in range(3)
  ]
  assert sum(not np.array_equal(cell, blank) for cell in cells) == 8


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """A workdir of released weights (ddpm_jax.pretrained, from a diffusers folder of random
  weights of a tiny official layout) at step IMPORTED, and its main.py flags."""
  root = tmp_path_factory.mktemp("imported")
  layout = rw.TINY
  rw.write_diffusers(
    str(root / "unet"), rw.random_weights(rw.official_variables(layout), 0), layout
  )
  config = tiny_config(**layout.overrides())
  pretrained.write_workdir(
    pretrained.load(str(root / "unet"), config), config, str(root / "wd"), IMPORTED
  )
  return root / "wd", [*layout.flags(), "--config.eval.num_examples=16"]


def test_sample_and_eval_of_imported_weights_on_a_pod_equal_one_process(server, imported, tmp_path):
  """--mode=sample on the pod writes a shard per process and the index; --mode=eval on the
  pod reads each process's share from those shards (process 0 wants indices 0-7, half of
  them in each shard), one process generates its FID samples afresh (its own set is
  tagged), and both score the same images alike. The index reads as one set, also in
  `python -m ddpm_jax.fid`."""
  workdir, layout_flags = imported
  for name in ("one", "pod"):
    shutil.copytree(workdir, tmp_path / name)
  single = [
    server.run(
      _args(tmp_path / "one", f"--mode={m}", *layout_flags, *extra, model=()),
      env=ft.devices_env(4),
      name=f"one_{m}",
      timeout=240,
    )
    for m, extra in (("sample", ["--config.sampling.tag=one"]), ("eval", []))
  ]
  pod = [
    _run_pod(server, tmp_path / "pod", f"--mode={m}", *layout_flags, name=f"pod_{m}", model=())
    for m in ("sample", "eval")
  ]
  for result in single + pod[0] + pod[1]:
    assert result.rc == 0, result.stderr[-3000:]
  sets = {
    n: tmp_path / n / "samples" / f"step_{IMPORTED}{t}" for n, t in (("one", "_one"), ("pod", ""))
  }
  assert sorted(os.listdir(sets["pod"])) == [
    "grid.png",
    "samples.json",
    "samples_0-of-2.npz",
    "samples_1-of-2.npz",
  ]
  assert "samples_0-of-1.npz" in os.listdir(sets["one"])
  for p in range(2):
    with np.load(sets["pod"] / f"samples_{p}-of-2.npz") as shard:
      np.testing.assert_array_equal(shard["indices"], generation.process_indices(16, 8, p, 2))
  samples = {n: sample_files.read(str(sets[n] / "samples.json"))[0] for n in sets}
  assert samples["one"].shape == (16, 8, 8, 3) and samples["one"].std() > 10  # Not blank.
  np.testing.assert_allclose(samples["pod"].astype(int), samples["one"].astype(int), atol=2)
  source = fid_cli.read_source(str(sets["pod"] / "samples.json"))
  np.testing.assert_array_equal(source.samples.read(), samples["pod"])
  for file in ("bpd.json", "fid.json"):
    one_json, pod_json = (
      json.loads((tmp_path / n / "eval" / f"step_{IMPORTED}" / file).read_text())
      for n in ("one", "pod")
    )
    for key in ("total_bpd", "prior_bpd", "decoder_bpd", "fid", "inception_score"):
      if key in one_json:
        assert pod_json[key] == pytest.approx(one_json[key], rel=1e-3), (file, key)
  assert one_json["samples"].startswith("generated")
  assert pod_json["samples"] == str(sets["pod"] / "samples.json")


def test_a_resumed_pod_skips_a_corrupt_checkpoint_and_stops_together_on_sigterm(
  server, runs, tmp_path
):
  """The newest checkpoint is corrupt: every host falls back to the previous one (moved
  aside once); then SIGTERM to process 1 only: through JAX's preemption service both hosts
  reach the same sync step, save it once and exit 0."""
  (_, _), (pod, _) = runs
  workdir = tmp_path / "wd"
  shutil.copytree(pod, workdir)
  ft.flip_bytes(ft.largest_file(str(workdir / "checkpoints" / str(STEPS) / "state")))
  pids = _start_pod(
    server,
    workdir,
    "--config.training.num_train_steps=100000",
    "--config.training.checkpoint_every_steps=50000",
    "--config.training.sample_every_steps=0",
    name="corrupt_preempt",
  )
  deadline = time.monotonic() + 240
  while max(ft.step_losses(server.stderr_so_far(pids[1])), default=0) < STEPS + 2:
    assert time.monotonic() < deadline, server.stderr_so_far(pids[1])[-3000:]
    time.sleep(0.05)
  os.kill(pids[1], signal.SIGTERM)
  results = [server.wait(pid, timeout=120) for pid in pids]
  assert all(r.rc == 0 for r in results), [r.stderr[-2000:] for r in results]
  for result in results:
    assert f"Resumed from the checkpoint at step {STEPS - 4}" in result.stderr
  assert os.path.isdir(workdir / "checkpoints_corrupt" / str(STEPS))
  assert not os.path.exists(workdir / "checkpoints_corrupt" / f"{STEPS}.1")  # Moved once.
  saved = [
    re.search(r"Saved the checkpoint of step (\d+) after SIGTERM", r.stderr) for r in results
  ]
  assert all(saved) and saved[0].group(1) == saved[1].group(1)
  assert max(ft.step_dirs(str(workdir / "checkpoints"))[0]) == int(saved[0].group(1))


def test_a_held_lock_stops_every_host_with_the_same_line(server, runs, tmp_path):
  (_, _), (pod, _) = runs
  workdir = tmp_path / "wd"
  shutil.copytree(pod, workdir)
  before = ft.snapshot(str(workdir / "checkpoints"))
  with open(workdir / "train.lock", "a+") as lock:
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.seek(0), lock.truncate(), lock.write("4242\n"), lock.flush()
    results = _run_pod(
      server, workdir, f"--config.training.num_train_steps={STEPS + 4}", name="locked", timeout=120
    )
  lines = [r.stderr.splitlines() for r in results]
  assert [r.rc for r in results] == [2, 2], [r.stderr[-2000:] for r in results]
  assert lines[0] == lines[1] and len(lines[0]) == 1, lines
  assert "is in use by another training process (PID 4242" in lines[0][0]
  assert ft.snapshot(str(workdir / "checkpoints")) == before
