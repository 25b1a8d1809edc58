"""Config validation, schedules and weight-decay masks (no training)."""
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from fmjax import config_validation, optim, parallel
from tests import test_engine_support as support

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_batch_not_divisible_by_data_parallel_devices():
  config = support.toy_config(batch_size=12, **{"mesh.data": 8})
  with pytest.raises(config_validation.ConfigError, match=r"batch_size=12 .* data x fsdp = 8"):
    config_validation.validate_with_mesh(config, parallel.make_mesh({"data": 8}))


def test_patch_must_divide_crop():
  config = support.toy_config(**{"model.patch_size": 5, "data.crop_size": 32})
  with pytest.raises(config_validation.ConfigError, match=r"model.patch_size=5 .* valid patch sizes .*\[1, 2, 4, 8, 16, 32\]"):
    config_validation.validate_static(config)


def test_grad_accum_must_divide_batch():
  config = support.toy_config(batch_size=16, grad_accum=3)
  with pytest.raises(config_validation.ConfigError, match="grad_accum=3"):
    config_validation.validate_static(config)


def test_band_count_checked_against_dataset(tmp_path):
  from fmjax.data import dataset_dir
  import json
  (tmp_path / "dataset_info.json").write_text(json.dumps({"name": "x", "splits": []}))
  (tmp_path / "fmjax_dataset.json").write_text(json.dumps({"num_bands": 224}))
  assert dataset_dir.read_dataset_info(tmp_path)["num_bands"] == 224
  config = support.toy_config(**{"data.dir": str(tmp_path), "data.num_bands": 202})
  with pytest.raises(config_validation.ConfigError, match=r"data.num_bands=202 .* has 224 bands"):
    config_validation.validate_static(config)


def test_unknown_config_key_is_rejected_by_main():
  result = subprocess.run([sys.executable, "-m", "fmjax.main", "--config=configs/demo.py", "--workdir=/tmp/unused",
                           "--config.optimizer.nmae=adamw"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "nmae" in result.stderr


def test_unknown_objective_names_valid_choices():
  from fmjax.objectives import build_objective
  config = support.toy_config(**{"objective.name": "simclr"})
  with pytest.raises(ValueError, match=r"objective.name='simclr' is not known; valid choices: .*'mae'"):
    build_objective(config)


def test_weight_decay_mask_skips_biases_norms_and_tokens():
  params = {"encoder": {"qkv": {"kernel": np.zeros((4, 12)), "bias": np.zeros(12)},
                        "norm1": {"scale": np.zeros(4), "bias": np.zeros(4)}},
            "cls_token": np.zeros((1, 1, 4)), "pos_embed": np.zeros((1, 5, 4)),
            "bn_1": {"scale": np.zeros(4)}, "patch_embed": {"kernel": np.zeros((2, 2, 3, 4))}}
  mask = optim.weight_decay_mask(params)
  assert mask["encoder"]["qkv"] == {"kernel": True, "bias": False}
  assert mask["encoder"]["norm1"] == {"scale": False, "bias": False}
  assert mask["cls_token"] is False and mask["pos_embed"] is False
  assert mask["patch_embed"]["kernel"] is True and mask["bn_1"]["scale"] is False
  assert optim.weight_decay_mask(params, decay_tokens=True)["cls_token"] is True


def test_adamw_decays_only_masked_leaves():
  """With zero gradients AdamW changes only decayed leaves, by exactly lr * wd * w (closed form)."""
  config = support.toy_config(**{"optimizer.weight_decay": 0.5, "schedule.name": "constant",
                                 "schedule.base_lr": 0.1, "schedule.warmup_steps": 0})
  tx = optim.build_optimizer(config.optimizer, optim.build_schedule(config.schedule, 10))
  params = {"dense": {"kernel": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)}}
  updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["dense"]["kernel"], 1 - 0.1 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(new["dense"]["bias"], 1.0)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_by_global_norm_matches_optax(max_norm):
  """optim.clip_by_global_norm (scale by min(1, max / norm)) against optax's: the same clipped
  gradients (to one rounding when clipping, exactly when not), state and tree structure; and the
  global norm against NumPy's. build_optimizer uses it for optimizer.grad_clip_norm."""
  rng = np.random.default_rng(3)
  grads = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": {"c": rng.normal(size=5).astype(np.float32)}}
  norm = np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(optim.global_norm(grads), norm, rtol=1e-6)
  ours, theirs = optim.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
  assert jax.tree.structure(ours.init(grads)) == jax.tree.structure(theirs.init(grads))
  got, _ = ours.update(grads, ours.init(grads))
  want, _ = theirs.update(grads, theirs.init(grads))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b, g in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=2e-7, atol=0)
    np.testing.assert_allclose(a, g * min(1.0, max_norm / norm), rtol=1e-6)
  # In build_optimizer: the same state layout optax's clipping gives (checkpoints unchanged).
  txs = [optim.build_optimizer(c.optimizer, optim.build_schedule(c.schedule, 10))
         for c in (support.toy_config(**{"optimizer.grad_clip_norm": n}) for n in (max_norm, 0.0))]
  assert jax.tree.structure(txs[0].init(grads)) == jax.tree.structure((theirs.init(grads), *txs[1].init(grads)))


def test_schedules_against_closed_forms():
  config = support.toy_config(**{"schedule.name": "cosine", "schedule.base_lr": 1.0, "schedule.warmup_steps": 10})
  s = optim.build_schedule(config.schedule, 110)
  assert float(s(0)) == 0.0 and abs(float(s(5)) - 0.5) < 1e-6 and abs(float(s(10)) - 1.0) < 1e-6
  np.testing.assert_allclose(float(s(60)), 0.5 * (1 + np.cos(np.pi * 50 / 100)), atol=1e-6)
  config.schedule.name = "step"
  config.schedule.warmup_steps = 0
  config.schedule.boundaries = (0.6, 0.8)
  s = optim.build_schedule(config.schedule, 100)
  assert [round(float(s(t)), 6) for t in (0, 59, 61, 81)] == [1.0, 1.0, 0.1, 0.01]
  config.schedule.name = "linear"
  with pytest.raises(ValueError, match=r"schedule.name='linear' .* \('cosine', 'step', 'constant'\)"):
    optim.build_schedule(config.schedule, 100)


def test_mae_configs_build():
  sys.path.insert(0, REPO)
  from configs import common, demo
  for size in "tsblhg":
    c = common.mae_config(size)
    assert c.model.name == f"spec_vit_{size}" and c.objective.mask_ratio == 0.9 and c.objective.decoder_depth == 1
  paper = common.mae_config("s", "recipe=paper")
  assert paper.objective.mask_ratio == 0.75 and paper.objective.decoder_depth == 8 and paper.optimizer.b2 == 0.95
  with pytest.raises(ValueError, match="valid choices"):
    common.mae_config("s", "recipe=mine")
  assert demo.get_config("objective=mae").model.width == 64
