"""Test-wide setup: 8 host devices for pmap tests, a persistent compile cache, and the
tiny config every training, sampling and evaluation test starts from.

The device count and the cache must be configured before JAX initialises its backends,
hence at import time here.
"""

import os

from ddpm_jax import xla_flags

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
xla_flags.apply_cpu_defaults()  # As main.py does: tests compile what users run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/ddpm_jax_test_compile_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402

from configs import test_tiny  # noqa: E402

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
