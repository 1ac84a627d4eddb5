"""Input-pipeline benchmark: images/s delivered to the devices, without any model.

  python -m bench.bench_input --datasets=cifar10_mock,fashion_mnist_files --batch_size=128

Runs what training runs (ddpm_jax.input_pipeline.create_train_iterator: epoch permutation
and gather; the random flips happen later, on the device, inside the train step) followed
by parallel.prefetch_to_device, and blocks on every device batch. Datasets:
  cifar10_mock         the real tfds code path (tfds.load -> NumPy in memory) of
                       configs/cifar10.py, fed by tfds.testing.mock_data (random 32x32x3
                       images; --mock_examples of them), since tfds cannot download here;
  fashion_mnist_files  the Debian files of configs/fashion_mnist.py (28x28x1);
  synthetic            the generated images of configs/test_tiny.py, at 32x32x3.
Prints one JSON object per dataset (median over --repeats runs of --batches batches after
--warmup batches). Nothing is asserted.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from typing import Any

import jax
from absl import app, flags

from bench import common
from configs import cifar10, fashion_mnist, test_tiny
from ddpm_jax import input_pipeline, parallel

DATASETS = ("cifar10_mock", "fashion_mnist_files", "synthetic")
flags.DEFINE_list("datasets", list(DATASETS[:2]), f"Any of {DATASETS}.")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_integer("batches", 200, "Timed batches per repeat.")
flags.DEFINE_integer("warmup", 5, "Untimed batches first (loading, first permutation).")
flags.DEFINE_integer("repeats", 3, "Timed repeats; the median is reported.")
flags.DEFINE_integer("mock_examples", 10_000, "Examples tfds.testing.mock_data generates.")
flags.DEFINE_string("out", "", "Append the JSON lines to this file.")
FLAGS = flags.FLAGS


def _data_config(name: str):
  if name == "cifar10_mock":
    return cifar10.get_config().data
  if name == "fashion_mnist_files":
    return fashion_mnist.get_config().data
  data = test_tiny.get_config().data
  data.image_size = 32
  return data


def _source_context(name: str):
  if name != "cifar10_mock":
    return contextlib.nullcontext()
  import tensorflow_datasets as tfds

  return tfds.testing.mock_data(num_examples=FLAGS.mock_examples)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  bad = sorted(set(FLAGS.datasets) - set(DATASETS))
  if bad or min(FLAGS.batch_size, FLAGS.batches, FLAGS.repeats) < 1 or FLAGS.warmup < 0:
    raise app.UsageError(
      f"--datasets has unknown {bad} (allowed {DATASETS}); --batch_size, "
      "--batches and --repeats must be >= 1, --warmup >= 0."
    )
  for name in FLAGS.datasets:
    data = _data_config(name)
    with _source_context(name):
      start = time.perf_counter()
      batches = parallel.prefetch_to_device(
        input_pipeline.create_train_iterator(data, global_batch_size=FLAGS.batch_size, seed=0)
      )
      for _ in range(FLAGS.warmup):
        jax.block_until_ready(next(batches))
      setup_s = time.perf_counter() - start

      def run(batches: Iterator) -> Any:
        for _ in range(FLAGS.batches):
          last = jax.block_until_ready(next(batches))
        return last

      run_s, _ = common.median_time(functools.partial(run, batches), FLAGS.repeats)
    record = {
      "bench": "input_pipeline",
      "dataset": name,
      "global_batch": FLAGS.batch_size,
      "image_shape": [data.image_size, data.image_size, data.num_channels],
      "setup_s": setup_s,
      "images_per_s": FLAGS.batches * FLAGS.batch_size / run_s,
      "batches_per_s": FLAGS.batches / run_s,
      "timed_batches": FLAGS.batches,
    }
    record.update(common.memory_report())
    record.update(common.machine())
    common.emit(record, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
