"""Shared pieces of the bench/ scripts: timing, machine description, JSON output, and for
the ddpm_jax-vs-PyTorch scripts the model layouts as config flags (each side reads the same
flags, so both build the same network) and running one side in a child process.

Benchmarks measure and print; they never assert on time.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

from ddpm_jax import xla_flags

# Every benchmark is an entry point: it measures what main.py runs (XLA reads the flags at
# the first computation, after this import).
xla_flags.apply_cpu_defaults()


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
  """Median wall time of ``repeats`` calls of ``fn`` (each ended with block_until_ready)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def memory_report() -> dict[str, Any]:
  """Peak host RSS (includes the compiler on CPU) and device memory_stats where available."""
  out: dict[str, Any] = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
  stats = jax.local_devices()[0].memory_stats()
  if stats:
    for key in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit"):
      if key in stats:
        out[f"device_{key.replace('bytes', 'mib')}"] = stats[key] / 2**20
  return out


def machine() -> dict[str, Any]:
  device = jax.local_devices()[0]
  return {
    "backend": jax.default_backend(),
    "device": device.device_kind,
    "num_devices": jax.device_count(),
    "host_cpus": os.cpu_count(),
    "machine": platform.machine(),
    "jax": jax.__version__,
    # Other load on the host distorts CPU timings: recorded so it can be judged.
    "load_avg_1m": os.getloadavg()[0],
  }


def emit(record: dict[str, Any], out_path: str = "") -> None:
  """Prints ``record`` as one JSON line; appends it to ``out_path`` (JSON lines) if given."""
  line = json.dumps(record)
  print(line, flush=True)
  if out_path:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "a") as f:
      f.write(line + "\n")


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_REFERENCE = ["-m", "reference_torch.torch_reference"]  # Run from REPO_ROOT.
MODELS = ("cifar10", "fashion_mnist")


def layout_flags(model: str, num_groups: int = 8) -> list[str]:
  """Config flags of a layout. cifar10: the paper's 35.7M model (configs/cifar10.py as is).
  fashion_mnist: ch 32, ch_mult 1,2,2, one res block per level, attention only in the
  middle, dropout 0, GroupNorm with ``num_groups`` groups."""
  if model == "cifar10":
    return [f"--config={os.path.join(REPO_ROOT, 'configs', 'cifar10.py')}"]
  if model == "fashion_mnist":
    return [
      f"--config={os.path.join(REPO_ROOT, 'configs', 'fashion_mnist.py')}",
      "--config.model.ch=32",
      "--config.model.ch_mult=(1,2,2)",
      "--config.model.num_res_blocks=1",
      "--config.model.attn_resolutions=()",
      f"--config.model.num_groups={num_groups}",
      "--config.model.dropout=0.0",
    ]
  raise ValueError(f"model={model!r}; allowed: {MODELS}")


def load_avg() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def run_json_child(
  argv: list[str], *, env: dict[str, str] | None = None, timeout_s: float | None = None
) -> tuple[dict[str, Any], float]:
  """Runs ``python argv...`` in the repository root; returns (its last stdout JSON line, wall
  seconds). Its stderr streams through to ours. Raises RuntimeError if it fails."""
  cmd = [sys.executable] + argv
  start = time.perf_counter()
  proc = subprocess.run(
    cmd,
    cwd=REPO_ROOT,
    stdout=subprocess.PIPE,
    text=True,
    env={**os.environ, **(env or {})},
    timeout=timeout_s,
    check=False,
  )
  wall = time.perf_counter() - start
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(
      f"{' '.join(cmd)} exited with {proc.returncode}; stdout tail: {proc.stdout[-2000:]}"
    )
  return json.loads(lines[-1]), wall


def run_child(argv: list[str], *, timeout_s: float | None = None) -> float:
  """Runs ``python argv...`` in the repository root, all its output sent to our stderr (our
  stdout holds only JSON lines); returns its wall seconds. Raises RuntimeError if it fails."""
  cmd = [sys.executable] + argv
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=sys.stderr, timeout=timeout_s, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
  return time.perf_counter() - start
