"""The fmjax record schema: the ONE module that knows how a record's bytes look.

A record holds one location: all of its timestamps plus the metadata that travels with the
pixels. On disk it is a serialized `tf.train.Example` (so that the dataset directory is also a
valid TFDS dataset), but decoding never needs TensorFlow: the proto is parsed with the protobuf
classes TFDS vendors, and every array is a zero-copy `np.frombuffer` view of one bytes field.

Arrays (schema version 1):
  pixels   [T, H, W, C]  the image stack, channels last, timestamps first (int16 for EnMAP,
                          uint16 for Sentinel-2); nodata pixels keep the sensor's nodata value.
  any other named array  e.g. downstream labels: `mask` [H, W], `multi_hot` [K], `target` [K].
Metadata: location id, timestamp ids, sensor, band wavelengths, CRS (WKT), affine transform
(GDAL order a,b,c,d,e,f), nodata value, per-timestamp nodata fraction, and free-form JSON.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import numpy as np
from tensorflow_datasets.proto import tf_example_pb2

SCHEMA_VERSION = 1

# Array dtypes a record may carry; stored as little-endian raw bytes.
_DTYPES = ("int16", "uint16", "uint8", "int32", "int64", "float32")


class RecordError(ValueError):
  """A record that cannot be decoded (wrong version, truncated bytes, bad shape)."""


@dataclasses.dataclass
class LocationRecord:
  """One location with all its timestamps. `arrays['pixels']` is [T, H, W, C]."""
  location_id: str
  timestamps: list[str]
  arrays: dict[str, np.ndarray]
  sensor: str = "enmap"
  wavelengths: np.ndarray | None = None  # [C] nm
  crs: str = ""
  transform: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
  nodata: int = -32768
  nodata_fraction: np.ndarray | None = None  # [T]
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def pixels(self) -> np.ndarray:
    return self.arrays["pixels"]

  @property
  def num_timestamps(self) -> int:
    return len(self.timestamps)


def _bytes_feature(feature, values):
  feature.bytes_list.value.extend(values)


def encode(record: LocationRecord) -> bytes:
  """Serialises a record to the bytes stored in ArrayRecord."""
  pixels = record.arrays.get("pixels")
  if pixels is None or pixels.ndim != 4:
    raise RecordError(f"record {record.location_id}: 'pixels' must be [T, H, W, C], got "
                      f"{None if pixels is None else pixels.shape}")
  if pixels.shape[0] != len(record.timestamps):
    raise RecordError(f"record {record.location_id}: {pixels.shape[0]} pixel stacks for "
                      f"{len(record.timestamps)} timestamps")
  example = tf_example_pb2.Example()
  f = example.features.feature
  f["schema_version"].int64_list.value.append(SCHEMA_VERSION)
  _bytes_feature(f["location_id"], [record.location_id.encode()])
  _bytes_feature(f["timestamps"], [t.encode() for t in record.timestamps])
  _bytes_feature(f["sensor"], [record.sensor.encode()])
  _bytes_feature(f["crs"], [record.crs.encode()])
  f["transform"].float_list.value.extend(float(v) for v in record.transform)
  f["nodata"].int64_list.value.append(int(record.nodata))
  wavelengths = (np.zeros([pixels.shape[-1]], np.float32) if record.wavelengths is None
                 else np.asarray(record.wavelengths, np.float32))
  f["wavelengths"].float_list.value.extend(wavelengths.tolist())
  nodata_fraction = (np.zeros([pixels.shape[0]], np.float32) if record.nodata_fraction is None
                     else np.asarray(record.nodata_fraction, np.float32))
  f["nodata_fraction"].float_list.value.extend(nodata_fraction.tolist())
  _bytes_feature(f["extra_json"], [json.dumps(record.extra, sort_keys=True).encode()])
  _bytes_feature(f["array_names"], [n.encode() for n in sorted(record.arrays)])
  for name, array in record.arrays.items():
    array = np.asarray(array)
    if array.dtype.name not in _DTYPES:
      raise RecordError(f"record {record.location_id}: array {name!r} has dtype {array.dtype}, "
                        f"supported: {_DTYPES}")
    _bytes_feature(f[f"{name}/bytes"], [np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()])
    _bytes_feature(f[f"{name}/dtype"], [array.dtype.name.encode()])
    f[f"{name}/shape"].int64_list.value.extend(array.shape)
  # deterministic: identical records give identical bytes, so re-converted shards are reproducible.
  return example.SerializeToString(deterministic=True)


def _one(feature_map, key, kind):
  if key not in feature_map:
    raise RecordError(f"record has no field {key!r}")
  return getattr(feature_map[key], kind).value


def decode(data: bytes, arrays: tuple[str, ...] | None = None) -> LocationRecord:
  """Parses record bytes. `arrays` limits which arrays are materialised (default: all)."""
  example = tf_example_pb2.Example()
  try:
    example.ParseFromString(data)
  except Exception as e:  # protobuf raises its own DecodeError type
    raise RecordError(f"not a fmjax record ({len(data)} bytes): {e}") from e
  f = example.features.feature
  version = _one(f, "schema_version", "int64_list")
  if not version or version[0] != SCHEMA_VERSION:
    raise RecordError(f"record schema version {list(version)} is not supported "
                      f"(this fmjax reads version {SCHEMA_VERSION})")
  names = [n.decode() for n in _one(f, "array_names", "bytes_list")]
  out = {}
  for name in names if arrays is None else arrays:
    if name not in names:
      raise RecordError(f"record has no array {name!r}; it has {names}")
    raw = _one(f, f"{name}/bytes", "bytes_list")[0]
    dtype = np.dtype(_one(f, f"{name}/dtype", "bytes_list")[0].decode()).newbyteorder("<")
    shape = tuple(_one(f, f"{name}/shape", "int64_list"))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
      raise RecordError(f"array {name!r}: {len(raw)} bytes, expected {expected} for {shape} {dtype}")
    out[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
  return LocationRecord(
      location_id=_one(f, "location_id", "bytes_list")[0].decode(),
      timestamps=[t.decode() for t in _one(f, "timestamps", "bytes_list")],
      arrays=out,
      sensor=_one(f, "sensor", "bytes_list")[0].decode(),
      wavelengths=np.asarray(_one(f, "wavelengths", "float_list"), np.float32),
      crs=_one(f, "crs", "bytes_list")[0].decode(),
      transform=tuple(_one(f, "transform", "float_list")),
      nodata=int(_one(f, "nodata", "int64_list")[0]),
      nodata_fraction=np.asarray(_one(f, "nodata_fraction", "float_list"), np.float32),
      extra=json.loads(_one(f, "extra_json", "bytes_list")[0].decode()),
  )


def tfds_features(array_specs: Mapping[str, tuple[tuple[int | None, ...], str]]):
  """The TFDS FeaturesDict that describes records holding `array_specs` {name: (shape, dtype)}.

  Written into the dataset directory (features.json) so `tfds.builder_from_directory(DIR)
  .as_data_source(split)` reads the same bytes. Arrays are exposed to TFDS as raw bytes plus
  their shape; fmjax decodes them itself with `decode`.
  """
  import tensorflow_datasets as tfds  # lazy: only dataset writers need the TFDS feature classes
  F = tfds.features
  text = lambda: F.Tensor(shape=(), dtype=np.object_)
  spec = {
      "schema_version": F.Tensor(shape=(), dtype=np.int64),
      "location_id": text(),
      "timestamps": F.Tensor(shape=(None,), dtype=np.object_),
      "sensor": text(),
      "crs": text(),
      "transform": F.Tensor(shape=(6,), dtype=np.float32),
      "nodata": F.Tensor(shape=(), dtype=np.int64),
      "wavelengths": F.Tensor(shape=(None,), dtype=np.float32),
      "nodata_fraction": F.Tensor(shape=(None,), dtype=np.float32),
      "extra_json": text(),
      "array_names": F.Tensor(shape=(None,), dtype=np.object_),
  }
  for name, (shape, _) in array_specs.items():
    spec[f"{name}/bytes"] = text()
    spec[f"{name}/dtype"] = text()
    spec[f"{name}/shape"] = F.Tensor(shape=(len(shape),), dtype=np.int64)
  return F.FeaturesDict(spec)
