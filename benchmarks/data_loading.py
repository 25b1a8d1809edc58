"""Data loading: the fmjax Grain pipeline over ArrayRecord vs GeoTIFF-per-file loaders.

    python -m benchmarks.data_loading [--locations 24] [--batches 4] [--batch-size 8] [--threads 2]
        [--compression blosc:lz4hc:5 --compression uncompressed ...] [--prefetch 2]
        [--workdir DIR] [--rounds 3] [--cold]

One run, same machine, same threads, same augmentation code (`fmjax.data.augment.crop_view`, the
MAE recipe: random resized crop 128, scale 0.4-1, h/v flips; per-band normalisation; nodata ->
band mean) and the same output (a float32 jax.Array batch [B, 1, 128, 128, 202]). The data are
written first from one synthetic archive (`python -m data_prep.synthetic`, else a built-in random
generator):
  geotiff       <root>/enmap/<location>/<timestamp>.tif, uncompressed, band-interleaved (the
                official SpectralEarth layout); one sample = one file read whole with rasterio,
                like the official PyTorch dataset; each worker thread builds whole batches
                (read, augment, collate), like PyTorch DataLoader workers
  geotiff-defl  the same files DEFLATE-compressed (predictor 2)
  fmjax[...]    ArrayRecord shards of location records (all timestamps of a location together),
                one variant per `--compression`, stored as data_prep's converter stores them
                (`blosc:...`: pixels compressed per timestamp inside the record, data_prep's
                default; others: ArrayRecord chunk compression)
Loaders are timed in interleaved rounds (each fmjax variant, geotiff, geotiff-defl, repeat) after
one warm-up batch each. Every loader reads ahead `prefetch` batches with `threads` threads and
runs only while timed: each round starts it fresh and stops it (no read-ahead in the others'
time). The page cache is warm for all of them (the files were just written), or with `--cold`
each loader's files are evicted from it before each of its rounds. The median round is
reported. Prints samples/s, ratios, bytes on disk per location and files per dataset, then where
the time goes: read + decode per sample, and augmentation per view on the host vs jitted.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def _generate_geotiffs(root: str, locations: int, seed: int) -> None:
  try:
    subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--output", root, "--locations",
                    str(locations), "--seed", str(seed)], check=True, capture_output=True)
    return
  except (subprocess.CalledProcessError, FileNotFoundError) as e:
    print(f"data_prep.synthetic unavailable ({e}); using the built-in generator")
  import rasterio
  from rasterio.transform import Affine
  rng = np.random.default_rng(seed)
  for i in range(locations):
    for t in range(2 if i % 5 == 0 else 1):
      os.makedirs(f"{root}/enmap/{i:07d}", exist_ok=True)
      base = rng.integers(500, 4000, (202, 1, 1))
      pixels = (base + rng.normal(0, 150, (202, 128, 128))).astype(np.int16)
      with rasterio.open(f"{root}/enmap/{i:07d}/{t:05d}.tif", "w", driver="GTiff", dtype="int16",
                         count=202, height=128, width=128, crs="EPSG:32632", nodata=-32768,
                         transform=Affine(30, 0, 500000, 0, -30, 5000000), interleave="band") as dst:
        dst.write(pixels)


def _deflate_copy(src_root: str, dst_root: str) -> None:
  import rasterio
  for path in sorted(glob.glob(f"{src_root}/enmap/*/*.tif")):
    out = path.replace(src_root, dst_root, 1)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with rasterio.open(path) as src:
      profile = dict(src.profile, compress="deflate", predictor=2)
      data = src.read()
    with rasterio.open(out, "w", **profile) as dst:
      dst.write(data)


def _write_array_records(geotiff_root: str, out_dir: str, compression: str) -> None:
  """The converter's storage for a --compression value (data_prep.spectral_earth.storage_options)."""
  import rasterio
  from data_prep import spectral_earth
  from fmjax.data import records, sources
  writer_options, pixel_codec = spectral_earth.storage_options(compression)
  encoded = []
  for location in sorted(os.listdir(f"{geotiff_root}/enmap")):
    files = sorted(glob.glob(f"{geotiff_root}/enmap/{location}/*.tif"))
    stack = []
    for path in files:
      with rasterio.open(path) as src:
        stack.append(src.read().transpose(1, 2, 0))
        nodata = int(src.nodata if src.nodata is not None else -32768)
    encoded.append(records.encode(records.LocationRecord(
        location, [os.path.basename(f)[:-4] for f in files], {"pixels": np.stack(stack)}, nodata=nodata),
        pixel_codec))
  os.makedirs(out_dir, exist_ok=True)
  sources.write_shards(f"{out_dir}/bench-train", encoded, num_shards=4, options=writer_options)


def _dir_bytes(root: str) -> tuple[int, int]:
  sizes = [os.path.getsize(p) for p in glob.glob(f"{root}/**/*", recursive=True) if os.path.isfile(p)]
  return sum(sizes), len(sizes)


class GeoTiffLoader:
  """One GeoTIFF per sample read whole with rasterio, augmented with the same code.

  Like a PyTorch DataLoader with `threads` workers: each worker builds whole batches (reads,
  augments and collates its batch's samples, as DataLoader workers run the dataset and
  `collate_fn`), and `prefetch` batches are kept in flight, as the Grain pipeline does.
  """

  def __init__(self, root, batch_size, threads, crop, mean, std, prefetch=2, seed=0):
    import rasterio  # noqa: F401  (fail early)
    self.files = sorted(glob.glob(f"{root}/enmap/*/*.tif"))
    self.batch_size, self.threads, self.prefetch = batch_size, threads, max(prefetch, threads, 1)
    self.crop, self.mean, self.inv_std = crop, mean, (1.0 / std).astype(np.float32)
    self.order = np.random.default_rng(seed).permutation(len(self.files))
    self.position = 0
    self.pool, self.pending = None, []

  def _sample(self, index):
    import rasterio
    from fmjax.data import augment
    with rasterio.open(self.files[index]) as src:
      pixels = src.read().transpose(1, 2, 0)  # [C, H, W] -> [H, W, C]
      nodata = src.nodata
    rng = np.random.default_rng([0, int(index)])
    return augment.crop_view(pixels, rng, self.crop, self.mean, None if nodata is None else int(nodata),
                             self.mean, self.inv_std)

  def _batch(self, indices):
    return np.stack([self._sample(i) for i in indices])[:, None]  # the collate, in the worker

  def start(self):
    self.pool, self.pending = concurrent.futures.ThreadPoolExecutor(self.threads), []

  def stop(self):
    for future in self.pending:
      future.cancel()
    self.pool.shutdown(wait=True)
    self.position -= len(self.pending) * self.batch_size  # not consumed: read again next round

  def _fill(self):
    while len(self.pending) < self.prefetch:
      indices = [self.order[(self.position + i) % len(self.order)] for i in range(self.batch_size)]
      self.position += self.batch_size
      self.pending.append(self.pool.submit(self._batch, indices))

  def __next__(self):
    import jax
    self._fill()
    images = self.pending.pop(0).result()
    self._fill()
    return {"image": jax.device_put(images)}


class _GrainLoader:
  """An fmjax pipeline started fresh for each timed round (from the saved iterator state).

  `host_only`: yield this host's NumPy batches (no device transfer, no jitted augmentation).
  """

  def __init__(self, pipe, host_only=False):
    self.pipe, self.state, self.host_only = pipe, None, host_only

  def start(self):
    self.pipe.grain_iterator = iter(self.pipe.dataset)
    if self.state is not None:
      self.pipe.grain_iterator.set_state(self.state)

  def stop(self):
    self.state = self.pipe.grain_iterator.get_state()
    self.pipe.close()

  def __next__(self):
    return self.pipe.next_host_batch() if self.host_only else next(self.pipe)


def _drop_page_cache(paths) -> None:
  """Evicts the files from the page cache (clean pages; no root needed): the next reads hit the disk."""
  for path in paths:
    fd = os.open(path, os.O_RDONLY)
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def _time_batches(loader, batches: int) -> float:
  """Samples/s over `batches` batches from a freshly started loader (start-up and the read-ahead
  left unconsumed at the end are part of the cost, the same for every loader)."""
  import jax
  start = time.perf_counter()
  loader.start()
  count = 0
  for _ in range(batches):
    batch = jax.block_until_ready(next(loader))
    count += batch["record_index" if "record_index" in batch else "image"].shape[0]
  rate = count / (time.perf_counter() - start)
  loader.stop()
  return rate


def _compare_host_work(build, config, args, mesh):
  """Samples/s of the host side alone (Grain batches, no device work) for both augment_on modes:
  what an accelerator host must sustain; with 'device' the augmentation left the host."""
  loaders = {}
  for where in ("host", "device"):
    config.augment_on = where
    loaders[where] = _GrainLoader(build(), host_only=True)
  config.augment_on = "host"
  for loader in loaders.values():
    _time_batches(loader, 1)
  rates = {where: [] for where in loaders}
  for _ in range(args.rounds):
    for where, loader in loaders.items():
      rates[where].append(_time_batches(loader, args.batches))
  print(f"\nhost side only ({config.dir.rsplit('/', 1)[-1]}: read + decode + [augment] + batch, no device work):")
  for where, values in rates.items():
    print(f"  augment_on={where:<7} {statistics.median(values):7.1f} samples/s   rounds "
          + " ".join(f"{v:.1f}" for v in values))


def _compare_read_costs(arrayrecords, geotiffs, rounds):
  """ms per sample to get one timestamp's int16 [H, W, C] pixels (read + decode), one thread."""
  import rasterio
  from fmjax.data import sources
  readers = {}
  for name, directory in arrayrecords.items():
    source = sources.open_split(directory, "train")
    # lazy, as the pipeline reads: a compressed record decompresses only the timestamp used
    readers[name] = (len(source), lambda i, s=source: s.decode(i, ("pixels",), lazy=True).pixels[0])
  for name, root in geotiffs.items():
    files = sorted(glob.glob(f"{root}/enmap/*/*.tif"))

    def read(i, files=files):
      with rasterio.open(files[i]) as src:
        return src.read().transpose(1, 2, 0)
    readers[name] = (len(files), read)
  times = {name: [] for name in readers}
  for _ in range(rounds):
    for name, (count, read) in readers.items():
      start = time.perf_counter()
      for i in range(count):
        read(i).sum(dtype=np.int64)  # touch the pixels (GeoTIFF arrays are transposed views)
      times[name].append((time.perf_counter() - start) / count * 1e3)
  print("\nread + decode one sample's int16 pixels (one timestamp; one thread; the loaders above add "
        "augmentation):")
  for name, values in times.items():
    print(f"  {name:<28} {statistics.median(values):7.1f} ms/sample   rounds " + " ".join(f"{v:.1f}" for v in values))


def _compare_host_and_jitted_augment(directory, crop, mean, std, batch_size, rounds):
  """Same views two ways: OpenCV/NumPy on the host (the pipeline's path) vs int16 + matrices -> jitted XLA.

  The jitted variant ships the full int16 image (2 bytes/value instead of 4) and the two small
  matrices per view, and does nodata fill, normalisation, crop, resize, flips (and blur) on the
  device. On this CPU-only machine "the device" is the same cores, so this shows the compute
  cost; on an accelerator that part is nearly free.
  """
  import jax
  import jax.numpy as jnp
  from fmjax.data import augment, sources
  source = sources.open_split(directory, "train")
  pixels = np.stack([source.decode(i % len(source), ("pixels",)).pixels[0] for i in range(batch_size)])
  inv_std = (1.0 / std).astype(np.float32)
  height, width = pixels.shape[1:3]

  @jax.jit
  def apply(pixels, rows, cols, mean, inv_std):
    x = (pixels.astype(jnp.float32) - mean) * inv_std
    x = jnp.where(pixels == -32768, 0.0, x)  # nodata -> band mean -> 0
    x = jnp.einsum("bsh,bhwc->bswc", rows, x)
    return jnp.einsum("btw,bswc->bstc", cols, x)

  def host(seed):
    return jax.device_put(np.stack([augment.crop_view(p, np.random.default_rng([seed, i]), crop, mean, -32768,
                                                      mean, inv_std) for i, p in enumerate(pixels)]))

  def device(seed):
    mats = [augment.embed_matrices(*augment.view_matrices(np.random.default_rng([seed, i]), height, width, crop),
                                   height, width) for i in range(len(pixels))]
    rows = np.stack([m[0] for m in mats])
    cols = np.stack([m[1] for m in mats])
    return apply(jax.device_put(pixels), rows, cols, mean, inv_std)

  np.testing.assert_allclose(np.asarray(host(0)), np.asarray(device(0)), rtol=1e-3, atol=1e-3)
  times = {"host (crop_view)": [], "jitted (XLA on this CPU)": []}
  for r in range(rounds):
    for name, fn in (("host (crop_view)", host), ("jitted (XLA on this CPU)", device)):
      start = time.perf_counter()
      fn(r + 1).block_until_ready()
      times[name].append((time.perf_counter() - start) / len(pixels) * 1e3)
  print(f"\naugment + normalise one 128x128x{pixels.shape[-1]} view, batch {len(pixels)} (same views, checked equal):")
  for name, values in times.items():
    print(f"  {name:<26} {statistics.median(values):7.1f} ms/view   rounds " + " ".join(f"{v:.1f}" for v in values))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--locations", type=int, default=24)
  parser.add_argument("--batches", type=int, default=4, help="timed batches per round and loader")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--threads", type=int, default=2, help="reader threads, the same for every loader")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--prefetch", type=int, default=2, help="batches read ahead, the same for every loader")
  parser.add_argument("--compression", action="append", default=None,
                      help="storage, repeatable: blosc:CNAME:LEVEL (pixels compressed inside the record, "
                           "as data_prep's default) | uncompressed | snappy | zstd:N[,window_log:W] "
                           "(ArrayRecord chunks) (default: blosc:lz4hc:5, zstd:9,window_log:24, "
                           "uncompressed)")
  parser.add_argument("--workdir", default="", help="keep the written data here (default: a temp dir)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--cold", action="store_true",
                      help="evict each loader's files from the page cache before each timed round "
                           "(posix_fadvise): reads come from the disk, as for an archive larger than RAM")
  args = parser.parse_args(argv)
  args.compression = args.compression or ["blosc:lz4hc:5", "zstd:9,window_log:24", "uncompressed"]

  import jax
  from fmjax import parallel
  from fmjax.data import augment, pipeline, sources
  from fmjax.objectives.base import ViewSpec

  workdir = args.workdir or tempfile.mkdtemp(prefix="fmjax_bench_data_")
  raw, deflate = f"{workdir}/geotiff", f"{workdir}/geotiff_deflate"
  arrayrecords = {f"fmjax[{c}]": f"{workdir}/arrayrecord_{i}" for i, c in enumerate(args.compression)}
  for d in (raw, deflate, *arrayrecords.values()):
    shutil.rmtree(d, ignore_errors=True)
  t0 = time.perf_counter()
  _generate_geotiffs(raw, args.locations, args.seed)
  _deflate_copy(raw, deflate)
  for compression, directory in zip(args.compression, arrayrecords.values()):
    t1 = time.perf_counter()
    _write_array_records(raw, directory, compression)
    print(f"ArrayRecord {compression}: written in {time.perf_counter() - t1:.1f} s")
  print(f"wrote {args.locations} locations in {2 + len(arrayrecords)} formats to {workdir} in "
        f"{time.perf_counter() - t0:.1f} s")

  config = pipeline.default_config()
  config.stats = "sample"
  config.read_threads = args.threads
  config.prefetch = args.prefetch
  config.aug.scale, config.aug.hflip, config.aug.vflip = (0.4, 1.0), 0.5, 0.5
  first = next(iter(arrayrecords.values()))
  mean, std = pipeline.dataset_band_stats(config, sources.open_split(first, "train"))
  crop = augment.CropConfig(size=config.crop_size, scale=tuple(config.aug.scale), ratio=tuple(config.aug.ratio))
  mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  loaders = {}
  build = lambda: pipeline.build_input(config, global_batch_size=args.batch_size, views=ViewSpec(1, 0),
                                      mesh=mesh, seed=args.seed, stats=(mean, std))
  for name, directory in arrayrecords.items():
    config.dir = directory
    loaders[name] = _GrainLoader(build())
  last = list(arrayrecords)[-1]
  config.augment_on = "device"   # the same views, made by a jitted function (here: on the same CPU)
  loaders[last[:-1] + ",augment_on=device]"] = _GrainLoader(build())
  config.augment_on = "host"
  loaders["geotiff"] = GeoTiffLoader(raw, args.batch_size, args.threads, crop, mean, std, args.prefetch)
  loaders["geotiff-defl"] = GeoTiffLoader(deflate, args.batch_size, args.threads, crop, mean, std,
                                           args.prefetch)
  for iterator in loaders.values():  # warm-up: first reads, rasterio/GDAL and Grain start-up
    _time_batches(iterator, 1)
  files = {name: glob.glob(f"{d}/*.array_record*") for name, d in arrayrecords.items()}
  files[last[:-1] + ",augment_on=device]"] = files[last]
  files["geotiff"], files["geotiff-defl"] = loaders["geotiff"].files, loaders["geotiff-defl"].files
  rates = {name: [] for name in loaders}
  for _ in range(args.rounds):
    for name, iterator in loaders.items():
      if args.cold:
        _drop_page_cache(files[name])
      rates[name].append(_time_batches(iterator, args.batches))

  sizes = {name: _dir_bytes(directory) for name, directory in arrayrecords.items()}
  sizes["geotiff"], sizes["geotiff-defl"] = _dir_bytes(f"{raw}/enmap"), _dir_bytes(f"{deflate}/enmap")
  for name in loaders:
    if name not in sizes:  # the augment_on=device variant reads the last ArrayRecord directory
      sizes[name] = sizes[list(arrayrecords)[-1]]
  median = {name: statistics.median(r) for name, r in rates.items()}
  print(f"\n{args.locations} locations, {len(glob.glob(f'{raw}/enmap/*/*.tif'))} GeoTIFFs, batch "
        f"{args.batch_size}, {args.threads} threads, {os.cpu_count()} cores; median of {args.rounds} rounds x "
        f"{args.batches} batches; page cache {'dropped before each round' if args.cold else 'warm'}; "
        f"'vs tif' / 'vs defl' = this loader's samples/s over the GeoTIFF loaders'")
  width = max(len(n) for n in loaders) + 2
  print(f"{'loader':<{width}}{'samples/s':>10}{'vs tif':>8}{'vs defl':>8}{'MB/location':>13}{'bytes vs tif':>14}"
        f"{'files':>7}   rounds")
  for name in loaders:
    total, files = sizes[name]
    print(f"{name:<{width}}{median[name]:>10.1f}{median[name] / median['geotiff']:>8.2f}"
          f"{median[name] / median['geotiff-defl']:>8.2f}{total / args.locations / 1e6:>13.2f}"
          f"{total / sizes['geotiff'][0]:>14.2f}{files:>7}   " + " ".join(f"{r:.1f}" for r in rates[name]))
  _compare_host_work(build, config, args, mesh)
  _compare_read_costs(arrayrecords, {"geotiff": raw, "geotiff-defl": deflate}, args.rounds)
  _compare_host_and_jitted_augment(first, crop, mean, std, args.batch_size, args.rounds)
  if not args.workdir:
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  from fmjax import host_memory
  host_memory.reexec_with_host_allocator()
  main()
