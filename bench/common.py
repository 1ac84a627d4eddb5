"""Shared pieces of the bench/ scripts: timing, machine description, peak FLOP/s, JSON output.

Benchmarks measure and print; they never assert on time.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from typing import Any, Callable

import jax

# Dense peak TFLOP/s per device (vendor figures, no sparsity), by (device_kind prefix, dtype).
# float32 on NVIDIA GPUs is XLA's default-precision matmul, which runs on TF32 tensor cores.
KNOWN_PEAK_TFLOPS = {
    ("NVIDIA H100", "bfloat16"): 989.0, ("NVIDIA H100", "float32"): 494.0,
    ("NVIDIA H200", "bfloat16"): 989.0, ("NVIDIA H200", "float32"): 494.0,
    ("NVIDIA A100", "bfloat16"): 312.0, ("NVIDIA A100", "float32"): 156.0,
    ("TPU v3", "bfloat16"): 61.5, ("TPU v3", "float32"): 61.5,  # Per core (2 per chip).
    ("TPU v4", "bfloat16"): 275.0, ("TPU v4", "float32"): 275.0,
    ("TPU v5 lite", "bfloat16"): 197.0, ("TPU v5 lite", "float32"): 197.0,
    ("TPU v5p", "bfloat16"): 459.0, ("TPU v5p", "float32"): 459.0,
}


def peak_tflops(device: jax.Device, dtype: str, override: float) -> float | None:
  """Per-device peak: ``override`` if positive, else the table above (None if unknown)."""
  if override > 0:
    return override
  for (prefix, table_dtype), value in KNOWN_PEAK_TFLOPS.items():
    if device.device_kind.startswith(prefix) and table_dtype == dtype:
      return value
  return None


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
  """Median wall time of ``repeats`` calls of ``fn`` (each ended with block_until_ready)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def compiled_cost(compiled: Any) -> dict[str, float]:
  """XLA's FLOP count and memory footprint of one compiled program (one device's share)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = {"flops": float(cost.get("flops", float("nan")))}
  mem = compiled.memory_analysis()
  if mem is not None:
    out["xla_mib"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                      + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2**20
    out["xla_temp_mib"] = mem.temp_size_in_bytes / 2**20
  return out


def memory_report() -> dict[str, Any]:
  """Peak host RSS (includes the compiler on CPU) and device memory_stats where available."""
  out: dict[str, Any] = {
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
  stats = jax.local_devices()[0].memory_stats()
  if stats:
    for key in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit"):
      if key in stats:
        out[f"device_{key.replace('bytes', 'mib')}"] = stats[key] / 2**20
  return out


def machine() -> dict[str, Any]:
  device = jax.local_devices()[0]
  return {"backend": jax.default_backend(), "device": device.device_kind,
          "num_devices": jax.device_count(), "host_cpus": os.cpu_count(),
          "machine": platform.machine(), "jax": jax.__version__,
          # Other load on the host distorts CPU timings: recorded so it can be judged.
          "load_avg_1m": os.getloadavg()[0]}


def emit(record: dict[str, Any], out_path: str = "") -> None:
  """Prints ``record`` as one JSON line; appends it to ``out_path`` (JSON lines) if given."""
  line = json.dumps(record)
  print(line, flush=True)
  if out_path:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "a") as f:
      f.write(line + "\n")
