"""Smallest reproducer: XLA:CPU's YNNPACK path runs this U-Net's convolutions on one core.

  python scripts/repro_xla_cpu_conv_threads.py --ynn_convolutions=True    # jaxlib's default
  python scripts/repro_xla_cpu_conv_threads.py --ynn_convolutions=False   # ddpm_jax's default

Times one call of a 3x3 convolution and of its kernel gradient at the shapes of the
Fashion-MNIST quick start (64 x 28 x 28 x 64), a 4x larger convolution and a matmul, and
reads from /proc how much CPU time each thread of the process spent during the call (so
other load on the host does not distort it): an op spread over two cores shows ~50% / 50%,
a single-threaded one 100%. The flag is set before JAX starts its backend, in this process.
Prints one JSON line per op; nothing is asserted.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from absl import app, flags

flags.DEFINE_bool(
  "ynn_convolutions",
  True,
  "Leave XLA:CPU's YNNPACK individual "
  "convolutions on (jaxlib's default) or turn them off (ddpm_jax.xla_flags).",
)
flags.DEFINE_string("out", "", "Also append the JSON lines to this file.")
FLAGS = flags.FLAGS
DN = ("NHWC", "HWIO", "NHWC")
PAD = ((1, 1), (1, 1))


def thread_cpu_s() -> dict[str, float]:
  """utime + stime of every thread of this process, in seconds."""
  ticks, out = os.sysconf("SC_CLK_TCK"), {}
  for tid in os.listdir("/proc/self/task"):
    try:
      with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:  # The thread ended.
      continue
    out[tid] = (int(fields[11]) + int(fields[12])) / ticks
  return out


def profile(name: str, fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
  import jax

  jax.block_until_ready(fn(*args))  # Compile and warm up.
  before, start = thread_cpu_s(), time.perf_counter()
  jax.block_until_ready(fn(*args))
  wall = time.perf_counter() - start
  after = thread_cpu_s()
  used = sorted((after[t] - before.get(t, 0.0) for t in after), reverse=True)
  used = [u for u in used if u > 0.005]
  total = sum(used)
  return {
    "op": name,
    "wall_s": round(wall, 4),
    "cpu_s": round(total, 4),
    "busiest_threads_share": [round(u / total, 2) for u in used[:4]],
  }


def main(argv: list[str]) -> None:
  del argv
  if not FLAGS.ynn_convolutions:
    from ddpm_jax import xla_flags

    xla_flags.apply_cpu_defaults()
  # Not bench.common: importing it applies ddpm_jax's flag defaults.
  import jax
  from jax import lax

  key = jax.random.key(0)

  def normal(i, shape):
    return jax.random.normal(jax.random.fold_in(key, i), shape)

  conv = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), PAD, dimension_numbers=DN))

  @jax.jit
  def kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array:
    w = jax.numpy.zeros((3, 3, x.shape[-1], g.shape[-1]))
    return jax.vjp(lambda w_: conv(x, w_), w)[1](g)[0]

  small_x, small_w = normal(0, (64, 28, 28, 64)), normal(1, (3, 3, 64, 64))
  small_g = normal(2, (64, 28, 28, 64))
  big_x, big_w = normal(3, (64, 56, 56, 64)), normal(4, (3, 3, 64, 64))
  a = normal(5, (3072, 3072))
  ops = [
    ("conv3x3 64x28x28x64", conv, small_x, small_w),
    ("kernel_grad 64x28x28x64", kernel_grad, small_x, small_g),
    ("conv3x3 64x56x56x64", conv, big_x, big_w),
    ("matmul 3072^2", jax.jit(lambda m: m @ m), a),
  ]
  for name, fn, *args in ops:
    line = json.dumps(
      {
        "bench": "xla_cpu_conv_threads",
        "ynn_convolutions": FLAGS.ynn_convolutions,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **profile(name, fn, *args),
        "jax": jax.__version__,
        "host_cpus": len(os.sched_getaffinity(0)),
        "load_avg": round(os.getloadavg()[0], 2),
      }
    )
    print(line, flush=True)
    if FLAGS.out:
      with open(FLAGS.out, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
  app.run(main)
