"""Writes a small synthetic archive in the SSL4EO-S12 layout, plus tree-cover rasters for the forest task.

    python -m data_prep.synthetic_s2 --output ROOT [--locations 16] [--size 264] [--products s2c,s2a]
        [--no-forest] [--no-density] [--faults] [--seed 0]

Layout (as SSL4EO-S12 distributes it):
  ROOT/<product>/<7-digit id>/<timestamp dir>/<band>.tif   one uint16 GeoTIFF per band, at its native
      resolution: 10 m bands size x size (264), 20 m bands size/2 (132), 60 m bands size/6 (44);
      product s2c = L1C (13 bands incl. B10), s2a = L2A (12 bands, no B10); 4 seasonal timestamps
      named like the GEE product ids (`20200317T103021_20200317T103024_T32UNU`), so they sort in time.
  ROOT/forest/<7-digit id>/mask.tif      uint8 tree cover at 10 m (1 tree, 0 other), same grid as B2
  ROOT/forest/<7-digit id>/density.tif   uint8 tree-cover density in percent (optional)

Scenes: a smooth random land-cover map (forest, grass/crop, bare soil, water) at 10 m; each class
has a Sentinel-2 reflectance spectrum (x 10000) whose vegetation red-edge/NIR part follows the
season (leaf-off winter, green-up spring, peak summer, senescent autumn); 20 m / 60 m bands are
block averages of the 10 m field (a coarse pixel integrates the ground it covers), plus sensor noise.
The tree mask is the forest class, so it is learnable from the spectra.

--faults adds two broken inputs the converter must report: one timestamp missing band B5, and one
timestamp whose pixels are all 0 (Sentinel-2 nodata).
"""
from __future__ import annotations

import argparse
import pathlib

import numpy as np
import tqdm

from fmjax.data import sensors

PRODUCTS = {"s2c": sensors.SENTINEL2_L1C_BANDS, "s2a": sensors.SENTINEL2_L2A_BANDS}
RESOLUTION = {b.name: b.resolution_m for b in sensors.SENTINEL2_BANDS}
SEASON_DATES = ("20200317", "20200621", "20200924", "20201219")
SEASON_NAMES = ("spring", "summer", "autumn", "winter")
CLASSES = ("forest", "grass", "soil", "water")

# Reflectance x 10000 per class for B1 B2 B3 B4 B5 B6 B7 B8 B8A B9 B10 B11 B12 (summer).
_SPECTRA = np.array([
    [250, 250, 450, 250, 700, 2000, 2600, 2800, 2900, 800, 20, 1300, 600],      # forest
    [350, 450, 800, 500, 1200, 2600, 3100, 3300, 3400, 900, 25, 2000, 1000],    # grass / crop
    [1000, 1200, 1500, 1800, 2000, 2200, 2300, 2400, 2500, 800, 30, 3000, 2500],  # bare soil
    [600, 500, 450, 250, 200, 150, 120, 100, 90, 30, 5, 50, 30],                  # water
], np.float64)
# How much of the summer red-edge/NIR/SWIR vegetation signal each season keeps, per class.
_PHENOLOGY = np.array([[0.8, 1.0, 0.75, 0.45],   # forest (mixed, leaf-off winter)
                       [0.9, 1.0, 0.55, 0.3],    # grass / crops (harvest, bare winter fields)
                       [1.0, 1.0, 1.0, 1.0],
                       [1.0, 1.0, 1.0, 1.0]])
_VEG_BANDS = np.array([4, 5, 6, 7, 8])  # B5-B8A: where phenology shows


def location_id(index: int) -> str:
  return f"{index:07d}"


def timestamp_name(season: int, tile: str = "T32UNU") -> str:
  date = SEASON_DATES[season]
  return f"{date}T103021_{date}T103024_{tile}"


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
  """A smooth random field: bilinear upsampling of a coarse Gaussian grid ([size, size], ~N(0,1))."""
  coarse = rng.normal(size=(cells + 1, cells + 1))
  t = np.linspace(0, cells, size)
  i0 = np.minimum(t.astype(int), cells - 1)
  f = t - i0
  rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]
  return rows[:, i0] * (1 - f) + rows[:, i0 + 1] * f


def land_cover(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
  """(class map [size, size] int, tree density in [0, 1] [size, size]) for one location."""
  forest = _smooth_field(rng, size, max(2, size // 40))
  other = _smooth_field(rng, size, max(2, size // 60))
  classes = np.where(other > 0.4, 2, 1)
  classes = np.where(other < -1.0, 3, classes)
  threshold = rng.uniform(-0.4, 0.4)
  classes = np.where(forest > threshold, 0, classes)
  # Density: high in the forest interior, fading over ~3 pixels at the edge; sparse trees outside.
  density = np.clip(0.5 + (forest - threshold) * 1.5, 0, 1) * (classes == 0) + 0.05 * (classes == 1)
  return classes, np.clip(density, 0, 1)


def block_mean(x: np.ndarray, factor: int) -> np.ndarray:
  h, w = x.shape
  return x.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def season_bands(rng: np.random.Generator, classes: np.ndarray, season: int) -> np.ndarray:
  """[13, size, size] float reflectance x 10000 of all L1C bands at 10 m for one season."""
  spectra = _SPECTRA.copy()
  for k in range(len(CLASSES)):
    spectra[k, _VEG_BANDS] = spectra[k, 3] + (spectra[k, _VEG_BANDS] - spectra[k, 3]) * _PHENOLOGY[k, season]
  image = spectra[classes].transpose(2, 0, 1)  # [13, H, W]
  brightness = 1.0 + 0.08 * _smooth_field(rng, classes.shape[0], 4)  # illumination / soil moisture
  image = image * brightness[None]
  return image + rng.normal(0, 15, image.shape)


def _write_tif(path: pathlib.Path, array: np.ndarray, resolution: int, origin: tuple[float, float]):
  import rasterio
  from rasterio.transform import Affine
  path.parent.mkdir(parents=True, exist_ok=True)
  with rasterio.open(path, "w", driver="GTiff", width=array.shape[1], height=array.shape[0], count=1,
                     dtype=array.dtype.name, crs="EPSG:32632",
                     transform=Affine(resolution, 0.0, origin[0], 0.0, -resolution, origin[1])) as dst:
    dst.write(array, 1)


def write_location(root: pathlib.Path, index: int, size: int, products, forest: bool, density: bool,
                   seed: int, missing_band: str | None = None, zero_season: int | None = None):
  rng = np.random.default_rng([seed, index])
  loc = location_id(index)
  classes, tree_density = land_cover(rng, size)
  origin = (300000.0 + 10000.0 * index, 5600000.0)
  names = sensors.SENTINEL2_L1C_BANDS
  for season in range(4):
    image = season_bands(rng, classes, season)
    for product in products:
      folder = root / product / loc / timestamp_name(season)
      for band in PRODUCTS[product]:
        if band == missing_band and season == 0:
          continue
        factor = RESOLUTION[band] // 10
        values = image[names.index(band)]
        values = block_mean(values, factor) if factor > 1 else values
        values = np.clip(np.round(values), 1, 65535).astype(np.uint16)  # 0 is reserved for nodata
        if zero_season == season:
          values[:] = 0
        _write_tif(folder / f"{band}.tif", values, RESOLUTION[band], origin)
  if forest:
    _write_tif(root / "forest" / loc / "mask.tif", (classes == 0).astype(np.uint8), 10, origin)
    if density:
      _write_tif(root / "forest" / loc / "density.tif",
                 np.round(tree_density * 100).astype(np.uint8), 10, origin)


def write_archive(output, locations: int = 16, size: int = 264, products=("s2c",), forest: bool = True,
                  density: bool = True, faults: bool = False, seed: int = 0, progress: bool = True) -> dict:
  """Writes the archive; returns {'locations': [...ids], 'faults': {...}}."""
  if size % 6:
    raise ValueError(f"--size {size} must be a multiple of 6 (60 m bands are size/6 pixels)")
  unknown = [p for p in products if p not in PRODUCTS]
  if unknown:
    raise ValueError(f"unknown products {unknown}; valid: {sorted(PRODUCTS)}")
  root = pathlib.Path(output)
  fault_info = {}
  if faults and locations < 3:
    raise ValueError("--faults needs at least 3 locations")
  for index in tqdm.trange(locations, desc="synthetic S2", unit="location", disable=not progress):
    missing = zero = None
    if faults and index == locations - 1:
      missing = "B5"
      fault_info["missing_band"] = f"{location_id(index)}/{timestamp_name(0)}/B5.tif"
    if faults and index == locations - 2:
      zero = 1
      fault_info["all_nodata"] = f"{location_id(index)}/{timestamp_name(1)}"
    write_location(root, index, size, products, forest, density, seed, missing, zero)
  return dict(locations=[location_id(i) for i in range(locations)], faults=fault_info)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--output", required=True)
  parser.add_argument("--locations", type=int, default=16)
  parser.add_argument("--size", type=int, default=264, help="10 m grid size in pixels (multiple of 6)")
  parser.add_argument("--products", default="s2c", help="comma-separated: s2c (L1C), s2a (L2A)")
  parser.add_argument("--forest", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--density", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--faults", action="store_true", help="add a missing band and an all-nodata timestamp")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  out = write_archive(args.output, args.locations, args.size, tuple(args.products.split(",")), args.forest,
                      args.density, args.faults, args.seed)
  print(f"wrote {len(out['locations'])} locations to {args.output}; faults: {out['faults'] or 'none'}")


if __name__ == "__main__":
  main()
