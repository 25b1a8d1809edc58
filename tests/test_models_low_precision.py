"""bfloat16 products on CPU (`layers.dot_general`): the values against float64 NumPy, and that every
product of the models, forward and backward, is handed to XLA as bf16 x bf16 -> float32 (the form
XLA CPU runs on the CPU's bf16 dot instructions instead of widening both operands)."""
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import linen as nn

from fmjax.models import build_model, layers as L
from fmjax.models.ssl_heads import DINOHead

# (lhs shape, rhs shape, dimension_numbers, the same product as an einsum for NumPy)
PRODUCTS = [
    ((6, 5), (5, 7), (((1,), (0,)), ((), ())), "ik,kn->in"),
    ((2, 3, 4, 5), (2, 3, 6, 5), (((3,), (3,)), ((0, 1), (0, 1))), "abqd,abkd->abqk"),
    ((4, 5, 3), (3, 4, 2), (((2,), (0,)), ((0,), (1,))), "bmk,kbn->bmn"),
    ((3, 9, 4), (4, 6), (((2,), (0,)), ((), ())), "pqk,kn->pqn"),
]


def _bf16(rng, shape):
  return np.asarray(rng.normal(size=shape), dtype=ml_dtypes.bfloat16)


@pytest.mark.parametrize("lhs_shape,rhs_shape,dims,subscripts", PRODUCTS)
def test_bf16_dot_general_matches_float64(lhs_shape, rhs_shape, dims, subscripts):
  rng = np.random.default_rng(0)
  lhs, rhs = _bf16(rng, lhs_shape), _bf16(rng, rhs_shape)
  out, vjp = jax.vjp(lambda a, b: L.dot_general(a, b, dims), jnp.asarray(lhs), jnp.asarray(rhs))
  assert out.dtype == jnp.bfloat16
  grad_out = _bf16(rng, out.shape)
  grad_lhs, grad_rhs = vjp(jnp.asarray(grad_out))

  f64 = lambda x: np.asarray(x, np.float64)
  operands, result = subscripts.split("->")
  lhs_names, rhs_names = operands.split(",")
  expected = np.einsum(subscripts, f64(lhs), f64(rhs))
  expected_lhs = np.einsum(f"{result},{rhs_names}->{lhs_names}", f64(grad_out), f64(rhs))
  expected_rhs = np.einsum(f"{result},{lhs_names}->{rhs_names}", f64(grad_out), f64(lhs))
  # Accumulated in float32, rounded once to bf16: within one bf16 rounding (2^-8 relative) plus
  # float32 summation error, measured against the largest magnitude of the result.
  for got, want in ((out, expected), (grad_lhs, expected_lhs), (grad_rhs, expected_rhs)):
    assert got.dtype == jnp.bfloat16 and got.shape == want.shape
    np.testing.assert_allclose(f64(got), want, rtol=2 ** -8, atol=1e-6 * np.abs(want).max())


def test_float32_products_are_unchanged():
  rng = np.random.default_rng(1)
  lhs, rhs = rng.normal(size=(2, 3, 4, 5)).astype(np.float32), rng.normal(size=(2, 3, 6, 5)).astype(np.float32)
  dims = PRODUCTS[1][2]
  np.testing.assert_array_equal(np.asarray(L.dot_general(lhs, rhs, dims)),
                                np.asarray(jax.lax.dot_general(lhs, rhs, dims)))


_DOT = re.compile(r"stablehlo\.dot_general[^\n]*: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\) -> tensor<[^>]*x(\w+)>")


def _dot_types(fn, *args):
  """(lhs, rhs, result) element types of every dot_general in fn's lowered program."""
  return _DOT.findall(jax.jit(fn).lower(*args).as_text())


def _assert_bf16_products(types, minimum: int):
  low = [t for t in types if "bf16" in t]
  assert len(low) >= minimum, types
  assert all(t == ("bf16", "bf16", "f32") for t in low), sorted(set(low))
  # float32 products are only the adapter's BatchNorm statistics and DINO's float32 last layer.
  assert all(t == ("f32", "f32", "f32") for t in types if "bf16" not in t), sorted(set(types))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the bf16 x bf16 -> f32 form is chosen on CPU only")
@pytest.mark.parametrize("name,overrides", [
    ("spec_vit", dict(width=32, depth=2, heads=2, image_size=16, patch_size=4, num_bands=80)),
    ("spec_resnet50", dict(num_bands=80)),
])
def test_bf16_models_hand_xla_bf16_products_forward_and_backward(name, overrides):
  model = build_model(name, dtype="bfloat16", **overrides)
  x = jnp.zeros((2, 16, 16, overrides["num_bands"]), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)

  def loss(params, state, x):
    out, _ = model.apply({**state, "params": params}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(jnp.square(out["embedding"].astype(jnp.float32)))

  state = {k: v for k, v in variables.items() if k != "params"}
  types = _dot_types(jax.grad(loss), variables["params"], state, x)
  # Every trainable product appears three times (forward, input and weight gradient).
  _assert_bf16_products(types, minimum=3 * 10)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the bf16 x bf16 -> f32 form is chosen on CPU only")
def test_bf16_dino_head_products():
  head = DINOHead(out_dim=64, hidden_dim=32, bottleneck_dim=16, dtype=jnp.bfloat16)
  x = jnp.zeros((4, 24), jnp.bfloat16)
  params = jax.eval_shape(lambda x: head.init(jax.random.key(0), x), x)["params"]
  loss = lambda p, x: jnp.sum(head.apply({"params": p}, x))
  _assert_bf16_products(_dot_types(jax.grad(loss, argnums=(0, 1)), params, x), minimum=3 * 3)


def test_bf16_gradients_sharded_equal_single_device():
  """The custom VJP under GSPMD: 8 fake devices (data, fsdp, tensor) against one."""
  from tests.test_models_sharded import _sharded_and_single
  model = build_model("spec_vit", width=32, depth=2, heads=4, mlp_dim=64, image_size=16, patch_size=4,
                      num_bands=80, dtype="bfloat16")
  x = jax.random.normal(jax.random.key(1), (8, 16, 16, 80))
  # A fixed random read-out of the tokens (a function of the LayerNormed tokens' squares alone would
  # be constant, and its gradients noise).
  readout = jax.random.normal(jax.random.key(2), (8, 16, 32))

  def grads(variables, x):
    def loss(params):
      out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
      return jnp.mean(out["tokens"].astype(jnp.float32) * readout)
    return jax.grad(loss)(variables["params"])

  _, sharded, single = _sharded_and_single(model, x, grads)
  single = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(single)))
  compared = 0
  for path, a in jax.tree_util.tree_leaves_with_path(jax.device_get(nn.unbox(sharded))):
    a, b = np.asarray(a, np.float32), np.asarray(single[path], np.float32)
    name = jax.tree_util.keystr(path)
    if "'spectral_adapter']['conv_" in name and "'bias'" in name:
      continue   # a per-channel constant before a train-mode BatchNorm: the exact gradient is 0
    # bf16 activations: the two programs round at different points (sharded partial sums).
    assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(b), name
    compared += 1
  assert compared > 30
