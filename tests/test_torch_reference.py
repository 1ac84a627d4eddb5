"""The PyTorch reference of bench/ computes ddpm_jax's function: with one set of trained
parameters (carried over by reference_torch/jax_to_torch.py) its network gives the same
outputs, L_simple and gradient, and its DDIM the same samples from the same x_T, as ddpm_jax's.

Needs torch and diffusers (`pip install -e '.[bench]'`); skips, saying so, without them. Both
programs run as child processes, as a user runs them.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # Trains and samples in child processes of both programs.

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_REASON = "the PyTorch reference needs torch and diffusers: pip install -e '.[bench]'"
# test_tiny has attention at 4x4, so the attention mapping is covered too.
_OVERRIDES = [
  "--config=configs/test_tiny.py",
  "--config.training.num_train_steps=30",
  "--config.training.checkpoint_every_steps=30",
  "--config.training.sample_every_steps=0",
  "--config.sampling.method=ddim",
  "--config.sampling.ddim.num_steps=20",
  "--config.sampling.ddim.eta=0.0",
  "--config.sampling.ddim.clip_denoised=False",
]


def _run(args: list[str]) -> str:
  env = dict(os.environ, XLA_FLAGS="")  # One CPU device, as a plain `python main.py`.
  proc = subprocess.run(
    [sys.executable] + args,
    cwd=_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory) -> dict:
  pytest.importorskip("torch", reason=_REASON)
  pytest.importorskip("diffusers", reason=_REASON)
  workdir = tmp_path_factory.mktemp("jax_run") / "run"
  _run(["main.py", f"--workdir={workdir}", "--mode=train"] + _OVERRIDES)
  out = _run(
    [
      "-m",
      "reference_torch.torch_reference",
      "--mode=equivalence",
      f"--jax_workdir={workdir}",
      "--ddim_batch=8",
      "--threads=1",
    ]
    + _OVERRIDES
  )
  return json.loads(out.strip().splitlines()[-1])


def test_outputs_loss_and_gradient_match(equivalence):
  assert equivalence["params"].endswith("at step 30")
  assert equivalence["output_max_abs"] > 0.1  # Trained weights, not the ~zero output head.
  assert equivalence["output_max_abs_diff"] < 1e-4 * equivalence["output_max_abs"]
  assert equivalence["loss_torch"] == pytest.approx(equivalence["loss_jax"], rel=1e-5)
  assert equivalence["grad_max_abs"] > 0
  assert equivalence["grad_max_rel_diff"] < 1e-3


def test_ddim_samples_match_from_one_x_T(equivalence):
  assert equivalence["ddim_samples"] == 8
  assert equivalence["ddim_max_abs_diff"] < 1e-3
  assert equivalence["ddim_uint8_pixels_differing"] < 0.01
