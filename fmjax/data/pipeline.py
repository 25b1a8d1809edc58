"""The Grain input pipeline: ArrayRecord shards -> global, sharded jax.Array batches.

Per host:
  record indices of the split  -> this host's contiguous slice (grain ShardOptions; equal sizes)
  -> per-epoch seeded shuffle  -> repeat (reseeded each epoch)
  -> batches of record indices (drop remainder)
  -> per batch: read + decode + views + augment + nodata fill + normalise, each sample's views
     written into its slot of the batch arrays (NumPy/OpenCV, RNG from (seed, epoch, record index))
  -> thread-parallel batches (ReadOptions) -> optional worker processes
Then each host's numpy batch becomes a slice of one global jax.Array with
`jax.make_array_from_process_local_data` and `fmjax.parallel.batch_sharding`.

Batches follow the contract of fmjax/objectives/base.py:
  'image' [B, V, S, S, C] normalised, 'local' [B, L, s, s, C] (DINO multi-crop, optional),
  'record_index' [B] int32 (global record index, for tracing), 'timestamp_index' [B, V] int32.

With `augment_on='device'` the host stops after choosing timestamps and drawing the random
crop/flip/blur parameters: it ships the int16 images with two small matrices per view, and a jitted
function (`augment.apply_planned_views`) makes the very same views on the accelerator.

Nodata: EnMAP marks missing pixels with -32768. With `nodata_fill='mean'` (default) those pixels
are set to the band mean before resizing, so after normalisation they are exactly 0 and never
leak a huge negative value into neighbours through interpolation or blur. 'zero' sets raw value
0 instead; 'none' leaves them (only for data known to be clean).

The pipeline is checkpointable: `get_state()` / `set_state()` (JSON-able dict) and
`.grain_iterator` for `grain.checkpoint.CheckpointSave/CheckpointRestore` inside an Orbax
Composite. Restoring gives exactly the batches that would have come next. The state depends on
`worker_count` (Grain's rule): keep it fixed across a restart.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Mapping

import grain
import jax
import numpy as np
import tqdm

from fmjax import parallel
from fmjax.data import augment, records, sources
from fmjax.data.defaults import default_config  # noqa: F401  (re-exported: the config section lives there)
from fmjax.objectives.base import ViewSpec

_DTYPES = ("float32", "bfloat16", "float16")
_NODATA_FILLS = ("mean", "zero", "none")
_STATS_SOURCES = ("dataset", "sample", "none", "scale10000")
_AUGMENT_ON = ("host", "device")


def _crop_configs(data_config) -> tuple[augment.CropConfig, augment.CropConfig]:
  a, l = data_config.aug, data_config.local
  global_crop = augment.CropConfig(
      size=int(data_config.crop_size), scale=tuple(a.scale), ratio=tuple(a.ratio), hflip=a.hflip,
      vflip=a.vflip, blur_prob=a.blur_prob, blur_sigma=tuple(a.blur_sigma))
  local_crop = augment.CropConfig(
      size=int(l.size), scale=tuple(l.scale), ratio=tuple(a.ratio), hflip=l.hflip, vflip=l.vflip,
      blur_prob=l.blur_prob, blur_sigma=tuple(l.blur_sigma))
  return global_crop, local_crop


def _check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"data.{name}={value!r} is not valid; choose one of {choices}")


# ----------------------------------------------------------------------------------------------
# Band statistics


def _stats_from_dataset_dir(directory: str):
  """Band mean/std from DIR/band_stats.json (written by data_prep/stats.py)."""
  from fmjax.data import dataset_dir
  try:
    info = dataset_dir.read_dataset_info(directory)
  except FileNotFoundError as e:
    raise ValueError(f"data.stats='dataset' but {e}; use data.stats='sample' or 'none'") from e
  stats = info.get("band_stats") or {}
  if stats.get("mean") is None or stats.get("std") is None:
    raise ValueError(f"dataset {directory} has no band statistics ({dataset_dir.BAND_STATS}): run "
                     f"python -m data_prep.stats, or set data.stats='sample' or 'none'")
  return np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)


def sample_band_stats(source: sources.RecordSource, num_records: int = 256,
                      nodata: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Per-band mean and std over the valid pixels of the first `num_records` records.

  Deterministic (same records on every host). float64 sums: 202 bands x 16k pixels x hundreds of
  records overflows float32 precision.
  """
  total = total_sq = count = None
  for index in tqdm.trange(min(num_records, len(source)), desc="band stats", leave=False):
    record = source.decode(index, ("pixels",))
    pixels = record.pixels.reshape(-1, record.pixels.shape[-1])
    fill = record.nodata if nodata is None else nodata
    valid = pixels != fill
    values = np.where(valid, pixels, 0).astype(np.float64)
    if total is None:
      total, total_sq, count = (np.zeros(pixels.shape[-1]) for _ in range(3))
    total += values.sum(0)
    total_sq += (values * values).sum(0)
    count += valid.sum(0)
  count = np.maximum(count, 1)
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
  return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def dataset_band_stats(data_config, source: sources.RecordSource | None = None,
                       num_bands: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(mean [C], std [C]) used for normalisation, from `data_config.stats`."""
  _check_choice("stats", data_config.stats, _STATS_SOURCES)
  num_bands = int(num_bands or data_config.num_bands)
  if data_config.stats == "none":
    return np.zeros([num_bands], np.float32), np.ones([num_bands], np.float32)
  if data_config.stats == "scale10000":  # Sentinel-2 reflectance x 10000 -> [0, 1] (clipped in _LoadViews)
    return np.zeros([num_bands], np.float32), np.full([num_bands], 10000.0, np.float32)
  if data_config.stats == "dataset":
    mean, std = _stats_from_dataset_dir(data_config.dir)
  else:
    source = source or sources.open_split(data_config.dir, data_config.split)
    mean, std = sample_band_stats(source, int(data_config.stats_samples))
  if mean.shape != (num_bands,) or std.shape != (num_bands,):
    raise ValueError(f"band statistics have shapes {mean.shape}/{std.shape}, expected ({num_bands},)")
  return mean, std


# ----------------------------------------------------------------------------------------------
# Per-element work (runs in Grain threads / workers)


@dataclasses.dataclass
class _LoadBatch(grain.transforms.MapWithIndex):
  """A batch of record indices -> the batch of augmented, normalised views.

  Works per batch, not per sample, so each sample's views are written straight into their slots
  of the batch arrays (no collate copy: for 8 x 128x128x202 float32 views that copy alone took
  ~35 ms, serially in the consuming thread). RNG per sample = f(seed, epoch, record index).
  """
  source: sources.RecordSource
  epoch_length: int
  seed: int
  global_crop: augment.CropConfig
  local_crop: augment.CropConfig
  views: ViewSpec
  mean: np.ndarray
  std: np.ndarray
  nodata_fill: str
  dtype: str
  num_bands: int
  clip: tuple[float, float] | None = None   # data.stats='scale10000': clip normalised values to [0, 1]
  augment_on: str = "host"                  # 'device': return planned views (int16 + matrices)

  def __post_init__(self):
    self._inv_std = (1.0 / self.std).astype(np.float32)
    self._mean = self.mean.astype(np.float32)
    self._np_dtype = jax.numpy.dtype(self.dtype)
    if self.nodata_fill == "none":
      self._fill = None
    else:
      self._fill = self._mean if self.nodata_fill == "mean" else np.zeros_like(self._mean)

  def map_with_index(self, batch_index: int, record_indices: np.ndarray):
    size = len(record_indices)
    first = batch_index * size                # position of the batch's first sample in the stream
    if self.augment_on == "device":
      planned = [self._load(first + j, int(r)) for j, r in enumerate(record_indices)]
      return {key: np.stack([p[key] for p in planned]) for key in planned[0]}
    v, l, c = self.views.global_views, self.views.local_views, self.num_bands
    s, t = self.global_crop.size, self.local_crop.size
    batch = {"image": np.empty((size, v, s, s, c), self._np_dtype),
             "record_index": np.asarray(record_indices, np.int32),
             "timestamp_index": np.empty((size, v), np.int32)}
    if l:
      batch["local"] = np.empty((size, l, t, t, c), self._np_dtype)
    for j, record_index in enumerate(record_indices):
      slots = {"image": batch["image"][j]} | ({"local": batch["local"][j]} if l else {})
      batch["timestamp_index"][j] = self._load(first + j, int(record_index), slots)["timestamp_index"]
    if self.clip is not None:
      for key in ("image", "local"):
        if key in batch:
          np.clip(batch[key], *self.clip, out=batch[key])
    return batch

  def _load(self, position: int, record_index: int, slots=None):
    """One sample: its views into `slots` (host augmentation) or its planned views (device)."""
    rng = np.random.default_rng([self.seed, position // self.epoch_length, record_index])
    # lazy: of a compressed record only the timestamps the views use are decompressed
    record = self.source.decode(record_index, ("pixels",), lazy=True)
    try:
      if self.augment_on == "device":
        out = augment.plan_views(record.pixels, rng, self.global_crop, self.views.global_views,
                                 self.local_crop, self.views.local_views)
        out["record_index"] = np.int32(record_index)
        return out
      return augment.make_views(record.pixels, rng, self.global_crop, self.views.global_views,
                                self.local_crop, self.views.local_views, self._fill, record.nodata,
                                self._mean, self._inv_std, out=slots)
    except records.RecordError as e:
      raise self.source.decode_error(record_index, e) from e


def inspect_data(source: sources.RecordSource) -> dict[str, Any]:
  """Shape facts of the first record: bands, height, width, dtype, nodata."""
  record = source.decode(0, ("pixels",))
  _, height, width, bands = record.pixels.shape
  return dict(num_bands=bands, height=height, width=width, dtype=record.pixels.dtype.name,
              nodata=record.nodata, sensor=record.sensor)


def host_dataset(data_config, *, per_host_batch_size: int, views: ViewSpec, seed: int,
                 shard_options: grain.sharding.ShardOptions, num_epochs: int | None = None,
                 source: sources.RecordSource | None = None,
                 stats: tuple[np.ndarray, np.ndarray] | None = None) -> grain.IterDataset:
  """This host's Grain dataset of numpy batch dicts (before the device transfer)."""
  _check_choice("nodata_fill", data_config.nodata_fill, _NODATA_FILLS)
  _check_choice("dtype", data_config.dtype, _DTYPES)
  _check_choice("augment_on", data_config.augment_on, _AUGMENT_ON)
  source = source or sources.open_split(data_config.dir, data_config.split)
  facts = inspect_data(source)
  if facts["num_bands"] != int(data_config.num_bands):
    raise ValueError(f"the data in {data_config.dir or source.paths[0]} has {facts['num_bands']} bands "
                     f"but data.num_bands={data_config.num_bands}; set data.num_bands to "
                     f"{facts['num_bands']} or point data.dir at the right dataset")
  mean, std = stats if stats is not None else dataset_band_stats(data_config, source, facts["num_bands"])
  start, end = _even_split_equal(len(source), shard_options)
  per_host = end - start
  if per_host < per_host_batch_size:
    raise ValueError(f"host {shard_options.shard_index} of {shard_options.shard_count} gets {per_host} "
                     f"records, fewer than its batch of {per_host_batch_size}: the split has {len(source)}")
  seed = int(seed if data_config.seed is None or data_config.seed < 0 else data_config.seed)
  global_crop, local_crop = _crop_configs(data_config)
  ds = grain.MapDataset.range(start, end)
  if data_config.shuffle:
    ds = ds.shuffle(seed=seed)   # reseeded every epoch by repeat() below
  ds = ds.repeat(num_epochs)
  # Batches of record indices (across epoch boundaries, remainder dropped), each loaded whole by one
  # thread: see _LoadBatch.
  ds = ds.batch(per_host_batch_size, drop_remainder=True)
  ds = ds.map_with_index(_LoadBatch(
      source=source, epoch_length=per_host, seed=seed, global_crop=global_crop, local_crop=local_crop,
      views=views, mean=mean, std=std, nodata_fill=data_config.nodata_fill, dtype=data_config.dtype,
      num_bands=facts["num_bands"], clip=(0.0, 1.0) if data_config.stats == "scale10000" else None,
      augment_on=data_config.augment_on))
  threads = int(data_config.read_threads)
  # Each thread loads a whole batch, so keep at least one batch in flight per thread.
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(1, int(data_config.prefetch), threads) if threads else 0))
  blas_threads = int(data_config.get("blas_threads", 0))
  limit_blas_threads(blas_threads)
  if int(data_config.worker_count) > 0:
    _ensure_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(data_config.worker_count), per_worker_buffer_size=max(1, int(data_config.prefetch))),
        worker_init_fn=lambda *_: limit_blas_threads(blas_threads))
  return ds


def limit_blas_threads(num_threads: int) -> None:
  """Caps NumPy's BLAS and OpenCV's thread pools in this process (0: no change)."""
  if num_threads <= 0:
    return
  import cv2  # OpenCV's own pool (resize, blur) would fight the Grain threads the same way
  cv2.setNumThreads(num_threads)
  try:
    from threadpoolctl import threadpool_limits
  except ImportError:
    logging.warning("threadpoolctl is not installed: cannot cap NumPy BLAS threads at %d; set "
                    "OPENBLAS_NUM_THREADS=%d in the environment instead", num_threads, num_threads)
    return
  threadpool_limits(num_threads, user_api="blas")


def _ensure_absl_flags_parsed():
  """Grain worker processes read absl flags; outside an absl app (tests, notebooks) use defaults."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _even_split_equal(num_records: int, options) -> tuple[int, int]:
  """Contiguous equal slices (remainder dropped): hosts must yield the same number of batches."""
  size = num_records // options.shard_count
  return options.shard_index * size, (options.shard_index + 1) * size


# ----------------------------------------------------------------------------------------------
# Global batches


class InputPipeline:
  """Iterator of global batch dicts of jax.Arrays, sharded over the mesh's batch axes.

  `grain_iterator` is the underlying `grain.DatasetIterator` (give it to
  `grain.checkpoint.CheckpointSave` / `CheckpointRestore`); `get_state`/`set_state` wrap it.
  """

  def __init__(self, dataset: grain.IterDataset, *, mesh, global_batch_size: int, views: ViewSpec,
               mean: np.ndarray, std: np.ndarray, num_records: int, records_per_host: int,
               facts: Mapping[str, Any], data_config=None):
    self.dataset = dataset
    self.mesh = mesh
    self.global_batch_size = global_batch_size
    self.views = views
    self.mean, self.std = mean, std
    self.num_records = num_records
    self.records_per_host = records_per_host
    self.facts = dict(facts)
    self.data_config = data_config
    self.grain_iterator = iter(dataset)
    self._device_views = None
    if data_config is not None and data_config.augment_on == "device":
      self._device_views = self._make_device_views()

  def _make_device_views(self):
    """Jitted: planned views (int16 pixels + matrices, batch-sharded) -> the batch contract."""
    inv_std = (1.0 / self.std).astype(np.float32)
    mean = self.mean.astype(np.float32)
    fill = {"mean": mean, "zero": np.zeros_like(mean), "none": None}[self.data_config.nodata_fill]
    dtype = jax.numpy.dtype(self.data_config.dtype)
    nodata = int(self.facts["nodata"])

    clip = (0.0, 1.0) if self.data_config.stats == "scale10000" else None

    @jax.jit
    def device_views(planned):
      out = augment.apply_planned_views(planned, mean, inv_std, fill, nodata, dtype, clip)
      out["record_index"] = planned["record_index"]
      out["timestamp_index"] = planned["timestamp_index"]
      return out
    return device_views

  def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes, dtypes and shardings of a global batch, without reading data (for `jax.eval_shape`)."""
    b, v, c = self.global_batch_size, self.views.global_views, self.num_bands
    size, dtype = int(self.data_config.crop_size), jax.numpy.dtype(self.data_config.dtype)
    shapes = {"image": ((b, v, size, size, c), dtype), "record_index": ((b,), np.int32),
              "timestamp_index": ((b, v), np.int32)}
    if self.views.local_views:
      local = int(self.data_config.local.size)
      shapes["local"] = ((b, self.views.local_views, local, local, c), dtype)
    return {name: jax.ShapeDtypeStruct(shape, dt, sharding=parallel.batch_sharding(self.mesh, len(shape)))
            for name, (shape, dt) in shapes.items()}

  @property
  def num_bands(self) -> int:
    return self.facts["num_bands"]

  @property
  def steps_per_epoch(self) -> int:
    """Full global batches per pass over the data (the tail that does not fill a batch is dropped)."""
    return self.records_per_host * jax.process_count() // self.global_batch_size

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return self

  def next_host_batch(self) -> dict[str, np.ndarray]:
    """This host's next numpy batch (no device transfer; with augment_on='device' the planned,
    not yet augmented views)."""
    return next(self.grain_iterator)

  def __next__(self) -> dict[str, jax.Array]:
    batch = self.to_global(self.next_host_batch())
    return batch if self._device_views is None else self._device_views(batch)

  def to_global(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    out = {}
    for name, local in host_batch.items():
      local = np.asarray(local)
      global_shape = (self.global_batch_size,) + local.shape[1:]
      sharding = parallel.batch_sharding(self.mesh, local.ndim)
      out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out

  def get_state(self) -> dict[str, Any]:
    return self.grain_iterator.get_state()

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.grain_iterator.set_state(dict(state))

  def close(self) -> None:
    close = getattr(self.grain_iterator, "close", None)
    if close is not None:
      close()


def build_input(data_config, *, global_batch_size: int, views: ViewSpec, mesh, seed: int,
                num_epochs: int | None = None, shard_options: grain.sharding.ShardOptions | None = None,
                source: sources.RecordSource | None = None,
                stats: tuple[np.ndarray, np.ndarray] | None = None) -> InputPipeline:
  """The training input: a checkpointable iterator of global, sharded batch dicts.

  `shard_options` defaults to one contiguous slice per JAX process (equal sizes). `num_epochs`
  None repeats forever (each epoch reshuffled). `source` overrides `data_config.dir/split`;
  `stats` (mean, std) overrides `data_config.stats`.
  """
  process_count = jax.process_count()
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the number of "
                     f"processes {process_count}")
  data_parallel = parallel.data_parallel_size(mesh)
  if global_batch_size % data_parallel:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the mesh's "
                     f"data-parallel size {data_parallel} (axes {parallel.BATCH_AXES})")
  shard_options = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
  if shard_options.shard_count != process_count:
    raise ValueError(f"shard_options.shard_count={shard_options.shard_count} but there are "
                     f"{process_count} JAX processes: each process must read its own shard")
  source = source or sources.open_split(data_config.dir, data_config.split)
  facts = inspect_data(source)
  if stats is not None:
    mean, std = (np.asarray(v, np.float32) for v in stats)
  elif facts["num_bands"] == int(data_config.num_bands):
    mean, std = dataset_band_stats(data_config, source, facts["num_bands"])
  else:
    mean = std = None  # host_dataset raises the band-count error
  per_host_batch = global_batch_size // process_count
  dataset = host_dataset(data_config, per_host_batch_size=per_host_batch, views=views, seed=seed,
                         shard_options=shard_options, num_epochs=num_epochs, source=source,
                         stats=None if mean is None else (mean, std))
  records_per_host = len(source) // shard_options.shard_count
  logging.info("input: %s, %d records, %d per host, per-host batch %d, views %s", source, len(source),
               records_per_host, per_host_batch, views)
  return InputPipeline(dataset, mesh=mesh, global_batch_size=global_batch_size, views=views,
                       mean=mean, std=std, num_records=len(source), records_per_host=records_per_host,
                       facts=facts, data_config=data_config)
