"""End to end through the engine's Orbax checkpoint: a MAE train state sharded over 8 fake devices
(data=2, fsdp=2, tensor=2) -> `python -m fmjax.export` -> strict torch load, same outputs ->
`python -m fmjax.export.import_torch` -> `load_backbone` gives the same arrays back."""
import json
import os

import jax
import numpy as np
import optax
import pytest
import torch

from fmjax import checkpoint, parallel, train_state
from fmjax.export import __main__ as export_cli
from fmjax.export import files, import_torch, torch_modules
from fmjax.models import build_model
from fmjax.objectives import build_objective


def _mae_demo_config():
  from configs import demo
  config = demo.get_config("objective=mae")
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  return config


def _write_sharded_checkpoint(workdir, config, step=7):
  mesh = parallel.make_mesh(dict(config.mesh))
  objective = build_objective(config)
  size, bands = config.data.crop_size, config.data.num_bands
  batch = {"image": jax.ShapeDtypeStruct((8, 1, size, size, bands), np.float32)}
  init_fn = train_state.make_init_fn(objective, optax.adamw(1e-3), batch, seed=0)
  _, shardings = train_state.abstract_state_and_shardings(init_fn, mesh)
  state = train_state.create_state(init_fn, shardings)
  # Random BatchNorm statistics: the init's zeros/ones would hide a mean/var swap.
  rng = np.random.RandomState(0)
  state["model_state"] = jax.tree.map(
      lambda a: jax.device_put(rng.uniform(0.5, 1.5, a.shape).astype(a.dtype), a.sharding), state["model_state"])
  ckpt = checkpoint.Checkpointer(workdir, keep=1, async_save=False)
  ckpt.save(step, state, config=config, force=True)
  ckpt.wait()
  ckpt.close()
  return state


@pytest.mark.slow
def test_export_8_device_checkpoint_and_import_back(tmp_path):
  config = _mae_demo_config()
  state = _write_sharded_checkpoint(str(tmp_path / "run"), config)
  fc1 = state["params"]["encoder"]["vit_core"]["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert len(fc1.sharding.device_set) == 8 and not fc1.sharding.is_fully_replicated

  out = str(tmp_path / "export" / "model.safetensors")
  assert export_cli.main(["--checkpoint", str(tmp_path / "run"), "--out", out, "--quiet"]) == 0
  with open(out[:-len(".safetensors")] + ".json") as f:
    sidecar = json.load(f)
  assert sidecar["step"] == 7 and sidecar["objective"] == "mae" and sidecar["model"] == "spec_vit"
  assert sidecar["torch_model"]["patch_size"] == 8 and sidecar["torch_model"]["image_size"] == 32
  assert sidecar["bands"]["count"] == 202 and len(sidecar["bands"]["wavelengths_nm"]) == 202
  assert sidecar["generated_keys"] == ["vit_core.pos_embed"]   # MAE trains with the fixed sin-cos table

  # The exported weights in the official module compute what the fmjax encoder computes.
  sd = files.read_state_dict(out)
  tm = torch_modules.build_torch_model(**sidecar["torch_model"]).eval()
  tm.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
  _, backbone = checkpoint.load_backbone(str(tmp_path / "run"))
  # The exporter read only the backbone's leaves (partial restore): same arrays as the full restore.
  from fmjax.export.restore import load_backbone_lazy, load_backbone_partial
  _, lazy, source = load_backbone_lazy(str(tmp_path / "run"), budget_bytes=1 << 16)
  assert source is not None, "the objective's backbone selection should allow a partial restore"
  assert jax.tree.leaves(lazy)[0].load().shape == jax.tree.leaves(lazy)[0].shape
  _, partial = load_backbone_partial(str(tmp_path / "run"))
  flat_full = jax.tree_util.tree_flatten_with_path(jax.device_get(backbone))[0]
  flat_partial = jax.tree_util.tree_flatten_with_path(partial)[0]
  assert [jax.tree_util.keystr(p) for p, _ in flat_full] == [jax.tree_util.keystr(p) for p, _ in flat_partial]
  assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(flat_full, flat_partial))
  encoder = build_model("spec_vit", width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=8, image_size=32,
                        sincos_pos_embed=True)
  x = np.random.RandomState(1).randn(2, 32, 32, 202).astype(np.float32)
  got = jax.jit(lambda v, x: encoder.apply(v, x, train=False))(backbone, x)
  with torch.no_grad():
    ref = tm.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
  assert np.abs(ref["embedding"].numpy() - np.asarray(got["embedding"])).max() <= 1e-4
  assert np.abs(ref["tokens"].numpy() - np.asarray(got["tokens"])).max() <= 1e-4

  # Import back: a checkpoint load_backbone reads, holding exactly the exported arrays.
  assert import_torch.main(["--state-dict", out, "--model", "spec_vit", "--out", str(tmp_path / "imported")]) == 0
  config2, imported = checkpoint.load_backbone(str(tmp_path / "imported"))
  assert config2.model.num_heads == 4 and config2.model.patch_size == 8
  original = jax.device_get(backbone)
  flat_a = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(original)[0]}
  flat_b = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(imported))[0]}
  # pos_embed: the import model keeps it as a learned parameter (the official module has one).
  assert set(flat_b) - set(flat_a) == {"['params']['vit_core']['pos_embed']"}
  for key, value in flat_a.items():
    assert np.array_equal(value, flat_b[key]), key


def test_export_cli_explains_a_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint found"):
    export_cli.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "m.pt")])

