"""Reads (and writes) the metadata of an fmjax dataset directory.

A dataset directory is a valid TFDS dataset (`tfds.builder_from_directory(DIR).as_data_source
(split)` opens it) holding ArrayRecord shards of `fmjax.data.records` bytes:

  DIR/dataset_info.json, DIR/features.json     TFDS metadata (splits, shard lengths, features)
  DIR/<name>-<split>.array_record-00000-of-000NN  the shards
  DIR/fmjax_dataset.json                       sensor, num_bands, wavelengths, nodata, patch size
  DIR/band_stats.json                          per-band mean/std (data_prep.stats), optional
  DIR/report.json                              the converter's report of rejected inputs, optional

`read_dataset_info` needs neither TensorFlow nor TFDS: it parses the JSON files directly.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping, Sequence

FMJAX_INFO = "fmjax_dataset.json"
BAND_STATS = "band_stats.json"
TFDS_INFO = "dataset_info.json"
DEFAULT_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


def shard_filename(name: str, split: str, index: int, num_shards: int,
                   file_format: str = "array_record", template: str = DEFAULT_TEMPLATE) -> str:
  """The TFDS file name of one shard, e.g. `spectral_earth-train.array_record-00003-of-00016`."""
  return (template.replace("{DATASET}", name).replace("{SPLIT}", split)
          .replace("{FILEFORMAT}", file_format)
          .replace("{SHARD_X_OF_Y}", f"{index:05d}-of-{num_shards:05d}")
          .replace("{SHARD_INDEX}", f"{index:05d}").replace("{NUM_SHARDS}", f"{num_shards:05d}"))


def read_dataset_info(directory: str | os.PathLike) -> dict[str, Any]:
  """Everything a data pipeline needs to know about DIR.

  Returns {'name', 'directory', 'file_format', 'splits': {split: {'shards': [paths] (also as 'paths'),
  'shard_lengths': [ints], 'num_examples': int}}, 'sensor', 'num_bands', 'wavelengths',
  'nodata', 'patch_size', 'arrays', 'band_stats': {'mean': [...], 'std': [...], ...} or None,
  'extra'}. Fields the directory does not record are None.
  """
  root = pathlib.Path(directory)
  info_path = root / TFDS_INFO
  if not info_path.exists():
    raise FileNotFoundError(f"{root} is not a dataset directory: no {TFDS_INFO} (write one with "
                            f"python -m data_prep.spectral_earth or write_tfds_metadata)")
  tfds_info = json.loads(info_path.read_text())
  name = tfds_info["name"]
  file_format = tfds_info.get("fileFormat", "array_record")
  splits = {}
  for split in tfds_info.get("splits", []):
    lengths = [int(n) for n in split.get("shardLengths", [])]
    template = split.get("filepathTemplate", DEFAULT_TEMPLATE)
    shards = [str(root / shard_filename(name, split["name"], i, len(lengths), file_format, template))
              for i in range(len(lengths))]
    splits[split["name"]] = dict(shards=shards, paths=shards, shard_lengths=lengths, num_examples=sum(lengths),
                                 num_bytes=int(split.get("numBytes", 0)))
  fmjax_info = _read_json(root / FMJAX_INFO) or {}
  stats = _read_json(root / BAND_STATS)
  return dict(
      name=name, directory=str(root), file_format=file_format, splits=splits,
      sensor=fmjax_info.get("sensor"), num_bands=fmjax_info.get("num_bands"),
      wavelengths=fmjax_info.get("wavelengths"), nodata=fmjax_info.get("nodata"),
      patch_size=fmjax_info.get("patch_size"), arrays=fmjax_info.get("arrays"),
      band_stats=stats, extra={k: v for k, v in fmjax_info.items() if k not in _KNOWN})


_KNOWN = ("sensor", "num_bands", "wavelengths", "nodata", "patch_size", "arrays")


def _read_json(path: pathlib.Path):
  return json.loads(path.read_text()) if path.exists() else None


def write_tfds_metadata(directory: str | os.PathLike, name: str,
                        shard_lengths: Mapping[str, Sequence[int]],
                        shard_bytes: Mapping[str, int],
                        arrays: Mapping[str, tuple[Sequence[int | None], str]],
                        fmjax_info: Mapping[str, Any], description: str = "") -> None:
  """Writes dataset_info.json + features.json (via TFDS's own writer) and fmjax_dataset.json.

  `shard_lengths` {split: [records per shard]} for shards already written under the default
  template; splits with no records are left out (TFDS cannot open an empty split).
  `arrays` {name: (shape, dtype)} are the record arrays (see `records.tfds_features`).
  """
  import tensorflow_datasets as tfds  # lazy: readers of a dataset never need TFDS
  from tensorflow_datasets.core import naming
  from fmjax.data import records
  root = pathlib.Path(directory)
  template = naming.ShardedFileTemplate(data_dir=root, template=DEFAULT_TEMPLATE,
                                        dataset_name=name, filetype_suffix="array_record")
  split_infos = [tfds.core.SplitInfo(name=split, shard_lengths=[int(n) for n in lengths],
                                     num_bytes=int(shard_bytes.get(split, 0)),
                                     filename_template=template.replace(split=split))
                 for split, lengths in shard_lengths.items() if sum(lengths) > 0]
  if not split_infos:
    raise ValueError(f"no split of {name!r} has any record: nothing to describe in {root}")
  tfds.folder_dataset.write_metadata(
      data_dir=root, features=records.tfds_features(arrays), split_infos=split_infos,
      filename_template=template, check_data=False, description=description)
  info = dict(fmjax_info, arrays={k: [list(s), d] for k, (s, d) in arrays.items()},
              schema_version=records.SCHEMA_VERSION)
  _atomic_write_json(root / FMJAX_INFO, info)


def _atomic_write_json(path: pathlib.Path, value) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(value, indent=1))
  os.replace(tmp, path)
