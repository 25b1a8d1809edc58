"""The synthetic archive: layout, determinism, and spectra that behave like the real materials."""
import json

import numpy as np
import pytest
import rasterio

from data_prep import synthetic
from fmjax.data import sensors


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic")
  synthetic.main(["--output", str(root), "--locations", "12", "--seed", "1", "--size", "32"])
  return root


def _band(wavelength_nm):
  return int(np.argmin(np.abs(sensors.enmap_wavelengths() - wavelength_nm)))


def test_layout_and_geotiff_profile(archive):
  folders = sorted((archive / "enmap").iterdir())
  assert len(folders) == 12 and all(len(f.name) == 7 and f.name.isdigit() for f in folders)
  for folder in folders:
    files = sorted(folder.iterdir())
    assert 1 <= len(files) <= 4 and all(len(f.stem) == 5 and f.suffix == ".tif" for f in files)
    with rasterio.open(files[0]) as src:
      assert (src.count, src.height, src.width, src.dtypes[0]) == (202, 32, 32, "int16")
      assert src.nodata == -32768 and src.res == (30.0, 30.0)
      assert src.crs.to_epsg() // 100 in (326, 327)
      tag = np.array(src.tags()["wavelengths_nm"].split(","), float)
      np.testing.assert_allclose(tag, sensors.enmap_wavelengths(), atol=1e-3)
    landcover = np.load(archive / "landcover" / f"{folder.name}.npy")
    assert landcover.shape == (32, 32) and landcover.dtype == np.uint8
  assert json.loads((archive / "landcover" / "classes.json").read_text()) == list(synthetic.MATERIALS)


def test_same_seed_same_pixels(archive, tmp_path):
  synthetic.generate(tmp_path, 12, seed=1, size=32, progress=False)
  for path in (archive / "enmap").glob("*/*.tif"):
    with rasterio.open(path) as a, rasterio.open(tmp_path / path.relative_to(archive)) as b:
      np.testing.assert_array_equal(a.read(), b.read())


def test_material_spectra_follow_physics():
  w = sensors.enmap_wavelengths()
  red, nir, green, swir2 = _band(665), _band(860), _band(555), _band(2200)
  veg = synthetic.green_vegetation(w)
  assert veg[nir] / veg[red] > 5 and veg[green] > veg[red]  # red edge, green peak
  assert veg[_band(1650)] > veg[swir2]  # leaf water: SWIR2 darker than SWIR1
  water = synthetic.water(w)
  assert water[nir] < 0.01 and water[swir2] < 0.01 and water[green] > water[nir]
  snow = synthetic.snow(w)
  assert snow[green] > 0.8 and snow[_band(1650)] < 0.15  # bright visible, dark SWIR
  soil = synthetic.soil(w)
  assert soil[red] > soil[_band(450)] and soil[_band(2205)] < soil[_band(2150)]  # clay absorption


def test_pixels_match_their_landcover_and_seasons_change(archive):
  red, nir = _band(665), _band(860)
  ndvi_by_class = {k: [] for k in range(len(synthetic.MATERIALS))}
  changed = 0
  for folder in sorted((archive / "enmap").iterdir()):
    landcover = np.load(archive / "landcover" / f"{folder.name}.npy")
    stack = []
    for path in sorted(folder.iterdir()):
      with rasterio.open(path) as src:
        stack.append(src.read().astype(np.float64))
    x = stack[0]
    ndvi = (x[nir] - x[red]) / (x[nir] + x[red] + 1e-9)
    for k in ndvi_by_class:
      ndvi_by_class[k] += list(ndvi[landcover == k])
    if len(stack) > 1:
      changed += np.abs(stack[1] - stack[0]).mean() > 50
  median = {synthetic.MATERIALS[k]: np.median(v) for k, v in ndvi_by_class.items() if len(v) > 20}
  assert median["forest"] > 0.5 and median["water"] < 0.1
  assert all(median[m] < median["forest"] for m in ("water", "soil", "built_up", "snow") if m in median)
  assert changed >= 1


def test_band_statistics_are_in_the_real_range(tmp_path):
  synthetic.generate(tmp_path, 30, seed=2, size=24, progress=False)
  pixels = []
  for path in sorted((tmp_path / "enmap").glob("*/*.tif")):
    with rasterio.open(path) as src:
      pixels.append(src.read().reshape(202, -1))
  x = np.concatenate(pixels, axis=1).astype(np.float64)
  mean, std = x.mean(1), x.std(1)
  # Real SpectralEarth: means 813-3217, stds 1096-1718 (REFERENCE.md). Allow sampling spread.
  assert 500 < mean.min() and mean.max() < 4000 and mean[_band(860)] > 2 * mean[_band(450)]
  assert 700 < std.min() and std.max() < 2200


def test_bad_arguments_are_named(tmp_path):
  with pytest.raises(ValueError, match="--bands 300"):
    synthetic.choose_wavelengths(300)
  with pytest.raises(ValueError, match="needs >= 9 locations"):
    synthetic.generate(tmp_path, 3, defects=True, size=16, bands=8, progress=False)
