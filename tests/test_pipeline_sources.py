"""ArrayRecord sources: reading across shards, and errors that name the shard and record."""
import os

import numpy as np
import pytest

from fmjax.data import records, sources


def _encoded(count, bands=4, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    pixels = rng.integers(0, 1000, (1, 6, 6, bands)).astype(np.int16)
    out.append(records.encode(records.LocationRecord(f"{i:07d}", ["00001"], {"pixels": pixels})))
  return out


def test_reads_every_record_across_shards_in_order(tmp_path):
  encoded = _encoded(11)
  paths = sources.write_shards(str(tmp_path / "toy-train"), encoded, num_shards=3)
  source = sources.open_split(str(tmp_path), "train")
  assert source.paths == paths and len(source) == 11 and sum(source.shard_sizes) == 11
  for i in range(11):
    assert source[i] == encoded[i]
    assert source.decode(i).location_id == f"{i:07d}"
  assert source.locate(10) == (paths[2], 10 - source.shard_sizes[0] - source.shard_sizes[1])
  with pytest.raises(IndexError, match="11 records"):
    source[11]


def test_source_survives_pickling_for_worker_processes(tmp_path):
  import pickle
  encoded = _encoded(4)
  sources.write_shards(str(tmp_path / "toy-train"), encoded, num_shards=2)
  source = sources.open_split(str(tmp_path), "train")
  assert source[3] == encoded[3]  # opens a reader
  clone = pickle.loads(pickle.dumps(source))
  assert clone[1] == encoded[1] and len(clone) == 4


def test_missing_shard_is_named(tmp_path):
  paths = sources.write_shards(str(tmp_path / "toy-train"), _encoded(4), num_shards=2)
  os.remove(paths[1])
  with pytest.raises(sources.SourceError, match=f"{paths[1]} does not exist"):
    sources.RecordSource(paths)


def test_corrupt_shard_is_named(tmp_path):
  paths = sources.write_shards(str(tmp_path / "toy-train"), _encoded(4), num_shards=2)
  with open(paths[0], "rb") as f:
    data = f.read()
  with open(paths[0], "wb") as f:
    f.write(data[: len(data) // 3])  # truncated: the footer/index is gone
  with pytest.raises(sources.SourceError, match=f"{paths[0]} is corrupt"):
    sources.open_split(str(tmp_path), "train")


def test_corrupt_chunk_names_shard_and_record(tmp_path):
  encoded = _encoded(3)
  paths = sources.write_shards(str(tmp_path / "toy-train"), encoded, num_shards=1,
                               options="group_size:1,uncompressed")
  data = bytearray(open(paths[0], "rb").read())
  # Overwrite bytes inside the second record's pixels (random, so unique in the file); its chunk
  # checksum then fails on read.
  offset = data.find(records.decode(encoded[1]).pixels.tobytes()[50:250])
  assert offset > 0
  data[offset:offset + 100] = b"\x00" * 100
  open(paths[0], "wb").write(bytes(data))
  source = sources.RecordSource(paths)
  with pytest.raises(sources.SourceError, match=rf"record 1 of shard {paths[0]}"):
    source[1]


def test_undecodable_record_names_shard_and_index(tmp_path):
  encoded = _encoded(5)
  encoded[3] = b"not a tf.train.Example at all" * 3
  paths = sources.write_shards(str(tmp_path / "toy-train"), encoded, num_shards=2)
  source = sources.RecordSource(paths)
  path, local = source.locate(3)
  with pytest.raises(sources.SourceError, match=rf"record {local} of shard {path} \(global index 3\)"):
    source.decode(3)


def test_empty_dataset_is_a_clear_error(tmp_path):
  paths = sources.write_shards(str(tmp_path / "toy-train"), [], num_shards=1)
  with pytest.raises(sources.SourceError, match="empty"):
    sources.RecordSource(paths)
  with pytest.raises(sources.SourceError, match="empty"):
    sources.RecordSource([])


def test_unknown_split_lists_present_splits(tmp_path):
  sources.write_shards(str(tmp_path / "toy-train"), _encoded(2), num_shards=1)
  with pytest.raises(sources.SourceError, match=r"split 'validation'.*\['train'\]"):
    sources.open_split(str(tmp_path), "validation")
  with pytest.raises(sources.SourceError, match="does not exist"):
    sources.open_split(str(tmp_path / "nope"), "train")
