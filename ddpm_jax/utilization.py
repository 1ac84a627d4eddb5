"""How much of the accelerator a step uses: XLA's FLOP count of a compiled program and the
device's peak, for TFLOP/s and MFU (model FLOP utilisation) in training logs and benchmarks.
"""

from __future__ import annotations

from typing import Any

import jax

# Dense peak TFLOP/s per device (vendor figures, no sparsity), by (device_kind prefix, dtype).
# float32 on NVIDIA GPUs is XLA's default-precision matmul, which runs on TF32 tensor cores.
KNOWN_PEAK_TFLOPS = {
  ("NVIDIA H100", "bfloat16"): 989.0,
  ("NVIDIA H100", "float32"): 494.0,
  ("NVIDIA H200", "bfloat16"): 989.0,
  ("NVIDIA H200", "float32"): 494.0,
  ("NVIDIA A100", "bfloat16"): 312.0,
  ("NVIDIA A100", "float32"): 156.0,
  ("TPU v3", "bfloat16"): 61.5,
  ("TPU v3", "float32"): 61.5,  # Per core (2 per chip).
  ("TPU v4", "bfloat16"): 275.0,
  ("TPU v4", "float32"): 275.0,
  ("TPU v5 lite", "bfloat16"): 197.0,
  ("TPU v5 lite", "float32"): 197.0,
  ("TPU v5p", "bfloat16"): 459.0,
  ("TPU v5p", "float32"): 459.0,
}


def peak_tflops(device: jax.Device, dtype: str, override: float = 0.0) -> float | None:
  """Per-device peak: ``override`` if positive, else the table above (None if unknown)."""
  if override > 0:
    return override
  for (prefix, table_dtype), value in KNOWN_PEAK_TFLOPS.items():
    if device.device_kind.startswith(prefix) and table_dtype == dtype:
      return value
  return None


def compiled_cost(compiled: Any) -> dict[str, float]:
  """XLA's FLOP count (2 per multiply-add) and memory footprint of one compiled program, for
  one device's share of a pmapped program. XLA counts a while loop's (scan's) body once."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = {"flops": float(cost.get("flops", float("nan")))}
  mem = compiled.memory_analysis()
  if mem is not None:
    out["xla_mib"] = (
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes
    ) / 2**20
    out["xla_temp_mib"] = mem.temp_size_in_bytes / 2**20
  return out


def rates(
  flops_per_device_step: float, steps_per_sec: float, peak: float | None
) -> dict[str, float]:
  """TFLOP/s per device and, with a known peak, MFU."""
  tflops = flops_per_device_step * steps_per_sec / 1e12
  return dict(tflops_per_device=tflops, **({"mfu": tflops / peak} if peak else {}))
