"""Train-step benchmark of the real pmapped step (ddpm_jax.train), for any config.

  python -m bench.bench_train --config=configs/cifar10.py --config.training.batch_size=8 \
      --steps=20 [--peak_tflops=0.157] [--out=bench/results/train.jsonl]

Any config field is a flag (``--config.model.dtype=bfloat16``, ``--config.model.remat=True``,
``--config.training.steps_per_call=4``, ...). Prints one JSON object: steps/s and images/s
(median of ``--steps`` timed calls after ``--warmup`` calls, each ended with
block_until_ready), compile time, XLA-counted FLOPs per step (all devices), achieved TFLOP/s
and MFU against ``--peak_tflops`` per device (or the known peak of the device), peak host RSS
and device memory. The batch is synthetic uint8 data already on the devices: this times the
step, not the input pipeline (see bench_input.py). Nothing is asserted.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from bench import common
from ddpm_jax import config_checks, factories, parallel, train_state, train_step, utilization

config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.DEFINE_integer("steps", 20, "Timed calls (after warm-up); the median is reported.")
flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation.")
flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device for MFU (0: known table).")
flags.DEFINE_string("out", "", "Append the JSON line to this file.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.steps < 1 or FLAGS.warmup < 0:
    raise app.UsageError(f"--steps={FLAGS.steps} must be >= 1 and --warmup={FLAGS.warmup} >= 0.")
  config = FLAGS.config
  config_checks.check_config(config, "train")
  model = factories.create_model(config)
  schedule = factories.create_schedule(config.diffusion)
  tx = train_state.create_optimizer(config.training)
  p_state = parallel.replicate(train_state.create_train_state(config, model, tx))
  p_step = train_step.make_p_train_step(config, model, schedule, tx)
  steps_per_call = int(config.training.steps_per_call)

  global_batch = int(config.training.batch_size)
  devices = jax.local_device_count()
  size, channels = int(config.data.image_size), int(config.data.num_channels)
  shape = (devices, global_batch // devices, size, size, channels)
  if steps_per_call > 1:  # [devices, k, per_device, ...]: k batches per call.
    shape = shape[:1] + (steps_per_call,) + shape[1:]
  images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  batch = next(parallel.prefetch_to_device(iter([images]), size=1))

  start = time.perf_counter()
  compiled = p_step.lower(p_state, batch).compile()
  compile_s = time.perf_counter() - start
  cost = utilization.compiled_cost(compiled)
  if steps_per_call > 1:  # XLA counts a while loop's body once: count one plain step instead.
    one_step = train_step.make_p_train_step(config, model, schedule, tx, num_steps=1)
    flops = utilization.compiled_cost(one_step.lower(p_state, batch[:, 0]).compile())["flops"]
    cost["flops"] = flops * steps_per_call

  def call():
    nonlocal p_state
    p_state, metrics = compiled(p_state, batch)
    return metrics

  for _ in range(FLAGS.warmup):
    jax.block_until_ready(call())
  call_s, times = common.median_time(call, FLAGS.steps)
  step_s = call_s / steps_per_call
  flops_per_step = cost["flops"] * devices / steps_per_call  # pmap's cost is per device.
  tflops = flops_per_step / step_s / 1e12
  dtype = str(config.model.dtype)
  peak = utilization.peak_tflops(jax.local_devices()[0], dtype, FLAGS.peak_tflops)
  record = {
    "bench": "train_step",
    "config": config_flags.get_config_filename(FLAGS["config"]),
    "global_batch": global_batch,
    "dtype": dtype,
    "remat": bool(config.model.remat),
    "attn_impl": str(config.model.attn_impl),
    "conv_wgrad": str(config.model.conv_wgrad),
    "steps_per_call": steps_per_call,
    "clip_mode": str(config.training.clip_mode),
    "clip_replicas": int(config.training.clip_replicas),
    "replica_loop": str(config.training.replica_loop),
    "num_params": train_state.num_params(parallel.unreplicate(p_state.params)),
    "step_s": step_s,
    "steps_per_s": 1.0 / step_s,
    "images_per_s": global_batch / step_s,
    "step_s_min": min(times) / steps_per_call,
    "step_s_max": max(times) / steps_per_call,
    "timed_calls": FLAGS.steps,
    "compile_s": compile_s,
    "gflop_per_step": flops_per_step / 1e9,
    "gflop_per_image": flops_per_step / global_batch / 1e9,
    "achieved_tflops": tflops,
    "peak_tflops_per_device": peak,
    "mfu": tflops / (peak * devices) if peak else None,
    "xla_mib_per_device": cost.get("xla_mib"),
  }
  record.update(common.memory_report())
  record.update(common.machine())
  common.emit(record, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
