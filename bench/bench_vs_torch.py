"""Train-step time of ddpm_jax against PyTorch (diffusers UNet2DModel + Adam), one layout, one
host.

  python -m bench.bench_vs_torch --model=cifar10 --batch=8 --rounds=2 --steps=3 --warmup=1
  python -m bench.bench_vs_torch --model=fashion_mnist --batch=64 --rounds=2 --steps=3

Each round runs the ddpm_jax step (bench/bench_train.py, run as ``python -m bench.bench_train``: the
real pmapped train step on a synthetic batch) and then the PyTorch step
(reference_torch/torch_reference.py --mode=bench: forward at random t, MSE on eps, backward, global-
norm clip, Adam, EMA; float32), each in its own child process so they never share threads,
alternating A B A B. Both read the same config flags (bench/common.layout_flags, random flips off),
so both build the same network. Prints one JSON line per measurement (the child's median step time
over --steps steps after --warmup) and a final line with the ratio jax/torch (median over rounds of
the per-round ratios), the parameter counts of both sides, torch's thread count and OMP_WAIT_POLICY,
the versions, and the host load average before and after. CPU timings on a shared host are noisy,
and PyTorch's are very sensitive to oversubscription: with more runnable threads than cores its
OpenMP threads spin at barriers (try --torch_omp_wait_policy=PASSIVE or --torch_threads=1 and report
which). Nothing is asserted.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

from absl import app, flags

from bench import common

flags.DEFINE_enum("model", "fashion_mnist", common.MODELS, "Layout (see bench/common.py).")
flags.DEFINE_integer("batch", 64, "Global batch of both sides.")
flags.DEFINE_integer("rounds", 2, "Rounds of (ddpm_jax, torch).")
flags.DEFINE_integer("steps", 3, "Timed steps per measurement (the child reports the median).")
flags.DEFINE_integer("warmup", 1, "Untimed steps per measurement (after compilation).")
flags.DEFINE_integer("num_groups", 8, "GroupNorm groups of the fashion_mnist layout (both sides).")
flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads of the PyTorch side.")
flags.DEFINE_enum(
  "adam_impl",
  "default",
  ("default", "foreach", "fused"),
  "torch.optim.Adam implementation of the PyTorch side.",
)
flags.DEFINE_enum(
  "torch_omp_wait_policy",
  "",
  ("", "PASSIVE", "ACTIVE"),
  'OMP_WAIT_POLICY of the PyTorch side ("": inherited). On an oversubscribed '
  "host, PASSIVE keeps torch's OpenMP threads from spinning at barriers.",
)
flags.DEFINE_string(
  "jax_compile_cache",
  "~/.cache/ddpm_jax/xla",
  'JAX persistent compilation cache for the ddpm_jax side ("": none): '
  "rounds after the first skip compiling. Does not change the step.",
)
flags.DEFINE_float("timeout_s", 3600.0, "Limit per child process.")
flags.DEFINE_string("out", "", "Also append the JSON lines to this file.")
FLAGS = flags.FLAGS


def config_flags() -> list[str]:
  return common.layout_flags(FLAGS.model, FLAGS.num_groups) + [
    f"--config.training.batch_size={FLAGS.batch}",
    "--config.data.random_flip=False",
  ]


def measure_jax() -> tuple[dict[str, Any], float]:
  env = {}
  if FLAGS.jax_compile_cache:
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.expanduser(FLAGS.jax_compile_cache)
  argv = (
    ["-m", "bench.bench_train"]
    + config_flags()
    + [f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}"]
  )
  return common.run_json_child(argv, env=env, timeout_s=FLAGS.timeout_s)


def measure_torch() -> tuple[dict[str, Any], float]:
  argv = (
    [*common.TORCH_REFERENCE, "--mode=bench"]
    + config_flags()
    + [
      f"--steps={FLAGS.steps}",
      f"--warmup={FLAGS.warmup}",
      f"--threads={FLAGS.torch_threads}",
      f"--adam_impl={FLAGS.adam_impl}",
    ]
  )
  env = {"OMP_WAIT_POLICY": FLAGS.torch_omp_wait_policy} if FLAGS.torch_omp_wait_policy else {}
  return common.run_json_child(argv, env=env, timeout_s=FLAGS.timeout_s)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.rounds < 1 or FLAGS.steps < 1 or FLAGS.warmup < 0 or FLAGS.batch < 1:
    raise app.UsageError("--rounds, --steps and --batch must be >= 1 and --warmup >= 0.")
  load_start = common.load_avg()
  sides = {"jax": measure_jax, "torch": measure_torch}
  records: dict[str, list[dict[str, Any]]] = {"jax": [], "torch": []}
  for round_index in range(FLAGS.rounds):
    for side, measure in sides.items():
      record, wall = measure()
      records[side].append(record)
      common.emit(
        {
          "bench": "vs_torch_measurement",
          "model": FLAGS.model,
          "side": side,
          "round": round_index,
          "global_batch": FLAGS.batch,
          "step_s": record["step_s"],
          "process_wall_s": wall,
          "child": record,
        },
        FLAGS.out,
      )
  jax_s = [r["step_s"] for r in records["jax"]]
  torch_s = [r["step_s"] for r in records["torch"]]
  ratios = [j / t for j, t in zip(jax_s, torch_s, strict=True)]
  last_jax, last_torch = records["jax"][-1], records["torch"][-1]
  common.emit(
    {
      "bench": "train_step_vs_torch",
      "model": FLAGS.model,
      "global_batch": FLAGS.batch,
      "config_flags": config_flags(),
      "rounds": FLAGS.rounds,
      "timed_steps": FLAGS.steps,
      "warmup_steps": FLAGS.warmup,
      "jax_step_s": jax_s,
      "torch_step_s": torch_s,
      "ratio_jax_over_torch_per_round": ratios,
      "ratio_jax_over_torch": statistics.median(ratios),
      "jax_step_s_median": statistics.median(jax_s),
      "torch_step_s_median": statistics.median(torch_s),
      "jax_num_params": last_jax["num_params"],
      "torch_num_params": last_torch["num_params"],
      "torch_threads": last_torch["torch_threads"],
      "torch_interop_threads": last_torch["torch_interop_threads"],
      "torch_adam_impl": FLAGS.adam_impl,
      "torch_omp_wait_policy": last_torch["omp_wait_policy"],
      "torch": last_torch["torch"],
      "diffusers": last_torch["diffusers"],
      "jax": last_jax["jax"],
      "jax_backend": last_jax["backend"],
      "host_cpus": last_jax["host_cpus"],
      "load_avg_start": load_start,
      "load_avg_end": common.load_avg(),
    },
    FLAGS.out,
  )


if __name__ == "__main__":
  app.run(main)
