"""The fmjax record schema: the ONE module that knows how a record's bytes look.

A record holds one location: all of its timestamps plus the metadata that travels with the
pixels. On disk it is a serialized `tf.train.Example` (so that the dataset directory is also a
valid TFDS dataset), but decoding never needs TensorFlow: the proto is parsed with the protobuf
classes TFDS vendors, and every array is a zero-copy `np.frombuffer` view of one bytes field.

Arrays:
  pixels   [T, H, W, C]  the image stack, channels last, timestamps first (int16 for EnMAP,
                          uint16 for Sentinel-2); nodata pixels keep the sensor's nodata value.
  any other named array  e.g. downstream labels: `mask` [H, W], `multi_hot` [K], `target` [K].
Each array is `<name>/bytes` + `/dtype` + `/shape`. Schema version 2 adds `<name>/codec`:
  raw                    little-endian bytes (version 1's only layout)
  blosc:<cname>:<level>  one Blosc chunk (byte shuffle + cname: lz4, lz4hc, zstd, zlib, blosclz)
                         per index of the leading axis (per timestamp for pixels), concatenated;
                         `<name>/offsets` [T + 1] are the chunk boundaries. A reader decompresses
                         only the timestamps it uses (`decode(..., lazy=True)` -> `CompressedStack`).
Pixels are compressed inside the record rather than by ArrayRecord's chunk compression because the
byte shuffle (high bytes of int16 reflectances are nearly constant) compresses them to ~0.6x where
zstd over interleaved bytes reaches ~0.7x, and Blosc decompresses at GB/s: see docs/pipeline.md.
Metadata: location id, timestamp ids, sensor, band wavelengths, CRS (WKT), affine transform
(GDAL order a,b,c,d,e,f), nodata value, per-timestamp nodata fraction, and free-form JSON.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import numpy as np
from numcodecs import blosc
from tensorflow_datasets.proto import tf_example_pb2

SCHEMA_VERSION = 2
_READABLE_VERSIONS = (1, 2)
RAW = "raw"
_BLOSC_NAMES = ("lz4", "lz4hc", "zstd", "zlib", "blosclz")

# Blosc's own thread pool would fight the input pipeline's threads (one chunk per timestamp is
# decoded by the thread that needs it): always use the single-threaded, re-entrant context API.
blosc.use_threads = False

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


def parse_codec(spec: str):
  """A codec name (`raw` or `blosc:<cname>:<level>`) -> a numcodecs Blosc codec (None for raw)."""
  if spec in (RAW, ""):
    return None
  parts = spec.split(":")
  if len(parts) != 3 or parts[0] != "blosc" or parts[1] not in _BLOSC_NAMES or not parts[2].isdigit() \
      or not 0 <= int(parts[2]) <= 9:
    raise RecordError(f"unknown array codec {spec!r}: use {RAW!r} or blosc:<cname>:<level 0-9> with "
                      f"cname one of {_BLOSC_NAMES}")
  return blosc.Blosc(cname=parts[1], clevel=int(parts[2]), shuffle=blosc.Blosc.SHUFFLE)


class CompressedStack:
  """A [T, ...] array stored as one Blosc chunk per leading index, decompressed on demand.

  Indexing with an int decompresses (and caches) one slice; `np.asarray(stack)` decompresses all.
  The pipeline decodes only the timestamps a sample's views use.
  """

  def __init__(self, blob: bytes, offsets, codec, dtype: np.dtype, shape: tuple[int, ...], name: str):
    if len(offsets) != shape[0] + 1 or offsets[0] != 0 or offsets[-1] != len(blob) \
        or any(b < a for a, b in zip(offsets, offsets[1:])):
      raise RecordError(f"array {name!r}: chunk offsets {list(offsets)} do not split its {len(blob)} "
                        f"bytes into {shape[0]} chunks")
    self._blob, self._offsets, self._codec = memoryview(blob), list(offsets), codec
    self.dtype, self.shape, self._name = dtype, tuple(shape), name
    self._cache: dict[int, np.ndarray] = {}

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __len__(self) -> int:
    return self.shape[0]

  def _chunk(self, index: int) -> np.ndarray:
    if index not in self._cache:
      if not -len(self) <= index < len(self):
        raise IndexError(f"index {index} out of range for {self._name!r} with {len(self)} entries")
      index %= len(self)
      chunk = self._blob[self._offsets[index]:self._offsets[index + 1]]
      out = np.empty(self.shape[1:], self.dtype)
      try:
        # Blosc chunk header: 4 version/flag bytes, then uint32 LE uncompressed size, block size,
        # compressed size. numcodecs checks only that `out` is large enough.
        size, _, stored = np.frombuffer(chunk[:16], "<u4", 3, 4) if len(chunk) >= 16 else (-1, 0, -1)
        if size != out.nbytes or stored != len(chunk):
          raise RecordError(f"its header says {size} bytes from {stored}; expected {out.nbytes} "
                            f"from {len(chunk)}")
        self._codec.decode(chunk, out=out)
      except Exception as e:  # numcodecs raises RuntimeError/ValueError on a damaged chunk
        raise RecordError(f"array {self._name!r}: chunk {index} cannot be decompressed: {e}") from e
      self._cache[index] = out
    return self._cache[index]

  def __getitem__(self, index):
    if isinstance(index, (int, np.integer)):
      return self._chunk(int(index))
    return np.stack([self._chunk(int(i)) for i in np.arange(len(self))[index]])

  def __array__(self, dtype=None, copy=None):
    out = self[:]
    return out if dtype is None else out.astype(dtype)


def encode(record: LocationRecord, pixel_codec: str = RAW) -> bytes:
  """Serialises a record to the bytes stored in ArrayRecord; `pixel_codec` compresses 'pixels'."""
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
  codec = parse_codec(pixel_codec)
  for name, array in record.arrays.items():
    array = np.asarray(array)
    if array.dtype.name not in _DTYPES:
      raise RecordError(f"record {record.location_id}: array {name!r} has dtype {array.dtype}, "
                        f"supported: {_DTYPES}")
    array = np.ascontiguousarray(array, array.dtype.newbyteorder("<"))
    if name == "pixels" and codec is not None:
      chunks = [codec.encode(chunk) for chunk in array]
      _bytes_feature(f[f"{name}/bytes"], [b"".join(chunks)])
      _bytes_feature(f[f"{name}/codec"], [pixel_codec.encode()])
      f[f"{name}/offsets"].int64_list.value.extend(np.cumsum([0] + [len(c) for c in chunks]).tolist())
    else:
      _bytes_feature(f[f"{name}/bytes"], [array.tobytes()])
      _bytes_feature(f[f"{name}/codec"], [RAW.encode()])
      f[f"{name}/offsets"].int64_list.SetInParent()  # present and empty: TFDS sees a [0] tensor
    _bytes_feature(f[f"{name}/dtype"], [array.dtype.name.encode()])
    f[f"{name}/shape"].int64_list.value.extend(array.shape)
  # deterministic: identical records give identical bytes, so re-converted shards are reproducible.
  return example.SerializeToString(deterministic=True)


def _one(feature_map, key, kind):
  if key not in feature_map:
    raise RecordError(f"record has no field {key!r}")
  return getattr(feature_map[key], kind).value


def decode(data: bytes, arrays: tuple[str, ...] | None = None, lazy: bool = False) -> LocationRecord:
  """Parses record bytes. `arrays` limits which arrays are materialised (default: all).

  Raw arrays are zero-copy views of the record's bytes. Compressed ones are decompressed here, or,
  with `lazy`, returned as a `CompressedStack` that decompresses the slices a caller indexes.
  """
  example = tf_example_pb2.Example()
  try:
    example.ParseFromString(data)
  except Exception as e:  # protobuf raises its own DecodeError type
    raise RecordError(f"not a fmjax record ({len(data)} bytes): {e}") from e
  f = example.features.feature
  version = _one(f, "schema_version", "int64_list")
  if not version or version[0] not in _READABLE_VERSIONS:
    raise RecordError(f"record schema version {list(version)} is not supported "
                      f"(this fmjax reads versions {list(_READABLE_VERSIONS)})")
  names = [n.decode() for n in _one(f, "array_names", "bytes_list")]
  out = {}
  for name in names if arrays is None else arrays:
    if name not in names:
      raise RecordError(f"record has no array {name!r}; it has {names}")
    spec = _one(f, f"{name}/codec", "bytes_list")[0].decode() if f"{name}/codec" in f else RAW  # v1: raw
    offsets = _one(f, f"{name}/offsets", "int64_list") if f"{name}/offsets" in f else ()
    out[name] = _array(name, _one(f, f"{name}/bytes", "bytes_list")[0],
                       _one(f, f"{name}/dtype", "bytes_list")[0].decode(),
                       _one(f, f"{name}/shape", "int64_list"), spec, offsets, lazy)
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


def array_from_tfds(example: Mapping[str, Any], name: str = "pixels") -> np.ndarray:
  """One array of a record read through TFDS (`builder.as_data_source(split)[i]`), decoded.

  TFDS hands out the stored fields (`<name>/bytes`, `/codec`, `/offsets`, `/dtype`, `/shape`);
  this applies the codec the way `decode` does.
  """
  as_text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
  return _array(name, example[f"{name}/bytes"], as_text(example[f"{name}/dtype"]), example[f"{name}/shape"],
                as_text(example.get(f"{name}/codec", RAW)), example.get(f"{name}/offsets", ()), lazy=False)


def _array(name: str, raw: bytes, dtype: str, shape, codec_spec: str, offsets, lazy: bool):
  """One stored array from its fields: a zero-copy view (raw) or its Blosc chunks decompressed."""
  dtype, shape = np.dtype(dtype).newbyteorder("<"), tuple(int(v) for v in shape)
  codec = parse_codec(codec_spec)
  if codec is not None:
    stack = CompressedStack(raw, [int(v) for v in offsets], codec, dtype, shape, name)
    return stack if lazy else np.asarray(stack)
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(raw) != expected:
    raise RecordError(f"array {name!r}: {len(raw)} bytes, expected {expected} for {shape} {dtype}")
  return np.frombuffer(raw, dtype=dtype).reshape(shape)


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
    spec[f"{name}/codec"] = text()
    spec[f"{name}/offsets"] = F.Tensor(shape=(None,), dtype=np.int64)
    spec[f"{name}/dtype"] = text()
    spec[f"{name}/shape"] = F.Tensor(shape=(len(shape),), dtype=np.int64)
  return F.FeaturesDict(spec)
