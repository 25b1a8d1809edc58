"""End to end: synthetic archive -> dataset -> Grain -> tiny SpecViT MAE (configs/demo.py); loss falls.

Also checks `fmjax.checkpoint.load_backbone` on the result and the reconstruction PNG.
"""
import glob
import json
import os
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_mae_loss_falls_and_backbone_loads(tmp_path):
  from data_prep import spectral_earth, synthetic
  from fmjax import checkpoint, train
  sys.path.insert(0, REPO)
  from configs import demo
  synthetic.generate(str(tmp_path / "archive"), 24, seed=1, size=32, bands=202, progress=False)
  spectral_earth.convert(str(tmp_path / "archive"), str(tmp_path / "ds"), shards=2, workers=1, size=32, val_fraction=0.25,
                         bands=202, progress=False)
  config = demo.get_config(f"data_dir={tmp_path / 'ds'},steps=40,batch=8")
  config.log.every_steps = 1
  config.log.images_every = 40
  config.log.tensorboard = False
  config.checkpoint.every_steps = 20
  workdir = str(tmp_path / "run")
  summary = train.train(config, workdir, devices=jax.devices()[:1])
  assert summary["final_step"] == 40
  losses = [json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert len(losses) == 40 and all(np.isfinite(losses))
  first, last = np.mean(losses[:5]), np.mean(losses[-10:])
  assert last < 0.9 * first, (first, last)
  assert glob.glob(os.path.join(workdir, "images", "reconstruction_*.png"))

  loaded_config, variables = checkpoint.load_backbone(workdir)
  assert loaded_config.model.width == 64
  assert set(variables) == {"params", "batch_stats"}
  assert {"spectral_adapter", "vit_core"} <= set(variables["params"])
  from fmjax.models import build_model
  model = build_model("spec_vit", width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=8, image_size=32,
                      num_bands=202, sincos_pos_embed=True)
  out = model.apply(variables, np.zeros((1, 32, 32, 202), np.float32), train=False)
  assert out["embedding"].shape == (1, 64)
