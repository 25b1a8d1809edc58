"""The CPU LayerNorm kernel (fmjax/kernels/layer_norm.cc, `layers.layer_norm_kernel`) against torch's
LayerNorm in float64, and `layers.layer_norm` choosing it: same parameters as flax's module, same
numbers, where it applies and where it does not."""
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from fmjax.kernels import cpu as cpu_kernels
from fmjax.models import layers
from tests.conftest import requires_cpu_kernels

pytestmark = requires_cpu_kernels


def _torch_reference(x, scale, bias, grad_y, epsilon):
  """y and the gradients of sum(y * grad_y) by torch.nn.LayerNorm in float64."""
  tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  norm = torch.nn.LayerNorm(x.shape[-1], eps=epsilon).double()
  with torch.no_grad():
    norm.weight.copy_(torch.tensor(scale))
    norm.bias.copy_(torch.tensor(bias))
  y = norm(tx)
  (y * torch.tensor(grad_y, dtype=torch.float64)).sum().backward()
  return y.detach().numpy(), tx.grad.numpy(), norm.weight.grad.numpy(), norm.bias.grad.numpy()


@pytest.mark.parametrize("rows,columns,offset", [
    (520, 384, 0.0),    # one ViT-S/4 encoder's tokens at 8 x 32 px
    (37, 200, 0.0),     # rows not a multiple of the kernel's chunk, C not a multiple of 16
    (300, 512, 1e3),    # a mean 1e3 times the spread: two-pass statistics keep float32 precision
    (3, 5, 0.5),        # narrower than one vector
])
def test_kernel_matches_torch_float64(kernels_on, rows, columns, offset):
  rng = np.random.default_rng(rows)
  x = (rng.standard_normal((rows, columns)) * rng.uniform(0.5, 3.0, (rows, 1)) + offset).astype(np.float32)
  scale = rng.standard_normal(columns).astype(np.float32)
  bias = rng.standard_normal(columns).astype(np.float32)
  grad_y = rng.standard_normal((rows, columns)).astype(np.float32)
  loss = lambda x, s, b: jnp.sum(layers.layer_norm_kernel(x, s, b, 1e-6) * grad_y)
  y = jax.jit(lambda x, s, b: layers.layer_norm_kernel(x, s, b, 1e-6))(x, scale, bias)
  dx, dscale, dbias = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)
  want_y, want_dx, want_dscale, want_dbias = _torch_reference(x, scale, bias, grad_y, 1e-6)
  # Far from zero, float32 cannot hold a row's mean closer than half an ulp of the offset: that much
  # of each centred value, relative to the row's spread (0.5 at least), is lost in any float32 form.
  tolerance = max(2e-6, 2 * np.finfo(np.float32).eps * offset / 0.5)
  np.testing.assert_allclose(y, want_y, rtol=0, atol=tolerance * np.abs(want_y).max())
  np.testing.assert_allclose(dx, want_dx, rtol=0, atol=10 * tolerance * np.abs(want_dx).max())
  np.testing.assert_allclose(dscale, want_dscale, rtol=0, atol=tolerance * np.abs(want_dscale).max())
  np.testing.assert_allclose(dbias, want_dbias, rtol=0, atol=2e-6 * np.abs(want_dbias).max())


def _norm_program(x, dtype=jnp.float32):
  module = layers.layer_norm("norm", dtype=dtype)
  variables = module.init(jax.random.key(0), x)
  weights = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape), jnp.float32)
  loss = lambda v, x: jnp.sum(module.apply(v, x).astype(jnp.float32) * weights)
  return module, variables, jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def test_layer_norm_uses_the_kernel_with_flax_parameters_and_numbers():
  x = jnp.asarray(np.random.default_rng(0).normal(1.0, 2.0, size=(2, 65, 384)), jnp.float32)
  with cpu_kernels.kernels_enabled(True):
    module_k, variables_k, step_k = _norm_program(x)
    assert isinstance(module_k, layers.KernelLayerNorm)
    assert "@fmjax_layer_norm_backward(" in step_k.lower(variables_k, x).as_text()
  with cpu_kernels.kernels_enabled(False):
    module_x, variables_x, step_x = _norm_program(x)
    assert isinstance(module_x, nn.LayerNorm)
    assert "@fmjax_layer_norm" not in step_x.lower(variables_x, x).as_text()
  # Checkpoints move between the two: the same names, shapes and logical axes.
  assert jax.tree.map(jnp.shape, variables_k) == jax.tree.map(jnp.shape, variables_x)
  assert (jax.tree.map(lambda b: b.names, variables_k, is_leaf=lambda b: isinstance(b, nn.Partitioned))
          == jax.tree.map(lambda b: b.names, variables_x, is_leaf=lambda b: isinstance(b, nn.Partitioned)))
  variables = jax.tree.map(lambda v: v + 0.1 * jnp.arange(v.size, dtype=v.dtype).reshape(v.shape) / v.size,
                           nn.unbox(variables_x))
  (loss_k, (grads_k, dx_k)), (loss_x, (grads_x, dx_x)) = step_k(variables, x), step_x(variables, x)
  np.testing.assert_allclose(float(loss_k), float(loss_x), rtol=1e-5)
  np.testing.assert_allclose(dx_k, dx_x, atol=1e-5 * float(jnp.abs(dx_x).max()))
  for got, want in zip(jax.tree.leaves(grads_k), jax.tree.leaves(grads_x)):
    np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.abs(want).max()))


def test_layer_norm_keeps_flax_where_the_kernel_does_not_apply(kernels_on):
  assert isinstance(layers.layer_norm("norm", dtype=jnp.bfloat16), nn.LayerNorm)
  assert isinstance(layers.layer_norm("norm", param_dtype=jnp.bfloat16), nn.LayerNorm)
  # Rows wider than the kernel's buffer: the same module, XLA's maths.
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, layers.LN_KERNEL_MAX_COLUMNS + 8)), jnp.float32)
  module = layers.layer_norm("norm")
  variables = module.init(jax.random.key(0), x)
  assert "@fmjax_layer_norm" not in jax.jit(module.apply).lower(variables, x).as_text()
  want = nn.LayerNorm(epsilon=layers.LN_EPS).apply(nn.unbox(variables), x)
  np.testing.assert_allclose(module.apply(variables, x), want, atol=1e-5)


def test_kernel_column_sums_are_bitwise_reproducible(kernels_on):
  """dscale and dbias are sums over rows taken on XLA's thread pool: they must not depend on which
  thread ran which rows."""
  rng = np.random.default_rng(3)
  x, grad_y = (jnp.asarray(rng.standard_normal((4100, 512)), jnp.float32) for _ in range(2))
  scale, bias = jnp.ones(512), jnp.zeros(512)
  grad = jax.jit(jax.grad(lambda x, s, b: jnp.sum(layers.layer_norm_kernel(x, s, b, 1e-6) * grad_y),
                          argnums=(0, 1, 2)))
  digests = set()
  for _ in range(6):
    digests.add(hashlib.sha256(b"".join(np.asarray(g).tobytes() for g in grad(x, scale, bias))).hexdigest())
  assert len(digests) == 1


def test_kernel_refuses_rows_beyond_its_buffer(kernels_on):
  """Called directly past its limit (the module never does), the kernel says why."""
  columns = layers.LN_KERNEL_MAX_COLUMNS + 16
  with pytest.raises(Exception, match=r"C <= 4096"):
    jax.block_until_ready(layers.layer_norm_kernel(jnp.ones((2, columns)), jnp.ones(columns), jnp.zeros(columns), 1e-6))
