"""Sampling speed of ddpm_jax's DPM-Solver++ against diffusers' DPMSolverMultistepScheduler
in a diffusers pipeline: the same network (the same weights), the same CPU, the same NFE.

  python -m bench.bench_solver_vs_diffusers --config=configs/fashion_mnist.py \
      [--workdir=W] --batch=64 --steps=20 --order=2 [--rounds=2 --repeats=3] [--out=FILE]

Needs the bench extra (torch, diffusers). Each round runs the ddpm_jax side (the pmapped
sampler of --mode=sample with sampling.method=dpm_solver) and the PyTorch side
(DDPMPipeline with DPMSolverMultistepScheduler, algorithm_type dpmsolver++, the config's
linear betas, float32), each in a child process of its own so they never share threads.
Each child times ``--repeats`` full calls after one untimed call (compilation) and reports
the median; the weights are the workdir's EMA parameters, or the initialisation of
training.seed without --workdir (speed does not depend on their values). The driver prints
the children's lines and the ratio of images/s. Nothing is asserted.

The two solvers differ in their time discretisation (the authors' continuous-time
interpolation here, diffusers' discrete timesteps there), not in cost: both evaluate the
network ``--steps`` times per sample.
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from bench import common

config_flags.DEFINE_config_file(
  "config", None, "Config file (its model and diffusion).", lock_config=False
)
flags.DEFINE_string("workdir", "", "A trained workdir whose EMA weights both sides load.")
flags.DEFINE_integer("batch", 64, "Images per sampler call, both sides.")
flags.DEFINE_integer("steps", 20, "Solver steps (network evaluations per sample).")
flags.DEFINE_integer("order", 2, "Solver order, both sides.")
flags.DEFINE_integer("repeats", 3, "Timed calls per child (the median is reported).")
flags.DEFINE_integer("rounds", 2, "Rounds of (ddpm_jax, diffusers).")
flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads of the PyTorch side.")
flags.DEFINE_enum("side", "driver", ("driver", "jax", "torch"), "Internal: a child's side.")
flags.DEFINE_string("out", "", "Also append the JSON lines to this file.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def _params(config: Any) -> Any:
  from ddpm_jax import checkpointing, factories, train_state

  if FLAGS.workdir:
    return checkpointing.restore_ema_params(config, FLAGS.workdir, -1)[0]
  model = factories.create_model(config)
  return train_state.create_train_state(
    config, model, train_state.create_optimizer(config.training)
  ).ema_params


def _solver_config(config: Any) -> Any:
  config.sampling.method = "dpm_solver"
  config.sampling.dpm_solver.num_steps = FLAGS.steps
  config.sampling.dpm_solver.order = FLAGS.order
  config.sampling.batch_size = FLAGS.batch
  return config


def run_jax() -> dict[str, Any]:
  import jax

  from ddpm_jax import config_checks, factories, generation, parallel

  config = _solver_config(FLAGS.config)
  config_checks.check_config(config, "sample")
  model, schedule = factories.create_model(config), factories.create_schedule(config.diffusion)
  sampler = generation.make_pmapped_sampler(
    config, model, schedule, FLAGS.batch // jax.device_count()
  )
  params = parallel.replicate(_params(config))
  rng = jax.random.key(0)
  jax.block_until_ready(sampler(params, rng))
  seconds, _ = common.median_time(lambda: sampler(params, rng), FLAGS.repeats)
  return {
    "side": "jax",
    "call_s": seconds,
    "images_per_s": FLAGS.batch / seconds,
    "jax": jax.__version__,
    "devices": jax.device_count(),
  }


def run_torch() -> dict[str, Any]:
  import time

  import diffusers
  import torch

  from ddpm_jax import pretrained, pretrained_names

  torch.set_num_threads(FLAGS.torch_threads)
  config = _solver_config(FLAGS.config)
  unet = diffusers.UNet2DModel(**pretrained_names.diffusers_config(config))
  state = {
    k: torch.from_numpy(v) for k, v in pretrained.diffusers_tensors(_params(config), config).items()
  }
  unet.load_state_dict(state, strict=True)
  unet.eval()
  diff = config.diffusion
  scheduler = diffusers.DPMSolverMultistepScheduler(
    num_train_timesteps=int(diff.num_timesteps),
    beta_start=float(diff.beta_start),
    beta_end=float(diff.beta_end),
    beta_schedule="linear",
    algorithm_type="dpmsolver++",
    solver_order=FLAGS.order,
    lower_order_final=True,
  )
  pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
  pipe.set_progress_bar_config(disable=True)

  def call() -> None:
    with torch.no_grad():
      pipe(
        batch_size=FLAGS.batch,
        num_inference_steps=FLAGS.steps,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
      )

  call()
  times = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  return {
    "side": "torch",
    "call_s": seconds,
    "images_per_s": FLAGS.batch / seconds,
    "torch": torch.__version__,
    "diffusers": diffusers.__version__,
    "torch_threads": torch.get_num_threads(),
  }


def child_argv(side: str) -> list[str]:
  passed = [a for a in sys.argv[1:] if not a.startswith(("--side", "--out", "--rounds"))]
  return ["-m", "bench.bench_solver_vs_diffusers", f"--side={side}"] + passed


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if min(FLAGS.batch, FLAGS.steps, FLAGS.repeats, FLAGS.rounds) < 1:
    raise app.UsageError("--batch, --steps, --repeats and --rounds must be >= 1.")
  if FLAGS.side != "driver":
    record = run_jax() if FLAGS.side == "jax" else run_torch()
    record.update(batch=FLAGS.batch, steps=FLAGS.steps, order=FLAGS.order)
    common.emit(record)
    return
  load_start = common.load_avg()
  rates: dict[str, list[float]] = {"jax": [], "torch": []}
  for round_index in range(FLAGS.rounds):
    for side in ("jax", "torch"):
      record, wall = common.run_json_child(child_argv(side))
      rates[side].append(record["images_per_s"])
      common.emit(
        {
          "bench": "solver_vs_diffusers_measurement",
          "round": round_index,
          "process_wall_s": wall,
          **record,
        },
        FLAGS.out,
      )
  jax_rate, torch_rate = (statistics.median(rates[s]) for s in ("jax", "torch"))
  record = {
    "bench": "solver_vs_diffusers",
    "config": config_flags.get_config_filename(FLAGS["config"]),
    "workdir": FLAGS.workdir,
    "batch": FLAGS.batch,
    "steps": FLAGS.steps,
    "order": FLAGS.order,
    "jax_images_per_s": jax_rate,
    "torch_images_per_s": torch_rate,
    "ratio_jax_over_torch": jax_rate / torch_rate,
    "load_avg_start": load_start,
    "load_avg_end": common.load_avg(),
  }
  record.update(common.machine())
  common.emit(record, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
