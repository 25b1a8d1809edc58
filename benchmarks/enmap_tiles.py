"""EnMAP tiles -> SpectralEarth patches: throughput, worker scaling, naive vs pruned n-tuples.

  python -m benchmarks.enmap_tiles [--clusters 3] [--size 128] [--extra 6] [--patch-size 32]

Writes a synthetic archive (data_prep.synthetic_tiles; `--clusters` separate groups of
overlapping tiles, the first with `--extra` more acquisitions), then on that same archive:
  1. the whole pipeline with 1 and with 2 workers: tiles/s (footprint scan), patches/s
     (planning + reading + resampling + writing), total; ratio 2 workers / 1 worker;
  2. n-tuple enumeration of every component, pruned (Apriori, as the pipeline does) vs naive
     (all 2^n - 1 combinations): seconds, tuples found (must agree), ratio.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from data_prep import enmap_tiles, enmap_tiles_plan, enmap_tiles_scan, synthetic_tiles


def _pipeline(src, out, patch_size, workers):
  started = time.perf_counter()
  summary = enmap_tiles.build(src, out, patch_size=patch_size, workers=workers, progress=False)
  summary["total_s"] = time.perf_counter() - started
  return summary


def _enumeration(src, patch_size):
  found = enmap_tiles_scan.discover(src)
  for tile in found.tiles:
    enmap_tiles_scan.scan_tile(tile, patch_size=patch_size, min_valid=0.99)
  graph = enmap_tiles_scan.overlap_graph(found.tiles)
  rows = []
  for members in enmap_tiles_scan.connected_components(graph):
    tiles = [found.tiles[i] for i in members]
    crs = enmap_tiles_plan.component_crs(tiles)
    side = patch_size * min(t.pixel_size for t in tiles)
    cache = enmap_tiles_plan.FootprintCache(tiles)
    for t in tiles:  # reprojection is shared by both methods: keep it out of the timings
      cache.get(t.index, crs)
    neighbours = {i: graph[i] & set(members) for i in members}
    t0 = time.perf_counter()
    pruned = enmap_tiles_plan.enumerate_tuples_pruned(tiles, cache, crs, side, neighbours)
    t1 = time.perf_counter()
    naive = enmap_tiles_plan.enumerate_tuples_naive(tiles, cache, crs, side, max_tiles=24)
    t2 = time.perf_counter()
    assert sorted(pruned) == sorted(naive), "pruned and naive enumerations disagree"
    rows.append((len(tiles), len(pruned), t1 - t0, t2 - t1))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--clusters", type=int, default=3)
  parser.add_argument("--size", type=int, default=128, help="tile width/height in pixels")
  parser.add_argument("--extra", type=int, default=6,
                      help="extra acquisitions over the first cluster (naive cost grows 2^n)")
  parser.add_argument("--patch-size", type=int, default=32)
  parser.add_argument("--workdir", default=None, help="default: a temporary directory")
  args = parser.parse_args(argv)
  work = args.workdir or tempfile.mkdtemp(prefix="bench_enmap_tiles_")
  src = os.path.join(work, "tiles")
  shutil.rmtree(src, ignore_errors=True)
  t0 = time.perf_counter()
  for c in range(args.clusters):
    lon, lat = synthetic_tiles.ANCHOR_LONLAT
    synthetic_tiles.make_archive(src, size=args.size, extra=args.extra if c == 0 else 0,
                                 anchor_lonlat=(lon, lat + 0.5 * c), datatake_base=10000 * c)
  print(f"synthetic archive: {args.clusters} clusters of {args.size}x{args.size} px x 224-band "
        f"tiles in {time.perf_counter() - t0:.1f} s -> {src}")

  results = {}
  for workers in (1, 2):
    out = os.path.join(work, f"out_w{workers}")
    shutil.rmtree(out, ignore_errors=True)
    results[workers] = _pipeline(src, out, args.patch_size, workers)
  s1, s2 = results[1], results[2]
  print(f"\npipeline (patch {args.patch_size}): {s1['tiles_read']} tiles, {s1['components']} "
        f"components, {s1['locations']} locations, {s1['patches']} patch files "
        f"{s1['locations_by_timestamp_count']}")
  print(f"{'':24s}{'1 worker':>12s}{'2 workers':>12s}{'ratio 2/1':>12s}")
  rows = [
      ("scan tiles/s", s1["tiles_read"] / s1["seconds"]["scan_s"],
       s2["tiles_read"] / s2["seconds"]["scan_s"]),
      ("patches/s", s1["patches"] / s1["seconds"]["patches_s"],
       s2["patches"] / s2["seconds"]["patches_s"]),
      ("total s", s1["total_s"], s2["total_s"]),
  ]
  for name, a, b in rows:
    print(f"{name:24s}{a:12.2f}{b:12.2f}{b / a:12.2f}")

  print("\nn-tuple enumeration per component (same archive, same footprints):")
  print(f"{'tiles':>6s}{'tuples':>8s}{'pruned s':>12s}{'naive s':>12s}{'naive/pruned':>14s}")
  total_p = total_n = 0.0
  for n, tuples, tp, tn in _enumeration(src, args.patch_size):
    total_p, total_n = total_p + tp, total_n + tn
    print(f"{n:6d}{tuples:8d}{tp:12.4f}{tn:12.4f}{tn / max(tp, 1e-9):14.1f}")
  print(f"{'all':>6s}{'':8s}{total_p:12.4f}{total_n:12.4f}{total_n / max(total_p, 1e-9):14.1f}")
  if not args.workdir:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
