"""Sentinel-2 data through the Grain pipeline: two views from two different seasons, /10000 scaling, S2 configs."""
import importlib.util
import pathlib

import grain
import numpy as np
import pytest

from data_prep import ssl4eo_s12, synthetic_s2
from fmjax.data import pipeline, sources
from fmjax.objectives.base import ViewSpec

SIZE = 24
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("s2")
  synthetic_s2.write_archive(root, locations=4, size=SIZE, forest=False, progress=False)
  out = tmp_path_factory.mktemp("data") / "s2"
  ssl4eo_s12.convert(root, out, size=SIZE, shards=1, workers=1, val_fraction=0.0, progress=False)
  return str(out)


def _batches(config, num, views=ViewSpec(2, 0)):
  ds = pipeline.host_dataset(config, per_host_batch_size=4, views=views, seed=3,
                             shard_options=grain.sharding.ShardOptions(0, 1, drop_remainder=True))
  it = iter(ds)
  return [next(it) for _ in range(num)]


def _exact_crop_config(directory, stats):
  """Full-size crops without flips/blur: a view is exactly one timestamp's (normalised) pixels."""
  c = pipeline.default_config()
  c.dir, c.num_bands, c.crop_size, c.stats, c.read_threads = directory, 13, SIZE, stats, 1
  c.aug.scale, c.aug.ratio, c.aug.hflip, c.aug.vflip, c.aug.blur_prob = (1.0, 1.0), (1.0, 1.0), 0.0, 0.0, 0.0
  return c


def test_two_views_come_from_two_different_seasons(dataset):
  source = sources.open_split(dataset, "train")
  for batch in _batches(_exact_crop_config(dataset, "none"), 3):
    for views, index, seasons in zip(batch["image"], batch["record_index"], batch["timestamp_index"]):
      pixels = source.decode(int(index)).pixels
      assert seasons[0] != seasons[1]
      for view, season in zip(views, seasons):
        np.testing.assert_array_equal(view, pixels[season].astype(np.float32))


def test_scale10000_divides_and_clips(dataset):
  source = sources.open_split(dataset, "train")
  batch = _batches(_exact_crop_config(dataset, "scale10000"), 1)[0]
  for views, index, seasons in zip(batch["image"], batch["record_index"], batch["timestamp_index"]):
    pixels = source.decode(int(index)).pixels
    for view, season in zip(views, seasons):
      expected = np.clip(pixels[season].astype(np.float64) / 10000.0, 0.0, 1.0)
      np.testing.assert_allclose(view, expected, rtol=1e-6, atol=1e-7)
  assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0


def _load(name):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / "s2" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name,model,objective", [
    ("moco_resnet18", "resnet18", "moco"), ("moco_resnet50", "resnet50", "moco"),
    ("dino_resnet18", "resnet18", "dino"), ("dino_vit_s", "spec_vit_s", "dino"), ("mae_vit_s", "spec_vit_s", "mae")])
def test_s2_pretraining_configs(name, model, objective):
  c = _load(name).get_config("data_dir=/data/s2,product=s2a,norm=scale10000")
  assert (c.model.name, c.objective.name) == (model, objective)
  assert (c.data.dir, c.data.num_bands, c.data.crop_size, c.data.stats) == ("/data/s2", 12, 224, "scale10000")
  if "vit" in model:
    assert c.model.patch_size == 16 and not c.model.use_adapter
  else:
    assert "patch_size" not in c.model
  with pytest.raises(ValueError, match="s2c"):
    _load(name).get_config("product=s1")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["moco_resnet18", "mae_vit_s"])
def test_s2_pretraining_runs_end_to_end(dataset, tmp_path, name):
  """Two optimiser steps of the real engine on converted S2 data (tiny crops; ViT cut to one block)."""
  import jax
  from fmjax import train
  c = _load(name).get_config(f"data_dir={dataset}")
  c.data.crop_size, c.data.read_threads = 16, 1
  c.batch_size, c.total_steps, c.epochs = 4, 2, 0
  c.model.dtype = "float32"
  c.checkpoint.every_steps, c.log.every_steps, c.log.tensorboard, c.log.images_every = 2, 1, False, 0
  if c.objective.name == "moco":
    c.objective.update(queue_size=8, dim=16, hidden_dim=32)
  else:
    c.model.update(patch_size=8, depth=1)
    c.objective.decoder_width, c.objective.decoder_heads = 32, 4
  summary = train.train(c, str(tmp_path / name), devices=jax.devices()[:1])
  assert summary["final_step"] == 2
  assert np.isfinite(float(summary["last_metrics"]["loss"]))
