"""The Grain input pipeline end to end on tiny ArrayRecord data written here."""
import json

import grain
import jax
import numpy as np
import pytest

from fmjax import parallel
from fmjax.data import pipeline, preview, records, sources
from fmjax.objectives.base import ViewSpec

BANDS = 4
SIZE = 12


def _write_dataset(directory, count=24, bands=BANDS, constant_timestamps=False, seed=0, nodata_at=None,
                   codec=records.RAW):
  """Locations with 1-3 timestamps. With `constant_timestamps`, timestamp t of location i is the
  constant 1000*(t+1) + i: any crop / resize / flip / blur of it keeps that value, so a view's
  value says which record and which timestamp it came from."""
  rng = np.random.default_rng(seed)
  encoded = []
  for i in range(count):
    num_t = 1 + i % 3
    if constant_timestamps:
      pixels = np.stack([np.full((SIZE, SIZE, bands), 1000 * (t + 1) + i, np.int16) for t in range(num_t)])
    else:
      pixels = rng.integers(0, 5000, (num_t, SIZE, SIZE, bands)).astype(np.int16)
    if nodata_at is not None:
      pixels[0, nodata_at[0], nodata_at[1]] = -32768
    encoded.append(records.encode(records.LocationRecord(
        f"{i:07d}", [f"{t:05d}" for t in range(num_t)], {"pixels": pixels}), codec))
  sources.write_shards(str(directory / "toy-train"), encoded, num_shards=3)
  return str(directory)


def _config(directory, **overrides):
  c = pipeline.default_config()
  c.dir = directory
  c.num_bands = BANDS
  c.crop_size = 8
  c.stats = "none"
  c.local.size = 4
  c.read_threads = 1
  for k, v in overrides.items():
    c[k] = v
  return c


def _host_batches(config, num, *, views=ViewSpec(2, 0), seed=0, shard=(0, 1), batch=4, num_epochs=None):
  ds = pipeline.host_dataset(config, per_host_batch_size=batch, views=views, seed=seed,
                             shard_options=grain.sharding.ShardOptions(*shard, drop_remainder=True),
                             num_epochs=num_epochs)
  it = iter(ds)
  return [next(it) for _ in range(num)] if num else list(it)


@pytest.mark.parametrize("codec", [records.RAW, "blosc:lz4hc:5"])
def test_two_views_are_different_timestamps(tmp_path, codec):
  directory = _write_dataset(tmp_path, constant_timestamps=True, codec=codec)
  config = _config(directory)
  config.aug.blur_prob = 1.0
  for batch in _host_batches(config, 6):
    image = batch["image"]  # stats 'none': raw values
    assert image.shape == (4, 2, 8, 8, BANDS)
    for sample, record_index, ts in zip(image, batch["record_index"], batch["timestamp_index"]):
      num_t = 1 + record_index % 3
      for view, t in zip(sample, ts):
        np.testing.assert_allclose(view, 1000 * (t + 1) + record_index, rtol=1e-5)
      if num_t >= 2:
        assert ts[0] != ts[1]
      else:
        assert ts[0] == ts[1] == 0


def test_single_view_and_local_crops(tmp_path):
  directory = _write_dataset(tmp_path)
  batch = _host_batches(_config(directory), 1, views=ViewSpec(1, 3))[0]
  assert batch["image"].shape == (4, 1, 8, 8, BANDS)
  assert batch["local"].shape == (4, 3, 4, 4, BANDS)


def test_hosts_read_disjoint_records_and_each_record_once_per_epoch(tmp_path):
  directory = _write_dataset(tmp_path, count=26)
  config = _config(directory)
  seen = []
  for host in range(2):
    batches = _host_batches(config, 0, shard=(host, 2), batch=3, num_epochs=1)
    seen.append(np.concatenate([b["record_index"] for b in batches]))
  # 26 records -> 13 per host -> 4 batches of 3 (one record per host is dropped with the remainder).
  assert len(seen[0]) == len(seen[1]) == 12
  assert not set(seen[0]) & set(seen[1])
  assert len(set(seen[0])) == 12 and len(set(seen[1])) == 12
  assert set(seen[0]) <= set(range(0, 13)) and set(seen[1]) <= set(range(13, 26))


def test_deterministic_per_seed_reshuffled_per_epoch(tmp_path):
  directory = _write_dataset(tmp_path)
  config = _config(directory)
  a = _host_batches(config, 12, seed=3)
  b = _host_batches(config, 12, seed=3)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  order = np.concatenate([x["record_index"] for x in a])
  epoch0, epoch1 = order[:24], order[24:48]
  assert sorted(epoch0) == sorted(epoch1) == list(range(24))
  assert list(epoch0) != list(epoch1)
  other = np.concatenate([x["record_index"] for x in _host_batches(config, 6, seed=4)])
  assert list(other) != list(epoch0)
  # The same record gets different augmentations in different epochs.
  images = np.concatenate([x["image"] for x in a])
  first = int(epoch0[0])
  later = 24 + int(np.flatnonzero(epoch1 == first)[0])
  assert not np.array_equal(images[0], images[later])


def test_global_batches_sharded_over_the_mesh(tmp_path):
  directory = _write_dataset(tmp_path)
  mesh = parallel.make_mesh({"data": 4, "fsdp": 2})
  pipe = pipeline.build_input(_config(directory), global_batch_size=8, views=ViewSpec(2, 0), mesh=mesh, seed=0)
  batch = next(pipe)
  assert batch["image"].shape == (8, 2, 8, 8, BANDS)
  assert batch["image"].sharding.is_equivalent_to(parallel.batch_sharding(mesh, 5), 5)
  assert len(batch["image"].addressable_shards) == 8
  assert pipe.steps_per_epoch == 3 and pipe.num_bands == BANDS
  spec = pipe.batch_spec()
  assert set(spec) == set(batch)
  for name, value in batch.items():
    assert (spec[name].shape, spec[name].dtype) == (value.shape, value.dtype)
    assert spec[name].sharding.is_equivalent_to(value.sharding, value.ndim)


@pytest.mark.parametrize("codec", [records.RAW, "blosc:zstd:5"])
def test_device_augmentation_gives_the_host_views(tmp_path, codec):
  # Same seed -> same random draws; the jitted path (int16 + matrices) must build the same views.
  directory = _write_dataset(tmp_path, nodata_at=(slice(0, 3), slice(0, 12)), codec=codec)
  mesh = parallel.make_mesh({"data": 4, "fsdp": 2})
  batches = {}
  for where in ("host", "device"):
    config = _config(directory, augment_on=where, stats="sample")
    config.aug.blur_prob = 0.5
    config.local.blur_prob = 0.5
    pipe = pipeline.build_input(config, global_batch_size=8, views=ViewSpec(2, 2), mesh=mesh, seed=5)
    batches[where] = [next(pipe) for _ in range(2)]
    spec = pipe.batch_spec()
  for host, device in zip(batches["host"], batches["device"]):
    assert set(host) == set(device) == set(spec)
    for key in host:
      assert device[key].shape == host[key].shape and device[key].dtype == host[key].dtype
      assert device[key].sharding.is_equivalent_to(host[key].sharding, host[key].ndim)
      np.testing.assert_allclose(np.asarray(device[key]), np.asarray(host[key]), rtol=1e-4, atol=1e-4)


def test_checkpoint_restore_gives_identical_next_batches(tmp_path):
  directory = _write_dataset(tmp_path)
  mesh = parallel.make_mesh()
  config = _config(directory, read_threads=2)
  make = lambda: pipeline.build_input(config, global_batch_size=8, views=ViewSpec(2, 1), mesh=mesh, seed=1)
  pipe = make()
  for _ in range(4):  # crosses an epoch boundary (3 batches per epoch)
    next(pipe)
  state = json.loads(json.dumps(pipe.get_state()))  # what the Grain handler writes
  expected = [jax.device_get(next(pipe)) for _ in range(3)]
  restored = make()
  restored.set_state(state)
  for want in expected:
    got = jax.device_get(next(restored))
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_orbax_saves_and_restores_the_grain_iterator(tmp_path):
  import orbax.checkpoint as ocp
  (tmp_path / "data").mkdir()
  directory = _write_dataset(tmp_path / "data")
  mesh = parallel.make_mesh()
  config = _config(directory)
  make = lambda: pipeline.build_input(config, global_batch_size=8, views=ViewSpec(1, 0), mesh=mesh, seed=0)
  pipe = make()
  next(pipe), next(pipe)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
    manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(pipe.grain_iterator)))
    manager.wait_until_finished()
  expected = jax.device_get(next(pipe))
  restored = make()
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
    manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored.grain_iterator)))
  np.testing.assert_array_equal(jax.device_get(next(restored))["image"], expected["image"])


def test_band_count_mismatch_names_both_numbers(tmp_path):
  directory = _write_dataset(tmp_path, bands=5)
  with pytest.raises(ValueError, match=r"has 5 bands but data.num_bands=4"):
    pipeline.build_input(_config(directory), global_batch_size=8, views=ViewSpec(1, 0),
                         mesh=parallel.make_mesh(), seed=0)


def test_batch_size_must_divide_over_the_mesh(tmp_path):
  directory = _write_dataset(tmp_path)
  with pytest.raises(ValueError, match="global batch size 6 is not divisible by the mesh's data-parallel size 8"):
    pipeline.build_input(_config(directory), global_batch_size=6, views=ViewSpec(1, 0),
                         mesh=parallel.make_mesh(), seed=0)


def test_bad_choices_are_named(tmp_path):
  directory = _write_dataset(tmp_path)
  with pytest.raises(ValueError, match=r"data.nodata_fill='median' is not valid"):
    _host_batches(_config(directory, nodata_fill="median"), 1)


def test_normalisation_uses_sampled_band_stats_and_nodata_becomes_zero(tmp_path):
  directory = _write_dataset(tmp_path, nodata_at=(slice(0, 12), slice(0, 6)))
  source = sources.open_split(directory, "train")
  # Independent reference: per-band mean/std over all non-nodata pixels of every record.
  all_pixels = np.concatenate([source.decode(i).pixels.reshape(-1, BANDS) for i in range(len(source))])
  valid = all_pixels[:, 0] != -32768
  ref_mean = all_pixels[valid].astype(np.float64).mean(0)
  ref_std = all_pixels[valid].astype(np.float64).std(0)
  config = _config(directory, stats="sample", stats_samples=1000)
  mean, std = pipeline.dataset_band_stats(config, source)
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-5)
  np.testing.assert_allclose(std, ref_std, rtol=1e-5)
  # Full crops without flips: the left half of timestamp 0 was nodata -> exactly 0 after normalising.
  config.crop_size = SIZE
  config.aug.scale = (1.0, 1.0)
  config.aug.ratio = (1.0, 1.0)
  config.aug.hflip = config.aug.vflip = 0.0
  batch = _host_batches(config, 1, views=ViewSpec(1, 0), batch=8)[0]
  for image, ts in zip(batch["image"], batch["timestamp_index"]):
    if ts[0] == 0:
      np.testing.assert_array_equal(image[0, :, :6], 0.0)
      assert np.abs(image[0, :, 6:]).max() > 0.1


def test_dataset_stats_missing_is_a_clear_error(tmp_path):
  directory = _write_dataset(tmp_path)  # bare shards: no dataset_info.json / band_stats.json
  with pytest.raises(ValueError, match=r"data.stats='dataset' but .*use data.stats='sample' or 'none'"):
    pipeline.dataset_band_stats(_config(directory, stats="dataset"))


def test_bfloat16_output(tmp_path):
  directory = _write_dataset(tmp_path)
  batch = _host_batches(_config(directory, dtype="bfloat16"), 1)[0]
  assert batch["image"].dtype == jax.numpy.bfloat16


def test_preview_png_shows_timestamps_side_by_side(tmp_path):
  from PIL import Image
  directory = _write_dataset(tmp_path)
  source = sources.open_split(directory, "train")
  locations = [source.decode(i) for i in (0, 1, 2)]  # 1, 2 and 3 timestamps
  image = preview.write_preview_png(locations, str(tmp_path / "p.png"), bands=(3, 2, 1))
  assert image.shape == (3 * SIZE + 4, 3 * SIZE + 4, 3)
  assert np.asarray(Image.open(tmp_path / "p.png")).shape == image.shape
  assert not np.array_equal(image[SIZE + 2:2 * SIZE + 2, :SIZE], image[SIZE + 2:2 * SIZE + 2, SIZE + 2:2 * SIZE + 2])
  batch = _host_batches(_config(directory), 1)[0]
  assert preview.write_preview_png(batch, str(tmp_path / "b.png"), bands=(0, 1, 2)).shape == (4 * 8 + 6, 2 * 8 + 2, 3)
  with pytest.raises(ValueError, match=r"bands \[43, 28, 10\] must be 3 indices in \[0, 3\]"):
    preview.write_preview_png(batch, str(tmp_path / "c.png"))


@pytest.mark.slow
def test_worker_processes_match_and_restore(tmp_path):
  directory = _write_dataset(tmp_path)
  config = _config(directory, worker_count=2)
  mesh = parallel.make_mesh()
  make = lambda: pipeline.build_input(config, global_batch_size=8, views=ViewSpec(2, 0), mesh=mesh, seed=0)
  pipe = make()
  first = [jax.device_get(next(pipe)) for _ in range(2)]
  state = pipe.get_state()
  expected = jax.device_get(next(pipe))
  pipe.close()
  restored = make()
  restored.set_state(state)
  np.testing.assert_array_equal(jax.device_get(next(restored))["image"], expected["image"])
  restored.close()
  # Workers process the same (seed, epoch, record) -> same augmentation as threads would.
  threads = _host_batches(_config(directory), 0, num_epochs=1, batch=8)
  by_record = {int(r): img for b in threads for r, img in zip(b["record_index"], b["image"])}
  for batch in first:
    for r, img in zip(batch["record_index"], batch["image"]):
      np.testing.assert_array_equal(img, by_record[int(r)])


@pytest.mark.slow
def test_end_to_end_from_converted_synthetic_archive(tmp_path):
  """synthetic GeoTIFFs -> data_prep.spectral_earth -> dataset dir -> global batches (dataset stats)."""
  import subprocess
  import sys
  archive, out = str(tmp_path / "archive"), str(tmp_path / "dataset")
  run = lambda *args: subprocess.run([sys.executable, "-m", *args], check=True, capture_output=True)
  run("data_prep.synthetic", "--output", archive, "--locations", "12", "--size", "16", "--bands", "80", "--seed", "1")
  run("data_prep.spectral_earth", "--input", archive, "--output", out, "--shards", "2", "--workers", "1",
      "--bands", "80", "--size", "16", "--val-fraction", "0.0")
  config = pipeline.default_config()
  config.dir, config.num_bands, config.crop_size, config.stats, config.read_threads = out, 80, 16, "dataset", 1
  pipe = pipeline.build_input(config, global_batch_size=8, views=ViewSpec(2, 0), mesh=parallel.make_mesh(), seed=0)
  from fmjax.data import dataset_dir
  stats = dataset_dir.read_dataset_info(out)["band_stats"]
  np.testing.assert_allclose(pipe.mean, stats["mean"], rtol=1e-6)
  image = np.asarray(next(pipe)["image"])
  assert image.shape == (8, 2, 16, 16, 80) and np.isfinite(image).all()
  # Normalised with the dataset's own statistics: roughly zero-mean, unit-scale per band.
  assert abs(image.mean()) < 0.5 and 0.3 < image.std() < 3.0


def test_damaged_compressed_timestamp_names_shard_and_record(tmp_path):
  # Decompression happens lazily, inside the per-sample work: its error still names the record.
  from tensorflow_datasets.proto import tf_example_pb2
  rng = np.random.default_rng(0)
  encoded = [records.encode(records.LocationRecord(f"{i:07d}", ["00001"], {"pixels": rng.integers(
      0, 5000, (1, SIZE, SIZE, BANDS)).astype(np.int16)}), "blosc:lz4:5") for i in range(8)]
  example = tf_example_pb2.Example.FromString(encoded[5])
  blob = example.features.feature["pixels/bytes"].bytes_list.value[0]
  example.features.feature["pixels/bytes"].bytes_list.value[:] = [blob[:4] + b"\xff\xff\x00\x00" + blob[8:]]
  encoded[5] = example.SerializeToString()
  paths = sources.write_shards(str(tmp_path / "toy-train"), encoded, num_shards=2)
  path, local = sources.RecordSource(paths).locate(5)
  config = _config(str(tmp_path), shuffle=False)
  named = rf"record {local} of shard {path} \(global index 5\).*chunk 0"
  with pytest.raises(sources.SourceError, match=named):
    _host_batches(config, 2, views=ViewSpec(1, 0), batch=4)


def test_checkpoint_of_the_sample_counting_pipeline_resumes_at_the_same_batch(tmp_path):
  # Checkpoints written before the pipeline loaded whole batches per Grain element stored a sample
  # position and no data_format item: restore converts it, or refuses loudly when it cannot.
  from fmjax import checkpoint
  (tmp_path / "data").mkdir()
  directory = _write_dataset(tmp_path / "data")
  mesh = parallel.make_mesh()
  make = lambda: pipeline.build_input(_config(directory), global_batch_size=8, views=ViewSpec(1, 0),
                                      mesh=mesh, seed=0)
  state = {"w": np.arange(3.0, dtype=np.float32)}
  pipe = make()
  next(pipe), next(pipe), next(pipe)
  saver = checkpoint.Checkpointer(str(tmp_path / "run"), async_save=False)
  saver.save(3, state, data_iterator=pipe)
  saver.wait()
  expected = jax.device_get(next(pipe))["image"]
  step_dir = tmp_path / "run" / "checkpoints" / "3"
  position = step_dir / "data" / "process_0-of-1.json"
  assert json.loads(position.read_text()) == {"next_index": 3}
  import shutil
  shutil.rmtree(step_dir / "data_format")                          # as an earlier version wrote it
  position.write_text(json.dumps({"next_index": 3 * 8}))
  restored = make()
  saver.restore(3, state, data_iterator=restored)
  np.testing.assert_array_equal(jax.device_get(next(restored))["image"], expected)
  position.write_text(json.dumps({"next_index": 3 * 8 + 5}))     # not a whole batch: refused
  with pytest.raises(checkpoint.CheckpointFormatError, match="counted samples"):
    saver.restore_latest(state, data_iterator=make())
