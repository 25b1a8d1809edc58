"""Does data ever limit training? The input pipeline on ONE core vs what the MAE ViT-S/4 step eats.

    python -m benchmarks.pipeline_vs_step [--batch 4] [--image-size 128] [--steps 3]
        [--locations 24] [--pipeline-batches 6] [--rounds 3]

One process, one run. First the fmjax MAE ViT-S/4 train step (the train loop's own jitted step,
official recipe: 202 bands, mask 0.9, 1-block decoder) on random data with every core, timed over
`--steps` steps after compilation: samples/s it consumes. Then the process is pinned to a single
core (sched_setaffinity) and the Grain pipeline runs over a synthetic SpectralEarth archive
converted to ArrayRecord, with one read thread and one BLAS thread, doing ALL of its work on the
host (read, decode, random resized crop 128 + flips, nodata fill, normalisation, batching:
augment_on=host): samples/s it delivers. The issue's target is pipeline >= 20x step.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def step_samples_per_second(args) -> float:
  import jax
  from benchmarks import train_step
  setup = argparse.Namespace(model="spec_vit_s", image_size=args.image_size, patch=4, bands=202,
                             batch=args.batch, mask_ratio=0.9, dtype="float32")
  compiled, state, batch, compile_s, _ = train_step.jax_mae_setup(setup)
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics["loss"])
  start = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
  seconds = (time.perf_counter() - start) / args.steps
  print(f"MAE ViT-S/4 step: {args.batch} x {args.image_size}px x 202 bands, {seconds:.3f} s/step on "
        f"{os.cpu_count()} cores -> {args.batch / seconds:.2f} samples/s (compile {compile_s:.1f} s)")
  return args.batch / seconds


def pipeline_samples_per_second(args, workdir: str) -> float:
  import jax
  from benchmarks import data_loading
  from fmjax import parallel
  from fmjax.data import pipeline
  from fmjax.objectives.base import ViewSpec
  data_loading._generate_geotiffs(f"{workdir}/geotiff", args.locations, 0)
  data_loading._write_array_records(f"{workdir}/geotiff", f"{workdir}/records", "uncompressed")
  config = pipeline.default_config()
  config.dir = f"{workdir}/records"
  config.stats, config.augment_on = "sample", "host"
  config.read_threads, config.blas_threads, config.prefetch = 1, 1, 1
  config.aug.scale, config.aug.hflip, config.aug.vflip = (0.4, 1.0), 0.5, 0.5
  core = sorted(os.sched_getaffinity(0))[0]
  os.sched_setaffinity(0, {core})   # every thread of this process, XLA's idle pool included
  mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  pipe = pipeline.build_input(config, global_batch_size=args.batch, views=ViewSpec(1, 0), mesh=mesh, seed=0)
  loader = data_loading._GrainLoader(pipe, host_only=True)
  data_loading._time_batches(loader, 1)   # warm-up: Grain start-up, first reads
  rates = [data_loading._time_batches(loader, args.pipeline_batches) for _ in range(args.rounds)]
  rate = statistics.median(rates)
  print(f"input pipeline on 1 core (core {core}), 1 read thread, 1 BLAS thread, augment_on=host: "
        f"{rate:.1f} samples/s (rounds " + " ".join(f"{r:.1f}" for r in rates) + ")")
  return rate


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--image-size", type=int, default=128)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--locations", type=int, default=24)
  parser.add_argument("--pipeline-batches", type=int, default=6)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args(argv)
  workdir = tempfile.mkdtemp(prefix="fmjax_bench_pipe_")
  try:
    step = step_samples_per_second(args)
    supply = pipeline_samples_per_second(args, workdir)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  print(f"pipeline / step = {supply / step:.1f}x (target >= 20x)")


if __name__ == "__main__":
  from fmjax import host_memory
  host_memory.reexec_with_host_allocator()
  main()
