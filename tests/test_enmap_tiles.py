"""EnMAP tile archive -> patches: names, duplicates, overlap graph, n-tuples, patch placement."""
import datetime
import os

import numpy as np
import pytest
import rasterio
from shapely import geometry as sgeom

from data_prep import enmap_tiles, enmap_tiles_patches, enmap_tiles_plan, enmap_tiles_scan
from data_prep import synthetic_tiles

CRS = "EPSG:32632"
X0, Y0, PIX = 600000.0, 5300000.0, 30.0
T0 = datetime.datetime(2022, 6, 1, 10, 0, 0)


def _write_tiles(directory, offsets, size=64, datatakes=None, valid=None):
  """Tiles of size x size px at (col, row) pixel offsets of one UTM grid; one datatake each
  (unless given), acquired a day apart in the given order."""
  specs = []
  for k, (dx, dy) in enumerate(offsets):
    transform = rasterio.Affine(PIX, 0, X0 + dx * PIX, 0, -PIX, Y0 - dy * PIX)
    specs.append(synthetic_tiles.write_tile(
        str(directory), datatake=(datatakes or list(range(100, 200)))[k],
        acquired=T0 + datetime.timedelta(days=k), tile=k + 1, crs=CRS, transform=transform,
        height=size, width=size, seed=k, valid=None if valid is None else valid[k]))
  return specs


def _locations(root):
  """{(col, row) of the patch's top-left in the test grid: sorted timestamp ids}."""
  out = {}
  for loc in sorted(os.listdir(os.path.join(root, "enmap"))):
    files = sorted(os.listdir(os.path.join(root, "enmap", loc)))
    with rasterio.open(os.path.join(root, "enmap", loc, files[0])) as ds:
      t = ds.transform
    key = (round((t.c - X0) / PIX), round((Y0 - t.f) / PIX))
    assert key not in out, f"location {key} emitted twice"
    out[key] = tuple(int(f[:5]) for f in files)
  return out


def _tile_stub(index, box, datatake=None, crs=CRS):
  geom = sgeom.box(*box)
  return enmap_tiles_scan.Tile(
      path=f"t{index}.tif", datatake=datatake or f"{index:010d}", acquired="", tile="001",
      version="010110", processed="", index=index, crs=crs,
      transform=(PIX, 0.0, box[0], 0.0, -PIX, box[3]), width=64, height=64,
      footprint=geom, footprint_geo=geom)


def test_kept_bands_follow_the_spectralearth_rule():
  kept = enmap_tiles_scan.KEPT_BANDS_1BASED
  dropped = [b for b in range(1, 225) if b not in kept]
  assert len(kept) == 202 and kept == tuple(sorted(kept))
  assert dropped == list(range(127, 142)) + list(range(161, 168))


def test_names_parse_and_newest_processing_wins(tmp_path):
  prefix = "ENMAP01-____L2A-DT00000"
  names = {
      "old": prefix + "01049_20220612T105735Z_030_V010110_20230208T200219Z-SPECTRAL_IMAGE.TIF",
      "new": prefix + "01049_20220612T105735Z_030_V010400_20240101T000000Z-SPECTRAL_IMAGE_COG.tiff",
      "other": prefix + "01049_20220612T105739Z_031_V010110_20230208T200219Z-SPECTRAL_IMAGE.tif",
      "early": prefix + "00900_20220301T090000Z_001_V010110_20230208T200219Z-SPECTRAL_IMAGE.TIF",
      "decoy": prefix + "01049_20220612T105735Z_030_V010110_20230208T200219Z-QL_QUALITY_CLOUD.TIF",
  }
  for key, name in names.items():
    sub = tmp_path / key
    sub.mkdir()
    (sub / name).write_bytes(b"")
  tile = enmap_tiles_scan.parse_product_name(names["old"])
  assert (tile.datatake, tile.acquired, tile.tile, tile.version) == (
      "0000001049", "2022-06-12T10:57:35Z", "030", "010110")
  found = enmap_tiles_scan.discover(str(tmp_path))
  assert [os.path.basename(t.path) for t in found.tiles] == [names["early"], names["new"],
                                                            names["other"]]
  assert [t.index for t in found.tiles] == [0, 1, 2]
  assert [(os.path.basename(a), os.path.basename(b)) for a, b in found.duplicates] == [
      (names["old"], names["new"])]
  assert [os.path.basename(p) for p in found.ignored] == [names["decoy"]]


def test_overlap_graph_and_components_on_known_geometry():
  s = 64 * PIX
  boxes = [(0, 0, s, s), (s / 2, 0, 1.5 * s, s), (s, s / 2, 2 * s, 1.5 * s),  # chain 0-1-2
           (2 * s, 0, 3 * s, s / 2),  # touches 2 at one corner only: not an overlap
           (10 * s, 0, 11 * s, s)]  # far away
  tiles = [_tile_stub(i, b) for i, b in enumerate(boxes)]
  graph = enmap_tiles_scan.overlap_graph(tiles)
  assert graph == {0: {1}, 1: {0, 2}, 2: {1}, 3: set(), 4: set()}
  assert enmap_tiles_scan.connected_components(graph) == [[0, 1, 2], [3], [4]]


def test_pruned_tuples_equal_all_combinations_and_skip_same_datatake():
  s = 64 * PIX
  # Four tiles in a 2x2 arrangement (half-tile offsets) plus one of tile 0's datatake.
  offsets = [(0, 0), (32, 0), (0, 32), (32, 32), (16, 16)]
  tiles = [_tile_stub(i, (X0 + dx * PIX, Y0 - dy * PIX - s, X0 + dx * PIX + s, Y0 - dy * PIX),
                      datatake="dt0" if i in (0, 4) else None)
           for i, (dx, dy) in enumerate(offsets)]
  graph = enmap_tiles_scan.overlap_graph(tiles)
  cache = enmap_tiles_plan.FootprintCache(tiles)
  side = 16 * PIX
  pruned = enmap_tiles_plan.enumerate_tuples_pruned(tiles, cache, CRS, side, graph)
  naive = enmap_tiles_plan.enumerate_tuples_naive(tiles, cache, CRS, side)
  assert sorted(pruned) == sorted(naive)
  sizes = {n: sum(len(m) == n for m in pruned) for n in range(1, 6)}
  # 5 singles; pairs: C(5,2) minus (0,4); triples/quads: those without both 0 and 4.
  assert sizes == {1: 5, 2: 9, 3: 7, 4: 2, 5: 0}
  assert all(pruned[m].equals(naive[m]) for m in pruned)
  # A 48-pixel-wide intersection holds a 16-pixel patch but not a 64-pixel one.
  assert enmap_tiles_plan.can_hold_patch(sgeom.box(0, 0, 48 * PIX, 48 * PIX), side)
  assert not enmap_tiles_plan.can_hold_patch(sgeom.box(0, 0, 48 * PIX, 48 * PIX), 64 * PIX)


def _build(tmp_path, offsets, **kwargs):
  src, out = tmp_path / "in", tmp_path / "out"
  specs = _write_tiles(src, offsets, **kwargs)
  summary = enmap_tiles.build(str(src), str(out), patch_size=16, progress=False)
  return specs, summary, _locations(str(out))


def test_two_fold_overlap_patches(tmp_path):
  _, summary, locs = _build(tmp_path, [(0, 0), (32, 0)])
  expected = {(c, r): (0, 1) for c in (32, 48) for r in (0, 16, 32, 48)}
  expected.update({(c, r): (0,) for c in (0, 16) for r in (0, 16, 32, 48)})
  expected.update({(c, r): (1,) for c in (64, 80) for r in (0, 16, 32, 48)})
  assert locs == expected
  assert summary["locations_by_timestamp_count"] == {"1": 16, "2": 8}
  assert summary["overlaps"] == 1 and summary["components"] == 1


def test_three_fold_overlap_patches(tmp_path):
  _, summary, locs = _build(tmp_path, [(0, 0), (32, 0), (16, 32)])
  expected = {}
  expected.update({(c, r): (0, 1, 2) for c in (32, 48) for r in (32, 48)})
  expected.update({(c, r): (0, 1) for c in (32, 48) for r in (0, 16)})
  expected.update({(16, 32): (0, 2), (16, 48): (0, 2), (64, 32): (1, 2), (64, 48): (1, 2)})
  expected.update({(0, r): (0,) for r in (0, 16, 32, 48)})
  expected.update({(16, 0): (0,), (16, 16): (0,)})
  expected.update({(64, 0): (1,), (64, 16): (1,)})
  expected.update({(80, r): (1,) for r in (0, 16, 32, 48)})
  expected.update({(c, r): (2,) for c in (16, 32, 48, 64) for r in (64, 80)})
  assert locs == expected
  assert summary["locations_by_timestamp_count"] == {"1": 20, "2": 8, "3": 4}


def test_four_fold_overlap_patches_tile_the_union(tmp_path):
  _, summary, locs = _build(tmp_path, [(0, 0), (32, 0), (0, 32), (32, 32)])
  assert {k: v for k, v in locs.items() if len(v) == 4} == {
      (c, r): (0, 1, 2, 3) for c in (32, 48) for r in (32, 48)}
  assert summary["locations_by_timestamp_count"] == {"1": 16, "2": 16, "4": 4}
  # 36 non-overlapping 16x16 patches exactly cover the 96x96 union.
  assert sorted(locs) == [(c, r) for c in range(0, 96, 16) for r in range(0, 96, 16)]
  assert summary["tuples_by_size"] == {"1": 4, "2": 6, "3": 4, "4": 1}


def test_same_datatake_overlap_gives_no_temporal_pairs(tmp_path):
  _, summary, locs = _build(tmp_path, [(0, 0), (32, 0)], datatakes=[7, 7])
  assert summary["locations_by_timestamp_count"] == {"1": 24}
  assert summary["overlaps"] == 1 and summary["overlaps_between_datatakes"] == 0


def test_patch_pixels_are_the_tiles_pixels_bit_exactly(tmp_path):
  specs, _, locs = _build(tmp_path, [(0, 0), (32, 0)])
  with rasterio.open(specs[0].path) as a, rasterio.open(specs[1].path) as b:
    tiles = [ds.read(enmap_tiles_scan.KEPT_BANDS_1BASED) for ds in (a, b)]
  root = tmp_path / "out" / "enmap"
  offsets = [0, 32]
  for loc in sorted(os.listdir(root)):
    for fname in sorted(os.listdir(root / loc)):
      with rasterio.open(root / loc / fname) as ds:
        patch, t = ds.read(), ds.transform
        header = (ds.count, ds.dtypes[0], ds.nodata, ds.crs.to_string())
      assert header == (202, "int16", -32768, CRS)
      k = int(fname[:5])
      col, row = round((t.c - X0) / PIX) - offsets[k], round((Y0 - t.f) / PIX)
      np.testing.assert_array_equal(patch, tiles[k][:, row:row + 16, col:col + 16])


def test_min_valid_rejects_patches_with_scattered_nodata(tmp_path):
  valid = np.ones((32, 32), bool)
  for r, c in [(3, 3), (3, 8), (8, 3), (8, 8), (12, 12)]:  # 251/256 valid: below 0.99
    valid[r, c] = False
  valid[5, 20] = False  # 255/256 valid: kept
  src = tmp_path / "in"
  _write_tiles(src, [(0, 0)], size=32, valid=[valid])
  strict = enmap_tiles.build(str(src), str(tmp_path / "a"), patch_size=16, progress=False)
  loose = enmap_tiles.build(str(src), str(tmp_path / "b"), patch_size=16, min_valid=0.9,
                            progress=False)
  assert (strict["locations"], strict["rejected_nodata"]) == (3, 1)
  assert (loose["locations"], loose["rejected_nodata"]) == (4, 0)


def test_float_tiles_with_nan_nodata(tmp_path):
  valid = np.ones((32, 32), bool)
  valid[:, :10] = False
  synthetic_tiles.write_tile(str(tmp_path / "in"), datatake=5, acquired=T0, tile=1, crs=CRS,
                             transform=rasterio.Affine(PIX, 0, X0, 0, -PIX, Y0), height=32,
                             width=32, valid=valid, dtype="float32")
  summary = enmap_tiles.build(str(tmp_path / "in"), str(tmp_path / "out"), patch_size=16,
                              progress=False)
  # Valid columns 10-31: the grid starts at column 10 and fits one patch per row band.
  assert summary["locations"] == 2 and summary["rejected_nodata"] == 0
  with rasterio.open(tmp_path / "in" / os.listdir(tmp_path / "in")[0] / os.listdir(
      tmp_path / "in" / os.listdir(tmp_path / "in")[0])[0]) as ds:
    source = ds.read(enmap_tiles_scan.KEPT_BANDS_1BASED, window=((0, 16), (10, 26)))
  with rasterio.open(tmp_path / "out" / "enmap" / "0000000" / "00000.tif") as ds:
    np.testing.assert_array_equal(ds.read(), np.rint(source).astype(np.int16))


def test_resume_skips_finished_components(tmp_path, monkeypatch):
  src = tmp_path / "in"
  _write_tiles(src, [(0, 0), (32, 0), (400, 0)])  # two components
  out = tmp_path / "out"
  calls = []
  real = enmap_tiles_patches.process_component

  def crash_on_second(cid, *args, **kwargs):
    calls.append(cid)
    if len(calls) == 2:
      raise RuntimeError("simulated crash")
    return real(cid, *args, **kwargs)

  monkeypatch.setattr(enmap_tiles_patches, "process_component", crash_on_second)
  with pytest.raises(RuntimeError, match="simulated crash"):
    enmap_tiles.build(str(src), str(out), patch_size=16, progress=False)
  first = calls[0]
  calls.clear()
  monkeypatch.setattr(enmap_tiles_patches, "process_component",
                      lambda cid, *a, **k: calls.append(cid) or real(cid, *a, **k))
  resumed = enmap_tiles.build(str(src), str(out), patch_size=16, progress=False)
  assert calls == [1 - first]
  fresh = enmap_tiles.build(str(src), str(tmp_path / "fresh"), patch_size=16, progress=False)
  assert resumed["locations_by_timestamp_count"] == fresh["locations_by_timestamp_count"]
  assert (out / "enmap_tiles_index.csv").read_text() == \
      (tmp_path / "fresh" / "enmap_tiles_index.csv").read_text().replace("fresh", "out")
  assert not [p for p in (out / "_staging").glob("c*") if p.is_dir()]  # staging emptied
  # Finished datasets are recognised; other settings are refused with a clear error.
  assert enmap_tiles.build(str(src), str(out), patch_size=16, progress=False)["locations"] == \
      resumed["locations"]
  with pytest.raises(ValueError, match="patch_size"):
    enmap_tiles.build(str(src), str(out), patch_size=32, progress=False)


def test_unusable_tiles_are_reported_not_fatal(tmp_path):
  src = tmp_path / "in"
  _write_tiles(src, [(0, 0)], size=32)
  synthetic_tiles.write_tile(str(src), datatake=9, acquired=T0, tile=9, crs=CRS, bands=10,
                             transform=rasterio.Affine(PIX, 0, X0, 0, -PIX, Y0), height=32,
                             width=32)
  summary = enmap_tiles.build(str(src), str(tmp_path / "out"), patch_size=16, progress=False)
  assert summary["tiles_read"] == 1 and summary["locations"] == 4
  (name, reason), = summary["tiles_rejected"].items()
  assert "DT0000000009" in name and "10 bands, expected 224" in reason


def test_bad_arguments_name_the_value(tmp_path):
  with pytest.raises(ValueError, match="nearest"):
    enmap_tiles.build(str(tmp_path), str(tmp_path / "o"), resampling="lanczos9")
  with pytest.raises(ValueError, match="min-valid"):
    enmap_tiles.build(str(tmp_path), str(tmp_path / "o"), min_valid=2.0)
  with pytest.raises(FileNotFoundError, match="nope"):
    enmap_tiles.build(str(tmp_path / "nope"), str(tmp_path / "o"))
