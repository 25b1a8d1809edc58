"""The spectral adapter's bn_1 batch statistics: the CPU kernel (fmjax/kernels/column_moments.cc,
`spectral_adapter.window_moments`) against the XLA formulation (`_window_moments_xla`: the unfolded,
centred windows), on the same input in one run, in interleaved rounds.

  python -m benchmarks.batch_statistics [--batch 8 --size 32 --bands 202 --rounds 40]

bn_1's statistics are the mean and covariance of layer 1's 7-tap windows. MoCo runs each encoder on
batch 8, DINO on batch 16 (two views of 8). Prints medians in ms and the ratio of the XLA form's
time to the kernel's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=32, help="image height and width")
  parser.add_argument("--bands", type=int, default=202)
  parser.add_argument("--rounds", type=int, default=40)
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  from fmjax.kernels import cpu as cpu_kernels
  from fmjax.models import spectral_adapter as sa
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((args.batch, args.size, args.size, args.bands)).astype(np.float32))
  kernel1, stride1, padding1, _ = sa.ADAPTER_LAYERS[0]
  with cpu_kernels.kernels_enabled(True):
    if not cpu_kernels.kernels_available():
      raise SystemExit("the CPU kernels are not available on this host (they need an AVX-512 CPU, a C++ "
                       f"compiler and {cpu_kernels.ENV_SWITCH} unset or 1)")
    variants = {"kernel": jax.jit(lambda a: sa.window_moments(a.reshape(-1, args.bands), kernel1, stride1,
                                                                padding1)),
                "XLA": jax.jit(lambda a: sa._window_moments_xla(a, kernel1, stride1, padding1))}
    for fn in variants.values():
      jax.block_until_ready(fn(x))
  times = {name: [] for name in variants}
  for _ in range(args.rounds):
    for name, fn in variants.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(x))
      times[name].append(time.perf_counter() - start)
  medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
  print(f"bn_1 window moments, batch {args.batch} x {args.size} px, {args.bands} bands, {args.rounds} "
        f"interleaved rounds (median ms): kernel {medians['kernel']:.2f}, XLA {medians['XLA']:.2f}, "
        f"XLA / kernel {medians['XLA'] / medians['kernel']:.2f}x")
  return medians


if __name__ == "__main__":
  main()
