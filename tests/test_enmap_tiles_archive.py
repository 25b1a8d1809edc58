"""The synthetic two-zone archive end to end: every patch checked against the source tiles with
rasterio/numpy directly (footprints, nodata, bit-exact copies, cross-zone resampling)."""
import csv
import json
import os

import numpy as np
import pytest
import rasterio
import rasterio.warp
import shapely
from shapely import geometry as sgeom

from data_prep import enmap_tiles, synthetic_tiles
from data_prep.enmap_tiles_scan import KEPT_BANDS_1BASED

PATCH = 16
MIN_VALID = 0.99
NODATA = -32768


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
  root = tmp_path_factory.mktemp("enmap_archive")
  specs = synthetic_tiles.make_archive(str(root / "in"), size=80)
  summary = enmap_tiles.build(str(root / "in"), str(root / "out"), patch_size=PATCH,
                              min_valid=MIN_VALID, progress=False)
  sources = {}
  for spec in specs:
    with rasterio.open(spec.path) as ds:
      sources[os.path.basename(spec.path)] = (ds.read(KEPT_BANDS_1BASED), ds.transform, ds.crs)
  patches = []
  enmap = root / "out" / "enmap"
  for loc in sorted(os.listdir(enmap)):
    for fname in sorted(os.listdir(enmap / loc)):
      with rasterio.open(enmap / loc / fname) as ds:
        patches.append(dict(location=loc, timestamp=fname[:5], data=ds.read(), crs=ds.crs,
                            transform=ds.transform, tags=ds.tags(), count=ds.count,
                            dtype=ds.dtypes[0], nodata=ds.nodata))
  return dict(root=root / "out", specs=specs, summary=summary, sources=sources, patches=patches)


def _on_patch_grid(array, src_transform, src_crs, patch, fill):
  """rasterio's own reprojection of a whole source array onto a patch's grid (nearest)."""
  out = np.full((array.shape[0], PATCH, PATCH), fill, array.dtype)
  rasterio.warp.reproject(array, out, src_transform=src_transform, src_crs=src_crs,
                          src_nodata=fill, dst_transform=patch["transform"], dst_crs=patch["crs"],
                          dst_nodata=fill, resampling=rasterio.warp.Resampling.nearest)
  return out


def _grid_offset(src_transform, src_crs, patch):
  t = patch["transform"]
  if src_crs != patch["crs"]:
    return None
  col, row = (t.c - src_transform.c) / t.a, (t.f - src_transform.f) / t.e
  if abs(col - round(col)) > 1e-9 or abs(row - round(row)) > 1e-9:
    return None
  return round(row), round(col)


def test_layout_index_and_summary(archive):
  summary, root = archive["summary"], archive["root"]
  locations = sorted(os.listdir(root / "enmap"))
  assert locations == [f"{i:07d}" for i in range(summary["locations"])]
  assert len(archive["patches"]) == summary["patches"]
  for p in archive["patches"]:
    assert (p["count"], p["dtype"], p["nodata"], p["data"].shape) == (
        202, "int16", NODATA, (202, PATCH, PATCH))
    assert p["crs"].to_string() in ("EPSG:32632", "EPSG:32633")
  counts = {}
  for loc in locations:
    n = len(os.listdir(root / "enmap" / loc))
    counts[str(n)] = counts.get(str(n), 0) + 1
  assert counts == summary["locations_by_timestamp_count"]
  assert {int(k) for k in counts} >= {1, 2, 3}  # the archive has real temporal stacks
  with open(root / "enmap_tiles_index.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == summary["patches"]
  assert all(os.path.exists(root / r["path"]) for r in rows)
  with open(root / "enmap_tiles_index.geojson") as f:
    assert len(json.load(f)["features"]) == summary["locations"]
  assert (summary["tiles_found"], summary["tiles_read"], len(summary["duplicates_dropped"]),
          len(summary["ignored_files"]), summary["components"]) == (7, 6, 1, 1, 2)


def test_every_patch_lies_in_the_valid_footprint_of_each_timestamp(archive):
  footprints = {}
  for name, (array, transform, _) in archive["sources"].items():
    valid = (array != NODATA).all(axis=0)
    boxes = []
    for r in range(valid.shape[0]):  # one box per run of valid pixels in a row
      edges = np.flatnonzero(np.diff(np.concatenate([[0], valid[r].astype(int), [0]])))
      for c0, c1 in zip(edges[::2], edges[1::2]):
        x0, y0 = transform @ (c0, r)
        x1, y1 = transform @ (c1, r + 1)
        boxes.append(sgeom.box(x0, y1, x1, y0))
    footprints[name] = (shapely.union_all(boxes), valid)
  for p in archive["patches"]:
    array, transform, crs = archive["sources"][p["tags"]["ENMAP_SOURCE"]]
    footprint, valid = footprints[p["tags"]["ENMAP_SOURCE"]]
    # Pixel test: the source's own valid mask resampled by rasterio onto the patch grid.
    mask = _on_patch_grid(valid[None].astype(np.uint8), transform, crs, p, 0)[0]
    assert mask.mean() >= MIN_VALID, (p["location"], p["timestamp"])
    # Geometry test: at most (1 - min_valid) of the patch falls outside the valid footprint.
    t = p["transform"]
    square = sgeom.box(t.c, t.f + t.e * PATCH, t.c + t.a * PATCH, t.f)
    if p["crs"] != crs:
      square = sgeom.shape(rasterio.warp.transform_geom(
          p["crs"], crs, sgeom.mapping(shapely.segmentize(square, t.a))))
    outside = square.difference(footprint).area / square.area
    assert outside <= 1 - MIN_VALID + 1e-3, (p["location"], p["timestamp"], outside)


def test_no_location_is_emitted_twice(archive):
  squares, stacks = [], {}
  for p in archive["patches"]:
    stacks.setdefault(p["location"], []).append(p["tags"]["ENMAP_SOURCE"])
    if p["location"] in {s[0] for s in squares}:
      continue
    t = p["transform"]
    square = sgeom.box(t.c, t.f + t.e * PATCH, t.c + t.a * PATCH, t.f)
    if p["crs"].to_string() != "EPSG:32632":
      square = sgeom.shape(rasterio.warp.transform_geom(
          p["crs"], "EPSG:32632", sgeom.mapping(shapely.segmentize(square, t.a))))
    squares.append((p["location"], square))
  tree = shapely.STRtree([s for _, s in squares])
  for i, (loc, square) in enumerate(squares):
    for j in tree.query(square):
      if j != i:
        assert square.intersection(squares[j][1]).area < 1e-3 * square.area, (loc, squares[j][0])
  for loc, names in stacks.items():  # timestamps of a location are different acquisitions
    datatakes = [n.split("-DT")[1][:10] for n in names]
    assert len(set(datatakes)) == len(datatakes), (loc, names)


def test_pixels_match_the_sources_copied_or_resampled_by_rasterio(archive):
  checked = {"copied": 0, "other_zone": 0, "shifted_grid": 0}
  for p in archive["patches"]:
    array, transform, crs = archive["sources"][p["tags"]["ENMAP_SOURCE"]]
    offset = _grid_offset(transform, crs, p)
    if offset is not None:  # same grid: bit-exact copy of the tile's pixels
      row, col = offset
      np.testing.assert_array_equal(p["data"], array[:, row:row + PATCH, col:col + PATCH])
      checked["copied"] += 1
    else:
      np.testing.assert_array_equal(p["data"], _on_patch_grid(array, transform, crs, p, NODATA))
      checked["other_zone" if crs != p["crs"] else "shifted_grid"] += 1
  assert all(v > 0 for v in checked.values()), checked


def test_reprocessed_duplicate_keeps_the_newest_version(archive):
  names = {p["tags"]["ENMAP_SOURCE"] for p in archive["patches"]}
  dt1004 = {n for n in names if "-DT0000001004_" in n}
  assert dt1004 and all("_V010200_" in n for n in dt1004)
  with open(archive["root"] / "enmap_tiles_tiles.csv") as f:
    tiles = [r["source_tile"] for r in csv.DictReader(f)]
  assert len(tiles) == 6 and not any("_V010110_" in n and "DT0000001004" in n for n in tiles)
  old = next(n for n in archive["sources"] if "DT0000001004" in n and "_V010110_" in n)
  array, transform, crs = archive["sources"][old]
  p = next(p for p in archive["patches"] if p["tags"]["ENMAP_SOURCE"] in dt1004)
  assert not np.array_equal(p["data"], _on_patch_grid(array, transform, crs, p, NODATA))


def test_tile_alone_in_another_zone_is_cut_on_its_own_grid(tmp_path):
  """Two tiles of different UTM zones, half overlapping: the overlap is cut on the earlier
  (zone 32) tile's grid with the zone-33 tile resampled; the zone-33 tile's own area is cut on
  its own grid (bit-exact), and no zone-33 patch overlaps a zone-32 one."""
  import datetime
  specs = []
  for k, crs in enumerate(("EPSG:32632", "EPSG:32633")):
    x, y = synthetic_tiles.utm_origin(crs)
    specs.append(synthetic_tiles.write_tile(
        str(tmp_path / "in"), datatake=50 + k, acquired=datetime.datetime(2023, 1, 1 + k),
        tile=1, crs=crs, transform=rasterio.Affine(30, 0, x + k * 32 * 30, 0, -30, y),
        height=64, width=64, seed=k))
  summary = enmap_tiles.build(str(tmp_path / "in"), str(tmp_path / "out"), patch_size=PATCH,
                              progress=False)
  assert summary["locations_by_timestamp_count"]["2"] > 0
  sources = {}
  for spec in specs:
    with rasterio.open(spec.path) as ds:
      sources[os.path.basename(spec.path)] = (ds.read(KEPT_BANDS_1BASED), ds.transform, ds.crs)
  squares, kinds = [], {"own_grid_33": 0, "resampled_33": 0}
  enmap = tmp_path / "out" / "enmap"
  for loc in sorted(os.listdir(enmap)):
    for fname in sorted(os.listdir(enmap / loc)):
      with rasterio.open(enmap / loc / fname) as ds:
        p = dict(data=ds.read(), crs=ds.crs, transform=ds.transform, tags=ds.tags())
      array, transform, crs = sources[p["tags"]["ENMAP_SOURCE"]]
      offset = _grid_offset(transform, crs, p)
      if offset is not None:
        row, col = offset
        np.testing.assert_array_equal(p["data"], array[:, row:row + PATCH, col:col + PATCH])
        kinds["own_grid_33"] += crs.to_string() == "EPSG:32633"
      else:
        np.testing.assert_array_equal(p["data"], _on_patch_grid(array, transform, crs, p, NODATA))
        kinds["resampled_33"] += crs.to_string() == "EPSG:32633"
    t = p["transform"]
    square = sgeom.box(t.c, t.f + t.e * PATCH, t.c + t.a * PATCH, t.f)
    if p["crs"].to_string() != "EPSG:32632":
      square = sgeom.shape(rasterio.warp.transform_geom(
          p["crs"], "EPSG:32632", sgeom.mapping(shapely.segmentize(square, t.a))))
    squares.append(square)
  assert kinds["own_grid_33"] > 0 and kinds["resampled_33"] > 0, kinds
  for i, a in enumerate(squares):
    for b in squares[i + 1:]:
      assert a.intersection(b).area < 1e-3 * a.area
