"""Band tables: checked against facts stated independently (band ranges, detector limits)."""
import numpy as np
import pytest

from fmjax.data import sensors


def test_enmap_table_shape_and_detectors():
  w = sensors.enmap_wavelengths(kept_only=False)
  assert w.shape == (224,)
  vnir, swir = w[:91], w[91:]
  assert np.all(np.diff(vnir) > 0) and np.all(np.diff(swir) > 0)  # each detector is monotonic
  assert vnir[0] == pytest.approx(418.4, abs=0.1) and vnir[-1] == pytest.approx(993.3, abs=0.1)
  assert swir[0] == pytest.approx(902.0, abs=0.1) and swir[-1] == pytest.approx(2445.3, abs=0.1)
  assert sensors.ENMAP_DETECTORS.count("VNIR") == 91 and sensors.ENMAP_DETECTORS.count("SWIR") == 133


def test_spectralearth_bands_drop_the_water_absorption_ranges():
  idx = np.array(sensors.SPECTRALEARTH_BAND_INDICES)
  assert len(idx) == 202 and np.all(np.diff(idx) > 0)
  full = sensors.enmap_wavelengths(kept_only=False)
  dropped = np.setdiff1d(np.arange(224), idx)
  # 1-based B127-B141 and B161-B167, i.e. 1294.9-1518.9 nm and 1738.6-1967.7 nm.
  np.testing.assert_array_equal(dropped + 1, list(range(127, 142)) + list(range(161, 168)))
  assert full[dropped[:15]].min() == pytest.approx(1294.9, abs=0.05)
  assert full[dropped[:15]].max() == pytest.approx(1518.9, abs=0.05)
  assert full[dropped[15:]].min() == pytest.approx(1738.6, abs=0.05)
  assert full[dropped[15:]].max() == pytest.approx(1967.7, abs=0.05)
  kept = sensors.enmap_wavelengths()
  assert not np.any((kept > 1290) & (kept < 1520)) and not np.any((kept > 1735) & (kept < 1970))


def test_rgb_bands_are_red_green_blue():
  r, g, b = sensors.enmap_wavelengths()[list(sensors.RGB_BANDS)]
  assert 620 < r < 680 and 530 < g < 570 and 440 < b < 490


def test_sentinel2_table():
  names = sensors.SENTINEL2_L1C_BANDS
  assert names == ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
  assert len(sensors.SENTINEL2_L2A_BANDS) == 12 and "B10" not in sensors.SENTINEL2_L2A_BANDS
  res = {b.name: b.resolution_m for b in sensors.SENTINEL2_BANDS}
  assert [n for n in names if res[n] == 10] == ["B2", "B3", "B4", "B8"]
  assert [n for n in names if res[n] == 60] == ["B1", "B9", "B10"]
  w = sensors.sentinel2_wavelengths(("B4", "B8A"))
  assert 650 < w[0] < 680 and 855 < w[1] < 875
  with pytest.raises(ValueError, match="B13"):
    sensors.sentinel2_wavelengths(("B13",))
  with pytest.raises(ValueError, match="valid"):
    sensors.wavelengths("landsat")
