"""Storage options for SpectralEarth records (data_prep --compression): size, write and read speed.

    python -m benchmarks.data_prep_compression [--locations 16] [--size 128]
        [--options none,snappy,zstd:1,zstd:3,zstd:6,blosc:lz4:5,blosc:lz4hc:5,blosc:zstd:5]

Generates a small synthetic archive (data_prep.synthetic), reads one record per location once,
then encodes and writes the same records with each option as the converter does
(`data_prep.spectral_earth.storage_options`: ArrayRecord chunk compression, or Blosc inside the
record with uncompressed chunks; group_size:1) and reads them back in random order with decode,
all timestamps (what a Grain worker does). Times are CPU
seconds of this process (time.process_time), so other load on a shared machine does not skew them. Prints one row per
option and the ratios against uncompressed.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

import numpy as np

from data_prep import spectral_earth, synthetic


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--locations", type=int, default=16)
  parser.add_argument("--size", type=int, default=128)
  parser.add_argument("--options",
                      default="none,snappy,zstd:1,zstd:3,zstd:6,blosc:lz4:5,blosc:lz4hc:5,blosc:zstd:5")
  parser.add_argument("--repeats", type=int, default=2, help="read passes (best one is reported)")
  args = parser.parse_args(argv)
  from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
  from fmjax.data import records
  with tempfile.TemporaryDirectory() as tmp:
    synthetic.generate(tmp, args.locations, seed=0, size=args.size, progress=False)
    located = []
    root = pathlib.Path(tmp)
    for loc, files in spectral_earth.find_locations(root):
      record, *_ = spectral_earth.read_location(root, loc, files, 202, args.size, 0.5)
      located.append(record)
    raw = sum(len(records.encode(r)) for r in located)
    print(f"{len(located)} records, {raw / 1e6:.1f} MB encoded ({args.size}x{args.size}x202 int16, "
          f"{sum(r.num_timestamps for r in located)} timestamps)")
    print(f"{'option':>13} {'MB':>7} {'ratio':>6} {'write MB/s':>10} {'read rec/s':>10} {'read MB/s':>9} "
          f"{'read vs none':>12}")
    base_read = None
    order = np.random.default_rng(0).permutation(len(located))
    for option in args.options.split(","):
      path = os.path.join(tmp, f"bench-{option.replace(':', '_')}.array_record")
      writer_options, pixel_codec = spectral_earth.storage_options(option)
      start = time.process_time()
      writer = ArrayRecordWriter(path, writer_options)
      for record in located:
        writer.write(records.encode(record, pixel_codec))
      writer.close()
      write_s = time.process_time() - start
      size = os.path.getsize(path)
      best = float("inf")
      for _ in range(args.repeats):
        reader = ArrayRecordReader(path)
        start = time.process_time()
        for i in order:
          records.decode(reader.read([int(i)])[0]).pixels.sum(dtype=np.int64)  # touch the pixels
        best = min(best, time.process_time() - start)
        reader.close()
      base_read = base_read or best
      print(f"{option:>13} {size / 1e6:7.1f} {raw / size:6.2f} {raw / 1e6 / write_s:10.0f} "
            f"{len(located) / best:10.1f} {raw / 1e6 / best:9.0f} {base_read / best:12.2f}")


if __name__ == "__main__":
  main()
