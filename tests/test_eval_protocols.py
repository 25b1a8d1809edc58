"""Each protocol trains exactly the parameters it should; losses; checkpoint compatibility errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from data_prep import synthetic, synthetic_downstream
from fmjax import parallel
from fmjax.evaluate import data as data_lib
from fmjax.evaluate import protocols as P
from fmjax.evaluate import run as run_lib
from fmjax.evaluate import tasks

SIZE, BANDS = 16, 80
MODEL = {"name": "spec_vit", "width": 8, "depth": 1, "num_heads": 2, "mlp_dim": 16, "patch_size": 8}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval_data")
  synthetic.generate(str(root / "archive"), locations=10, size=SIZE, bands=BANDS, progress=False)
  return synthetic_downstream.build(str(root / "archive"), str(root / "down"), workers=1)


def _config(dataset, protocol, **kw):
  c = tasks.eval_config("custom", protocol)
  c.dataset = dataset
  c.model = dict(MODEL)
  c.epochs, c.batch_size, c.head_channels, c.tensorboard, c.num_examples = 1, 8, 4, False, 0
  c.update(kw)
  return c


def _trained(dataset, protocol, **kw):
  config = _config(dataset, protocol, **kw)
  info = data_lib.read_task(dataset)
  train = data_lib.SplitData(dataset, "train", info)
  val = data_lib.SplitData(dataset, "val", info)
  backbone, _, _ = run_lib.resolve_backbone(config, SIZE, info.num_bands)
  mesh = parallel.make_mesh({"data": -1})
  ev = P.Evaluator(config, info, backbone, SIZE, mesh)
  before = ev.init(jax.random.PRNGKey(0), jnp.asarray(train.sample(0)[0][None]))
  best, _, _ = ev.train(before, train, val, "")
  return before, jax.device_get(best["variables"])


def _changed(before, after, collection):
  a = traverse_util.flatten_dict(before[collection], sep="/")
  b = traverse_util.flatten_dict(after[collection], sep="/")
  return {k for k in a if not np.array_equal(a[k], b[k])}, set(a)


@pytest.mark.parametrize("protocol,bn_mode", [("frozen", "eval"), ("frozen", "train"), ("adapter", "train"),
                                              ("finetune", "train")])
def test_protocol_trains_exactly_its_parameters(datasets, protocol, bn_mode):
  kw = {"layer_decay": 0.5} if protocol == "finetune" else {}
  # The multi-label task: a Linear head keeps compilation cheap; the backbone is what matters here.
  before, after = _trained(datasets["synthetic_cls"], protocol, bn_mode=bn_mode, **kw)
  changed, all_params = _changed(before, after, "params")
  head = {k for k in all_params if k.startswith("head/")}
  adapter = {k for k in all_params if "spectral_adapter" in k}
  expected = {"frozen": head, "adapter": head | adapter, "finetune": all_params}[protocol]
  if bn_mode == "train":
    # The first conv's bias is followed by a BatchNorm with batch statistics, which subtracts it
    # again: its gradient is exactly zero (fmjax folds that BN into the conv), so it cannot move.
    expected = expected - {"backbone/spectral_adapter/conv_0/bias"}
  assert changed == expected
  stats_changed, all_stats = _changed(before, after, "batch_stats")
  backbone_stats = {k for k in all_stats if k.startswith("backbone/")}
  assert backbone_stats  # the adapter's BatchNorms
  if bn_mode == "eval":
    assert not (stats_changed & backbone_stats)
  else:
    assert backbone_stats <= stats_changed


def test_layer_ids_and_decay_scales():
  assert P.layer_id(("head", "x"), 12) == 13
  assert P.layer_id(("backbone", "vit_core", "encoder", "blocks_3", "attn"), 12) == 4
  assert P.layer_id(("backbone", "spectral_adapter", "conv_0", "kernel"), 12) == 0
  assert P.layer_id(("backbone", "vit_core", "norm", "scale"), 12) == 12
  # With decay 0.5 and 1 block, the adapter (layer 0) moves 0.5^2 as far as the head in step 1
  # of plain SGD-like Adam (first Adam step = lr * sign(grad) per element).
  params = {("backbone", "spectral_adapter", "w"): jnp.ones(2), ("backbone", "vit_core", "encoder", "blocks_0", "w"): jnp.ones(2),
            ("head", "w"): jnp.ones(2)}
  cfg = tasks.eval_config("custom", "finetune")
  cfg.update(lr=1.0, weight_decay=0.0, layer_decay=0.5, epochs=1)
  tx = P.make_optimizer(cfg, params, total_steps=1000)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  steps = {k[-2] if k[0] == "backbone" else "head": float(-v[0]) for k, v in updates.items()}
  assert steps["head"] == pytest.approx(1.0, rel=1e-3)
  assert steps["blocks_0"] == pytest.approx(0.5, rel=1e-3)
  assert steps["spectral_adapter"] == pytest.approx(0.25, rel=1e-3)


def test_losses_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  labels = rng.integers(0, 4, (2, 4, 4))            # 3 = ignore index
  batch = {"label": jnp.asarray(labels), "valid": jnp.array([1, 0])}
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.minimum(labels, 2)[..., None], -1)[..., 0]
  keep = (labels != 3) & (np.arange(2)[:, None, None] == 0)
  ce = P.task_loss("ce", jnp.asarray(logits), batch, 3, 3)
  assert float(ce) == pytest.approx(nll[keep].mean(), rel=1e-5)
  # boundary: a pixel with a differently labelled 4-neighbour weighs 5
  pad = np.pad(labels, ((0, 0), (1, 1), (1, 1)), mode="edge")
  edge = np.zeros_like(labels, bool)
  for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
    edge |= pad[:, dy:dy + 4, dx:dx + 4] != labels
  w = np.where(edge, 5.0, 1.0) * keep
  bce_w = P.task_loss("boundary_ce", jnp.asarray(logits), batch, 3, 3, 5.0)
  assert float(bce_w) == pytest.approx((nll * w).sum() / w.sum(), rel=1e-5)
  ml_logits = rng.normal(size=(3, 5)).astype(np.float32)
  targets = rng.integers(0, 2, (3, 5))
  p = 1 / (1 + np.exp(-ml_logits))
  ref = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean(-1)[:2].mean()
  got = P.task_loss("bce", jnp.asarray(ml_logits), {"label": jnp.asarray(targets), "valid": jnp.array([1, 1, 0])}, 5, None)
  assert float(got) == pytest.approx(ref, rel=1e-5)
  with pytest.raises(ValueError, match="valid choices"):
    P.task_loss("focal", jnp.asarray(ml_logits), {"label": targets, "valid": jnp.ones(3)}, 5, None)


def test_incompatible_checkpoint_names_both_sides():
  good = {"params": {"a": np.zeros((2, 3)), "b": np.zeros(4)}}
  bad = {"params": {"a": np.zeros((2, 5)), "c": np.zeros(4)}}
  P.check_compatible(good, good, "/ckpt", "(spec_vit)")
  with pytest.raises(ValueError) as e:
    P.check_compatible(bad, good, "/ckpt/run1", "(name=spec_vit, width=8)")
  msg = str(e.value)
  assert "/ckpt/run1" in msg and "width=8" in msg
  assert "params/b" in msg and "params/c" in msg and "(2, 5)" in msg and "(2, 3)" in msg


def test_missing_checkpoint_and_bad_protocol_are_clear(datasets, tmp_path):
  with pytest.raises(FileNotFoundError, match="init_from="):
    run_lib.run(_config(datasets["synthetic_cls"], "frozen", init_from=str(tmp_path / "nothing")), str(tmp_path / "w"))
  with pytest.raises(ValueError, match="valid choices"):
    tasks.eval_config("custom", "probe")


@pytest.mark.slow
def test_run_linear_probe_writes_results(datasets, tmp_path):
  config = _config(datasets["synthetic_cls"], "linear", epochs=2, num_examples=2)
  results = run_lib.run(config, str(tmp_path))
  assert results["protocol"] == "linear" and results["type"] == "multilabel"
  assert results["trainable_params"] == MODEL["width"] * 6 + 6  # Linear D -> 6 land-cover classes
  saved = json.load(open(tmp_path / "results.json"))
  assert 0.0 <= saved["test"]["f1_micro"] <= 1.0 and len(saved["history"]) == 2
  assert os.path.getsize(tmp_path / "predictions.png") > 1000


def test_label_fraction_subset_is_seeded(datasets):
  info = data_lib.read_task(datasets["synthetic_seg"])
  full = data_lib.SplitData(datasets["synthetic_seg"], "train", info)
  a, b = full.subset(0.5, seed=1), full.subset(0.5, seed=1)
  assert len(a) == round(0.5 * len(full)) and list(a.indices) == list(b.indices)
  with pytest.raises(ValueError, match="label fraction"):
    full.subset(0.0, 0)
