"""XLA:CPU flag defaults: added once, never over a user's own setting, and known to this jaxlib."""

import os
import subprocess
import sys

from ddpm_jax import xla_flags

FLAG = xla_flags.CPU_DEFAULTS[0]


def test_defaults_are_appended_to_other_flags():
  assert xla_flags.with_cpu_defaults("") == FLAG
  assert xla_flags.with_cpu_defaults(" --xla_force_host_platform_device_count=8 ") == (
    "--xla_force_host_platform_device_count=8 " + FLAG
  )


def test_users_setting_of_the_same_flag_is_kept():
  own = f"--{xla_flags.YNN_FUSION_FLAG}=+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
  assert xla_flags.with_cpu_defaults(own) == own


def test_applying_twice_adds_the_flag_once():
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  xla_flags.apply_cpu_defaults(environ)
  xla_flags.apply_cpu_defaults(environ)
  assert environ["XLA_FLAGS"].split().count(FLAG) == 1


def test_this_jaxlib_accepts_the_flag_and_convolves():
  # XLA aborts the process on a flag it does not know, so a jaxlib that dropped or renamed
  # it fails here rather than in a user's first run.
  code = (
    "import jax, jax.numpy as jnp\n"
    "x = jnp.ones((2, 8, 8, 4)); w = jnp.ones((3, 3, 4, 4))\n"
    "f = lambda w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', "
    "dimension_numbers=('NHWC', 'HWIO', 'NHWC')).sum()\n"
    "print(float(jax.grad(f)(w)[1, 1, 0, 0]))\n"
  )
  env = {**os.environ, "XLA_FLAGS": FLAG, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert float(result.stdout.strip()) == 2 * 8 * 8  # Interior tap: every output pixel.
