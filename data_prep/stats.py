"""Per-band mean/std of a dataset directory: one streaming pass, float64, parallel over shards.

    python -m data_prep.stats DIR [--split train] [--workers 2]

Only valid values count: a value equal to the dataset's nodata value (-32768 for EnMAP) is
skipped, band by band. Each record contributes exact float64 (count, mean, M2) per band; records
and then shards are combined with Chan et al.'s pairwise merge, so the result does not depend on
the shard order or the worker count beyond float64 rounding. std is the population std (ddof=0).
Writes DIR/band_stats.json, which `fmjax.data.dataset_dir.read_dataset_info` returns as
`band_stats`. Statistics come from the training split by default (normalisation must not see
validation data); `--split all` uses every split.
"""
from __future__ import annotations

import argparse
import multiprocessing
import pathlib
import time

import numpy as np
import tqdm

from fmjax.data import dataset_dir, records


class Moments:
  """Per-band count, mean and M2 (sum of squared deviations) in float64."""

  def __init__(self, num_bands: int):
    self.count = np.zeros(num_bands, np.float64)
    self.mean = np.zeros(num_bands, np.float64)
    self.m2 = np.zeros(num_bands, np.float64)

  @classmethod
  def of_pixels(cls, pixels: np.ndarray, nodata: int | None) -> "Moments":
    """Moments of [..., C] values, skipping `nodata` per band (two-pass within the block)."""
    x = pixels.reshape(-1, pixels.shape[-1])
    out = cls(x.shape[1])
    invalid = None if nodata is None else (x == nodata)
    if invalid is None or not invalid.any():  # the common case: no masking work
      values = x.astype(np.float64)
      out.count[:] = x.shape[0]
      out.mean = values.mean(0)
      values -= out.mean
      out.m2 = np.einsum("ij,ij->j", values, values)
      return out
    values = np.where(invalid, 0, x).astype(np.float64)
    out.count = x.shape[0] - invalid.sum(0).astype(np.float64)
    out.mean = values.sum(0) / np.maximum(out.count, 1)
    values -= out.mean
    values[invalid] = 0.0
    out.m2 = np.einsum("ij,ij->j", values, values)
    return out

  def merge(self, other: "Moments") -> "Moments":
    """Chan et al. parallel combination; in place, returns self."""
    n = self.count + other.count
    delta = other.mean - self.mean
    safe = np.maximum(n, 1)
    self.mean = self.mean + delta * other.count / safe
    self.m2 = self.m2 + other.m2 + delta ** 2 * self.count * other.count / safe
    self.count = n
    return self

  @property
  def std(self) -> np.ndarray:
    return np.sqrt(self.m2 / np.maximum(self.count, 1))


def shard_moments(args) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """(count, mean, m2, records) of one ArrayRecord shard."""
  path, nodata, array = args
  from array_record.python.array_record_module import ArrayRecordReader
  reader = ArrayRecordReader(path)
  total, num_records = None, reader.num_records()
  for i in range(num_records):
    record = records.decode(reader.read([i])[0], arrays=(array,))
    pixels = record.arrays[array]
    block = Moments.of_pixels(pixels, record.nodata if nodata is None else nodata)
    total = block if total is None else total.merge(block)
  reader.close()
  if total is None:
    return None, None, None, 0
  return total.count, total.mean, total.m2, num_records


def compute(directory, split: str = "train", workers: int = 2, array: str = "pixels",
            progress: bool = True) -> dict:
  """Band statistics of DIR's `split` ('all' for every split)."""
  info = dataset_dir.read_dataset_info(directory)
  splits = list(info["splits"]) if split == "all" else [split]
  for s in splits:
    if s not in info["splits"]:
      raise ValueError(f"split {s!r} not in {directory}; it has {sorted(info['splits'])} (or 'all')")
  shards = [p for s in splits for p, n in zip(info["splits"][s]["shards"], info["splits"][s]["shard_lengths"]) if n]
  jobs = [(p, info["nodata"], array) for p in shards]
  total, num_records = None, 0
  bar = tqdm.tqdm(total=len(jobs), unit="shard", desc="band stats", disable=not progress)
  if workers > 1 and len(jobs) > 1:
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
      results = pool.imap(shard_moments, jobs)  # ordered: the merge order is fixed
      total, num_records = _merge_all(results, bar)
      pool.close()   # workers exit on their own: a terminated one can leave the resource tracker
      pool.join()    # a semaphore that it reports as leaked when this process exits
  else:
    total, num_records = _merge_all(map(shard_moments, jobs), bar)
  bar.close()
  if total is None:
    raise ValueError(f"{directory} split {split!r} has no records to compute statistics from")
  return dict(mean=total.mean.tolist(), std=total.std.tolist(), count=total.count.astype(np.int64).tolist(),
              split=split, records=num_records, nodata=info["nodata"], ddof=0)


def _merge_all(results, bar):
  total, num_records = None, 0
  for count, mean, m2, n in results:
    bar.update(1)
    if n == 0:
      continue
    num_records += n
    block = Moments(len(mean))
    block.count, block.mean, block.m2 = count, mean, m2
    total = block if total is None else total.merge(block)
  return total, num_records


def compute_and_save(directory, split: str = "train", workers: int = 2, progress: bool = True) -> dict:
  stats = compute(directory, split, workers, progress=progress)
  dataset_dir._atomic_write_json(pathlib.Path(directory) / dataset_dir.BAND_STATS, stats)
  return stats


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("directory", help="dataset directory (data_prep.spectral_earth output)")
  parser.add_argument("--split", default="train", help="split to use, or 'all'")
  parser.add_argument("--workers", type=int, default=2)
  args = parser.parse_args(argv)
  start = time.perf_counter()
  stats = compute_and_save(args.directory, args.split, args.workers)
  mean, std = np.array(stats["mean"]), np.array(stats["std"])
  print(f"{stats['records']} records, {len(mean)} bands: mean {mean.min():.1f}..{mean.max():.1f}, "
        f"std {std.min():.1f}..{std.max():.1f}; {time.perf_counter() - start:.1f} s -> "
        f"{pathlib.Path(args.directory) / dataset_dir.BAND_STATS}")


if __name__ == "__main__":
  main()
