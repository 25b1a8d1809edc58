"""Cutting, resampling and writing the patches of one connected component.

The reference tile's pixels are copied bit-exactly; a tile on the same grid (same CRS, pixel
size and an integer pixel offset) is copied too; any other tile (another UTM zone, or a shifted
grid) is resampled onto the patch grid with `rasterio.warp.reproject`. A patch is kept only if
every timestamp has at least `min_valid` valid pixels (no kept band nodata/NaN).

Each component is written to its own staging directory and finished with a done marker (JSON
describing its patches), so an interrupted run resumes per component.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Sequence

import numpy as np
import rasterio
import rasterio.warp
import rasterio.windows
from rasterio.enums import Resampling

from data_prep import enmap_tiles_plan as plan
from fmjax.data import sensors
from data_prep.enmap_tiles_scan import (GEOGRAPHIC_CRS, KEPT_BANDS_1BASED, NODATA, Tile,
                                        reproject_geometry)

RESAMPLING = {"nearest": Resampling.nearest, "bilinear": Resampling.bilinear,
              "cubic": Resampling.cubic}
_INT16 = np.iinfo(np.int16)
_WAVELENGTHS = sensors.ENMAP_WAVELENGTHS_NM


def component_dir(staging: str, cid: int) -> str:
  return os.path.join(staging, f"c{cid:05d}")


def done_marker(staging: str, cid: int) -> str:
  return os.path.join(staging, f"c{cid:05d}.done.json")


def _to_int16(data: np.ndarray, nodata) -> np.ndarray:
  """int16 with NODATA wherever the source is nodata or NaN (float products)."""
  if data.dtype == np.int16 and (nodata is None or nodata == NODATA):
    return data
  invalid = data == (NODATA if nodata is None else nodata)
  if np.issubdtype(data.dtype, np.floating):
    invalid |= ~np.isfinite(data)
    data = np.rint(np.nan_to_num(data))
  out = np.clip(data, _INT16.min + 1, _INT16.max).astype(np.int16)
  out[invalid] = NODATA
  return out


def _grid_offset(tile: Tile, ref: Tile) -> tuple[int, int] | None:
  """(row, col) of ref's pixel (0, 0) in tile's grid when both share a grid, else None."""
  if not plan.same_crs(tile.crs, ref.crs):
    return None
  a, b = tile.affine, ref.affine
  if not (np.isclose(a.a, b.a) and np.isclose(a.e, b.e)):
    return None
  col, row = (b.c - a.c) / a.a, (b.f - a.f) / a.e
  if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
    return None
  return int(round(row)), int(round(col))


def read_patch(ds, tile: Tile, ref: Tile, row: int, col: int, size: int,
               resampling: str = "nearest") -> np.ndarray:
  """The kept 202 bands of `tile` on the window (row, col, size) of `ref`'s grid: [202, H, W]."""
  offset = _grid_offset(tile, ref)
  if offset is not None:
    window = rasterio.windows.Window(col + offset[1], row + offset[0], size, size)
    inside = (window.col_off >= 0 and window.row_off >= 0 and
              window.col_off + size <= ds.width and window.row_off + size <= ds.height)
    # Boundless reads go through a VRT; only needed when the window leaves this tile.
    data = ds.read(KEPT_BANDS_1BASED, window=window, boundless=not inside,
                   fill_value=ds.nodata if ds.nodata is not None else NODATA)
    return _to_int16(data, ds.nodata)
  dst_transform = ref.affine @ rasterio.Affine.translation(col, row)
  float_src = np.issubdtype(np.dtype(ds.dtypes[0]), np.floating)
  dst = np.full((len(KEPT_BANDS_1BASED), size, size), np.nan if float_src else NODATA,
                np.float32 if float_src else np.int16)
  rasterio.warp.reproject(
      source=rasterio.band(ds, list(KEPT_BANDS_1BASED)), destination=dst,
      src_transform=ds.transform, src_crs=ds.crs,
      src_nodata=ds.nodata if ds.nodata is not None else NODATA,
      dst_transform=dst_transform, dst_crs=ref.crs,
      dst_nodata=np.nan if float_src else NODATA, resampling=RESAMPLING[resampling])
  return _to_int16(dst, np.nan if float_src else NODATA)


def valid_fraction(patch: np.ndarray) -> float:
  return float((patch != NODATA).all(axis=0).mean())


def write_patch(path: str, data: np.ndarray, crs: str, transform, tags: dict) -> None:
  """One timestamp of one location: uncompressed, band-interleaved int16 GeoTIFF (the fastest
  layout to read back), written to a temporary name first so a crash leaves no partial file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".part"
  with rasterio.open(tmp, "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
                     count=data.shape[0], dtype="int16", crs=crs, transform=transform,
                     nodata=NODATA, interleave="band") as out:
    out.write(data)
    out.update_tags(**tags)
    for i, band in enumerate(KEPT_BANDS_1BASED, start=1):
      out.set_band_description(i, f"B{band} {_WAVELENGTHS[band - 1]:.1f} nm")
  os.replace(tmp, path)


def process_component(cid: int, tiles: Sequence[Tile], neighbours: dict[int, set[int]],
                      staging: str, patch_size: int, min_valid: float,
                      resampling: str = "nearest", naive: bool = False) -> dict:
  """Plans, reads and writes every patch of one component; returns (and writes) its marker."""
  started = time.perf_counter()
  out_dir = component_dir(staging, cid)
  shutil.rmtree(out_dir, ignore_errors=True)  # leftovers of an interrupted attempt
  by_index = {t.index: t for t in tiles}
  stats = {"candidates": 0, "rejected_nodata": 0}
  locations = plan.LocationIndex()
  patches = []
  datasets = {t.index: rasterio.open(t.path) for t in tiles}
  try:
    for members, ref_index, row, col, poly in plan.iter_candidates(
        tiles, neighbours, patch_size, locations, naive=naive, stats=stats):
      stats["candidates"] += 1
      ref = by_index[ref_index]
      stack = [read_patch(datasets[i], by_index[i], ref, row, col, patch_size, resampling)
               for i in members]
      fractions = [valid_fraction(p) for p in stack]
      if min(fractions) < min_valid:
        stats["rejected_nodata"] += 1
        continue
      locations.add(poly)
      local = len(patches)
      transform = ref.affine @ rasterio.Affine.translation(col, row)
      for i, data in zip(members, stack):
        write_patch(os.path.join(out_dir, f"{local:07d}", f"{i:05d}.tif"), data, ref.crs,
                    transform, {"ENMAP_SOURCE": by_index[i].name,
                                "ACQUISITION_TIME": by_index[i].acquired,
                                "REFERENCE_TILE": ref.name})
      geo = reproject_geometry(plan.window_polygon(ref, row, col, patch_size), ref.crs,
                               GEOGRAPHIC_CRS)
      patches.append({"local": local, "timestamps": list(members), "reference": ref_index,
                      "row": row, "col": col, "crs": rasterio.crs.CRS.from_wkt(ref.crs).to_string(),
                      "transform": list(transform)[:6], "valid_fraction": fractions,
                      "footprint_wgs84": geo.wkt})
  finally:
    for ds in datasets.values():
      ds.close()
  stats["crs"] = rasterio.crs.CRS.from_wkt(stats.get("crs") or tiles[0].crs).to_string()
  marker = {"component": cid, "tiles": [t.index for t in tiles],
            "tile_names": [[t.index, t.name] for t in tiles], "patches": patches,
            "stats": stats, "seconds": time.perf_counter() - started}
  tmp = done_marker(staging, cid) + ".part"
  with open(tmp, "w") as f:
    json.dump(marker, f)
  os.replace(tmp, done_marker(staging, cid))
  return marker
