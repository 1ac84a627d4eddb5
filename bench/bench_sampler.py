"""Sampler benchmark: images/s of the samplers (ancestral, DDIM, DPM-Solver++, ...), and the
scan overhead, i.e. the time per network evaluation over the time of one forward pass of
the same batch.

  python -m bench.bench_sampler --config=configs/cifar10.py --config.sampling.batch_size=256 \
      --methods=ancestral,ddim [--config.diffusion.num_timesteps=50] [--out=...]

Uses the pmapped sampler of training and --mode=sample (generation.make_pmapped_sampler)
with freshly initialised parameters (speed does not depend on their values).
``config.sampling.batch_size`` is the global batch; each method runs with its config group
(e.g. ``--config.sampling.ddim.num_steps``) and reports its network evaluations per sample
(``sampler_steps``). Prints one JSON object per method: median of ``--repeats`` full
sampler calls after one warm-up call. Nothing is asserted.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from bench import common
from ddpm_jax import config_checks, factories, generation, parallel, samplers, train_state

config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.DEFINE_list("methods", ["ancestral", "ddim"], "Samplers to time.")
flags.DEFINE_integer("repeats", 3, "Timed sampler calls; the median is reported.")
flags.DEFINE_integer("forward_repeats", 10, "Timed forward passes; the median is reported.")
flags.DEFINE_string("out", "", "Append the JSON lines to this file.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  bad = sorted(set(FLAGS.methods) - set(samplers.METHODS))
  if bad or FLAGS.repeats < 1 or FLAGS.forward_repeats < 1:
    raise app.UsageError(
      f"--methods={FLAGS.methods} (allowed {list(samplers.METHODS)}), "
      f"--repeats={FLAGS.repeats}, --forward_repeats={FLAGS.forward_repeats}."
    )
  config = FLAGS.config
  config_checks.check_config(config, "sample")
  model = factories.create_model(config)
  schedule = factories.create_schedule(config.diffusion)
  state = train_state.create_train_state(
    config, model, train_state.create_optimizer(config.training)
  )
  p_params = parallel.replicate(state.ema_params)
  devices = jax.local_device_count()
  global_batch = int(config.sampling.batch_size)
  per_device = global_batch // devices
  size, channels = int(config.data.image_size), int(config.data.num_channels)

  # One forward pass of the same per-device batch, pmapped like the sampler.
  x = jnp.asarray(
    np.random.default_rng(0).normal(size=(devices, per_device, size, size, channels)), jnp.float32
  )
  t = jnp.full((devices, per_device), schedule.num_timesteps // 2, jnp.int32)
  p_forward = jax.pmap(lambda p, x, t: model.apply({"params": p}, x, t, train=False))
  jax.block_until_ready(p_forward(p_params, x, t))
  forward_s, _ = common.median_time(lambda: p_forward(p_params, x, t), FLAGS.forward_repeats)

  for method in FLAGS.methods:
    config.unlock()
    config.sampling.method = method
    config.lock()
    steps = samplers.from_config(config.sampling).nfe(int(config.diffusion.num_timesteps))
    p_sample = generation.make_pmapped_sampler(config, model, schedule, per_device)
    rng = jax.random.key(0)
    start = time.perf_counter()
    jax.block_until_ready(p_sample(p_params, rng))
    first_call_s = time.perf_counter() - start
    sample_s, _ = common.median_time(functools.partial(p_sample, p_params, rng), FLAGS.repeats)
    per_step_s = sample_s / steps
    record = {
      "bench": "sampler",
      "method": method,
      "config": config_flags.get_config_filename(FLAGS["config"]),
      "global_batch": global_batch,
      "dtype": str(config.model.dtype),
      "sampler_steps": steps,
      "sample_s": sample_s,
      "images_per_s": global_batch / sample_s,
      "first_call_s": first_call_s,
      "per_step_s": per_step_s,
      "forward_s": forward_s,
      "scan_overhead": per_step_s / forward_s - 1.0,
      "timed_calls": FLAGS.repeats,
    }
    record.update(common.memory_report())
    record.update(common.machine())
    common.emit(record, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
