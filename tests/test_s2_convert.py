"""SSL4EO-S12 converter on a synthetic layout: band resampling vs rasterio's own warp, report, products, resume."""
import json
import pathlib

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.warp import reproject

from data_prep import ssl4eo_s12, synthetic_s2
from fmjax.data import dataset_dir, sensors, sources

SIZE = 24  # 10 m grid; 20 m bands 12 px, 60 m bands 4 px


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
  root = tmp_path_factory.mktemp("s2")
  info = synthetic_s2.write_archive(root, locations=4, size=SIZE, products=("s2c", "s2a"), faults=True,
                                    progress=False)
  return root, info


@pytest.fixture(scope="module")
def converted(archive, tmp_path_factory):
  root, _ = archive
  out = tmp_path_factory.mktemp("out") / "l1c"
  report = ssl4eo_s12.convert(root, out, size=SIZE, shards=2, workers=1, val_fraction=0.0, progress=False)
  return out, report


def test_synthetic_layout_has_native_resolutions(archive):
  root, info = archive
  folder = root / "s2c" / info["locations"][0] / synthetic_s2.timestamp_name(0)
  sizes = {}
  for band in sensors.SENTINEL2_L1C_BANDS:
    with rasterio.open(folder / f"{band}.tif") as src:
      assert src.dtypes[0] == "uint16"
      sizes[band] = (src.height, src.transform.a)
  assert sizes["B2"] == (SIZE, 10.0) and sizes["B5"] == (SIZE // 2, 20.0) and sizes["B1"] == (SIZE // 6, 60.0)
  assert sorted(p.name for p in (root / "s2c" / info["locations"][0]).iterdir()) == sorted(
      synthetic_s2.timestamp_name(s) for s in range(4))
  assert not (root / "s2a" / info["locations"][0] / synthetic_s2.timestamp_name(0) / "B10.tif").exists()


def test_report_counts_every_timestamp(converted, archive):
  _, info = archive
  out, report = converted
  assert report["consistent"]
  assert report["inputs"] == {"timestamps": 16, "locations": 4}
  assert report["rejected"]["by_reason"] == {"missing_band": 1, "all_nodata": 1}
  rejected = {r["path"].split("/", 1)[1] for r in report["rejected_timestamps"]}
  assert info["faults"]["all_nodata"] in rejected
  assert info["faults"]["missing_band"].rsplit("/", 1)[0] in rejected
  assert json.loads((out / "report.json").read_text())["converted"]["timestamps"] == 14
  meta = dataset_dir.read_dataset_info(out)
  assert meta["num_bands"] == 13 and meta["sensor"] == "sentinel2_l1c" and meta["nodata"] == 0
  assert len(meta["band_stats"]["mean"]) == 13


def _record(out, location):
  source = sources.open_split(str(out), "train")
  for i in range(len(source)):
    record = source.decode(i)
    if record.location_id == location:
      return record
  raise KeyError(location)


def test_bands_on_the_10m_grid_match_rasterio_warp(converted, archive):
  """Every band of a record equals rasterio's reprojection of the band file onto B2's 10 m grid."""
  root, info = archive
  out, _ = converted
  loc = info["locations"][0]
  record = _record(out, loc)
  assert record.pixels.shape == (4, SIZE, SIZE, 13) and record.pixels.dtype == np.uint16
  assert record.timestamps == [synthetic_s2.timestamp_name(s) for s in range(4)]
  np.testing.assert_allclose(record.wavelengths, sensors.sentinel2_wavelengths(), rtol=1e-6)
  folder = root / "s2c" / loc / record.timestamps[2]
  with rasterio.open(folder / "B2.tif") as ref:
    grid, crs = ref.transform, ref.crs
  for c, band in enumerate(sensors.SENTINEL2_L1C_BANDS):
    with rasterio.open(folder / f"{band}.tif") as src:
      expected = np.zeros((SIZE, SIZE), np.float64)
      reproject(rasterio.band(src, 1), expected, dst_transform=grid, dst_crs=crs, resampling=Resampling.bilinear)
    # GDAL rounds to uint16 in our read; the warp keeps float: at most half a count apart.
    np.testing.assert_allclose(record.pixels[2, :, :, c], expected, atol=0.5 + 1e-6, err_msg=band)


def test_nearest_resampling_repeats_coarse_pixels(archive):
  root, info = archive
  loc = info["locations"][1]
  ts = synthetic_s2.timestamp_name(1)
  record, rejected, _, _ = ssl4eo_s12.read_location(root, "s2c", loc, [ts], SIZE, "nearest", 0.5)
  assert not rejected
  for band, factor in (("B5", 2), ("B1", 6), ("B4", 1)):
    with rasterio.open(root / "s2c" / loc / ts / f"{band}.tif") as src:
      raw = src.read(1)
    expected = np.repeat(np.repeat(raw, factor, 0), factor, 1)
    np.testing.assert_array_equal(record.pixels[0, :, :, sensors.SENTINEL2_L1C_BANDS.index(band)], expected)


def test_l2a_product_has_12_bands(archive, tmp_path):
  root, _ = archive
  report = ssl4eo_s12.convert(root, tmp_path / "l2a", product="s2a", size=SIZE, shards=1, workers=1,
                              val_fraction=0.0, stats=False, progress=False)
  assert report["consistent"]
  record = sources.open_split(str(tmp_path / "l2a"), "train").decode(0)
  assert record.pixels.shape[-1] == 12 and record.sensor == "sentinel2_l2a"
  np.testing.assert_allclose(record.wavelengths, sensors.sentinel2_wavelengths(sensors.SENTINEL2_L2A_BANDS))


def test_resume_skips_done_shards_and_rejects_changed_settings(archive, tmp_path):
  root, _ = archive
  out = tmp_path / "resume"
  first = ssl4eo_s12.convert(root, out, size=SIZE, shards=2, workers=1, val_fraction=0.0, stats=False,
                             progress=False)
  shard = next(out.glob("*-train.array_record-*"))
  before = shard.stat().st_mtime_ns
  again = ssl4eo_s12.convert(root, out, size=SIZE, shards=2, workers=1, val_fraction=0.0, stats=False,
                             progress=False)
  assert shard.stat().st_mtime_ns == before
  assert again["converted"] == first["converted"]
  with pytest.raises(ValueError, match="resampling"):
    ssl4eo_s12.convert(root, out, size=SIZE, resampling="nearest", shards=2, workers=1, val_fraction=0.0,
                       stats=False, progress=False)


def test_bad_options_name_the_valid_choices(archive, tmp_path):
  root, _ = archive
  with pytest.raises(ValueError, match="s2a"):
    ssl4eo_s12.convert(root, tmp_path / "x", product="s1", progress=False)
  with pytest.raises(ValueError, match="multiple of 6"):
    ssl4eo_s12.convert(root, tmp_path / "x", size=25, progress=False)
  with pytest.raises(FileNotFoundError, match="s2c"):
    ssl4eo_s12.convert(pathlib.Path(tmp_path / "empty"), tmp_path / "x", progress=False)


def test_two_worker_conversion_exits_without_resource_tracker_warnings(archive, tmp_path):
  """As in tests/test_data_prep_convert.py: the progress-reporting pool is closed and joined, not
  terminated, so the process exits without 'leaked semaphore' warnings (three conversions, as one
  leaks in about half of the runs when the pool is terminated)."""
  import subprocess
  import sys
  root, _ = archive
  code = "\n".join(["from data_prep import ssl4eo_s12", *(
      f"ssl4eo_s12.convert({str(root)!r}, {str(tmp_path / name)!r}, size={SIZE}, shards=2, workers=2, "
      "val_fraction=0.0, stats=False, progress=True)" for name in ("a", "b", "c"))])
  repo = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / "c" / "report.json").exists()
  assert "resource_tracker" not in result.stderr, result.stderr[-3000:]
