"""A small synthetic archive of EnMAP L2A spectral images for tests, benchmarks and demos.

  python -m data_prep.synthetic_tiles --output DIR [--size 300] [--rows 300] [--extra 0]

Tiles are named like real products, hold 224 int16 bands with nodata -32768, and sit near the
UTM 32/33 zone boundary (12 E, 48 N). The default archive has: two along-track tiles of one
datatake (a small overlap that is *not* a temporal pair), an overlapping tile with nodata
"clouds", a tile in the next UTM zone, a tile on a half-pixel-shifted grid that was processed
twice (the older version must be dropped), and an isolated tile. Every tile has nodata corners
from a tilted swath. Pixels are a smooth function of geographic position plus per-tile noise,
so misplaced pixels show. `--extra N` adds N more overlapping acquisitions (for benchmarks).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
from typing import Sequence

import numpy as np
import rasterio
import rasterio.warp
from tqdm import tqdm

NODATA = -32768
NUM_BANDS = 224
PIXEL = 30.0
ANCHOR_LONLAT = (11.95, 48.0)


def product_name(datatake: int, acquired: datetime.datetime, tile: int, version: str = "010110",
                 processed: datetime.datetime | None = None, cog: bool = False) -> str:
  processed = processed or datetime.datetime(2023, 2, 8, 20, 2, 19)
  return (f"ENMAP01-____L2A-DT{datatake:010d}_{acquired:%Y%m%dT%H%M%S}Z_{tile:03d}_V{version}_"
          f"{processed:%Y%m%dT%H%M%S}Z-SPECTRAL_IMAGE{'_COG' if cog else ''}.TIF")


def swath_mask(height: int, width: int, angle_deg: float = 8.0, half_width: float = 0.45,
               clouds: Sequence[tuple[float, float, float]] = ()) -> np.ndarray:
  """Valid pixels of a tilted swath (nodata corners) minus circular nodata 'clouds' given as
  (row, col, radius) fractions of the tile size."""
  rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
  theta = np.deg2rad(angle_deg)
  u = (cols - width / 2) * np.cos(theta) + (rows - height / 2) * np.sin(theta)
  valid = np.abs(u) <= half_width * width
  for r, c, radius in clouds:
    valid &= (rows - r * height) ** 2 + (cols - c * width) ** 2 > (radius * min(height, width)) ** 2
  return valid


def tile_pixels(crs: str, transform: rasterio.Affine, height: int, width: int, seed: int,
                offset: int = 0, bands: int = NUM_BANDS) -> np.ndarray:
  """[bands, H, W] int16 reflectance-like values: a smooth field of lon/lat (the same ground
  gives similar values in every tile and zone) plus per-tile noise."""
  cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
  xs, ys = transform @ (cols.ravel(), rows.ravel())
  lon, lat = rasterio.warp.transform(crs, "EPSG:4326", xs, ys)
  lon = np.asarray(lon).reshape(height, width)
  lat = np.asarray(lat).reshape(height, width)
  field = 1500 + 700 * np.sin(lon * 400.0) * np.cos(lat * 300.0)
  rng = np.random.default_rng(seed)
  scale = 1.0 + 0.5 * np.arange(bands, dtype=np.float32)[:, None, None] / bands
  data = field[None].astype(np.float32) * scale + 5 * np.arange(bands)[:, None, None] + offset
  data += rng.integers(-40, 41, size=data.shape)
  return np.clip(data, 0, 10000).astype(np.int16)


@dataclasses.dataclass
class TileSpec:
  path: str
  datatake: int
  acquired: datetime.datetime
  tile: int
  crs: str
  transform: rasterio.Affine
  valid: np.ndarray  # [H, W] bool


def write_tile(directory: str, *, datatake: int, acquired: datetime.datetime, tile: int, crs: str,
               transform: rasterio.Affine, height: int, width: int, valid: np.ndarray | None = None,
               version: str = "010110", processed: datetime.datetime | None = None,
               seed: int = 0, offset: int = 0, bands: int = NUM_BANDS,
               dtype: str = "int16") -> TileSpec:
  """Writes one spectral image in a product folder, like the real archive's layout."""
  name = product_name(datatake, acquired, tile, version, processed)
  folder = os.path.join(directory, name.split("-SPECTRAL_IMAGE")[0])
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, name)
  data = tile_pixels(crs, transform, height, width, seed, offset, bands)
  valid = np.ones((height, width), bool) if valid is None else valid
  data[:, ~valid] = NODATA
  if dtype != "int16":  # float products: NaN marks nodata
    data = data.astype(dtype)
    data[:, ~valid] = np.nan
  with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=bands,
                     dtype=dtype, crs=crs, transform=transform,
                     nodata=NODATA if dtype == "int16" else np.nan, interleave="band") as out:
    out.write(data)
  return TileSpec(path, datatake, acquired, tile, crs, transform, valid)


def utm_origin(crs: str, lonlat=ANCHOR_LONLAT) -> tuple[float, float]:
  """The anchor's coordinates in `crs`, snapped to the 30 m grid."""
  xs, ys = rasterio.warp.transform("EPSG:4326", crs, [lonlat[0]], [lonlat[1]])
  return round(xs[0] / PIXEL) * PIXEL, round(ys[0] / PIXEL) * PIXEL


def make_archive(directory: str, size: int = 300, rows: int | None = None, extra: int = 0,
                 progress: bool = False, anchor_lonlat=ANCHOR_LONLAT,
                 datatake_base: int = 0) -> list[TileSpec]:
  """The default archive (see the module docstring); returns what was written. Several calls
  with distant anchors and different `datatake_base` make an archive of separate clusters."""
  rows = rows or size
  z32, z33 = "EPSG:32632", "EPSG:32633"
  x32, y32 = utm_origin(z32, anchor_lonlat)
  x33, y33 = utm_origin(z33, anchor_lonlat)
  t0 = datetime.datetime(2022, 6, 1, 10, 30, 0)

  def at(crs, dx, dy, shift=0.0):  # offsets in tile sizes, +dy is south
    x0, y0 = (x32, y32) if crs == z32 else (x33, y33)
    return rasterio.Affine(PIXEL, 0, x0 + round(dx * size) * PIXEL + shift, 0, -PIXEL,
                           y0 - round(dy * rows) * PIXEL)

  clouds = [(0.3, 0.6, 0.08), (0.7, 0.4, 0.05)]
  plan = [
      dict(datatake=1001, acquired=t0, tile=1, crs=z32, transform=at(z32, 0, 0)),
      dict(datatake=1001, acquired=t0 + datetime.timedelta(seconds=4), tile=2, crs=z32,
           transform=at(z32, 0, 0.9)),
      dict(datatake=1002, acquired=datetime.datetime(2022, 7, 15, 10, 41, 5), tile=1, crs=z32,
           transform=at(z32, 0.35, 0.3), clouds=clouds),
      dict(datatake=1003, acquired=datetime.datetime(2022, 9, 3, 10, 22, 48), tile=7, crs=z33,
           transform=None, clouds=[(0.5, 0.5, 0.06)]),
      # Processed twice: the V010200 copy must win.
      dict(datatake=1004, acquired=datetime.datetime(2023, 5, 20, 10, 35, 12), tile=3, crs=z32,
           transform=at(z32, 0.5, -0.2, shift=PIXEL / 2), version="010110",
           processed=datetime.datetime(2023, 6, 1), offset=7),
      dict(datatake=1004, acquired=datetime.datetime(2023, 5, 20, 10, 35, 12), tile=3, crs=z32,
           transform=at(z32, 0.5, -0.2, shift=PIXEL / 2), version="010200",
           processed=datetime.datetime(2024, 1, 10)),
      dict(datatake=1005, acquired=datetime.datetime(2023, 8, 8, 10, 28, 40), tile=4, crs=z32,
           transform=at(z32, 20, 0)),
  ]
  # The zone-33 tile covers the zone-32 tiles' overlap: place it by the same ground point.
  ground = at(z32, 0.25, 0.5) @ (0, 0)
  gx, gy = rasterio.warp.transform(z32, z33, [ground[0]], [ground[1]])
  plan[3]["transform"] = rasterio.Affine(PIXEL, 0, round(gx[0] / PIXEL) * PIXEL, 0, -PIXEL,
                                         round(gy[0] / PIXEL) * PIXEL)
  rng = np.random.default_rng(0)
  for k in range(extra):  # more acquisitions over the same area (benchmark scaling)
    plan.append(dict(datatake=2000 + k, acquired=datetime.datetime(2024, 1, 1) +
                     datetime.timedelta(days=17 * k), tile=1, crs=z32,
                     transform=at(z32, rng.uniform(-0.4, 0.6), rng.uniform(-0.3, 0.9))))
  specs = []
  for seed, spec in enumerate(tqdm(plan, desc="synthetic tiles", disable=not progress)):
    spec = dict(spec)
    clouds_here = spec.pop("clouds", ())
    valid = swath_mask(rows, size, clouds=clouds_here)
    spec["datatake"] += datatake_base
    specs.append(write_tile(directory, height=rows, width=size, valid=valid,
                            seed=seed + datatake_base, **spec))
  # Real product folders hold other rasters too (quality layers); they must be ignored.
  decoy = os.path.join(os.path.dirname(specs[0].path),
                       os.path.basename(specs[0].path).replace("SPECTRAL_IMAGE", "QL_PIXELMASK"))
  with rasterio.open(decoy, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8",
                     crs=z32, transform=plan[0]["transform"]) as out:
    out.write(np.zeros((1, 8, 8), np.uint8))
  return specs


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output", required=True)
  parser.add_argument("--size", type=int, default=300, help="tile width in pixels")
  parser.add_argument("--rows", type=int, default=None, help="tile height (default: --size)")
  parser.add_argument("--extra", type=int, default=0, help="extra overlapping acquisitions")
  args = parser.parse_args(argv)
  specs = make_archive(args.output, args.size, args.rows, args.extra, progress=True)
  print(f"wrote {len(specs)} tiles to {args.output}")


if __name__ == "__main__":
  main()
