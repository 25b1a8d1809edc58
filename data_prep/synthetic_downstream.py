"""Downstream tasks derived from the synthetic archive's latent land cover (data_prep/synthetic.py).

The synthetic archive stores, per location, the land-cover map its pixels were mixed from
(ROOT/landcover/<id>.npy, classes in ROOT/landcover/classes.json). This module lays out two tasks
in the *official* downstream layout, so they go through data_prep/downstream.py like CORINE/CDL:

  OUT/raw/enmap/<id>/<ts>.tif          the location's first timestamp (symlink to the archive)
  OUT/raw/landcover_seg/<id>/<ts>.tif  land-cover codes 10, 20, ... (class k -> 10 (k + 1)); pixels
                                       where the image is nodata get code 0 (unknown -> ignored)
  OUT/raw/{train,val,test}.txt         random split of the locations (seed)
and converts them to
  OUT/synthetic_seg   segmentation, K classes (+ ignore index K)
  OUT/synthetic_cls   multi-label: a class is present when it covers >= min_fraction of the patch

    python -m data_prep.synthetic_downstream --archive ROOT --out OUT [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import rasterio
from tqdm import tqdm

from data_prep import downstream

SEG_PRODUCT = "landcover_seg"
SEG_NAME, CLS_NAME = "synthetic_seg", "synthetic_cls"


def landcover_classes(archive: str) -> list[str]:
  path = os.path.join(archive, "landcover", "classes.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{archive} has no landcover/classes.json: not a synthetic archive "
                            f"(write one with `python -m data_prep.synthetic --output {archive}`)")
  with open(path) as f:
    return list(json.load(f))


def _first_good_image(folder: str) -> str | None:
  """The earliest timestamp file that rasterio can read (defect files are skipped)."""
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".tif"):
      continue
    try:
      with rasterio.open(os.path.join(folder, name)) as src:
        src.read(1, window=((0, 1), (0, 1)))
      return name
    except Exception:  # truncated / not a GeoTIFF: try the next timestamp
      continue
  return None


def layout(archive: str, raw: str, seed: int = 0, fractions=(0.6, 0.2, 0.2)) -> dict[str, list[str]]:
  """Writes the official layout under `raw`; returns the split lists."""
  classes = landcover_classes(archive)
  ids = sorted(f[:-4] for f in os.listdir(os.path.join(archive, "landcover")) if f.endswith(".npy"))
  samples = []
  for loc in tqdm(ids, desc="synthetic downstream", unit="loc"):
    folder = os.path.join(archive, "enmap", loc)
    name = _first_good_image(folder) if os.path.isdir(folder) else None
    if name is None:
      continue
    sample = f"{loc}/{name}"
    image_path = os.path.join(archive, "enmap", sample)
    cover = np.load(os.path.join(archive, "landcover", f"{loc}.npy"))
    if cover.max() >= len(classes):
      raise ValueError(f"landcover/{loc}.npy has class {cover.max()} but classes.json lists {len(classes)}")
    with rasterio.open(image_path) as src:
      profile = dict(driver="GTiff", width=src.width, height=src.height, count=1, dtype="uint8",
                     crs=src.crs, transform=src.transform)
      nodata = np.all(src.read() == src.nodata, axis=0) if src.nodata is not None else False
    codes = np.where(nodata, 0, (cover.astype(np.int64) + 1) * 10).astype(np.uint8)
    for product in ("enmap", SEG_PRODUCT):
      os.makedirs(os.path.join(raw, product, loc), exist_ok=True)
    link = os.path.join(raw, "enmap", sample)
    if not os.path.lexists(link):
      os.symlink(os.path.abspath(image_path), link)
    with rasterio.open(os.path.join(raw, SEG_PRODUCT, sample), "w", **profile) as dst:
      dst.write(codes[None])
    samples.append(sample)
  rng = np.random.default_rng(seed)
  order = [samples[i] for i in rng.permutation(len(samples))]
  n_train = int(round(fractions[0] * len(order)))
  n_val = int(round(fractions[1] * len(order)))
  splits = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
  for split, names in splits.items():
    if not names:
      raise ValueError(f"{len(samples)} usable locations leave split {split!r} empty; use more locations")
    with open(os.path.join(raw, f"{split}.txt"), "w") as f:
      f.write("\n".join(sorted(names)) + "\n")
  return splits


def build(archive: str, out: str, seed: int = 0, min_fraction: float = 0.05, workers: int = 4) -> dict:
  """Lays out and converts both tasks; returns {task name: dataset directory}."""
  classes = landcover_classes(archive)
  raw = os.path.join(out, "raw")
  splits = layout(archive, raw, seed)
  with rasterio.open(os.path.join(raw, "enmap", splits["train"][0])) as src:
    bands, size = src.count, src.height
  codes = [10 * (k + 1) for k in range(len(classes))]
  common = dict(product=SEG_PRODUCT, codes=codes, num_bands=bands, class_names=classes)
  seg = downstream.task_spec("generic", task_type="segmentation", **common)
  cls = downstream.task_spec("generic", task_type="multilabel", **common)
  seg = downstream.dataclasses.replace(seg, name=SEG_NAME, known_background=(0,))
  cls = downstream.dataclasses.replace(cls, name=CLS_NAME, known_background=(0,))
  dirs = {}
  for spec, min_pixels in ((seg, 1), (cls, max(1, int(round(min_fraction * size * size))))):
    directory = os.path.join(out, spec.name)
    report = downstream.convert(raw, directory, spec, workers=workers, min_pixels=min_pixels)
    print(downstream.format_report(report))
    dirs[spec.name] = directory
  return dirs


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--archive", required=True, help="root written by data_prep.synthetic")
  p.add_argument("--out", required=True)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--min_fraction", type=float, default=0.05,
                 help="multi-label: a class counts as present above this fraction of the patch")
  args = p.parse_args(argv)
  for name, directory in build(args.archive, args.out, args.seed, args.min_fraction).items():
    print(f"{name}: {directory}")


if __name__ == "__main__":
  main()
