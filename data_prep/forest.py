"""Forest monitoring (SSL4EO-EU-Forests style): Sentinel-2 seasons + tree-cover masks -> downstream dataset.

    python -m data_prep.forest --s2 ROOT --masks MASKS --output DIR [--product s2c|s2a] [--season all]
        [--size 264] [--resampling bilinear] [--val-fraction 0.1] [--test-fraction 0.2] [--workers 2]

Inputs: ROOT/<product>/<id>/<timestamp>/<band>.tif (the SSL4EO-S12 layout, read exactly as
data_prep.ssl4eo_s12 reads it: every band on the 10 m grid) and MASKS/<id>/mask.tif (uint8 on the
same 10 m grid: 1 tree, 0 other, any other value = unlabelled) with an optional MASKS/<id>/density.tif
(tree-cover density in percent, 0-100).

--season picks which timestamps become samples: 'all' (one sample per good season; a location's
seasons always share a split), a season name (spring/summer/autumn/winter, from the month of the
timestamp: MAM/JJA/SON/DJF; the location is skipped when it has none) or a 0-based index into the
location's sorted timestamps.

Output: the downstream format fmjax.evaluate reads (see data_prep/downstream.py):
  DIR/forest-<split>.array_record-*   records: 'pixels' [1, H, W, C] uint16, 'mask' [H, W] uint8
      (0 other, 1 tree, 255 ignored: unlabelled or S2 nodata), 'density' [H, W] uint8 when present
  DIR/downstream.json   task 'forest', segmentation, 2 classes, ignore 255, train band mean/std,
                        'has_density'
  DIR/report.json       kept/rejected per split with reasons
Splits come from a SHA-256 hash of the location id (stable whatever else is in the archive).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import pathlib

import numpy as np
import tqdm

from data_prep import ssl4eo_s12
from data_prep.downstream import _ShardedWriter
from fmjax.data import records

SPLITS = ("train", "val", "test")
IGNORE = 255
CLASS_NAMES = ("other", "tree")
SEASONS = {"spring": (3, 4, 5), "summer": (6, 7, 8), "autumn": (9, 10, 11), "winter": (12, 1, 2)}


def split_of(location_id: str, val_fraction: float, test_fraction: float) -> str:
  u = int.from_bytes(hashlib.sha256(f"forest:{location_id}".encode()).digest()[:8], "big") / 2.0**64
  return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def season_of(timestamp: str) -> str:
  """Season name from a timestamp folder starting with YYYYMMDD."""
  month = int(timestamp[4:6])
  return next(name for name, months in SEASONS.items() if month in months)


def choose_timestamps(timestamps: list[str], season: str) -> list[str]:
  if season == "all":
    return list(timestamps)
  if season in SEASONS:
    return [t for t in timestamps if season_of(t) == season][:1]
  if season.isdigit():
    index = int(season)
    return [timestamps[index]] if index < len(timestamps) else []
  raise ValueError(f"--season {season!r}: valid are 'all', {sorted(SEASONS)} or a timestamp index")


class _Rejected(Exception):
  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason


def _read_single(path: pathlib.Path) -> np.ndarray:
  import rasterio
  with rasterio.open(path) as src:
    return src.read(1)


def convert_location(s2_root: pathlib.Path, masks: pathlib.Path, product: str, loc: str, timestamps: list[str],
                     season: str, size: int, resampling: str) -> tuple[list[records.LocationRecord], list]:
  """(records, rejected timestamps) of one location. Raises _Rejected for location-level problems."""
  mask_path = masks / loc / "mask.tif"
  if not mask_path.exists():
    raise _Rejected("missing_mask", str(mask_path))
  mask = _read_single(mask_path)
  if mask.shape != (size, size):
    raise _Rejected("mask_size", f"{loc}: mask {mask.shape}, expected ({size}, {size}) on the 10 m grid")
  density_path = masks / loc / "density.tif"
  density = _read_single(density_path) if density_path.exists() else None
  chosen = choose_timestamps(timestamps, season)
  if not chosen:
    raise _Rejected("no_timestamp_for_season", f"{loc}: season {season} not among {timestamps}")
  record, rejected, _, _ = ssl4eo_s12.read_location(s2_root, product, loc, chosen, size, resampling, max_nodata=0.5)
  if record is None:
    raise _Rejected("no_valid_timestamp", f"{loc}: " + "; ".join(f"{r['timestamp']} {r['reason']}" for r in rejected))
  label = np.where(mask <= 1, mask, IGNORE).astype(np.uint8)
  out = []
  for t, ts in enumerate(record.timestamps):
    pixels = record.pixels[t]
    arrays = {"pixels": np.ascontiguousarray(pixels[None]),
              "mask": np.where((pixels == ssl4eo_s12.NODATA).all(-1), IGNORE, label).astype(np.uint8)}
    if density is not None:
      arrays["density"] = np.clip(density, 0, 100).astype(np.uint8)
    out.append(records.LocationRecord(
        location_id=loc, timestamps=[ts], arrays=arrays, sensor=record.sensor, wavelengths=record.wavelengths,
        crs=record.crs, transform=record.transform, nodata=record.nodata,
        extra={"task": "forest", "sample": f"{loc}/{ts}", "season": season_of(ts)}))
  return out, rejected


def convert(s2_root, masks, output, product="s2c", season="all", size=264, resampling="bilinear",
            val_fraction=0.1, test_fraction=0.2, workers=2, per_shard=256, options="group_size:1",
            progress=True) -> dict:
  """Writes the downstream dataset; returns the report (also DIR/report.json)."""
  _, bands = ssl4eo_s12.product_info(product)
  if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
    raise ValueError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be in [0, 1) "
                     f"and leave a training split")
  choose_timestamps(["20200101"], season)  # validates --season before any work
  s2_root, masks, out = pathlib.Path(s2_root), pathlib.Path(masks), pathlib.Path(output)
  if not masks.is_dir():
    raise FileNotFoundError(f"--masks {masks} does not exist (expected MASKS/<id>/mask.tif)")
  out.mkdir(parents=True, exist_ok=True)
  locations = ssl4eo_s12.find_locations(s2_root, product)
  by_split = {s: [l for l in locations if split_of(l[0], val_fraction, test_fraction) == s] for s in SPLITS}
  report = {"task": "forest", "s2": str(s2_root), "masks": str(masks), "season": season, "splits": {},
            "rejected": {}}
  num_bands = len(bands)
  moments = np.zeros((3, num_bands), np.float64)  # count, sum, sum of squares (train, valid pixels)
  has_density = False
  for split in SPLITS:
    writer = _ShardedWriter(str(out / f"forest-{split}"), per_shard, options)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # GDAL releases the GIL
      futures = [pool.submit(convert_location, s2_root, masks, product, loc, ts, season, size, resampling)
                 for loc, ts in by_split[split]]
      for (loc, _), future in tqdm.tqdm(list(zip(by_split[split], futures)), desc=f"forest/{split}",
                                        unit="location", disable=not progress):
        try:
          recs, rejected = future.result()
        except _Rejected as e:
          entry = report["rejected"].setdefault(e.reason, {"count": 0, "examples": []})
          entry["count"] += 1
          entry["examples"] = (entry["examples"] + [str(e)])[:20]
          continue
        for r in rejected:
          entry = report["rejected"].setdefault(f"timestamp_{r['reason']}", {"count": 0, "examples": []})
          entry["count"] += 1
          entry["examples"] = (entry["examples"] + [r["path"]])[:20]
        for rec in recs:
          has_density |= "density" in rec.arrays
          if split == "train":
            pixels = rec.pixels[0].reshape(-1, num_bands).astype(np.float64)
            valid = ~(pixels == ssl4eo_s12.NODATA).all(-1)
            moments += [np.full(num_bands, valid.sum()), pixels[valid].sum(0), (pixels[valid] ** 2).sum(0)]
          writer.write(records.encode(rec))
    paths = writer.close()
    report["splits"][split] = {"kept": writer.count, "locations": len(by_split[split]), "shards": len(paths)}
  if report["splits"]["train"]["kept"] == 0:
    raise ValueError(f"no training sample was written (rejected: {report['rejected']}); check --s2/--masks")
  mean = moments[1] / np.maximum(moments[0], 1)
  std = np.sqrt(np.maximum(moments[2] / np.maximum(moments[0], 1) - mean ** 2, 0))
  info = {"format": "fmjax-downstream-v1", "task": "forest", "type": "segmentation", "num_classes": 2,
          "class_names": list(CLASS_NAMES), "ignore_index": IGNORE, "num_bands": num_bands,
          "sensor": ssl4eo_s12.product_info(product)[0], "bands": list(bands), "label_key": "mask",
          "has_density": has_density, "season": season, "image_size": size,
          "splits": {s: v["kept"] for s, v in report["splits"].items()},
          "band_mean": mean.tolist(), "band_std": np.where(std > 0, std, 1.0).tolist()}
  (out / "downstream.json").write_text(json.dumps(info, indent=1))
  (out / "report.json").write_text(json.dumps(report, indent=1))
  return report


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--s2", required=True, help="SSL4EO-S12 root holding <product>/<id>/<ts>/<band>.tif")
  parser.add_argument("--masks", required=True, help="folder holding <id>/mask.tif [and density.tif]")
  parser.add_argument("--output", required=True)
  parser.add_argument("--product", default="s2c", choices=sorted(ssl4eo_s12.PRODUCTS))
  parser.add_argument("--season", default="all", help="all | spring | summer | autumn | winter | index")
  parser.add_argument("--size", type=int, default=264)
  parser.add_argument("--resampling", default="bilinear", choices=ssl4eo_s12.RESAMPLING)
  parser.add_argument("--val-fraction", type=float, default=0.1)
  parser.add_argument("--test-fraction", type=float, default=0.2)
  parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
  args = parser.parse_args(argv)
  report = convert(args.s2, args.masks, args.output, args.product, args.season, args.size, args.resampling,
                   args.val_fraction, args.test_fraction, args.workers)
  kept = ", ".join(f"{s} {v['kept']}" for s, v in report["splits"].items())
  rejected = {k: v["count"] for k, v in report["rejected"].items()}
  print(f"forest samples: {kept}; rejected: {rejected or 'none'} -> {args.output}")


if __name__ == "__main__":
  main()
