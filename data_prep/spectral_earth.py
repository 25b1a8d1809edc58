"""Converts a SpectralEarth GeoTIFF archive into an fmjax/TFDS dataset directory of ArrayRecords.

    python -m data_prep.spectral_earth --input ROOT --output DIR [--shards 16] [--workers 2]
        [--val-fraction 0.05] [--compression blosc:lz4hc:5|zstd:3|none] [--max-nodata 0.5]
        [--bands 202] [--size 128] [--name spectral_earth] [--stats|--no-stats]

Input: ROOT/enmap/<location id>/<timestamp>.tif (one folder per location, one GeoTIFF per
timestamp). Output: one record per location holding all its good timestamps
(`fmjax.data.records.LocationRecord`, pixels [T, H, W, C] int16), ArrayRecord shards named
`<name>-<split>.array_record-<i>-of-<n>`, TFDS metadata, DIR/report.json and DIR/band_stats.json.

Every file in a location folder is one input. Each ends up converted or rejected, with a reason:
  not_geotiff             not a .tif/.tiff, or GDAL opens it with another driver (e.g. PNG)
  unreadable              GDAL cannot open or read it (truncated, corrupt)
  wrong_band_count / wrong_size / wrong_dtype   header does not match --bands/--size/int16
  all_nodata              every pixel is nodata (-32768)
  nodata_above_threshold  nodata fraction > --max-nodata
  duplicate               identical pixels to an earlier timestamp (by name) of the same location
A pixel is nodata when any of its bands holds the nodata value. Timestamps with some nodata
(<= --max-nodata) are kept, flagged in the report (`partial_nodata`) and carry their fraction in
the record's `nodata_fraction`. report.json satisfies converted + rejected == inputs.

Split and shard come from a stable hash (SHA-256) of the location id, so they never depend on the
file system order, the worker count or on which other locations exist. Resumable: each shard is
written to DIR/.conversion/ under a temporary name, renamed into place when complete, then marked
done; a rerun (same settings) skips done shards, so a killed run rerun yields every location
exactly once.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import re
import shutil
import time
import warnings

import numpy as np

from data_prep import shard_pool
from fmjax.data import dataset_dir, records, sensors

WORK_DIR = ".conversion"
SPLITS = ("train", "validation")
DEFAULT_COMPRESSION = "blosc:lz4hc:5"  # see docs/data_prep.md for the measurement behind this choice
_COMPRESSION = re.compile(r"^(none|uncompressed|snappy|zstd(:-?\d+)?|brotli(:\d+)?|"
                          r"blosc:(lz4|lz4hc|zstd|zlib|blosclz):\d)$")
COMPRESSION_HELP = ("blosc:CNAME:LEVEL (pixels byte-shuffled and compressed per timestamp inside the "
                    "record; CNAME lz4|lz4hc|zstd|zlib|blosclz) | none | snappy | zstd[:LEVEL] | "
                    "brotli[:LEVEL] (ArrayRecord chunk compression)")


# --- deterministic assignment --------------------------------------------------------------------

def _digest(location_id: str) -> bytes:
  return hashlib.sha256(location_id.encode()).digest()


def split_of(location_id: str, val_fraction: float) -> str:
  """'validation' for a stable `val_fraction` of the locations, else 'train'."""
  u = int.from_bytes(_digest(location_id)[:8], "big") / 2.0**64
  return "validation" if u < val_fraction else "train"


def shard_of(location_id: str, num_shards: int) -> int:
  return int.from_bytes(_digest(location_id)[8:16], "big") % num_shards


def num_val_shards(num_shards: int, val_fraction: float) -> int:
  return max(1, math.ceil(num_shards * val_fraction / max(1e-9, 1 - val_fraction))) if val_fraction > 0 else 0


def find_locations(root: pathlib.Path) -> list[tuple[str, list[str]]]:
  """[(location id, sorted file names)] under ROOT/enmap, sorted by id."""
  enmap = root / "enmap"
  if not enmap.is_dir():
    raise FileNotFoundError(f"--input {root}: expected the folder {enmap} (ROOT/enmap/<id>/<ts>.tif)")
  out = []
  for entry in sorted(os.scandir(enmap), key=lambda e: e.name):
    if entry.is_dir():
      out.append((entry.name, sorted(f.name for f in os.scandir(entry.path) if f.is_file())))
  return out


def plan_shards(locations, num_shards: int, val_fraction: float) -> dict[tuple[str, int], list]:
  """{(split, shard index): [(location id, files)]}; every shard of both splits is present."""
  counts = {"train": num_shards, "validation": num_val_shards(num_shards, val_fraction)}
  plan = {(split, i): [] for split in SPLITS for i in range(counts[split])}
  for loc, files in locations:
    split = split_of(loc, val_fraction)
    plan[(split, shard_of(loc, counts[split]))].append((loc, files))
  return plan


# --- reading one location ------------------------------------------------------------------------

def read_location(root: pathlib.Path, loc: str, files: list[str], bands: int, size: int,
                  max_nodata: float):
  """Validates a location's files; returns (record or None, rejected, flagged, bytes read)."""
  import rasterio  # workers import GDAL themselves
  warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)
  rejected, flagged, kept, seen, nbytes = [], [], [], {}, 0
  for name in files:
    rel = f"enmap/{loc}/{name}"
    path = root / rel
    timestamp = name.split(".")[0]

    def reject(reason, detail=""):
      rejected.append(dict(path=rel, location_id=loc, timestamp=timestamp, reason=reason, detail=detail))

    if not name.lower().endswith((".tif", ".tiff")):
      reject("not_geotiff", "file name does not end in .tif/.tiff")
      continue
    try:
      nbytes += path.stat().st_size
      with rasterio.open(path) as src:
        if src.driver != "GTiff":
          reject("not_geotiff", f"GDAL driver {src.driver}")
          continue
        if src.count != bands:
          reject("wrong_band_count", f"{src.count} bands, expected {bands}")
          continue
        if (src.height, src.width) != (size, size):
          reject("wrong_size", f"{src.height}x{src.width}, expected {size}x{size}")
          continue
        if any(d != "int16" for d in src.dtypes):
          reject("wrong_dtype", f"{sorted(set(src.dtypes))}, expected int16")
          continue
        pixels = src.read()  # [C, H, W]
        nodata = sensors.ENMAP_NODATA if src.nodata is None else int(src.nodata)
        crs = src.crs.to_wkt() if src.crs else ""
        transform = tuple(src.transform.to_gdal())
        tag = src.tags().get("wavelengths_nm")
    except Exception as e:  # rasterio/GDAL raise several error types for corrupt files
      reject("unreadable", f"{type(e).__name__}: {e}"[:300])
      continue
    invalid = (pixels == nodata).any(axis=0)
    fraction = float(invalid.mean())
    if fraction == 1.0:
      reject("all_nodata")
      continue
    if fraction > max_nodata:
      reject("nodata_above_threshold", f"nodata fraction {fraction:.4f} > {max_nodata}")
      continue
    digest = hashlib.sha256(pixels.tobytes()).hexdigest()
    if digest in seen:
      reject("duplicate", f"identical pixels to enmap/{loc}/{seen[digest]}")
      continue
    seen[digest] = name
    if fraction > 0:
      flagged.append(dict(path=rel, location_id=loc, timestamp=timestamp, reason="partial_nodata",
                          nodata_fraction=fraction))
    kept.append(dict(name=name, timestamp=timestamp, pixels=pixels, nodata=nodata, crs=crs,
                     transform=transform, fraction=fraction, tag=tag))
  if not kept:
    return None, rejected, flagged, nbytes
  first = kept[0]
  wavelengths = _wavelengths(first["tag"], bands)
  record = records.LocationRecord(
      location_id=loc, timestamps=[k["timestamp"] for k in kept],
      arrays={"pixels": np.stack([k["pixels"].transpose(1, 2, 0) for k in kept])},
      sensor="enmap", wavelengths=wavelengths, crs=first["crs"], transform=first["transform"],
      nodata=first["nodata"], nodata_fraction=np.array([k["fraction"] for k in kept], np.float32),
      extra={"files": [k["name"] for k in kept]})
  return record, rejected, flagged, nbytes


def _wavelengths(tag: str | None, bands: int) -> np.ndarray | None:
  """Band wavelengths from the GeoTIFF tag, else the SpectralEarth table for 202 bands."""
  if tag and len(tag.split(",")) == bands:
    return np.array([float(v) for v in tag.split(",")], np.float32)
  if bands == sensors.SPECTRALEARTH_NUM_BANDS:
    return sensors.enmap_wavelengths().astype(np.float32)
  return None


# --- one shard (runs in a worker) ----------------------------------------------------------------

def storage_options(compression: str) -> tuple[str, str]:
  """(ArrayRecord writer options, record pixel codec) of a --compression value.

  One record per chunk (group_size:1): random access reads a single record. A blosc codec
  compresses the pixels inside the record, so the chunks stay uncompressed (no second pass).
  """
  if compression.startswith("blosc:"):
    return "group_size:1,uncompressed", compression
  codec = "uncompressed" if compression in ("none", "uncompressed") else compression
  return f"group_size:1,{codec}", records.RAW


def convert_shard(task: dict) -> dict:
  """Writes one shard (temp name -> rename -> done marker) and returns its summary."""
  from array_record.python.array_record_module import ArrayRecordWriter
  out, work = pathlib.Path(task["output"]), pathlib.Path(task["output"]) / WORK_DIR
  # The pid in the temp name keeps a stray worker of a killed run from clobbering a rerun's file.
  tmp = work / f"{task['filename']}.{os.getpid()}.tmp"
  writer_options, pixel_codec = storage_options(task["compression"])
  writer = ArrayRecordWriter(str(tmp), writer_options)
  summary = dict(filename=task["filename"], split=task["split"], index=task["index"], records=0,
                 converted_files=0, rejected=[], flagged=[], empty_locations=[], wavelengths=None, input_bytes=0)
  for loc, files in task["locations"]:
    record, rejected, flagged, nbytes = read_location(
        pathlib.Path(task["input"]), loc, files, task["bands"], task["size"], task["max_nodata"])
    summary["rejected"] += rejected
    summary["flagged"] += flagged
    summary["input_bytes"] += nbytes
    if record is None:
      summary["empty_locations"].append(loc)
    else:
      writer.write(records.encode(record, pixel_codec))
      summary["records"] += 1
      summary["converted_files"] += record.num_timestamps
      if summary["wavelengths"] is None and record.wavelengths is not None:
        summary["wavelengths"] = [round(float(v), 3) for v in record.wavelengths]
    shard_pool.report(len(files), nbytes)
  writer.close()
  os.replace(tmp, out / task["filename"])
  summary["num_bytes"] = (out / task["filename"]).stat().st_size
  dataset_dir._atomic_write_json(work / (task["filename"] + ".done.json"), summary)
  return summary


# --- the whole conversion ------------------------------------------------------------------------

def convert(input_root, output, shards=16, workers=2, val_fraction=0.05,
            compression=DEFAULT_COMPRESSION, max_nodata=0.5, bands=202, size=128,
            name="spectral_earth", stats=True, overwrite=False, progress=True) -> dict:
  """Runs (or resumes) a conversion; returns the report (also written to DIR/report.json)."""
  if not _COMPRESSION.match(compression):
    raise ValueError(f"--compression {compression!r}: valid are {COMPRESSION_HELP}")
  if shards < 1 or workers < 1:
    raise ValueError(f"--shards ({shards}) and --workers ({workers}) must be >= 1")
  if not 0 <= val_fraction < 1:
    raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
  if not 0 <= max_nodata <= 1:
    raise ValueError(f"--max-nodata must be in [0, 1], got {max_nodata}")
  root, out = pathlib.Path(input_root), pathlib.Path(output)
  work = out / WORK_DIR
  if overwrite and out.exists():
    shutil.rmtree(out)
  work.mkdir(parents=True, exist_ok=True)
  locations = find_locations(root)
  settings = dict(input=str(root.resolve()), shards=shards, val_fraction=val_fraction,
                  compression=compression, max_nodata=max_nodata, bands=bands, size=size, name=name,
                  inputs_sha256=hashlib.sha256(json.dumps(locations).encode()).hexdigest())
  settings_path = work / "settings.json"
  if settings_path.exists():
    previous = json.loads(settings_path.read_text())
    if previous != settings:
      changed = sorted(k for k in settings if previous.get(k) != settings[k])
      raise ValueError(f"--output {out} holds a conversion with other settings/inputs (changed: "
                       f"{changed}); use a fresh --output or --overwrite")
  else:
    dataset_dir._atomic_write_json(settings_path, settings)
  plan = plan_shards(locations, shards, val_fraction)
  counts = {s: sum(1 for (split, _) in plan if split == s) for s in SPLITS}
  tasks, summaries = [], []
  for (split, index), locs in sorted(plan.items()):
    filename = dataset_dir.shard_filename(name, split, index, counts[split])
    done = work / (filename + ".done.json")
    if done.exists() and (out / filename).exists():
      summaries.append(json.loads(done.read_text()))
      continue
    tasks.append(dict(input=str(root), output=str(out), split=split, index=index, filename=filename,
                      locations=locs, bands=bands, size=size, max_nodata=max_nodata,
                      compression=compression))
  # Biggest shards first keeps the workers busy until the end.
  tasks.sort(key=lambda t: -sum(len(f) for _, f in t["locations"]))
  summaries += _run_tasks(tasks, workers, progress)
  report = _finalise(out, name, locations, summaries, counts, settings)
  for leftover in work.glob("*.tmp"):  # partial shards of killed runs, superseded by now
    leftover.unlink(missing_ok=True)
  if stats and report["splits"]["train"]["records"]:
    from data_prep import stats as stats_lib
    stats_lib.compute_and_save(out, workers=workers, progress=progress)
  return report


def _run_tasks(tasks, workers, progress):
  return shard_pool.run(tasks, convert_shard, workers, progress,
                        total=sum(len(files) for t in tasks for _, files in t["locations"]), unit="file")


def _finalise(out, name, locations, summaries, counts, settings):
  """Merges the shard summaries into report.json and writes the TFDS metadata."""
  summaries = sorted(summaries, key=lambda s: (s["split"], s["index"]))
  rejected = sorted((r for s in summaries for r in s["rejected"]), key=lambda r: r["path"])
  flagged = sorted((r for s in summaries for r in s["flagged"]), key=lambda r: r["path"])
  by_reason = {}
  for r in rejected:
    by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
  inputs = sum(len(files) for _, files in locations)
  converted = sum(s["converted_files"] for s in summaries)
  shard_lengths = {s: [0] * counts[s] for s in SPLITS}
  shard_bytes = {s: 0 for s in SPLITS}
  for s in summaries:
    shard_lengths[s["split"]][s["index"]] = s["records"]
    shard_bytes[s["split"]] += s["num_bytes"]
  report = dict(
      inputs=dict(files=inputs, locations=len(locations)),
      converted=dict(files=converted, records=sum(s["records"] for s in summaries)),
      rejected=dict(files=len(rejected), by_reason=by_reason),
      locations_without_record=sorted(l for s in summaries for l in s.get("empty_locations", [])),
      flagged=dict(partial_nodata=len(flagged)),
      consistent=converted + len(rejected) == inputs,
      splits={s: dict(records=sum(shard_lengths[s]), shards=counts[s], bytes=shard_bytes[s]) for s in SPLITS},
      settings=settings, rejected_files=rejected, flagged_files=flagged)
  if not report["consistent"]:
    raise RuntimeError(f"converted {converted} + rejected {len(rejected)} != {inputs} inputs; "
                       f"the output in {out} is incomplete")
  wavelengths = next((s["wavelengths"] for s in summaries if s["wavelengths"]), None)
  fmjax_info = dict(sensor="enmap", num_bands=settings["bands"], wavelengths=wavelengths,
                    nodata=sensors.ENMAP_NODATA, patch_size=settings["size"],
                    compression=settings["compression"], source="data_prep.spectral_earth")
  arrays = {"pixels": ((None, settings["size"], settings["size"], settings["bands"]), "int16")}
  if report["converted"]["records"]:
    dataset_dir.write_tfds_metadata(out, name, shard_lengths, shard_bytes, arrays, fmjax_info,
                                    description="SpectralEarth-format EnMAP patches, one record per location.")
  dataset_dir._atomic_write_json(out / "report.json", report)
  return report


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--input", required=True, help="archive root holding enmap/<id>/<ts>.tif")
  parser.add_argument("--output", required=True, help="dataset directory to write")
  parser.add_argument("--shards", type=int, default=16, help="train shards (validation gets its share)")
  parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
  parser.add_argument("--val-fraction", type=float, default=0.05)
  parser.add_argument("--compression", default=DEFAULT_COMPRESSION, help=COMPRESSION_HELP)
  parser.add_argument("--max-nodata", type=float, default=0.5, help="reject timestamps above this nodata fraction")
  parser.add_argument("--bands", type=int, default=sensors.SPECTRALEARTH_NUM_BANDS)
  parser.add_argument("--size", type=int, default=128)
  parser.add_argument("--name", default="spectral_earth", help="TFDS dataset name (file prefix)")
  parser.add_argument("--stats", action=argparse.BooleanOptionalAction, default=True,
                      help="compute DIR/band_stats.json at the end (data_prep.stats)")
  parser.add_argument("--overwrite", action="store_true", help="delete DIR first instead of resuming")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  report = convert(args.input, args.output, args.shards, args.workers, args.val_fraction,
                   args.compression, args.max_nodata, args.bands, args.size, args.name, args.stats,
                   args.overwrite)
  print(f"{report['converted']['records']} records from {report['converted']['files']} files; "
        f"rejected {report['rejected']['files']} {report['rejected']['by_reason']}; "
        f"flagged {report['flagged']['partial_nodata']} partial-nodata; "
        f"{time.perf_counter() - start:.1f} s -> {args.output}")


if __name__ == "__main__":
  main()
