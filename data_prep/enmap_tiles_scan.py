"""EnMAP L2A tiles: find them, drop reprocessed duplicates, compute valid-data footprints, and
build the overlap graph whose connected components are processed independently.

Footprints come from the valid-data mask (a pixel is valid when none of the 202 kept bands is
nodata or NaN), polygonised with `rasterio.features.shapes`, not from the raster's bbox: EnMAP
swaths are tilted in UTM, so every tile has nodata corners, and some have nodata holes.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
from typing import Iterable, Sequence

import numpy as np
import rasterio
import rasterio.crs
import rasterio.features
import rasterio.warp
import rasterio.windows
import shapely
from shapely import geometry as sgeom
from shapely.prepared import prep
from rtree import index as rtree_index

from fmjax.data import sensors

NODATA = sensors.ENMAP_NODATA
NUM_ENMAP_BANDS = sensors.ENMAP_NUM_BANDS
# SpectralEarth keeps 202 bands (drops the water-absorption bands B127-B141, B161-B167);
# rasterio counts bands from 1.
KEPT_BANDS_1BASED = tuple(i + 1 for i in sensors.SPECTRALEARTH_BAND_INDICES)

# ENMAP01-____L2A-DT0000001049_20220612T105735Z_030_V010110_20230208T200219Z-SPECTRAL_IMAGE.TIF
PRODUCT_RE = re.compile(
    r"^ENMAP01-_{4}L2A-DT(?P<datatake>\d+)_(?P<acquired>\d{8}T\d{6})Z_(?P<tile>\d+)"
    r"_V(?P<version>\d+)_(?P<processed>\d{8}T\d{6})Z-SPECTRAL_IMAGE(?:_COG)?\.tiff?$",
    re.IGNORECASE)

# Footprints are reprojected here for the archive-wide overlap test only.
GEOGRAPHIC_CRS = "EPSG:4326"


@dataclasses.dataclass
class Tile:
  """One EnMAP L2A spectral image after de-duplication. `index` is its 5-digit timestamp id."""
  path: str
  datatake: str
  acquired: str  # ISO 8601, UTC
  tile: str
  version: str
  processed: str
  index: int = -1
  crs: str = ""  # WKT
  transform: tuple[float, ...] = ()  # GDAL order a, b, c, d, e, f
  width: int = 0
  height: int = 0
  footprint: sgeom.base.BaseGeometry | None = None  # native CRS
  footprint_geo: sgeom.base.BaseGeometry | None = None  # EPSG:4326
  valid_fraction: float = 0.0

  @property
  def name(self) -> str:
    return os.path.basename(self.path)

  @property
  def scene_key(self) -> tuple[str, str, str]:
    """What identifies one acquisition of one tile, whatever its processing version."""
    return (self.datatake, self.acquired, self.tile)

  @property
  def pixel_size(self) -> float:
    return abs(self.transform[0])

  @property
  def affine(self) -> rasterio.Affine:
    return rasterio.Affine(*self.transform)


def parse_product_name(path: str) -> Tile | None:
  """Parses an EnMAP L2A spectral image file name; None when the name is not one."""
  match = PRODUCT_RE.match(os.path.basename(path))
  if match is None:
    return None
  iso = lambda s: datetime.datetime.strptime(s, "%Y%m%dT%H%M%S").isoformat() + "Z"
  return Tile(path=path, datatake=match["datatake"], acquired=iso(match["acquired"]),
              tile=match["tile"], version=match["version"], processed=iso(match["processed"]))


@dataclasses.dataclass
class Discovery:
  tiles: list[Tile]
  duplicates: list[tuple[str, str]]  # (dropped file, kept file)
  ignored: list[str]  # files that look like rasters but are not L2A spectral images


def discover(input_dir: str) -> Discovery:
  """Finds spectral images under `input_dir` (recursively) and keeps the newest processing of
  each (datatake, acquisition time, tile): EnMAP reprocesses scenes, and archives hold both."""
  if not os.path.isdir(input_dir):
    raise FileNotFoundError(f"--input {input_dir!r} is not a directory")
  found, ignored = [], []
  for root, _, files in os.walk(input_dir):
    for fname in sorted(files):
      if not fname.lower().endswith((".tif", ".tiff")):
        continue
      tile = parse_product_name(os.path.join(root, fname))
      (ignored.append(os.path.join(root, fname)) if tile is None else found.append(tile))
  newest: dict[tuple[str, str, str], Tile] = {}
  duplicates = []
  # Newest version, then newest processing date, then the path, so the choice is deterministic.
  for tile in sorted(found, key=lambda t: (int(t.version), t.processed, t.path), reverse=True):
    kept = newest.setdefault(tile.scene_key, tile)
    if kept is not tile:
      duplicates.append((tile.path, kept.path))
  tiles = sorted(newest.values(), key=lambda t: (t.acquired, t.datatake, t.tile))
  for i, tile in enumerate(tiles):
    tile.index = i
  return Discovery(tiles=tiles, duplicates=sorted(duplicates), ignored=ignored)


def valid_mask(dataset, window=None) -> np.ndarray:
  """True where none of the kept bands is nodata (or NaN for float products)."""
  data = dataset.read(KEPT_BANDS_1BASED, window=window)
  nodata = dataset.nodata if dataset.nodata is not None else NODATA
  invalid = data == nodata
  if np.issubdtype(data.dtype, np.floating):
    invalid |= ~np.isfinite(data)
  return ~invalid.any(axis=0)


def _drop_small_holes(geom, min_hole_area: float, min_part_area: float):
  parts = getattr(geom, "geoms", [geom])
  kept = []
  for poly in parts:
    if poly.is_empty or poly.area < min_part_area:
      continue
    holes = [ring for ring in poly.interiors if sgeom.Polygon(ring).area >= min_hole_area]
    kept.append(sgeom.Polygon(poly.exterior, holes))
  return shapely.union_all(kept) if kept else sgeom.Polygon()


def footprint_from_mask(mask: np.ndarray, transform, *, min_hole_pixels: float = 0.0,
                        min_part_pixels: float = 0.0):
  """Valid-data polygon (native CRS) of a boolean mask. Holes smaller than `min_hole_pixels`
  are filled (a patch may hold a few nodata pixels) and parts smaller than `min_part_pixels`
  dropped (they cannot hold a patch)."""
  affine = rasterio.Affine(*transform) if not isinstance(transform, rasterio.Affine) else transform
  polys = [sgeom.shape(g) for g, v in rasterio.features.shapes(
      mask.astype(np.uint8), mask=mask, transform=affine, connectivity=4) if v == 1]
  if not polys:
    return sgeom.Polygon()
  pixel_area = abs(affine.a * affine.e - affine.b * affine.d)
  return _drop_small_holes(shapely.union_all(polys), min_hole_pixels * pixel_area,
                           min_part_pixels * pixel_area)


def reproject_geometry(geom, src_crs, dst_crs, *, max_segment: float | None = None):
  """Reprojects a shapely geometry; straight edges are densified first (they curve in the
  target CRS). `max_segment` is in source units; default 1/20 of the geometry's extent."""
  if geom.is_empty or rasterio.crs.CRS.from_user_input(src_crs) == \
      rasterio.crs.CRS.from_user_input(dst_crs):
    return geom
  if max_segment is None:
    minx, miny, maxx, maxy = geom.bounds
    max_segment = max(maxx - minx, maxy - miny, 1e-9) / 20
  dense = shapely.segmentize(geom, max_segment)
  out = sgeom.shape(rasterio.warp.transform_geom(src_crs, dst_crs, sgeom.mapping(dense)))
  return out if out.is_valid else out.buffer(0)


def scan_tile(tile: Tile, *, patch_size: int, min_valid: float, rows_per_read: int = 64) -> Tile:
  """Reads a tile's header and valid-data mask (in row blocks, to bound memory) and fills in its
  grid and footprints. Raises ValueError for tiles that cannot be used, naming the problem."""
  with rasterio.open(tile.path) as ds:
    if ds.count != NUM_ENMAP_BANDS:
      raise ValueError(f"{tile.name}: {ds.count} bands, expected {NUM_ENMAP_BANDS}")
    if ds.crs is None:
      raise ValueError(f"{tile.name}: no CRS")
    if ds.transform.b != 0 or ds.transform.d != 0:
      raise ValueError(f"{tile.name}: rotated grid {tuple(ds.transform)[:6]} is not supported")
    if ds.crs.is_geographic:
      raise ValueError(f"{tile.name}: geographic CRS {ds.crs}; EnMAP L2A tiles are projected (UTM)")
    mask = np.zeros((ds.height, ds.width), bool)
    for row in range(0, ds.height, rows_per_read):
      window = rasterio.windows.Window(0, row, ds.width, min(rows_per_read, ds.height - row))
      mask[row:row + window.height] = valid_mask(ds, window)
    tile.crs = ds.crs.to_wkt()
    tile.transform = tuple(ds.transform)[:6]
    tile.width, tile.height = ds.width, ds.height
  tile.valid_fraction = float(mask.mean())
  tile.footprint = footprint_from_mask(
      mask, tile.transform, min_hole_pixels=(1.0 - min_valid) * patch_size**2,
      min_part_pixels=patch_size**2)
  tile.footprint_geo = reproject_geometry(tile.footprint, tile.crs, GEOGRAPHIC_CRS)
  return tile


def overlap_graph(tiles: Sequence[Tile]) -> dict[int, set[int]]:
  """Tiles (by position in `tiles`) whose footprints share area, found with an R-tree over the
  geographic footprints. Tiles that only touch are not neighbours."""
  tree = rtree_index.Index()
  for i, tile in enumerate(tiles):
    if not tile.footprint_geo.is_empty:
      tree.insert(i, tile.footprint_geo.bounds)
  graph: dict[int, set[int]] = {i: set() for i in range(len(tiles))}
  for i, tile in enumerate(tiles):
    if tile.footprint_geo.is_empty:
      continue
    prepared = prep(tile.footprint_geo)
    for j in tree.intersection(tile.footprint_geo.bounds):
      if j <= i or not prepared.intersects(tiles[j].footprint_geo):
        continue
      if tile.footprint_geo.intersection(tiles[j].footprint_geo).area > 0:
        graph[i].add(j)
        graph[j].add(i)
  return graph


def connected_components(graph: dict[int, Iterable[int]]) -> list[list[int]]:
  """Components as sorted node lists, ordered by their smallest node (deterministic ids)."""
  seen, components = set(), []
  for start in sorted(graph):
    if start in seen:
      continue
    stack, members = [start], []
    seen.add(start)
    while stack:
      node = stack.pop()
      members.append(node)
      for nxt in graph[node]:
        if nxt not in seen:
          seen.add(nxt)
          stack.append(nxt)
    components.append(sorted(members))
  return components
