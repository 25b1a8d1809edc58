"""data_prep/downstream.py: code tables, ignore index, splits, rejection report, records."""
import json
import os

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from data_prep import downstream as D
from fmjax.data import sources


def _tif(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  array = np.asarray(array)
  if array.ndim == 2:
    array = array[None]
  with rasterio.open(path, "w", driver="GTiff", width=array.shape[2], height=array.shape[1],
                     count=array.shape[0], dtype=array.dtype, crs="EPSG:32632",
                     transform=from_origin(500000, 5000000, 30, 30)) as dst:
    dst.write(array)


def test_tables():
  assert len(D.CLC_CODES) == 44 and len(D.BEN43_CODES) == 43
  assert sorted(set(D.CLC_TO_BEN19.values())) == list(range(19))
  assert set(D.CLC_TO_BEN19) <= set(D.BEN43_CODES)
  assert len(D.BEN19_NAMES) == 19
  cdl, nlcd = D.task_spec("cdl"), D.task_spec("nlcd")
  assert (cdl.num_classes, cdl.ignore_index) == (14, 14)
  assert (nlcd.num_classes, nlcd.ignore_index) == (15, 15)
  assert cdl.code_to_class[210] == 13 and nlcd.code_to_class[95] == 14
  with pytest.raises(ValueError, match="valid choices: corine, corine43, cdl, nlcd, generic"):
    D.task_spec("bigearth")
  with pytest.raises(ValueError, match="--codes"):
    D.task_spec("generic")


def test_segmentation_code_mapping_and_ignore():
  spec = D.task_spec("cdl")
  label = np.array([[1, 2, 0], [210, 999, 45]])
  class_map, unknown = D.map_codes(label, spec)
  np.testing.assert_array_equal(class_map, [[0, 1, -1], [13, -1, 6]])
  assert unknown == {0: 1, 999: 1}
  mask = D.label_arrays(class_map, spec)["mask"]
  np.testing.assert_array_equal(mask, [[0, 1, 14], [13, 14, 6]])
  assert mask.dtype == np.uint8


def test_corine_multilabel_grouping_and_grid_codes():
  spec = D.task_spec("corine")
  label = np.array([[111, 112, 335], [332, 523, 523]])  # 335 known background, 332 not in BEN19
  class_map, unknown = D.map_codes(label, spec)
  hot = D.label_arrays(class_map, spec)["multi_hot"]
  assert hot.tolist() == [1] + [0] * 17 + [1]
  assert unknown == {332: 1}
  grid = D.task_spec("corine", grid_codes=True)
  # GRID_CODE 1 = 111, 44 = 523, 48 = CLC nodata (unknown)
  class_map, unknown = D.map_codes(np.array([[1, 44, 48]]), grid)
  assert D.label_arrays(class_map, grid)["multi_hot"].tolist() == [1] + [0] * 17 + [1]
  assert unknown == {48: 1}
  spec43 = D.task_spec("corine43")
  hot43 = D.label_arrays(D.map_codes(label, spec43)[0], spec43)["multi_hot"]
  assert np.flatnonzero(hot43).tolist() == [0, 1, D.BEN43_CODES.index(332), 42]


def test_min_pixels_threshold():
  spec = D.task_spec("generic", product="p", codes=[5, 6], task_type="multilabel")
  class_map, _ = D.map_codes(np.array([[5, 5, 6]]), spec)
  assert D.label_arrays(class_map, spec, min_pixels=2)["multi_hot"].tolist() == [1, 0]


def test_convert_end_to_end_with_report(tmp_path):
  root, out = tmp_path / "raw", tmp_path / "out"
  rng = np.random.default_rng(0)
  bands, size = 6, 8
  names = {"train": ["0000001/00001.tif", "0000002/00001.tif", "0000003/00001.tif", "0000009/00001.tif"],
           "val": ["0000004/00002.tif"], "test": ["0000005/00003"]}  # test: name without .tif
  for split, lines in names.items():
    (root / f"{split}.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
  images = {}
  for split, lines in names.items():
    for n in lines:
      n = n if n.endswith(".tif") else n + ".tif"
      images[n] = rng.integers(-100, 3000, (bands, size, size)).astype(np.int16)
      _tif(str(root / "enmap" / n), images[n])
      label = rng.choice([1, 2, 45, 0, 7], (size, size)).astype(np.uint16)
      _tif(str(root / "cdl" / n), label)
  os.remove(root / "cdl" / "0000003/00001.tif")                     # missing label
  _tif(str(root / "cdl" / "0000009/00001.tif"), np.ones((4, 4), np.uint16))  # size mismatch
  spec = D.task_spec("cdl", num_bands=bands)
  report = D.convert(str(root), str(out), spec, workers=2)
  assert report["splits"]["train"] == {"kept": 2, "listed": 4, "shards": 1}
  assert report["rejected"]["missing_label"]["count"] == 1
  assert report["rejected"]["size_mismatch"]["count"] == 1
  assert set(report["unknown_codes"]) == {"0", "7"}
  assert "rejected missing_label: 1" in D.format_report(report)
  info = D.read_info(str(out))
  assert info["splits"] == {"train": 2, "val": 1, "test": 1}
  assert info["label_key"] == "mask" and info["ignore_index"] == 14
  train_pixels = np.concatenate([images[n].reshape(bands, -1) for n in names["train"][:2]], 1)
  np.testing.assert_allclose(info["band_mean"], train_pixels.mean(1), rtol=1e-9)
  np.testing.assert_allclose(info["band_std"], train_pixels.std(1), rtol=1e-6)
  source = sources.open_split(str(out), "test")
  record = source.decode(0)
  np.testing.assert_array_equal(record.pixels[0], images["0000005/00003.tif"].transpose(1, 2, 0))
  with rasterio.open(root / "cdl" / "0000005/00003.tif") as src:
    raw = src.read(1)
  expected = np.select([raw == 1, raw == 2, raw == 45], [0, 1, 6], 14)
  np.testing.assert_array_equal(record.arrays["mask"], expected)
  assert record.location_id == "0000005" and record.timestamps == ["00003"]
  assert json.load(open(out / "report.json"))["task"] == "cdl"


def test_band_count_rejected(tmp_path):
  root = tmp_path / "raw"
  (root).mkdir()
  (root / "train.txt").write_text("a/1.tif\n")
  _tif(str(root / "enmap/a/1.tif"), np.zeros((5, 4, 4), np.int16))
  _tif(str(root / "nlcd/a/1.tif"), np.full((4, 4), 11, np.uint8))
  report = D.convert(str(root), str(tmp_path / "out"), D.task_spec("nlcd", num_bands=235), splits=("train",))
  assert report["rejected"]["band_count"]["count"] == 1
  assert "235" in report["rejected"]["band_count"]["examples"][0]
