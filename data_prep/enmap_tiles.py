"""Builds a SpectralEarth-style pretraining dataset from raw EnMAP L2A tiles.

  python -m data_prep.enmap_tiles --input DIR --output ROOT [--patch-size 128] [--min-valid 0.99]
      [--workers W] [--resampling nearest]

Steps (the SpectralEarth procedure): find the spectral images and keep the newest processing of
each scene; compute each tile's valid-data footprint; build the graph of overlapping footprints
(R-tree); for every connected component (in parallel, resumable), grow n-tuples of overlapping
tiles from different datatakes, cut their intersections into patches (largest n first), and let
an R-tree of emitted patches keep any location from being emitted twice; finally give locations
contiguous 7-digit ids. Output:

  ROOT/enmap/<7-digit location>/<5-digit timestamp>.tif   202 bands, int16, nodata -32768, UTM
  ROOT/enmap_tiles_index.csv       one row per patch file (location, timestamp, source tile, ...)
  ROOT/enmap_tiles_index.geojson   one feature per location (WGS84 footprint, its timestamps)
  ROOT/enmap_tiles_tiles.csv       timestamp id -> source tile (acquisition time, datatake, ...)
  ROOT/enmap_tiles_summary.json    tiles read, duplicates, overlaps, patches per timestamp count

The 5-digit timestamp id is the source tile's position in the de-duplicated archive sorted by
acquisition time, so the same id in two locations means the same acquisition.
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import multiprocessing
import os
import shutil
import sys
import time

import rasterio.crs
import shapely
import shapely.geometry
from tqdm import tqdm

from data_prep import enmap_tiles_patches as patches_lib
from data_prep import enmap_tiles_scan as scan_lib

STAGING = "_staging"
SUMMARY = "enmap_tiles_summary.json"


def _scan_one(args):
  tile, patch_size, min_valid = args
  try:
    return scan_lib.scan_tile(tile, patch_size=patch_size, min_valid=min_valid), None
  except Exception as e:  # a broken file is reported, not fatal for the archive
    return tile, f"{type(e).__name__}: {e}"


def _component_job(args):
  return patches_lib.process_component(*args)


def _map(fn, items, workers, desc, progress):
  """fn over items, in a process pool when workers > 1, with a progress bar."""
  bar = tqdm(total=len(items), desc=desc, disable=not progress, file=sys.stderr)
  if workers <= 1 or len(items) <= 1:
    for item in items:
      yield fn(item)
      bar.update()
  else:
    # fork: workers inherit the imported modules (cheap start); no GDAL handle is open here.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
      for out in pool.imap_unordered(fn, items):
        yield out
        bar.update()
      pool.close()   # workers exit on their own, as in data_prep/shard_pool.py; the `with` still
      pool.join()    # terminates them if the consumer stops early or raises
  bar.close()


def _tile_key(tile):
  st = os.stat(tile.path)
  return [tile.name, st.st_size, st.st_mtime_ns]


def _scan_all(tiles, staging, patch_size, min_valid, workers, progress):
  """Footprints of all tiles, cached in the staging directory (keyed by name, size, mtime)."""
  cache_path = os.path.join(staging, "scan.json")
  cache = {}
  if os.path.exists(cache_path):
    with open(cache_path) as f:
      cache = json.load(f)
  todo, errors = [], {}
  for tile in tiles:
    entry = cache.get(tile.path)
    if entry and entry["key"] == _tile_key(tile):
      if entry.get("error"):
        errors[tile.index] = entry["error"]
        tile.footprint = tile.footprint_geo = shapely.Polygon()
        continue
      tile.crs, tile.transform = entry["crs"], tuple(entry["transform"])
      tile.width, tile.height, tile.valid_fraction = entry["width"], entry["height"], entry["valid"]
      tile.footprint = shapely.from_wkb(bytes.fromhex(entry["footprint"]))
      tile.footprint_geo = shapely.from_wkb(bytes.fromhex(entry["footprint_wgs84"]))
    else:
      todo.append(tile)
  by_index = {t.index: t for t in tiles}
  for tile, error in _map(_scan_one, [(t, patch_size, min_valid) for t in todo], workers,
                          "scan tiles", progress):
    target = by_index[tile.index]
    if error:
      errors[tile.index] = error
      target.footprint = target.footprint_geo = shapely.Polygon()
      cache[tile.path] = {"key": _tile_key(tile), "error": error}
      continue
    for field in ("crs", "transform", "width", "height", "valid_fraction", "footprint",
                  "footprint_geo"):
      setattr(target, field, getattr(tile, field))
    cache[tile.path] = {
        "key": _tile_key(tile), "crs": tile.crs, "transform": list(tile.transform),
        "width": tile.width, "height": tile.height, "valid": tile.valid_fraction,
        "footprint": shapely.to_wkb(tile.footprint).hex(),
        "footprint_wgs84": shapely.to_wkb(tile.footprint_geo).hex()}
  with open(cache_path + ".part", "w") as f:
    json.dump(cache, f)
  os.replace(cache_path + ".part", cache_path)
  return errors


def _marker_matches(marker_path, members):
  if not os.path.exists(marker_path):
    return None
  with open(marker_path) as f:
    marker = json.load(f)
  expected = [[t.index, t.name] for t in members]
  return marker if marker.get("tile_names") == expected else None


def _check_config(staging, config):
  path = os.path.join(staging, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != config:
      raise ValueError(f"{staging} holds a run with settings {old}, not {config}: resume with "
                       "the same settings or choose another --output")
  else:
    with open(path, "w") as f:
      json.dump(config, f)


def build(input_dir: str, output_root: str, *, patch_size: int = 128, min_valid: float = 0.99,
          workers: int = 1, resampling: str = "nearest", naive: bool = False,
          progress: bool = True) -> dict:
  """Runs the whole pipeline (resuming what a previous run finished); returns the summary."""
  if patch_size < 1:
    raise ValueError(f"--patch-size must be >= 1, got {patch_size}")
  if not 0.0 <= min_valid <= 1.0:
    raise ValueError(f"--min-valid must be in [0, 1], got {min_valid}")
  if resampling not in patches_lib.RESAMPLING:
    raise ValueError(f"--resampling {resampling!r}: choose one of {sorted(patches_lib.RESAMPLING)}")
  config = {"patch_size": patch_size, "min_valid": min_valid, "resampling": resampling}
  summary_path = os.path.join(output_root, SUMMARY)
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
    if summary.get("config") == config:
      print(f"{output_root} is complete ({summary['locations']} locations); nothing to do")
      return summary
    raise ValueError(f"{output_root} already holds a dataset built with {summary.get('config')}; "
                     f"choose another --output for {config}")
  staging = os.path.join(output_root, STAGING)
  os.makedirs(staging, exist_ok=True)
  _check_config(staging, config)
  timings = {}

  started = time.perf_counter()
  found = scan_lib.discover(input_dir)
  tiles = found.tiles
  errors = _scan_all(tiles, staging, patch_size, min_valid, workers, progress)
  timings["scan_s"] = time.perf_counter() - started

  started = time.perf_counter()
  graph = scan_lib.overlap_graph(tiles)
  components = [c for c in scan_lib.connected_components(graph)
                if any(not tiles[i].footprint.is_empty for i in c)]
  timings["graph_s"] = time.perf_counter() - started

  started = time.perf_counter()
  markers, jobs = {}, []
  for cid, members in enumerate(components):
    member_tiles = [tiles[i] for i in members if not tiles[i].footprint.is_empty]
    marker = _marker_matches(patches_lib.done_marker(staging, cid), member_tiles)
    if marker is not None:
      markers[cid] = marker
      continue
    neighbours = {i: graph[i] & set(members) for i in members}
    jobs.append((cid, member_tiles, neighbours, staging, patch_size, min_valid, resampling, naive))
  jobs.sort(key=lambda job: -len(job[1]))  # biggest components first: better load balance
  for marker in _map(_component_job, jobs, workers, "components", progress):
    markers[marker["component"]] = marker
  timings["patches_s"] = time.perf_counter() - started

  summary = _finalize(output_root, staging, tiles, markers, config)
  summary.update({
      "tiles_found": len(tiles) + len(found.duplicates),
      "tiles_read": len(tiles) - len(errors),
      "tiles_rejected": {tiles[i].name: e for i, e in sorted(errors.items())},
      "duplicates_dropped": [{"dropped": os.path.basename(a), "kept": os.path.basename(b)}
                             for a, b in found.duplicates],
      "ignored_files": [os.path.relpath(p, input_dir) for p in found.ignored],
      "overlaps": sum(len(v) for v in graph.values()) // 2,
      "overlaps_between_datatakes": sum(1 for i, v in graph.items() for j in v
                                        if i < j and tiles[i].datatake != tiles[j].datatake),
      "components": len(components),
      "components_with_overlaps": sum(1 for c in components if len(c) > 1),
      "seconds": timings,
  })
  with open(summary_path + ".part", "w") as f:
    json.dump(summary, f, indent=1)
  os.replace(summary_path + ".part", summary_path)
  print(f"{summary['tiles_read']} tiles read ({len(found.duplicates)} duplicates dropped, "
        f"{len(errors)} rejected), {summary['overlaps']} overlaps, {len(components)} components "
        f"-> {summary['locations']} locations, patches per timestamp count "
        f"{summary['locations_by_timestamp_count']}")
  return summary


def _finalize(output_root, staging, tiles, markers, config):
  """Contiguous location ids in component order; moves staged files into ROOT/enmap and writes
  the indexes. Safe to repeat after an interruption (moved files are recognised)."""
  enmap_dir = os.path.join(output_root, "enmap")
  by_index = {t.index: t for t in tiles}
  rows, features = [], []
  by_count = collections.Counter()
  stats = collections.Counter()
  tuples_by_size = collections.Counter()
  location = 0
  for cid in sorted(markers):
    marker = markers[cid]
    for key in ("candidates", "rejected_nodata"):
      stats[key] += marker["stats"].get(key, 0)
    tuples_by_size.update({int(k): v for k, v in marker["stats"].get("tuples_by_size", {}).items()})
    for patch in marker["patches"]:
      loc_id = f"{location:07d}"
      location += 1
      by_count[len(patch["timestamps"])] += 1
      for ts, fraction in zip(patch["timestamps"], patch["valid_fraction"]):
        src = os.path.join(patches_lib.component_dir(staging, cid), f"{patch['local']:07d}",
                           f"{ts:05d}.tif")
        dst = os.path.join(enmap_dir, loc_id, f"{ts:05d}.tif")
        if os.path.exists(src):
          os.makedirs(os.path.dirname(dst), exist_ok=True)
          os.replace(src, dst)
        elif not os.path.exists(dst):
          raise FileNotFoundError(f"patch {src} is missing and was never moved to {dst}; delete "
                                  f"{patches_lib.done_marker(staging, cid)} and rerun")
        tile = by_index[ts]
        a, _, c, _, e, f = patch["transform"]
        size = config["patch_size"]
        rows.append({
            "location_id": loc_id, "timestamp_id": f"{ts:05d}",
            "path": os.path.join("enmap", loc_id, f"{ts:05d}.tif"),
            "num_timestamps": len(patch["timestamps"]), "source_tile": tile.name,
            "datatake": tile.datatake, "acquired": tile.acquired, "crs": patch["crs"],
            "minx": c, "maxy": f, "maxx": c + a * size, "miny": f + e * size,
            "valid_fraction": round(fraction, 6), "component": cid})
      geom = shapely.from_wkt(patch["footprint_wgs84"])
      stamps = patch["timestamps"]
      features.append({"type": "Feature", "geometry": shapely.geometry.mapping(geom),
                       "properties": {"location_id": loc_id,
                                      "timestamps": [f"{t:05d}" for t in stamps],
                                      "acquired": [by_index[t].acquired for t in stamps],
                                      "crs": patch["crs"], "transform": patch["transform"]}})
    shutil.rmtree(patches_lib.component_dir(staging, cid), ignore_errors=True)
  _write_csv(os.path.join(output_root, "enmap_tiles_index.csv"), rows, INDEX_COLUMNS)
  _write_csv(os.path.join(output_root, "enmap_tiles_tiles.csv"), [
      {"timestamp_id": f"{t.index:05d}", "source_tile": t.name, "datatake": t.datatake,
       "acquired": t.acquired, "tile": t.tile, "version": t.version,
       "crs": _crs_string(t.crs) if t.crs else "", "valid_fraction": round(t.valid_fraction, 6)}
      for t in tiles], TILE_COLUMNS)
  with open(os.path.join(output_root, "enmap_tiles_index.geojson"), "w") as f:
    json.dump({"type": "FeatureCollection", "features": features}, f)
  return {"config": config, "locations": location, "patches": len(rows),
          "locations_by_timestamp_count": {str(k): by_count[k] for k in sorted(by_count)},
          "tuples_by_size": {str(k): tuples_by_size[k] for k in sorted(tuples_by_size)},
          "candidates": stats["candidates"], "rejected_nodata": stats["rejected_nodata"]}


def _crs_string(wkt):
  return rasterio.crs.CRS.from_wkt(wkt).to_string()


INDEX_COLUMNS = ("location_id", "timestamp_id", "path", "num_timestamps", "source_tile",
                 "datatake", "acquired", "crs", "minx", "maxy", "maxx", "miny", "valid_fraction",
                 "component")
TILE_COLUMNS = ("timestamp_id", "source_tile", "datatake", "acquired", "tile", "version", "crs",
                "valid_fraction")


def _write_csv(path, rows, columns):
  with open(path + ".part", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  os.replace(path + ".part", path)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", required=True, help="directory searched recursively for "
                      "ENMAP01-____L2A-...-SPECTRAL_IMAGE[_COG].tif[f]")
  parser.add_argument("--output", required=True, help="dataset root (ROOT/enmap/...)")
  parser.add_argument("--patch-size", type=int, default=128)
  parser.add_argument("--min-valid", type=float, default=0.99,
                      help="least fraction of valid pixels in every timestamp of a patch")
  parser.add_argument("--workers", type=int, default=1, help="processes (one component each)")
  parser.add_argument("--resampling", default="nearest", choices=sorted(patches_lib.RESAMPLING),
                      help="for tiles not on the patch's grid (other UTM zone, shifted grid)")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  build(args.input, args.output, patch_size=args.patch_size, min_valid=args.min_valid,
        workers=args.workers, resampling=args.resampling, progress=not args.no_progress)


if __name__ == "__main__":
  main()
