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


def _smooth_pixels(t=3, h=16, w=12, c=40, dtype=np.int16, seed=0):
  # reflectance-like: smooth spectra + noise, so Blosc's byte shuffle has something to compress
  rng = np.random.default_rng(seed)
  spectra = 2000 + 800 * np.sin(np.linspace(0, 3, c))
  return (spectra + rng.normal(0, 40, (t, h, w, c))).clip(0, 9000).astype(dtype)


@pytest.mark.parametrize("codec", ["blosc:lz4hc:5", "blosc:zstd:3", "blosc:lz4:1"])
@pytest.mark.parametrize("dtype", [np.int16, np.uint16])
def test_compressed_pixels_round_trip_exactly_and_smaller(codec, dtype):
  rec = _record()
  rec.arrays["pixels"] = _smooth_pixels(t=2, dtype=dtype)
  rec.arrays["pixels"][1, :3] = -32768 if dtype == np.int16 else 0  # a nodata border
  raw, packed = records.encode(rec), records.encode(rec, codec)
  assert len(packed) < 0.8 * len(raw)
  out = records.decode(packed)
  assert isinstance(out.pixels, np.ndarray) and out.pixels.dtype == dtype
  np.testing.assert_array_equal(out.pixels, rec.pixels)
  np.testing.assert_array_equal(out.arrays["mask"], rec.arrays["mask"])  # labels stay raw


def test_lazy_decode_decompresses_only_the_timestamps_used():
  rec = _record(t=3)
  rec.arrays["pixels"] = _smooth_pixels(t=3)
  stack = records.decode(records.encode(rec, "blosc:lz4hc:5"), ("pixels",), lazy=True).pixels
  assert isinstance(stack, records.CompressedStack)
  assert stack.shape == rec.pixels.shape and len(stack) == 3 and stack.dtype == np.int16
  np.testing.assert_array_equal(stack[2], rec.pixels[2])
  assert sorted(stack._cache) == [2]            # one chunk decompressed
  assert stack[-1] is stack[2]                   # and cached
  np.testing.assert_array_equal(stack[[0, 2]], rec.pixels[[0, 2]])
  np.testing.assert_array_equal(np.asarray(stack), rec.pixels)
  with pytest.raises(IndexError):
    stack[3]


def test_version_1_records_still_decode():
  from tensorflow_datasets.proto import tf_example_pb2
  rec = _record()
  example = tf_example_pb2.Example.FromString(records.encode(rec))
  f = example.features.feature
  f["schema_version"].int64_list.value[:] = [1]
  for name in rec.arrays:  # version 1 had no codec fields
    del f[f"{name}/codec"], f[f"{name}/offsets"]
  out = records.decode(example.SerializeToString())
  np.testing.assert_array_equal(out.pixels, rec.pixels)


def test_tfds_reads_compressed_records():
  rec = _record(t=2)
  rec.arrays["pixels"] = _smooth_pixels(t=2, h=8, w=6, c=5)
  feats = records.tfds_features({"pixels": ((None, 8, 6, 5), "int16"), "mask": ((8, 6), "uint8")})
  ex = feats.deserialize_example_np(records.encode(rec, "blosc:zstd:5"))
  np.testing.assert_array_equal(records.array_from_tfds(ex, "pixels"), rec.pixels)
  np.testing.assert_array_equal(records.array_from_tfds(ex, "mask"), rec.arrays["mask"])


def test_damaged_compressed_records_fail_clearly():
  from tensorflow_datasets.proto import tf_example_pb2
  rec = _record()
  rec.arrays["pixels"] = _smooth_pixels(t=2)
  with pytest.raises(records.RecordError, match="unknown array codec 'blosc:gzip:5'"):
    records.encode(rec, "blosc:gzip:5")
  example = tf_example_pb2.Example.FromString(records.encode(rec, "blosc:lz4hc:5"))
  f = example.features.feature
  good = f["pixels/bytes"].bytes_list.value[0]
  offsets = list(f["pixels/offsets"].int64_list.value)
  f["pixels/offsets"].int64_list.value[:] = offsets[:2]
  with pytest.raises(records.RecordError, match="do not split its"):
    records.decode(example.SerializeToString())
  f["pixels/offsets"].int64_list.value[:] = offsets
  second = offsets[1]
  damaged = good[:second + 4] + b"\x00\x00\x00\x7f" + good[second + 8:]  # chunk 1's size field
  f["pixels/bytes"].bytes_list.value[:] = [damaged]
  stack = records.decode(example.SerializeToString(), lazy=True).pixels
  np.testing.assert_array_equal(stack[0], rec.pixels[0])   # chunk 0 is intact
  with pytest.raises(records.RecordError, match="chunk 1 cannot be decompressed"):
    stack[1]
