"""Where patches go inside one connected component of overlapping tiles.

1. n-tuples: sets of tiles from different datatakes whose footprints' intersection can hold a
   patch. They are grown level by level (Apriori): an n-tuple is only tried when all of its
   (n-1)-subsets were valid, because a patch inside n footprints is inside every n-1 of them.
   `enumerate_tuples_naive` tries every combination instead (the benchmark's baseline; both give
   the same tuples).
2. Tuples are visited from the largest n down to single tiles, so a location gets as many
   timestamps as the archive has. Each tuple's intersection is cut into patch-sized windows on
   the grid of one of its tiles (the reference tile).
3. An R-tree of the patches already emitted (in the component's CRS) keeps any location from
   being emitted twice: a candidate that overlaps an emitted patch is skipped.
"""
from __future__ import annotations

import collections
import itertools
import math
from typing import Iterator, Sequence

import rasterio.crs
import shapely
from rtree import index as rtree_index
from shapely import geometry as sgeom
from shapely.prepared import prep

from data_prep.enmap_tiles_scan import Tile, reproject_geometry

# A rotated/rescaled patch (tiles in another UTM zone) still contains a disc of radius ~side/2;
# the margin covers UTM scale and grid-convergence differences between neighbouring zones.
_ERODE_MARGIN = 0.98
# Overlap (fraction of a patch's area) above which two patches are the same location; reprojected
# edges of adjacent patches may overlap by a sliver.
OVERLAP_TOLERANCE = 1e-3


def same_crs(a: str, b: str) -> bool:
  return a == b or rasterio.crs.CRS.from_user_input(a) == rasterio.crs.CRS.from_user_input(b)


def component_crs(tiles: Sequence[Tile]) -> str:
  """The CRS most tiles of the component use (ties: the earliest tile's)."""
  counts = collections.Counter(t.crs for t in tiles)
  best = max(counts.values())
  return next(t.crs for t in tiles if counts[t.crs] == best)


def polygonal(geom):
  """The areal part of an intersection (shared edges and corners come back as lines/points)."""
  if geom.geom_type in ("Polygon", "MultiPolygon"):
    return geom
  parts = [g for g in getattr(geom, "geoms", []) if g.geom_type in ("Polygon", "MultiPolygon")]
  return shapely.union_all(parts) if parts else sgeom.Polygon()


def can_hold_patch(geom, side: float) -> bool:
  """Necessary condition for a side x side square to fit inside `geom`: its largest inscribed
  circle has radius >= side / 2 (only used to prune; `candidate_windows` decides)."""
  side = _ERODE_MARGIN * side
  if geom.is_empty or geom.area < side ** 2:
    return False
  minx, miny, maxx, maxy = geom.bounds
  if maxx - minx < side or maxy - miny < side:
    return False
  # The solver stops within `tolerance` of the optimum (20x faster than a negative buffer).
  tolerance = side / 20
  radius = shapely.maximum_inscribed_circle(geom, tolerance=tolerance).length
  return radius + tolerance >= side / 2


class FootprintCache:
  """Tile footprints reprojected to any CRS, computed once per (tile, CRS)."""

  def __init__(self, tiles: Sequence[Tile]):
    self._tiles = {t.index: t for t in tiles}
    self._cache: dict[tuple[int, str], object] = {}

  def get(self, index: int, crs: str):
    key = (index, crs)
    if key not in self._cache:
      tile = self._tiles[index]
      self._cache[key] = (tile.footprint if same_crs(tile.crs, crs) else
                          reproject_geometry(tile.footprint, tile.crs, crs))
    return self._cache[key]


def _tuple_ok(tiles: dict[int, Tile], members: Sequence[int]) -> bool:
  """Timestamps of a location must be different acquisitions: tiles of one datatake overlap a
  little along track, and those overlaps are not temporal positives."""
  return len({tiles[i].datatake for i in members}) == len(members)


def enumerate_tuples_pruned(tiles: Sequence[Tile], footprints: FootprintCache, crs: str,
                            side: float, neighbours: dict[int, set[int]]) -> dict[tuple, object]:
  """All valid tuples (sorted tile indices -> intersection in `crs`), grown level by level."""
  by_index = {t.index: t for t in tiles}
  level = {}
  for t in tiles:
    geom = footprints.get(t.index, crs)
    if can_hold_patch(geom, side):
      level[(t.index,)] = geom
  valid = dict(level)
  while level:
    nxt = {}
    for members, geom in level.items():
      # Extend by a larger index that neighbours every member (the overlap graph prunes first).
      common = set.intersection(*(neighbours.get(i, set()) for i in members))
      for j in sorted(c for c in common if c > members[-1]):
        cand = members + (j,)
        if not _tuple_ok(by_index, cand):
          continue
        if any(cand[:k] + cand[k + 1:] not in level for k in range(len(cand) - 1)):
          continue  # some (n-1)-subset cannot hold a patch: neither can this n-tuple
        inter = polygonal(geom.intersection(footprints.get(j, crs)))
        if can_hold_patch(inter, side):
          nxt[cand] = inter
    valid.update(nxt)
    level = nxt
  return valid


def enumerate_tuples_naive(tiles: Sequence[Tile], footprints: FootprintCache, crs: str,
                           side: float, max_tiles: int = 20) -> dict[tuple, object]:
  """Every combination of the component's tiles, intersected from scratch (2^n - 1 of them)."""
  if len(tiles) > max_tiles:
    raise ValueError(f"naive enumeration of {len(tiles)} tiles needs 2^{len(tiles)} "
                     f"intersections; limit is max_tiles={max_tiles}")
  by_index = {t.index: t for t in tiles}
  indices = sorted(by_index)
  valid = {}
  for n in range(1, len(indices) + 1):
    for cand in itertools.combinations(indices, n):
      if not _tuple_ok(by_index, cand):
        continue
      inter = polygonal(shapely.intersection_all([footprints.get(i, crs) for i in cand]))
      if can_hold_patch(inter, side):
        valid[cand] = inter
  return valid


def tuple_visit_order(tuples: dict[tuple, object]) -> list[tuple]:
  """Largest tuples first (most timestamps), then by tile indices (deterministic)."""
  return sorted(tuples, key=lambda members: (-len(members), members))


def reference_tile(members: Sequence[int], tiles: dict[int, Tile], crs: str) -> int:
  """The tile whose pixel grid the patches are cut on: the earliest one in the component's CRS
  (its pixels are copied bit-exactly; the others are resampled onto its grid)."""
  for i in members:
    if same_crs(tiles[i].crs, crs):
      return i
  return members[0]


def candidate_windows(region, ref: Tile, patch_size: int) -> list[tuple[int, int]]:
  """(row, col) offsets in `ref`'s pixel grid of the patch_size windows that lie inside
  `region` (a polygon in `ref`'s CRS). The grid starts at the region's top-left pixel."""
  if region.is_empty:
    return []
  affine = ref.affine
  res_x, res_y = affine.a, -affine.e
  minx, miny, maxx, maxy = region.bounds
  eps = 1e-6
  col0 = math.ceil((minx - affine.c) / res_x - eps)
  col1 = math.floor((maxx - affine.c) / res_x + eps)
  row0 = math.ceil((affine.f - maxy) / res_y - eps)
  row1 = math.floor((affine.f - miny) / res_y + eps)
  inside = prep(region)
  out = []
  for row in range(row0, row1 - patch_size + 1, patch_size):
    for col in range(col0, col1 - patch_size + 1, patch_size):
      if inside.contains(window_polygon(ref, row, col, patch_size)):
        out.append((row, col))
  return out


def window_polygon(tile: Tile, row: int, col: int, size: int) -> sgeom.Polygon:
  """The square covered by a window of `tile`'s grid, in `tile`'s CRS."""
  affine = tile.affine
  x0, y0 = affine @ (col, row)
  x1, y1 = affine @ (col + size, row + size)
  return sgeom.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


class LocationIndex:
  """R-tree of emitted patch polygons (one CRS): answers 'is this location already taken?'."""

  def __init__(self):
    self._tree = rtree_index.Index()
    self._polys: list = []

  def __len__(self) -> int:
    return len(self._polys)

  def conflicts(self, poly) -> bool:
    limit = OVERLAP_TOLERANCE * poly.area
    for i in self._tree.intersection(poly.bounds):
      if self._polys[i].intersection(poly).area > limit:
        return True
    return False

  def add(self, poly) -> None:
    self._tree.insert(len(self._polys), poly.bounds)
    self._polys.append(poly)


def iter_candidates(tiles: Sequence[Tile], neighbours: dict[int, set[int]], patch_size: int,
                    locations: LocationIndex, *, naive: bool = False,
                    stats: dict | None = None) -> Iterator[tuple[tuple, int, int, int, object]]:
  """Yields (tuple, reference tile index, row, col, polygon in the component CRS) for every
  window not yet taken, visiting tuples largest first. Lazy: the caller `locations.add`s the
  patches it keeps, and later candidates see them."""
  by_index = {t.index: t for t in tiles}
  crs = component_crs(tiles)
  footprints = FootprintCache(tiles)
  side = patch_size * min(t.pixel_size for t in tiles)
  enumerate_fn = (lambda: enumerate_tuples_naive(tiles, footprints, crs, side)) if naive else \
      (lambda: enumerate_tuples_pruned(tiles, footprints, crs, side, neighbours))
  tuples = enumerate_fn()
  if stats is not None:
    stats["crs"] = crs
    stats["tuples_by_size"] = dict(collections.Counter(len(m) for m in tuples))
  for members in tuple_visit_order(tuples):
    ref_index = reference_tile(members, by_index, crs)
    ref = by_index[ref_index]
    if same_crs(ref.crs, crs):
      region = tuples[members]
    else:
      region = polygonal(shapely.intersection_all([footprints.get(i, ref.crs) for i in members]))
    for row, col in candidate_windows(region, ref, patch_size):
      poly = window_polygon(ref, row, col, patch_size)
      if not same_crs(ref.crs, crs):
        poly = reproject_geometry(poly, ref.crs, crs, max_segment=ref.pixel_size * patch_size / 4)
      if not locations.conflicts(poly):
        yield members, ref_index, row, col, poly
