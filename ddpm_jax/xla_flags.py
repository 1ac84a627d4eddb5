"""XLA:CPU flag defaults, set in ``XLA_FLAGS`` before JAX creates its CPU backend.

XLA:CPU (jaxlib 0.10) hands each convolution on its own to YNNPACK by default. For this
U-Net's 3x3 convolutions and their gradients, XLA's other CPU convolution path is faster:
with YNNPACK's individual convolutions off, a Fashion-MNIST train step (batch 64) took 0.76 s
instead of 1.07 s and a CIFAR-10 step (batch 8) 2.11 s instead of 2.72 s on a 2-core
AVX-512 host (docs/performance.md). The flag only changes how XLA:CPU lowers convolutions;
GPU and TPU backends ignore it. A user's own ``ynn_fusion_type`` setting is left alone.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
CPU_DEFAULTS = (f"--{YNN_FUSION_FLAG}=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",)


def with_cpu_defaults(xla_flags: str) -> str:
  """``xla_flags`` plus each of CPU_DEFAULTS whose flag the string does not already set."""
  present = {token.lstrip("-").split("=", 1)[0] for token in xla_flags.split()}
  extra = [flag for flag in CPU_DEFAULTS if flag.lstrip("-").split("=", 1)[0] not in present]
  return " ".join([xla_flags.strip(), *extra]).strip()


def apply_cpu_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
  """Adds CPU_DEFAULTS to ``environ["XLA_FLAGS"]``. Call before the first JAX computation:
  XLA reads the variable once, when JAX initialises its backends."""
  environ["XLA_FLAGS"] = with_cpu_defaults(environ.get("XLA_FLAGS", ""))
