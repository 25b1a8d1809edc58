"""Forest use case: dataset conversion, stem output strides, boundary weights / loss / F1, tiny end-to-end runs."""
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rasterio

from data_prep import forest, synthetic_s2
from fmjax.evaluate import data as data_lib
from fmjax.evaluate import forest_compare as fc
from fmjax.evaluate import protocols
from fmjax.models import build_model

SIZE = 24
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def forest_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("s2")
  synthetic_s2.write_archive(root, locations=6, size=SIZE, progress=False)
  out = tmp_path_factory.mktemp("forest") / "forest"
  report = forest.convert(root, root / "forest", out, size=SIZE, val_fraction=0.2, test_fraction=0.3, workers=1,
                          progress=False)
  return root, out, report


def test_forest_dataset_matches_the_rasters(forest_data):
  root, out, report = forest_data
  info = json.loads((out / "downstream.json").read_text())
  assert info["type"] == "segmentation" and info["num_classes"] == 2 and info["ignore_index"] == 255
  assert info["has_density"] and info["num_bands"] == 13
  assert info["splits"] == {"train": 16, "val": 4, "test": 4}  # 6 locations x 4 seasons, hash split
  task = data_lib.read_task(str(out))   # the evaluation helper's reader opens it
  split = data_lib.SplitData(str(out), "train", task)
  record = split.source.decode(0)
  loc = record.location_id
  with rasterio.open(root / "forest" / loc / "mask.tif") as src:
    np.testing.assert_array_equal(record.arrays["mask"], src.read(1))
  with rasterio.open(root / "forest" / loc / "density.tif") as src:
    np.testing.assert_array_equal(record.arrays["density"], src.read(1))
  assert record.pixels.shape == (1, SIZE, SIZE, 13)
  # A location's seasons never straddle splits.
  seen = {}
  for s in forest.SPLITS:
    source = data_lib.sources.open_split(str(out), s)
    for i in range(len(source)):
      assert seen.setdefault(source.decode(i, ("mask",)).location_id, s) == s


def test_single_season_selection(forest_data, tmp_path):
  root, _, _ = forest_data
  forest.convert(root, root / "forest", tmp_path / "summer", season="summer", size=SIZE, val_fraction=0.2,
                 test_fraction=0.3, workers=1, progress=False)
  info = json.loads((tmp_path / "summer" / "downstream.json").read_text())
  assert sum(info["splits"].values()) == 6
  record = data_lib.sources.open_split(str(tmp_path / "summer"), "train").decode(0)
  assert record.timestamps == [synthetic_s2.timestamp_name(1)] and record.extra["season"] == "summer"
  with pytest.raises(ValueError, match="spring"):
    forest.convert(root, root / "forest", tmp_path / "x", season="monsoon", size=SIZE, progress=False)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_detail_stem_halves_the_output_strides(name):
  x = jnp.zeros((1, 32, 32, 13))
  for detail, strides in ((False, (2, 4, 8, 16, 32)), (True, (1, 2, 4, 8, 16))):
    model = build_model(name, in_channels=13, detail_stem=detail)
    shapes = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x, train=False)[0])
    assert tuple(32 // f.shape[1] for f in shapes["features"]) == strides == model.feature_strides


def _square_labels():
  labels = np.zeros((1, 10, 10), np.int32)
  labels[0, 3:7, 3:7] = 1
  return labels


def test_boundary_weights_peak_on_edges():
  labels = _square_labels()
  w = np.asarray(protocols.boundary_weights(jnp.asarray(labels), 255, 5.0))[0]
  # Independent reference: a pixel is on an edge iff one of its 4-neighbours (inside the image) differs.
  ref = np.ones((10, 10))
  for i in range(10):
    for j in range(10):
      for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        if 0 <= i + di < 10 and 0 <= j + dj < 10 and labels[0, i + di, j + dj] != labels[0, i, j]:
          ref[i, j] = 5.0
  np.testing.assert_array_equal(w, ref)
  assert w.max() == 5.0 and w[0, 0] == 1.0 and w[5, 5] == 1.0 and w[3, 4] == 5.0 and w[2, 4] == 5.0


def test_boundary_weighted_ce_against_numpy():
  labels = _square_labels()
  logits = np.random.default_rng(0).normal(size=(1, 10, 10, 2)).astype(np.float32)
  batch = {"label": jnp.asarray(labels), "valid": jnp.ones(1, jnp.int32)}
  config = fc.forest_config(loss="boundary_ce")
  got = float(fc.forest_loss(config, jnp.asarray(logits), batch))
  w = np.asarray(protocols.boundary_weights(jnp.asarray(labels), 255, 5.0))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(got, (nll * w).sum() / w.sum(), rtol=1e-5)


def test_boundary_f1():
  labels = _square_labels()
  assert fc.boundary_f1(fc.boundary_counts(labels, labels, 0))["boundary_f1"] == 1.0
  shifted = np.roll(labels, 1, axis=2)   # the square one pixel to the right
  assert fc.boundary_f1(fc.boundary_counts(shifted, labels, 1))["boundary_f1"] == 1.0
  counts = fc.boundary_counts(shifted, labels, 0)
  # Edges are the 4x4 square's 12 rim pixels and the 16 outside pixels 4-adjacent to it (28 per square).
  # Shifted one column, shared edge pixels per row (hand count): rows 2 and 7: 3; rows 3 and 6 (rim plus the
  # left/right outside pixels): 5; rows 4 and 5: 2 -> 20.
  assert counts[1] == counts[3] == 28 and counts[0] == counts[2] == 20
  assert fc.boundary_f1(np.zeros(4, np.int64))["boundary_f1"] == 0.0
  ignored = np.where(labels == 1, 255, labels)
  assert fc.boundary_counts(labels, ignored, 0)[3] == 0   # no boundary next to unlabelled pixels


def _config(name, data, **overrides):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / "s2" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.update(dataset=str(data), epochs=1, batch_size=2, num_devices=1, num_examples=2, **overrides)
  return c


def test_forest_configs():
  for name, model, target, loss in (("forest_unet_resnet50_detail_boundary", "resnet50", "mask", "boundary_ce"),
                                    ("forest_vit_s", "spec_vit_s", "mask", "ce"),
                                    ("forest_density_resnet18_detail", "resnet18", "density", "ce")):
    c = _config(name, "/x")
    assert (c.task, c.model.name, c.target, c.loss) == ("forest", model, target, loss)
  assert _config("forest_unet_resnet18_detail", "/x").model.detail_stem


@pytest.mark.slow
def test_forest_main_vit_density(forest_data, tmp_path):
  """fmjax.main's 'forest' task: a (one-block) ViT with the segmentation head regressing density."""
  from fmjax import main
  _, out, _ = forest_data
  c = _config("forest_vit_s", out, crop_size=16, target="density")
  c.model.update(patch_size=8, depth=1)   # tiny: the test is about the plumbing, not ViT-S itself
  result = main.run(c, str(tmp_path / "vit"))
  assert np.isfinite(result["test"]["mae_percent"]) and 0 <= result["test"]["tree_iou"] <= 1
  assert (tmp_path / "vit" / "predictions.png").exists() and (tmp_path / "vit" / "results.json").exists()


@pytest.mark.slow
def test_compare_stems_cli(forest_data, tmp_path):
  _, out, _ = forest_data
  fc.main(["--data", str(out), "--out", str(tmp_path), "--epochs", "1", "--batch-size", "4"])
  summary = json.loads((tmp_path / "compare.json").read_text())
  for label in ("standard", "detail"):
    assert set(summary[label]) >= {"accuracy", "tree_iou", "miou", "boundary_f1"}
  assert (tmp_path / "compare.png").stat().st_size > 0
