"""The record schema: round trip, zero-copy decoding, TFDS readability, clear errors."""
import numpy as np
import pytest

from fmjax.data import records


def _record(t=2, h=8, w=6, c=5, seed=0):
  rng = np.random.default_rng(seed)
  return records.LocationRecord(
      location_id="0001234", timestamps=[f"{i:05d}" for i in range(t)],
      arrays={"pixels": rng.integers(-32768, 32767, (t, h, w, c), dtype=np.int16),
              "mask": rng.integers(0, 15, (h, w), dtype=np.uint8)},
      wavelengths=np.linspace(418.0, 2445.0, c), crs="EPSG:32632",
      transform=(30.0, 0.0, 500000.0, 0.0, -30.0, 5000000.0),
      nodata_fraction=np.array([0.0, 0.25][:t]), extra={"scene": "DT0001"})


def test_round_trip_is_exact():
  rec = _record()
  out = records.decode(records.encode(rec))
  np.testing.assert_array_equal(out.pixels, rec.pixels)
  np.testing.assert_array_equal(out.arrays["mask"], rec.arrays["mask"])
  assert out.pixels.dtype == np.int16 and out.arrays["mask"].dtype == np.uint8
  assert out.location_id == "0001234" and out.timestamps == ["00000", "00001"]
  assert out.transform == rec.transform and out.crs == "EPSG:32632"
  np.testing.assert_allclose(out.wavelengths, rec.wavelengths, rtol=1e-6)
  np.testing.assert_allclose(out.nodata_fraction, [0.0, 0.25])
  assert out.extra == {"scene": "DT0001"} and out.nodata == -32768


def test_decode_selected_arrays_only():
  out = records.decode(records.encode(_record()), arrays=("mask",))
  assert set(out.arrays) == {"mask"}
  with pytest.raises(records.RecordError, match="no array 'label'"):
    records.decode(records.encode(_record()), arrays=("label",))


def test_tfds_features_read_the_same_bytes():
  rec = _record(t=3)
  feats = records.tfds_features({"pixels": ((None, 8, 6, 5), "int16"), "mask": ((8, 6), "uint8")})
  ex = feats.deserialize_example_np(records.encode(rec))
  pixels = np.frombuffer(ex["pixels/bytes"], np.int16).reshape(ex["pixels/shape"])
  np.testing.assert_array_equal(pixels, rec.pixels)
  assert [t.decode() for t in ex["timestamps"]] == rec.timestamps


def test_bad_inputs_fail_clearly():
  with pytest.raises(records.RecordError, match="not a fmjax record"):
    records.decode(b"\xff\xff\xff garbage")
  rec = _record()
  rec.timestamps = ["00000"]
  with pytest.raises(records.RecordError, match="2 pixel stacks for 1 timestamps"):
    records.encode(rec)
  rec = _record()
  rec.arrays["pixels"] = rec.pixels.astype(np.float64)
  with pytest.raises(records.RecordError, match="dtype float64"):
    records.encode(rec)
