"""Test-wide setup: 8 host devices for pmap tests, a persistent compile cache, the tiny
config every training, sampling and evaluation test starts from, the data configs and idx
files of the data tests, and the fork server and reference run the fault tests share.

The device count and the cache must be configured before JAX initialises its backends,
hence at import time here.
"""

import gzip
import os

import numpy as np

from ddpm_jax import xla_flags

# The tests compile without LLVM's optimisation passes: compilation dominates these tiny
# programs (the tiny config's train step compiles in ~18 s instead of ~28 s on a 2-core
# CPU, and runs ~30% slower), and every comparison runs both sides under the same flags.
# The programs themselves (XLA's HLO passes included) are the ones users run.
TEST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_COMPILE_FLAGS}")
xla_flags.apply_cpu_defaults()  # As main.py does: the CPU defaults users get.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/ddpm_jax_test_compile_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402  (after the environment above)

from configs import default as default_config  # noqa: E402  (after the environment above)
from configs import test_tiny  # noqa: E402  (after the environment above)

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
  "jax_persistent_cache_min_compile_time_secs",
  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)


def tiny_config(**overrides):
  """configs/test_tiny.py with ``overrides`` {"group.field": value} applied."""
  config = test_tiny.get_config()
  for dotted, value in overrides.items():
    *groups, field = dotted.split(".")
    node = config
    for group in groups:
      node = node[group]
    node[field] = value
  return config


@pytest.fixture(scope="session")
def make_config():
  """The factory `tiny_config(**{"group.field": value})` (session-scoped, so module-scoped
  fixtures can use it too)."""
  return tiny_config


def data_config(dataset: str = "fashion_mnist_files", **overrides):
  """configs/default.py's data group for ``dataset`` at its image shape (28x28x1 for
  Fashion-MNIST, 8x8x3 for synthetic, 32x32x3 otherwise), then ``overrides`` (field: value)."""
  config = default_config.get_config().data
  shape = {"fashion_mnist_files": (28, 1), "fashion_mnist": (28, 1), "synthetic": (8, 3)}
  config.image_size, config.num_channels = shape.get(dataset, (32, 3))
  config.dataset = dataset
  config.update(overrides)
  return config


def write_idx(path, header: list[int], payload: np.ndarray, truncate: int = 0) -> None:
  """A gzipped idx file: ``header`` (the magic number, then the dimensions) as big-endian
  uint32, then ``payload`` as uint8, less its last ``truncate`` bytes."""
  data = np.array(header, dtype=">u4").tobytes() + payload.astype(np.uint8).tobytes()
  with gzip.open(path, "wb") as f:
    f.write(data[: len(data) - truncate])


@pytest.fixture(scope="session")
def main_server(tmp_path_factory):
  """A fork server of main.py's command line (tests/_fault_tools.py), shared by the files
  that run main.py in processes of its own."""
  from tests import _fault_tools  # Here: only the files that use it.

  server = _fault_tools.MainServer(str(tmp_path_factory.mktemp("main_logs")))
  yield server
  server.close()


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
  """tests/_reference_run.py's uninterrupted run, (workdir, final TrainState, {step: loss})
  on 8 devices: trained once per session for every file that compares with it."""
  from tests import _reference_run  # Here: it imports orbax and train.py.

  return _reference_run.train_reference(tmp_path_factory.mktemp("reference"))
