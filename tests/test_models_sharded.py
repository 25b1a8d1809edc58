"""Sharded forward passes over 8 fake devices (mesh data=2, fsdp=2, tensor=2) equal single-device
ones: parameters born sharded from their logical names, batch split over (data, fsdp), BatchNorm
statistics global."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fmjax import parallel
from fmjax.models import MAEDecoder, build_model


def _sharded_and_single(model, x, apply_fn):
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  init = lambda key, x: model.init(key, x, train=False)
  with parallel.with_rules(), jax.set_mesh(mesh):
    abstract = jax.eval_shape(init, jax.random.key(0), x)
    shardings = parallel.logical_to_shardings(abstract, mesh)
    variables = jax.jit(init, out_shardings=shardings)(jax.random.key(0), x)
    xs = jax.device_put(x, parallel.batch_sharding(mesh, x.ndim))
    sharded = jax.jit(apply_fn)(variables, xs)
  single_vars = jax.device_get(nn.unbox(variables))
  single = jax.jit(apply_fn)(jax.device_put(single_vars, jax.devices()[0]), jax.device_put(np.asarray(x), jax.devices()[0]))
  return variables, sharded, single


def _assert_trees_close(a, b, tol=2e-5):
  ja, jb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
  assert len(ja) == len(jb)
  for u, v in zip(ja, jb):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_spec_vit_sharded_equals_single_device(scan):
  model = build_model("spec_vit", width=32, depth=2, heads=4, mlp_dim=64, image_size=16, patch_size=4,
                      num_bands=80, scan=scan)
  x = jax.random.normal(jax.random.key(1), (8, 16, 16, 80))

  def apply_fn(v, x):   # train=True: adapter BatchNorm uses (global) batch statistics
    out, state = model.apply(v, x, train=True, mutable=["batch_stats"])
    return out, state

  variables, sharded, single = _sharded_and_single(model, x, apply_fn)
  # parameters really are laid out over the mesh
  prefix = "encoder/blocks" if scan else "encoder/blocks_0"
  fc1 = variables["params"]["vit_core"]
  for key in prefix.split("/") + ["mlp", "fc1"]:
    fc1 = fc1[key]
  spec = fc1["kernel"].value.sharding.spec
  assert tuple(spec)[-2:] == ("fsdp", "tensor"), spec
  _assert_trees_close(sharded, single)


@pytest.mark.slow
def test_mae_encode_decode_sharded_equals_single_device():
  model = build_model("spec_vit", width=32, depth=1, heads=4, image_size=16, patch_size=4, num_bands=6,
                      use_adapter=False, sincos_pos_embed=True)
  decoder = MAEDecoder(patch_size=4, out_channels=6, width=16, depth=1, num_heads=2)
  keep = np.stack([np.sort(np.random.default_rng(s).permutation(16)[:4]) for s in range(8)]).astype(np.int32)
  restore = np.stack([np.argsort(np.concatenate([k, np.setdiff1d(np.arange(16), k)])) for k in keep]).astype(np.int32)

  class MAE(nn.Module):   # how an objective composes them: modules passed as attributes
    encoder: nn.Module
    decoder: nn.Module

    def __call__(self, x, *, train):
      tokens = self.encoder.encode(x, train=train, keep_idx=jnp.asarray(keep))
      return self.decoder(tokens, jnp.asarray(restore), train=train)

  mae = MAE(model, decoder)
  x = jax.random.normal(jax.random.key(2), (8, 16, 16, 6))
  _, sharded, single = _sharded_and_single(mae, x, lambda v, x: mae.apply(v, x, train=False))
  assert sharded.shape == (8, 16, 4 * 4 * 6)
  _assert_trees_close(sharded, single)


@pytest.mark.slow
def test_resnet_sharded_equals_single_device():
  model = build_model("resnet18", in_channels=5, image_size=16)
  x = jax.random.normal(jax.random.key(3), (8, 16, 16, 5))
  _, sharded, single = _sharded_and_single(
      model, x, lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  _assert_trees_close(sharded, single, tol=1e-4)
