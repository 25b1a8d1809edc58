"""Random-access sources of fmjax records: ArrayRecord shard files -> record bytes.

`RecordSource` is a Grain `RandomAccessDataSource` over a list of ArrayRecord shards. It opens
every shard once at start-up to count its records, so a missing, truncated or corrupt shard
fails immediately with the shard's path in the message, and an unreadable record later fails
with its shard and index within the shard. Readers are re-opened lazily after pickling, so the
source works in Grain worker processes too.

`find_shards(directory, split)` lists a dataset directory's shards for a split: from the TFDS
dataset_info written by data_prep (`fmjax.data.dataset_dir.read_dataset_info`) when present, else
by globbing the TFDS shard names `<name>-<split>.array_record-NNNNN-of-NNNNN`.
"""
from __future__ import annotations

import bisect
import glob
import os
import threading
from typing import Sequence, SupportsIndex

import numpy as np

from fmjax.data import records

# Random access: no read-ahead (it would read whole chunks we do not need).
_READER_OPTIONS = "readahead_buffer_size:0"


class SourceError(ValueError):
  """A dataset that cannot be read: missing/corrupt shard, bad record, empty split."""


def _open_reader(path: str):
  from array_record.python import array_record_module  # lazy: keeps `import fmjax.data` light
  if not os.path.exists(path):
    raise SourceError(f"ArrayRecord shard {path} does not exist")
  reader = array_record_module.ArrayRecordReader(path, _READER_OPTIONS)
  # The reader does not raise on a bad file: it opens in a failed state and reports 0 records.
  if not reader.ok():
    raise SourceError(f"ArrayRecord shard {path} is corrupt or not an ArrayRecord file "
                      f"({os.path.getsize(path)} bytes)")
  return reader


def _glob_shards(directory: str, split: str) -> list[str]:
  pattern = os.path.join(directory, f"*-{split}.array_record*")
  paths = sorted(glob.glob(pattern))
  if not paths:
    present = sorted({os.path.basename(p).split(".array_record")[0].rsplit("-", 1)[-1]
                      for p in glob.glob(os.path.join(directory, "*.array_record*"))})
    raise SourceError(f"no ArrayRecord shards for split {split!r} in {directory} (looked for "
                      f"{pattern}); splits present: {present or 'none'}")
  return paths


def find_shards(directory: str, split: str) -> list[str]:
  """Shard paths of `split` in a dataset directory, in record order.

  From DIR/dataset_info.json (`fmjax.data.dataset_dir.read_dataset_info`) when present, else the
  TFDS shard names found by globbing (a bare directory of shards: tests, hand-made data).
  """
  from fmjax.data import dataset_dir
  if not os.path.isdir(directory):
    raise SourceError(f"dataset directory {directory} does not exist")
  try:
    info = dataset_dir.read_dataset_info(directory)
  except FileNotFoundError:
    return _glob_shards(directory, split)
  splits = info["splits"]
  if split not in splits:
    raise SourceError(f"split {split!r} is not in the dataset {directory}; splits: {sorted(splits)}")
  return list(splits[split]["paths"])


class RecordSource:
  """Grain random-access source: global record index -> record bytes, across shards."""

  def __init__(self, paths: Sequence[str]):
    self._paths = [str(p) for p in paths]
    if not self._paths:
      raise SourceError("no shard paths given: the dataset is empty")
    counts = []
    for path in self._paths:
      reader = _open_reader(path)
      counts.append(reader.num_records())
      reader.close()
    self._counts = counts
    self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
    if self._starts[-1] == 0:
      raise SourceError(f"the dataset is empty: {len(self._paths)} shard(s) with 0 records "
                        f"({self._paths[0]}{' ...' if len(self._paths) > 1 else ''})")
    self._readers: dict[int, object] = {}
    self._lock = threading.Lock()

  @property
  def paths(self) -> list[str]:
    return list(self._paths)

  @property
  def shard_sizes(self) -> list[int]:
    return list(self._counts)

  def __len__(self) -> int:
    return self._starts[-1]

  def locate(self, index: int) -> tuple[str, int]:
    """(shard path, index within the shard) of a global record index."""
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} is out of range: the dataset has {len(self)} records")
    shard = bisect.bisect_right(self._starts, index) - 1
    return self._paths[shard], index - self._starts[shard]

  def _reader(self, shard: int):
    reader = self._readers.get(shard)
    if reader is None:
      with self._lock:
        reader = self._readers.get(shard)
        if reader is None:
          reader = self._readers[shard] = _open_reader(self._paths[shard])
    return reader

  def __getitem__(self, record_key: SupportsIndex) -> bytes:
    index = record_key.__index__()
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} is out of range: the dataset has {len(self)} records")
    shard = bisect.bisect_right(self._starts, index) - 1
    local = index - self._starts[shard]
    try:
      return self._reader(shard).read([local])[0]
    except SourceError:
      raise
    except Exception as e:  # array_record raises RuntimeError on checksum / I/O failures
      raise SourceError(f"cannot read record {local} of shard {self._paths[shard]} "
                        f"(global index {index}): {e}") from e

  def decode(self, index: int, arrays: tuple[str, ...] | None = None,
             lazy: bool = False) -> records.LocationRecord:
    """Reads and decodes one record; errors name the shard and the record's index in it.

    `lazy`: compressed arrays come as `records.CompressedStack`s (decompressed when indexed; wrap
    that use in `except records.RecordError as e: raise source.decode_error(index, e)`).
    """
    data = self[index]
    try:
      return records.decode(data, arrays, lazy)
    except records.RecordError as e:
      raise self.decode_error(index, e) from e

  def decode_error(self, index: int, error: Exception) -> SourceError:
    """The SourceError for a record that failed to decode, naming its shard and index in it."""
    path, local = self.locate(index)
    return SourceError(f"record {local} of shard {path} (global index {index}) cannot be decoded: {error}")

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_readers"] = {}  # C++ readers do not pickle; workers re-open lazily
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def close(self):
    with self._lock:
      for reader in self._readers.values():
        reader.close()
      self._readers.clear()

  def __repr__(self) -> str:
    return f"RecordSource({len(self._paths)} shards, {len(self)} records, first={self._paths[0]})"


def open_split(directory: str, split: str) -> RecordSource:
  """The `RecordSource` of one split of a dataset directory."""
  return RecordSource(find_shards(directory, split))


def write_shards(path_prefix: str, encoded: Sequence[bytes], num_shards: int = 1,
                 options: str = "group_size:1") -> list[str]:
  """Writes record bytes contiguously into `num_shards` TFDS-named shards.

  A small helper for tests and benchmarks; the real converter lives in data_prep/. `options` is the
  ArrayRecord writer option string (e.g. 'group_size:1,zstd:3' or 'group_size:1,uncompressed').
  Returns the shard paths, named `<path_prefix>.array_record-0000i-of-0000n`.
  """
  from array_record.python import array_record_module
  bounds = np.linspace(0, len(encoded), num_shards + 1).round().astype(int)
  paths = []
  for i in range(num_shards):
    path = f"{path_prefix}.array_record-{i:05d}-of-{num_shards:05d}"
    writer = array_record_module.ArrayRecordWriter(path, options)
    for data in encoded[bounds[i]:bounds[i + 1]]:
      writer.write(data)
    writer.close()
    paths.append(path)
  return paths
