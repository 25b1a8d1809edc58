"""Downstream datasets (written by data_prep/downstream.py) -> normalised numpy batches.

Downstream sets are small (10^3-10^4 patches), so this reads records by index from the ArrayRecord
shards and keeps decoded samples in an optional in-memory cache; no Grain pipeline needed.
Each host reads only its own slice of every global batch (`host_slice`), and the protocol turns
the slices into one global array with `jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from fmjax.data import sources


@dataclasses.dataclass
class TaskInfo:
  name: str
  type: str                # 'multilabel' | 'segmentation'
  num_classes: int
  class_names: list[str]
  ignore_index: int | None
  num_bands: int
  label_key: str
  band_mean: np.ndarray
  band_std: np.ndarray
  splits: dict[str, int]


def read_task(directory: str) -> TaskInfo:
  path = os.path.join(directory, "downstream.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} is not a downstream dataset (no downstream.json); build it "
                            f"with `python -m data_prep.downstream` or data_prep.synthetic_downstream")
  with open(path) as f:
    info = json.load(f)
  return TaskInfo(name=info["task"], type=info["type"], num_classes=info["num_classes"],
                  class_names=info["class_names"], ignore_index=info["ignore_index"],
                  num_bands=info["num_bands"], label_key=info["label_key"],
                  band_mean=np.asarray(info["band_mean"], np.float32),
                  band_std=np.asarray(info["band_std"], np.float32), splits=info["splits"])


class SplitData:
  """One split: index -> (normalised image [H, W, C] float32, label)."""

  def __init__(self, directory: str, split: str, info: TaskInfo, band_mean=None, band_std=None,
               cache: bool = True):
    self.info = info
    self.source = sources.open_split(directory, split)
    self.split = split
    self.mean = np.asarray(info.band_mean if band_mean is None else band_mean, np.float32)
    self.std = np.asarray(info.band_std if band_std is None else band_std, np.float32)
    self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None
    self.indices = np.arange(len(self.source))

  def __len__(self) -> int:
    return len(self.indices)

  def subset(self, fraction: float, seed: int) -> "SplitData":
    """A random `fraction` of the samples (at least one), fixed by `seed` (label-fraction sweeps)."""
    if not 0 < fraction <= 1:
      raise ValueError(f"label fraction {fraction} must be in (0, 1]")
    out = object.__new__(SplitData)
    out.__dict__.update(self.__dict__)
    count = max(1, int(round(fraction * len(self.indices))))
    out.indices = np.sort(np.random.default_rng(seed).permutation(self.indices)[:count])
    return out

  def sample(self, position: int) -> tuple[np.ndarray, np.ndarray]:
    index = int(self.indices[position])
    if self._cache is not None and index in self._cache:
      return self._cache[index]
    record = self.source.decode(index, ("pixels", self.info.label_key))
    pixels = record.pixels[0]
    if pixels.shape[-1] != self.mean.shape[0]:
      raise ValueError(f"{self.split} record {index} has {pixels.shape[-1]} bands but the band "
                       f"statistics have {self.mean.shape[0]}")
    image = (pixels.astype(np.float32) - self.mean) / self.std
    image[pixels == record.nodata] = 0.0   # nodata -> the band mean
    label = np.asarray(record.arrays[self.info.label_key])
    out = (image, label.astype(np.int32))
    if self._cache is not None:
      self._cache[index] = out
    return out

  def batch(self, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Stacks samples; positions < 0 are padding (copies of sample 0 with valid = 0)."""
    items = [self.sample(max(int(p), 0)) for p in positions]
    return {"image": np.stack([i for i, _ in items]), "label": np.stack([l for _, l in items]),
            "valid": (np.asarray(positions) >= 0).astype(np.int32)}


def host_slice(global_positions: np.ndarray) -> np.ndarray:
  """This process's contiguous part of a global batch (what make_array_from_process_local_data expects)."""
  n = jax.process_count()
  per = len(global_positions) // n
  i = jax.process_index()
  return global_positions[i * per:(i + 1) * per]


def epoch_batches(size: int, batch_size: int, rng: np.random.Generator | None, drop_last: bool):
  """Global position batches for one epoch; the last one padded with -1 unless dropped."""
  order = rng.permutation(size) if rng is not None else np.arange(size)
  if drop_last and size >= batch_size:
    order = order[:size - size % batch_size]
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    if len(chunk) < batch_size:
      chunk = np.concatenate([chunk, -np.ones(batch_size - len(chunk), chunk.dtype)])
    yield chunk
