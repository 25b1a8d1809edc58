"""Converts an SSL4EO-S12 Sentinel-2 archive into an fmjax/TFDS dataset directory of ArrayRecords.

    python -m data_prep.ssl4eo_s12 --input ROOT --output DIR [--product s2c|s2a] [--size 264]
        [--resampling bilinear|nearest|cubic] [--shards 16] [--workers 2] [--val-fraction 0.05]
        [--compression blosc:lz4hc:5|zstd:3|none] [--max-nodata 0.5] [--name ssl4eo_s12_l1c]
        [--stats|--no-stats]

Input: ROOT/<product>/<7-digit id>/<timestamp dir>/<band>.tif, one single-band uint16 GeoTIFF per
band at its native resolution (10 m: size px, 20 m: size/2, 60 m: size/6). Product s2c (L1C) has 13
bands B1-B12 with B8A and B10; s2a (L2A) has 12 (no B10); extra files in a timestamp folder are ignored.

Output: one record per location with all its good timestamps (the 4 seasons), pixels [T, size, size, C]
uint16 in the band order of `fmjax.data.sensors` (B1, B2, ..., B8, B8A, B9, [B10,] B11, B12). Every
band is brought to the 10 m grid (size x size) by GDAL's resampled read (rasterio `out_shape`):
bilinear by default (--resampling), which for 20 m / 60 m bands interpolates between pixel centres;
'nearest' repeats each coarse pixel 2x2 / 6x6 times. CRS and transform are the 10 m band B2's.

Each timestamp folder is one input; it ends up converted or rejected with a reason:
  missing_band    a band file of the product is absent
  unreadable      GDAL cannot open or read a band file
  wrong_dtype / wrong_size   a band is not uint16 or not at its native size for --size
  all_nodata      every pixel is 0 (Sentinel-2 nodata) in every band
  nodata_above_threshold     nodata fraction > --max-nodata
  duplicate       identical pixels to an earlier timestamp of the same location
A pixel is nodata when all its bands are 0 (a 0 in one band, e.g. cirrus B10, is a valid value).
report.json satisfies converted + rejected == inputs (timestamp folders). Splits (hash of the
location id), shard assignment, temp-name/rename/done-marker resumability and TFDS metadata are
those of data_prep.spectral_earth (its helpers are imported, not copied).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import time
import warnings

import numpy as np

from data_prep import spectral_earth as se
from data_prep import shard_pool
from fmjax.data import dataset_dir, records, sensors

PRODUCTS = {"s2c": ("sentinel2_l1c", sensors.SENTINEL2_L1C_BANDS),
            "s2a": ("sentinel2_l2a", sensors.SENTINEL2_L2A_BANDS)}
RESAMPLING = ("bilinear", "nearest", "cubic")
NODATA = 0
RESOLUTION = {b.name: b.resolution_m for b in sensors.SENTINEL2_BANDS}


def product_info(product: str) -> tuple[str, tuple[str, ...]]:
  """(sensor name stored in records, band names) of --product."""
  if product not in PRODUCTS:
    raise ValueError(f"--product {product!r} is not known; valid: {sorted(PRODUCTS)}")
  return PRODUCTS[product]


def find_locations(root: pathlib.Path, product: str) -> list[tuple[str, list[str]]]:
  """[(location id, sorted timestamp folder names)] under ROOT/<product>, sorted by id."""
  base = root / product
  if not base.is_dir():
    present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    raise FileNotFoundError(f"--input {root}: expected the folder {base} (ROOT/{product}/<id>/<timestamp>/"
                            f"<band>.tif); folders present: {present or 'none'}")
  out = []
  for entry in sorted(os.scandir(base), key=lambda e: e.name):
    if entry.is_dir():
      out.append((entry.name, sorted(t.name for t in os.scandir(entry.path) if t.is_dir())))
  return out


def read_band(path: pathlib.Path, size: int, resampling: str) -> tuple[np.ndarray, object]:
  """One band file -> ([size, size] uint16 on the 10 m grid, rasterio dataset profile facts)."""
  import rasterio
  from rasterio.enums import Resampling
  with rasterio.open(path) as src:
    if src.dtypes[0] != "uint16":
      raise _Reject("wrong_dtype", f"{path.name}: {src.dtypes[0]}, expected uint16")
    band = path.stem
    expected = size * 10 // RESOLUTION[band]
    if (src.height, src.width) != (expected, expected):
      raise _Reject("wrong_size", f"{path.name}: {src.height}x{src.width}, expected {expected}x{expected} "
                    f"({RESOLUTION[band]} m band of a {size} px 10 m grid)")
    if expected == size:
      data = src.read(1)
    else:
      data = src.read(1, out_shape=(size, size), resampling=getattr(Resampling, resampling))
    facts = dict(crs=src.crs.to_wkt() if src.crs else "", transform=tuple(src.transform.to_gdal()))
  return data, facts


class _Reject(Exception):
  def __init__(self, reason: str, detail: str = ""):
    super().__init__(detail)
    self.reason, self.detail = reason, detail


def read_timestamp(folder: pathlib.Path, bands, size: int, resampling: str):
  """A timestamp folder -> ([size, size, C] uint16, facts of the 10 m band B2). Raises _Reject."""
  import rasterio
  planes, facts = [], None
  for band in bands:
    path = folder / f"{band}.tif"
    if not path.exists():
      raise _Reject("missing_band", f"{band}.tif is absent")
    try:
      data, band_facts = read_band(path, size, resampling)
    except _Reject:
      raise
    except (rasterio.errors.RasterioError, OSError) as e:
      raise _Reject("unreadable", f"{band}.tif: {type(e).__name__}: {e}"[:300]) from e
    planes.append(data)
    if band == "B2":
      facts = band_facts
  return np.stack(planes, axis=-1), facts


def read_location(root: pathlib.Path, product: str, loc: str, timestamps: list[str], size: int,
                  resampling: str, max_nodata: float):
  """Validates a location's timestamps; returns (record or None, rejected, flagged, bytes read)."""
  import rasterio
  warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)
  sensor, bands = product_info(product)
  rejected, flagged, kept, seen, nbytes = [], [], [], {}, 0
  for ts in timestamps:
    rel = f"{product}/{loc}/{ts}"
    folder = root / rel

    def reject(reason, detail=""):
      rejected.append(dict(path=rel, location_id=loc, timestamp=ts, reason=reason, detail=detail))

    nbytes += sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    try:
      pixels, facts = read_timestamp(folder, bands, size, resampling)
    except _Reject as e:
      reject(e.reason, e.detail)
      continue
    invalid = (pixels == NODATA).all(axis=-1)
    fraction = float(invalid.mean())
    if fraction == 1.0:
      reject("all_nodata")
      continue
    if fraction > max_nodata:
      reject("nodata_above_threshold", f"nodata fraction {fraction:.4f} > {max_nodata}")
      continue
    digest = hashlib.sha256(pixels.tobytes()).hexdigest()
    if digest in seen:
      reject("duplicate", f"identical pixels to {product}/{loc}/{seen[digest]}")
      continue
    seen[digest] = ts
    if fraction > 0:
      flagged.append(dict(path=rel, location_id=loc, timestamp=ts, reason="partial_nodata",
                          nodata_fraction=fraction))
    kept.append(dict(timestamp=ts, pixels=pixels, fraction=fraction, **facts))
  if not kept:
    return None, rejected, flagged, nbytes
  record = records.LocationRecord(
      location_id=loc, timestamps=[k["timestamp"] for k in kept],
      arrays={"pixels": np.stack([k["pixels"] for k in kept])}, sensor=sensor,
      wavelengths=sensors.sentinel2_wavelengths(bands).astype(np.float32), crs=kept[0]["crs"],
      transform=kept[0]["transform"], nodata=NODATA,
      nodata_fraction=np.array([k["fraction"] for k in kept], np.float32),
      extra={"product": product, "bands": list(bands), "resampling": resampling})
  return record, rejected, flagged, nbytes


# --- one shard (runs in a worker) ----------------------------------------------------------------

def convert_shard(task: dict) -> dict:
  """Writes one shard (temp name -> rename -> done marker) and returns its summary."""
  from array_record.python.array_record_module import ArrayRecordWriter
  out, work = pathlib.Path(task["output"]), pathlib.Path(task["output"]) / se.WORK_DIR
  tmp = work / f"{task['filename']}.{os.getpid()}.tmp"
  writer_options, pixel_codec = se.storage_options(task["compression"])
  writer = ArrayRecordWriter(str(tmp), writer_options)
  summary = dict(filename=task["filename"], split=task["split"], index=task["index"], records=0,
                 converted_files=0, rejected=[], flagged=[], empty_locations=[], input_bytes=0)
  for loc, timestamps in task["locations"]:
    record, rejected, flagged, nbytes = read_location(
        pathlib.Path(task["input"]), task["product"], loc, timestamps, task["size"], task["resampling"],
        task["max_nodata"])
    summary["rejected"] += rejected
    summary["flagged"] += flagged
    summary["input_bytes"] += nbytes
    if record is None:
      summary["empty_locations"].append(loc)
    else:
      writer.write(records.encode(record, pixel_codec))
      summary["records"] += 1
      summary["converted_files"] += record.num_timestamps
    shard_pool.report(len(timestamps), nbytes)
  writer.close()
  os.replace(tmp, out / task["filename"])
  summary["num_bytes"] = (out / task["filename"]).stat().st_size
  dataset_dir._atomic_write_json(work / (task["filename"] + ".done.json"), summary)
  return summary


def _run_tasks(tasks, workers, progress):
  return shard_pool.run(tasks, convert_shard, workers, progress,
                        total=sum(len(ts) for t in tasks for _, ts in t["locations"]), unit="timestamp")


# --- the whole conversion ------------------------------------------------------------------------

def convert(input_root, output, product="s2c", size=264, resampling="bilinear", shards=16, workers=2,
            val_fraction=0.05, compression=se.DEFAULT_COMPRESSION, max_nodata=0.5, name=None, stats=True,
            overwrite=False, progress=True) -> dict:
  """Runs (or resumes) a conversion; returns the report (also written to DIR/report.json)."""
  sensor, bands = product_info(product)
  if resampling not in RESAMPLING:
    raise ValueError(f"--resampling {resampling!r}: valid are {RESAMPLING}")
  if size % 6:
    raise ValueError(f"--size {size} must be a multiple of 6 (the 60 m bands are size/6 pixels)")
  if not se._COMPRESSION.match(compression):
    raise ValueError(f"--compression {compression!r}: valid are {se.COMPRESSION_HELP}")
  if shards < 1 or workers < 1:
    raise ValueError(f"--shards ({shards}) and --workers ({workers}) must be >= 1")
  if not 0 <= val_fraction < 1:
    raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
  if not 0 <= max_nodata <= 1:
    raise ValueError(f"--max-nodata must be in [0, 1], got {max_nodata}")
  name = name or f"ssl4eo_s12_{sensor.split('_')[1]}"
  root, out = pathlib.Path(input_root), pathlib.Path(output)
  work = out / se.WORK_DIR
  if overwrite and out.exists():
    shutil.rmtree(out)
  work.mkdir(parents=True, exist_ok=True)
  locations = find_locations(root, product)
  settings = dict(input=str(root.resolve()), product=product, size=size, resampling=resampling, shards=shards,
                  val_fraction=val_fraction, compression=compression, max_nodata=max_nodata, name=name,
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
  plan = se.plan_shards(locations, shards, val_fraction)
  counts = {s: sum(1 for (split, _) in plan if split == s) for s in se.SPLITS}
  tasks, summaries = [], []
  for (split, index), locs in sorted(plan.items()):
    filename = dataset_dir.shard_filename(name, split, index, counts[split])
    done = work / (filename + ".done.json")
    if done.exists() and (out / filename).exists():
      summaries.append(json.loads(done.read_text()))
      continue
    tasks.append(dict(input=str(root), output=str(out), product=product, split=split, index=index,
                      filename=filename, locations=locs, size=size, resampling=resampling,
                      max_nodata=max_nodata, compression=compression))
  tasks.sort(key=lambda t: -sum(len(ts) for _, ts in t["locations"]))
  summaries += _run_tasks(tasks, workers, progress)
  report = _finalise(out, name, sensor, bands, locations, summaries, counts, settings)
  for leftover in work.glob("*.tmp"):
    leftover.unlink(missing_ok=True)
  if stats and report["splits"]["train"]["records"]:
    from data_prep import stats as stats_lib
    stats_lib.compute_and_save(out, workers=workers, progress=progress)
  return report


def _finalise(out, name, sensor, bands, locations, summaries, counts, settings):
  summaries = sorted(summaries, key=lambda s: (s["split"], s["index"]))
  rejected = sorted((r for s in summaries for r in s["rejected"]), key=lambda r: r["path"])
  flagged = sorted((r for s in summaries for r in s["flagged"]), key=lambda r: r["path"])
  by_reason = {}
  for r in rejected:
    by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
  inputs = sum(len(ts) for _, ts in locations)
  converted = sum(s["converted_files"] for s in summaries)
  shard_lengths = {s: [0] * counts[s] for s in se.SPLITS}
  shard_bytes = {s: 0 for s in se.SPLITS}
  for s in summaries:
    shard_lengths[s["split"]][s["index"]] = s["records"]
    shard_bytes[s["split"]] += s["num_bytes"]
  report = dict(
      inputs=dict(timestamps=inputs, locations=len(locations)),
      converted=dict(timestamps=converted, records=sum(s["records"] for s in summaries)),
      rejected=dict(timestamps=len(rejected), by_reason=by_reason),
      locations_without_record=sorted(l for s in summaries for l in s["empty_locations"]),
      flagged=dict(partial_nodata=len(flagged)),
      consistent=converted + len(rejected) == inputs,
      splits={s: dict(records=sum(shard_lengths[s]), shards=counts[s], bytes=shard_bytes[s]) for s in se.SPLITS},
      settings=settings, rejected_timestamps=rejected, flagged_timestamps=flagged)
  if not report["consistent"]:
    raise RuntimeError(f"converted {converted} + rejected {len(rejected)} != {inputs} inputs; "
                       f"the output in {out} is incomplete")
  size = settings["size"]
  fmjax_info = dict(sensor=sensor, num_bands=len(bands), bands=list(bands),
                    wavelengths=[round(float(v), 3) for v in sensors.sentinel2_wavelengths(bands)],
                    nodata=NODATA, patch_size=size, resampling=settings["resampling"],
                    compression=settings["compression"], source="data_prep.ssl4eo_s12")
  arrays = {"pixels": ((None, size, size, len(bands)), "uint16")}
  if report["converted"]["records"]:
    dataset_dir.write_tfds_metadata(out, name, shard_lengths, shard_bytes, arrays, fmjax_info,
                                    description="SSL4EO-S12 Sentinel-2 seasons on the 10 m grid, one record "
                                                "per location.")
  dataset_dir._atomic_write_json(out / "report.json", report)
  return report


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--input", required=True, help="archive root holding <product>/<id>/<ts>/<band>.tif")
  parser.add_argument("--output", required=True, help="dataset directory to write")
  parser.add_argument("--product", default="s2c", choices=sorted(PRODUCTS), help="s2c = L1C 13 bands, s2a = L2A 12")
  parser.add_argument("--size", type=int, default=264, help="10 m grid size in pixels")
  parser.add_argument("--resampling", default="bilinear", choices=RESAMPLING, help="20 m / 60 m -> 10 m")
  parser.add_argument("--shards", type=int, default=16)
  parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
  parser.add_argument("--val-fraction", type=float, default=0.05)
  parser.add_argument("--compression", default=se.DEFAULT_COMPRESSION, help=se.COMPRESSION_HELP)
  parser.add_argument("--max-nodata", type=float, default=0.5)
  parser.add_argument("--name", default=None, help="TFDS dataset name (default ssl4eo_s12_l1c / _l2a)")
  parser.add_argument("--stats", action=argparse.BooleanOptionalAction, default=True,
                      help="compute DIR/band_stats.json at the end (data_prep.stats)")
  parser.add_argument("--overwrite", action="store_true", help="delete DIR first instead of resuming")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  report = convert(args.input, args.output, args.product, args.size, args.resampling, args.shards,
                   args.workers, args.val_fraction, args.compression, args.max_nodata, args.name,
                   args.stats, args.overwrite)
  print(f"{report['converted']['records']} records from {report['converted']['timestamps']} timestamps; "
        f"rejected {report['rejected']['timestamps']} {report['rejected']['by_reason']}; "
        f"flagged {report['flagged']['partial_nodata']} partial-nodata; "
        f"{time.perf_counter() - start:.1f} s -> {args.output}")


if __name__ == "__main__":
  main()
