"""Exported weights in the official PyTorch modules compute what fmjax computes; round trips are exact.

The JAX side is fmjax.models (Flax); the PyTorch side is fmjax.export.torch_modules, an independent
torch.nn implementation of the official modules (itself checked against NumPy formulas in
test_export_torch_modules.py). Parameters are random (not the init) so that no layout mistake can
hide behind zeros or ones; BatchNorms run in eval mode on random running statistics.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from fmjax.export import convert, files, import_torch, mapping, torch_modules
from fmjax.export.convert import ImportMismatchError
from fmjax.models import build_model

TOL = 1e-4


def random_variables(model, seed=0):
  """Random, well-scaled variables with the model's exact tree (built from eval_shape: no init compile)."""
  x = jax.ShapeDtypeStruct(model.input_shape(1), jnp.float32)
  abstract = nn.meta.unbox(jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x))
  rng = np.random.RandomState(seed)

  def make(path, leaf):
    names = [getattr(p, "key", str(p)) for p in path]
    shape, leaf_name = leaf.shape, names[-1]
    scanned = "blocks" in names and "encoder" in names and not any(n.startswith("blocks_") for n in names)
    core = shape[1:] if scanned else shape
    if leaf_name == "kernel":
      value = rng.randn(*shape) / np.sqrt(np.prod(core[:-1]))
    elif leaf_name == "scale":
      value = rng.uniform(0.5, 1.0, shape)
    elif leaf_name == "var":
      value = rng.uniform(0.5, 1.5, shape)
    elif leaf_name in ("cls_token", "pos_embed"):
      value = rng.randn(*shape) * 0.5
    else:  # biases, running means
      value = rng.randn(*shape) * 0.1
    return value.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(make, abstract)


def torch_model_for(flax_model, name):
  return torch_modules.build_torch_model(**import_torch.torch_kwargs_for(name, flax_model))


def export_to_torch(variables, flax_model, name, with_head=True):
  tm = torch_model_for(flax_model, name)
  table = mapping.key_table(tm, scanned=mapping.scanned_blocks_path(variables))
  sd = convert.plan_export(variables, table, step=3, with_head=with_head).state_dict()
  tm.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
  return tm.eval(), sd, table


def compare(flax_model, variables, tm, x):
  out = jax.jit(lambda v, x: flax_model.apply(v, x, train=False))(variables, x)
  with torch.no_grad():
    xt = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)
    ref = tm.forward_features(xt)
    logits = tm(xt)
  diffs = {"embedding": np.abs(ref["embedding"].numpy() - np.asarray(out["embedding"])).max(),
           "logits": np.abs(logits.numpy() - np.asarray(out["logits"])).max()}
  if "tokens" in ref:
    diffs["tokens"] = np.abs(ref["tokens"].numpy() - np.asarray(out["tokens"])).max()
  else:
    diffs["features"] = max(np.abs(r.permute(0, 2, 3, 1).numpy() - np.asarray(o)).max()
                            for r, o in zip(ref["features"], out["features"]))
  scale = float(np.abs(np.asarray(out["embedding"])).max())
  return diffs, scale


@pytest.mark.parametrize("patch,scan", [(4, False), (16, True)])
def test_spec_vit_s_forward_matches_pytorch(patch, scan):
  # S/16 runs scanned (stacked blocks, one compiled body): covers that layout at full depth too.
  model = build_model("spec_vit_s", patch_size=patch, image_size=32, num_classes=7, scan=scan)
  variables = random_variables(model, seed=patch)
  tm, _, _ = export_to_torch(variables, model, "spec_vit_s")
  x = np.random.RandomState(0).randn(2, 32, 32, 202).astype(np.float32)
  diffs, scale = compare(model, variables, tm, x)
  assert scale > 0.1, "degenerate outputs would make the comparison meaningless"
  assert max(diffs.values()) <= TOL, diffs


def test_scanned_vit_exports_the_same_state_dict_as_unrolled():
  kw = dict(width=32, depth=3, num_heads=4, patch_size=8, image_size=16, num_classes=2)
  unrolled, scanned = build_model("spec_vit", **kw), build_model("spec_vit", scan=True, **kw)
  v_unrolled = random_variables(unrolled, seed=1)
  _, sd, table = export_to_torch(v_unrolled, unrolled, "spec_vit")
  # The scanned tree imported from that state_dict exports back to identical bytes.
  v_scanned, _, report = import_torch.import_state_dict(sd, "spec_vit", scan=True, **kw)
  assert report.ok
  assert mapping.scanned_blocks_path(v_scanned) is not None
  _, sd_scanned, _ = export_to_torch(v_scanned, scanned, "spec_vit")
  assert list(sd_scanned) == list(sd)
  for key in sd:
    assert np.array_equal(sd[key], sd_scanned[key]), key
  x = np.random.RandomState(0).randn(2, 16, 16, 202).astype(np.float32)
  a = jax.jit(lambda v: unrolled.apply(v, x, train=False)["embedding"])(v_unrolled)
  b = jax.jit(lambda v: scanned.apply(v, x, train=False)["embedding"])(v_scanned)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_round_trip_jax_torch_jax_is_bit_exact(tmp_path, fmt):
  model = build_model("spec_vit", width=32, depth=2, num_heads=2, patch_size=4, image_size=16, num_classes=3)
  variables = random_variables(model, seed=2)
  from fmjax.export import exporter
  out = str(tmp_path / f"model.{fmt}")
  sidecar = exporter.export_variables(variables, out, with_head=True, step=11, show_progress=False,
                                      config={"model": {"name": "spec_vit", "num_heads": 2}})
  sd = files.read_state_dict(out)
  assert sd["spectral_adapter.1.num_batches_tracked"].dtype == np.int64
  assert int(sd["spectral_adapter.1.num_batches_tracked"]) == 11
  tm = torch_modules.build_torch_model(**sidecar["torch_model"])
  tm.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
  back, _, report = import_torch.import_state_dict(sd, "spec_vit", sidecar=sidecar)
  assert report.ok
  flat_a, flat_b = mapping.flatten(jax.device_get(variables)), mapping.flatten(back)
  assert set(flat_a) == set(flat_b)
  for path in flat_a:
    assert flat_a[path].dtype == flat_b[path].dtype and np.array_equal(flat_a[path], flat_b[path]), path


def test_import_reports_missing_unexpected_and_mismatched_keys_by_name():
  model = build_model("spec_vit", width=32, depth=2, num_heads=2, patch_size=4, image_size=16)
  variables = random_variables(model)
  _, sd, _ = export_to_torch(variables, model, "spec_vit", with_head=False)
  bad = dict(sd)
  del bad["vit_core.blocks.1.mlp.fc2.bias"]
  bad["vit_core.blocks.0.attn.qkv.weight"] = np.zeros((90, 32), np.float32)
  bad["vit_core.fc_norm.weight"] = np.zeros(32, np.float32)
  with pytest.raises(ImportMismatchError) as err:
    import_torch.import_state_dict(bad, "spec_vit", width=32, depth=2, num_heads=2, patch_size=4, image_size=16)
  message = str(err.value)
  assert "vit_core.blocks.1.mlp.fc2.bias" in message
  assert "vit_core.blocks.0.attn.qkv.weight: file has (90, 32), the model needs (96, 32)" in message
  assert "vit_core.fc_norm.weight" in message


def test_export_refuses_variables_that_do_not_fit():
  model = build_model("spec_vit", width=32, depth=2, num_heads=2, patch_size=4, image_size=16)
  variables = jax.device_get(random_variables(model))
  variables["params"]["vit_core"]["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
  tm = torch_model_for(model, "spec_vit")
  with pytest.raises(mapping.MappingError, match="vit_core/extra/kernel .* has no official key"):
    convert.plan_export(variables, mapping.key_table(tm))
  with pytest.raises(mapping.MappingError, match="no head"):
    del variables["params"]["vit_core"]["extra"]
    convert.plan_export(variables, mapping.key_table(tm), with_head=True)


def test_mae_sincos_model_exports_the_fixed_table_as_pos_embed():
  kw = dict(width=32, depth=1, num_heads=2, patch_size=4, image_size=16)
  mae_encoder = build_model("spec_vit", sincos_pos_embed=True, **kw)
  variables = random_variables(mae_encoder)
  assert "pos_embed" not in variables["params"]["vit_core"]
  tm, sd, _ = export_to_torch(variables, mae_encoder, "spec_vit", with_head=False)
  from fmjax.models.layers import sincos_2d
  np.testing.assert_array_equal(sd["vit_core.pos_embed"], sincos_2d(32, 4)[None].astype(np.float32))
  x = np.random.RandomState(0).randn(1, 16, 16, 202).astype(np.float32)
  with torch.no_grad():
    ref = tm.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))["embedding"].numpy()
  got = np.asarray(jax.jit(lambda v: mae_encoder.apply(v, x, train=False)["embedding"])(variables))
  assert np.abs(ref - got).max() <= TOL
  # Importing into a sin-cos model accepts the table; a learned pos_embed is refused by name.
  _, _, report = import_torch.import_state_dict(sd, "spec_vit", sincos_pos_embed=True, **kw)
  assert report.ok
  sd["vit_core.pos_embed"] = sd["vit_core.pos_embed"] + 0.1
  with pytest.raises(ImportMismatchError, match="vit_core.pos_embed .*sincos_pos_embed=False"):
    import_torch.import_state_dict(sd, "spec_vit", sincos_pos_embed=True, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["spec_resnet50", "spec_resnet50_dilated"])
def test_spec_resnet50_forward_matches_pytorch(name):
  model = build_model(name, image_size=16, num_classes=5)
  variables = random_variables(model, seed=3)
  tm, sd, table = export_to_torch(variables, model, name)
  x = np.random.RandomState(0).randn(2, 16, 16, 202).astype(np.float32)
  diffs, scale = compare(model, variables, tm, x)
  assert scale > 0.1
  assert max(diffs.values()) <= TOL, diffs
  back, _, report = import_torch.import_state_dict(sd, name, image_size=16)
  assert report.ok
  for path, value in mapping.flatten(jax.device_get(variables)).items():
    assert np.array_equal(value, mapping.get_leaf(back, path)), path


def test_vit_without_adapter_exports_and_imports():
  """fmjax's use_adapter=False ViT (e.g. 13-band Sentinel-2): vit_core keys only, in_chans = bands."""
  model = build_model("spec_vit", width=32, depth=1, num_heads=2, patch_size=4, image_size=16, num_bands=13,
                      use_adapter=False, num_classes=3)
  variables = random_variables(model, seed=4)
  tm, sd, _ = export_to_torch(variables, model, "spec_vit")
  assert not any(k.startswith("spectral_adapter") for k in sd)
  assert sd["vit_core.patch_embed.proj.weight"].shape == (32, 13, 4, 4)
  x = np.random.RandomState(0).randn(2, 16, 16, 13).astype(np.float32)
  diffs, _ = compare(model, variables, tm, x)
  assert max(diffs.values()) <= TOL, diffs
  back, options, report = import_torch.import_state_dict(sd, "spec_vit", width=32, depth=1, num_heads=2)
  assert report.ok and options["use_adapter"] is False and options["num_bands"] == 13
