"""Model FLOPs utilisation: FLOPs of the train step over the devices' peak FLOP/s.

FLOPs come from XLA's cost analysis of the lowered step (before optimisation; the caller divides
the whole program's count over the devices): on an H200, XLA GPU's count of the compiled step was
3.6x below it. Peak FLOP/s per device come from a table of dense bf16 figures for accelerators; on
CPU (no datasheet figure that means anything for fake devices sharing cores) a jitted matmul in the
model's compute dtype is measured once instead.
"""
from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp

from fmjax.models.layers import dot_general

# Dense bf16 peak FLOP/s per device (chip for TPU, GPU for NVIDIA), from vendor datasheets.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e / Trillium
    "TPU v6e": 918e12,
    "TPU7x": 2307e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10": 125e12,
}


def _flops(stage) -> float:
  """The 'flops' entry of a lowered or compiled program's cost analysis (0 when unavailable)."""
  try:
    analysis = stage.cost_analysis()
  except Exception as e:  # some backends do not implement it
    logging.info("cost_analysis unavailable: %s", e)
    return 0.0
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def compiled_flops(compiled) -> float:
  """FLOPs of one call of a compiled executable as XLA counts them: one device's share of an SPMD
  program (on GPU far below the real count: use `lowered_flops`)."""
  return _flops(compiled)


def lowered_flops(lowered) -> float:
  """FLOPs of a lowered (not yet optimised) program as XLA counts them: the whole SPMD program,
  not one device's share; the same on every backend."""
  return _flops(lowered)


def measured_matmul_peak(size: int = 2048, dtype=jnp.float32, repeats: int = 10) -> float:
  """FLOP/s of a jitted [size]^3 matmul of random `dtype` values on the first device, best of
  `repeats` (on an accelerator: bf16 at 8192 reaches the practical ceiling of its tensor cores).
  Formed as the models form their products (`layers.dot_general`): on CPU, bf16 operands into a
  float32 result, the form XLA CPU runs on the CPU's bf16 dot instructions."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  matmul = jax.jit(lambda x: dot_general(x, x, (((1,), (0,)), ((), ()))))
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


@functools.lru_cache(maxsize=None)
def measured_cpu_peak(size: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
  """FLOP/s of a jitted `dtype` matmul on this host's first device (the CPU 'peak'), best of `repeats`
  (~1 s; on a shared VM single 1024^3 products varied 1.1-2.2e11 FLOP/s, hence the size). bfloat16
  is about twice float32 on CPUs with AVX512-BF16, and slower than it on CPUs without."""
  return measured_matmul_peak(size, jnp.dtype(dtype), repeats)


def peak_flops_per_device(device: jax.Device | None = None, compute_dtype: str = "float32") -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from). On CPU it is measured with products
  of `compute_dtype` (the model's `dtype`); accelerators use their datasheet's bf16 figure."""
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops, f"datasheet bf16 ({kind})"
  if device.platform == "cpu":
    # All fake CPU devices of a process share the host cores: divide the host's measured peak.
    name = jnp.dtype(compute_dtype).name
    return (measured_cpu_peak(dtype=name) / jax.local_device_count(),
            f"measured {name} matmul / local devices")
  return 0.0, f"unknown device kind {kind!r}"


def mfu(flops_per_device_step: float, step_seconds: float, peak_per_device: float) -> float:
  if not (flops_per_device_step and step_seconds and peak_per_device):
    return 0.0
  return flops_per_device_step / step_seconds / peak_per_device
