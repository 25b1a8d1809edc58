"""Downstream tasks (official SpectralEarth layout) -> ArrayRecord datasets fmjax.evaluate reads.

Input layout (as distributed by SpectralEarth):
  <root>/enmap/<sample>            image GeoTIFF, C bands (202 EnMAP; 235 DESIS; 198 EO-1), int16
  <root>/<product>/<sample>        label raster of the same height/width (CLC / CDL / NLCD codes)
  <root>/{train,val,test}.txt      one sample per line, e.g. `0287155/07676.tif`
                                   (also accepted: `<root>/splits/<split>.txt`, names without .tif)
Output (a TFDS-style directory read by fmjax.data.sources):
  <out>/<task>-<split>.array_record-0000i-of-0000n   fmjax records: 'pixels' [1,H,W,C] int16 plus
      'multi_hot' [K] uint8 (multi-label) or 'mask' [H,W] uint8/int16 (segmentation; ignore_index
      where the source code is not one of the task's codes)
  <out>/downstream.json   task description, class names, split sizes, train-split band mean/std
  <out>/report.json       rejected samples by reason, unknown label codes with pixel counts

Usage:
  python -m data_prep.downstream --task=cdl --root=/data/enmap_cdl --out=/data/fmjax/cdl
  python -m data_prep.downstream --task=generic --type=segmentation --product=eurocrops \
      --codes=10,20,30 --root=... --out=...
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from typing import Sequence

import numpy as np
from tqdm import tqdm

from fmjax.data import records

SPLITS = ("train", "val", "test")

# ---------------------------------------------------------------------------- label tables

# CORINE Land Cover level-3 codes in the standard order (44 classes).
CLC_CODES = (111, 112, 121, 122, 123, 124, 131, 132, 133, 141, 142, 211, 212, 213, 221, 222, 223,
             231, 241, 242, 243, 244, 311, 312, 313, 321, 322, 323, 324, 331, 332, 333, 334, 335,
             411, 412, 421, 422, 423, 511, 512, 521, 522, 523)
# BigEarthNet's 43 classes are CLC level 3 without 335 (glaciers and perpetual snow).
BEN43_CODES = tuple(c for c in CLC_CODES if c != 335)
# BigEarthNet 19-class nomenclature (Sumbul et al. 2020): CLC code -> 19-class index. Codes not
# listed (122-142 built-up details, 332 bare rock, 334 burnt areas, 423 intertidal flats) drop out.
BEN19_NAMES = ("Urban fabric", "Industrial or commercial units", "Arable land", "Permanent crops",
               "Pastures", "Complex cultivation patterns",
               "Land principally occupied by agriculture, with significant areas of natural vegetation",
               "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
               "Natural grassland and sparsely vegetated areas",
               "Moors, heathland and sclerophyllous vegetation", "Transitional woodland, shrub",
               "Beaches, dunes, sands", "Inland wetlands", "Coastal wetlands", "Inland waters",
               "Marine waters")
CLC_TO_BEN19 = {111: 0, 112: 0, 121: 1, 211: 2, 212: 2, 213: 2, 221: 3, 222: 3, 223: 3, 241: 3,
                231: 4, 242: 5, 243: 6, 244: 7, 311: 8, 312: 9, 313: 10, 321: 11, 333: 11, 322: 12,
                323: 12, 324: 13, 331: 14, 411: 15, 412: 15, 421: 16, 422: 16, 511: 17, 512: 17,
                521: 18, 522: 18, 523: 18}
# CLC rasters may store GRID_CODE 1..44 (the position in CLC_CODES, 1-based) instead of the code.
CLC_GRID_TO_CODE = {i + 1: c for i, c in enumerate(CLC_CODES)}

CDL_CODES = (1, 2, 3, 4, 5, 6, 45, 54, 69, 72, 75, 76, 204, 210)
NLCD_CODES = (11, 21, 22, 23, 24, 31, 41, 42, 43, 52, 71, 81, 82, 90, 95)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """How one downstream task's label rasters become targets."""
  name: str
  type: str                         # 'multilabel' | 'segmentation'
  product: str                      # label directory under the root
  code_to_class: dict[int, int]     # source code -> class index; other codes are 'unknown'
  class_names: tuple[str, ...]
  ignore_index: int | None = None   # segmentation: value written where the code is unknown
  known_background: tuple[int, ...] = ()  # codes that are expected and silently ignored
  num_bands: int = 202
  sensor: str = "enmap"
  grid_codes: bool = False          # CORINE: raster holds CLC GRID_CODE 1..44

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def _codes_task(name, codes, product=None, task_type="segmentation", names=None, **kw) -> TaskSpec:
  codes = tuple(int(c) for c in codes)
  if len(set(codes)) != len(codes):
    raise ValueError(f"task {name}: duplicate codes in {codes}")
  names = tuple(names) if names else tuple(f"code_{c}" for c in codes)
  ignore = len(codes) if task_type == "segmentation" else None
  return TaskSpec(name=name, type=task_type, product=product or name,
                  code_to_class={c: i for i, c in enumerate(codes)}, class_names=names,
                  ignore_index=ignore, **kw)


def task_spec(task: str, *, product: str | None = None, codes: Sequence[int] | None = None,
              task_type: str = "segmentation", num_bands: int = 202, sensor: str = "enmap",
              grid_codes: bool = False, class_names: Sequence[str] | None = None) -> TaskSpec:
  """Built-in tasks: corine (19 classes), corine43, cdl, nlcd; 'generic' takes `codes`.

  EuroCrops, BDForet, TreeMap, BNETD and other products are 'generic' with their code list
  (in class order); DESIS-CDL / EO1-CDL are 'cdl' with num_bands=235 / 198.
  """
  common = dict(num_bands=num_bands, sensor=sensor)
  if task == "corine":
    return TaskSpec("corine", "multilabel", product or "corine", dict(CLC_TO_BEN19), BEN19_NAMES,
                    grid_codes=grid_codes, known_background=(335,), **common)
  if task == "corine43":
    return TaskSpec("corine43", "multilabel", product or "corine",
                    {c: i for i, c in enumerate(BEN43_CODES)}, tuple(f"clc_{c}" for c in BEN43_CODES),
                    grid_codes=grid_codes, known_background=(335,), **common)
  if task == "cdl":
    return _codes_task("cdl", CDL_CODES, product, **common)
  if task == "nlcd":
    return _codes_task("nlcd", NLCD_CODES, product, **common)
  if task == "generic":
    if not codes or not product:
      raise ValueError("task 'generic' needs --codes (source codes in class order) and --product "
                       "(the label directory name)")
    if task_type not in ("segmentation", "multilabel"):
      raise ValueError(f"type {task_type!r}; valid choices: 'segmentation', 'multilabel'")
    return _codes_task(product, codes, product, task_type, class_names, **common)
  raise ValueError(f"task {task!r} is not known; valid choices: corine, corine43, cdl, nlcd, generic")


# ---------------------------------------------------------------------------- one sample

class Rejected(Exception):
  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason


def map_codes(label: np.ndarray, spec: TaskSpec) -> tuple[np.ndarray, dict[int, int]]:
  """Source codes -> class indices. Returns (class map with -1 for unknown codes, unknown counts).

  Works on the unique values only (a few per patch), so it costs one np.unique per raster.
  """
  values, inverse = np.unique(label, return_inverse=True)
  if spec.grid_codes:
    codes = np.array([CLC_GRID_TO_CODE.get(int(v), -1000 - int(v)) for v in values])
  else:
    codes = values.astype(np.int64)
  classes = np.array([spec.code_to_class.get(int(c), -1) for c in codes], np.int64)
  unknown = {}
  for v, c, k in zip(values, codes, classes):
    if k < 0 and int(c) not in spec.known_background:
      unknown[int(v)] = int(np.count_nonzero(label == v))
  return classes[inverse].reshape(label.shape), unknown


def label_arrays(class_map: np.ndarray, spec: TaskSpec, min_pixels: int = 1) -> dict[str, np.ndarray]:
  if spec.type == "multilabel":
    counts = np.bincount(class_map[class_map >= 0].reshape(-1), minlength=spec.num_classes)
    return {"multi_hot": (counts >= min_pixels).astype(np.uint8)}
  dtype = np.uint8 if spec.num_classes < 255 else np.int16
  return {"mask": np.where(class_map >= 0, class_map, spec.ignore_index).astype(dtype)}


def _read(path: str):
  import rasterio
  with rasterio.open(path) as src:
    return src.read(), src.crs.to_wkt() if src.crs else "", tuple(src.transform)[:6], src.nodata


def convert_sample(root: str, sample: str, spec: TaskSpec, min_pixels: int = 1):
  """Reads one image + label pair -> (record, unknown code counts). Raises Rejected."""
  image_path = os.path.join(root, "enmap", sample)
  label_path = os.path.join(root, spec.product, sample)
  if not os.path.exists(image_path):
    raise Rejected("missing_image", image_path)
  if not os.path.exists(label_path):
    raise Rejected("missing_label", label_path)
  try:
    image, crs, transform, nodata = _read(image_path)
    label = _read(label_path)[0]
  except Exception as e:  # rasterio raises its own error types
    raise Rejected("unreadable", f"{sample}: {e}") from e
  if image.shape[0] != spec.num_bands:
    raise Rejected("band_count", f"{sample}: {image.shape[0]} bands, task expects {spec.num_bands}")
  if label.shape[1:] != image.shape[1:]:
    raise Rejected("size_mismatch", f"{sample}: image {image.shape[1:]} vs label {label.shape[1:]}")
  class_map, unknown = map_codes(label[0], spec)
  arrays = label_arrays(class_map, spec, min_pixels)
  if spec.type == "segmentation" and not np.any(arrays["mask"] != spec.ignore_index):
    raise Rejected("no_labelled_pixels", sample)
  arrays["pixels"] = np.ascontiguousarray(image.transpose(1, 2, 0)[None].astype(np.int16))
  location, _, timestamp = sample.rpartition("/")
  timestamp = os.path.splitext(timestamp)[0]
  record = records.LocationRecord(
      location_id=location or timestamp, timestamps=[timestamp], arrays=arrays, sensor=spec.sensor,
      crs=crs, transform=transform, nodata=int(-32768 if nodata is None else nodata),
      extra={"task": spec.name, "sample": sample})
  return record, unknown


# ---------------------------------------------------------------------------- whole dataset

def read_split(root: str, split: str) -> list[str]:
  for path in (os.path.join(root, f"{split}.txt"), os.path.join(root, "splits", f"{split}.txt")):
    if os.path.exists(path):
      with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
      return [n if os.path.splitext(n)[1] else n + ".tif" for n in names]
  raise FileNotFoundError(f"split file for {split!r} not found: looked for {root}/{split}.txt and "
                          f"{root}/splits/{split}.txt")


class _ShardedWriter:
  """Streams records into TFDS-named ArrayRecord shards of at most `per_shard` records."""

  def __init__(self, prefix: str, per_shard: int, options: str):
    self.prefix, self.per_shard, self.options = prefix, per_shard, options
    self.paths: list[str] = []
    self.count = 0
    self._writer = None

  def write(self, data: bytes):
    from array_record.python import array_record_module
    if self._writer is None or self.count % self.per_shard == 0:
      self._close_one()
      self.paths.append(f"{self.prefix}.array_record-tmp{len(self.paths):05d}")
      self._writer = array_record_module.ArrayRecordWriter(self.paths[-1], self.options)
    self._writer.write(data)
    self.count += 1

  def _close_one(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def close(self) -> list[str]:
    self._close_one()
    final = []
    for i, path in enumerate(self.paths):
      target = f"{self.prefix}.array_record-{i:05d}-of-{len(self.paths):05d}"
      os.replace(path, target)
      final.append(target)
    return final


def convert(root: str, out: str, spec: TaskSpec, splits: Sequence[str] = SPLITS, workers: int = 4,
            per_shard: int = 512, options: str = "group_size:1", min_pixels: int = 1,
            max_listed: int = 20) -> dict:
  """Converts every split; returns (and writes) the report. Band statistics come from 'train'."""
  os.makedirs(out, exist_ok=True)
  report = {"task": spec.name, "root": os.path.abspath(root), "splits": {}, "rejected": {},
            "unknown_codes": {}}
  band_sum = np.zeros(spec.num_bands, np.float64)
  band_sq = np.zeros(spec.num_bands, np.float64)
  band_n = np.zeros(spec.num_bands, np.float64)
  label_counts = np.zeros(spec.num_classes, np.int64)
  for split in splits:
    samples = read_split(root, split)
    writer = _ShardedWriter(os.path.join(out, f"{spec.name}-{split}"), per_shard, options)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # rasterio releases the GIL
      futures = [pool.submit(convert_sample, root, s, spec, min_pixels) for s in samples]
      for sample, future in tqdm(zip(samples, futures), total=len(samples), desc=f"{spec.name}/{split}"):
        try:
          record, unknown = future.result()
        except Rejected as e:
          entry = report["rejected"].setdefault(e.reason, {"count": 0, "examples": []})
          entry["count"] += 1
          if len(entry["examples"]) < max_listed:
            entry["examples"].append(str(e))
          continue
        for code, n in unknown.items():
          u = report["unknown_codes"].setdefault(str(code), {"pixels": 0, "samples": 0})
          u["pixels"] += n
          u["samples"] += 1
        if split == "train":
          pixels = record.pixels[0].reshape(-1, spec.num_bands).astype(np.float64)
          valid = pixels != record.nodata
          band_sum += np.where(valid, pixels, 0).sum(0)
          band_sq += np.where(valid, pixels ** 2, 0).sum(0)
          band_n += valid.sum(0)
          labels = record.arrays.get("multi_hot")
          if labels is None:
            m = record.arrays["mask"]
            labels = np.bincount(m[m != spec.ignore_index].astype(np.int64), minlength=spec.num_classes)
          label_counts += labels
        writer.write(records.encode(record))
    paths = writer.close()
    report["splits"][split] = {"kept": writer.count, "listed": len(samples), "shards": len(paths)}
  mean = band_sum / np.maximum(band_n, 1)
  std = np.sqrt(np.maximum(band_sq / np.maximum(band_n, 1) - mean ** 2, 0))
  info = {
      "format": "fmjax-downstream-v1", "task": spec.name, "type": spec.type,
      "num_classes": spec.num_classes, "class_names": list(spec.class_names),
      "ignore_index": spec.ignore_index, "num_bands": spec.num_bands, "sensor": spec.sensor,
      "label_key": "multi_hot" if spec.type == "multilabel" else "mask",
      "source_codes": {str(k): v for k, v in spec.code_to_class.items()},
      "splits": {s: v["kept"] for s, v in report["splits"].items()},
      "band_mean": mean.tolist(), "band_std": np.where(std > 0, std, 1.0).tolist(),
      "train_label_counts": label_counts.tolist(),
  }
  with open(os.path.join(out, "downstream.json"), "w") as f:
    json.dump(info, f, indent=1)
  with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  return report


def read_info(directory: str) -> dict:
  path = os.path.join(directory, "downstream.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} is not a downstream dataset (no downstream.json); "
                            f"build one with `python -m data_prep.downstream`")
  with open(path) as f:
    return json.load(f)


def format_report(report: dict) -> str:
  lines = [f"task {report['task']} from {report['root']}"]
  for split, s in report["splits"].items():
    lines.append(f"  {split}: kept {s['kept']} of {s['listed']} ({s['shards']} shards)")
  for reason, r in sorted(report["rejected"].items()):
    lines.append(f"  rejected {reason}: {r['count']} (e.g. {r['examples'][0]})")
  if report["unknown_codes"]:
    top = sorted(report["unknown_codes"].items(), key=lambda kv: -kv[1]["pixels"])[:10]
    lines.append("  unknown label codes (pixels, samples): " +
                 ", ".join(f"{c}: {u['pixels']}/{u['samples']}" for c, u in top))
  return "\n".join(lines)


def main(argv=None):
  import argparse
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--task", required=True, help="corine | corine43 | cdl | nlcd | generic")
  p.add_argument("--root", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--product", default=None, help="label directory name (default: the task name)")
  p.add_argument("--codes", default="", help="generic: comma-separated source codes in class order")
  p.add_argument("--type", default="segmentation", help="generic: segmentation | multilabel")
  p.add_argument("--num_bands", type=int, default=202, help="202 EnMAP, 235 DESIS, 198 EO-1")
  p.add_argument("--sensor", default="enmap")
  p.add_argument("--grid_codes", action="store_true", help="CORINE raster holds GRID_CODE 1..44")
  p.add_argument("--workers", type=int, default=4)
  p.add_argument("--per_shard", type=int, default=512)
  p.add_argument("--options", default="group_size:1", help="ArrayRecord writer options, e.g. group_size:1,zstd:3")
  args = p.parse_args(argv)
  codes = [int(c) for c in args.codes.split(",") if c.strip()]
  spec = task_spec(args.task, product=args.product, codes=codes, task_type=args.type,
                   num_bands=args.num_bands, sensor=args.sensor, grid_codes=args.grid_codes)
  report = convert(args.root, args.out, spec, workers=args.workers, per_shard=args.per_shard,
                   options=args.options)
  print(format_report(report))


if __name__ == "__main__":
  main()
