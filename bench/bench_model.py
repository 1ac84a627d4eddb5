"""Benchmark of the DDPM U-Net: forward and train-step time, XLA FLOPs, memory.

Prints one JSON object per batch size (and writes them all to --out if given). Nothing is
asserted: the numbers are what this machine measured.

  python -m bench.bench_model --batch_sizes=8,32 --model=cifar10 --out=bench/results/cpu.json

Time: median wall time of `--repeats` calls after one warm-up call (compile excluded),
each call ended with block_until_ready. FLOPs: XLA's cost analysis of the compiled
program (2 FLOPs per multiply-add), divided by the batch size. Memory: XLA's compiled
memory analysis (arguments + outputs + temporaries of the step) and the process's peak
resident set size, which on CPU includes the compiler.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import optax

from bench import common
from configs import default as default_config
from ddpm_jax import utilization
from ddpm_jax.models import unet as unet_lib

MODELS = {
  # name: (image_size, ch_mult, attn_resolutions)
  "cifar10": (32, (1, 2, 2, 2), (16,)),
  "256": (256, (1, 1, 2, 2, 4, 4), (16,)),
}


def bench(model_name: str, batch_size: int, dtype: str, remat: bool, repeats: int) -> dict:
  image_size, ch_mult, attn = MODELS[model_name]
  cfg = default_config.get_config().model
  cfg.ch_mult, cfg.attn_resolutions, cfg.dtype, cfg.remat = ch_mult, attn, dtype, remat
  model = unet_lib.create_model(cfg, image_size=image_size, num_channels=3)
  key = jax.random.key(0)
  x = jax.random.normal(key, (batch_size, image_size, image_size, 3), jnp.float32)
  t = jax.random.randint(key, (batch_size,), 0, 1000, jnp.int32)
  params = jax.jit(lambda k: model.init(k, x[:1], t[:1], train=False))(key)["params"]
  tx = optax.adam(2e-4)
  opt_state = tx.init(params)

  def forward(params, x, t):
    return model.apply({"params": params}, x, t, train=False)

  def train_step(params, opt_state, x, t, key):
    def loss_fn(p):
      out = model.apply({"params": p}, x, t, train=True, rngs={"dropout": key})
      return jnp.mean((out - x) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  fwd_args = (params, x, t)
  step_args = (params, opt_state, x, t, key)
  fwd, step = (
    jax.jit(f).lower(*a).compile() for f, a in ((forward, fwd_args), (train_step, step_args))
  )
  fwd_stats, step_stats = utilization.compiled_cost(fwd), utilization.compiled_cost(step)
  jax.block_until_ready((fwd(*fwd_args), step(*step_args)))  # Warm-up: first transfers.
  fwd_s, _ = common.median_time(lambda: fwd(*fwd_args), repeats)
  step_s, _ = common.median_time(lambda: step(*step_args), repeats)
  record = {
    "model": model_name,
    "image_size": image_size,
    "batch_size": batch_size,
    "dtype": dtype,
    "remat": remat,
    "repeats": repeats,
    "num_params": unet_lib.count_params(model, image_size=image_size, num_channels=3),
    "forward_s": fwd_s,
    "forward_images_per_s": batch_size / fwd_s,
    "train_step_s": step_s,
    "train_images_per_s": batch_size / step_s,
    "forward_gflop_per_image": fwd_stats["flops"] / batch_size / 1e9,
    "train_step_gflop_per_image": step_stats["flops"] / batch_size / 1e9,
    "forward_xla_mib": fwd_stats.get("xla_mib"),
    "train_step_xla_mib": step_stats.get("xla_mib"),
  }
  record.update(common.memory_report())
  record.update(common.machine())
  return record


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="cifar10", choices=sorted(MODELS))
  parser.add_argument("--batch_sizes", default="8,32")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  try:
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  except ValueError:
    parser.error(f"--batch_sizes={args.batch_sizes!r} must be comma-separated integers.")
  if any(b <= 0 for b in batch_sizes) or args.repeats <= 0:
    parser.error(f"--batch_sizes={batch_sizes} and --repeats={args.repeats} must be positive.")
  results = []
  for b in batch_sizes:
    results.append(bench(args.model, b, args.dtype, args.remat, args.repeats))
    print(json.dumps(results[-1]), flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
