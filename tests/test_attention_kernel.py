"""The CPU attention kernel (fmjax/kernels/attention.cc) against torch's scaled_dot_product_attention
in float64, and where the Attention module calls it (and where it keeps the XLA formulation)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.kernels import cpu as cpu_kernels
from fmjax.models import build_model, transformer

from tests.conftest import requires_cpu_kernels

pytestmark = requires_cpu_kernels


def _torch_reference(qkv, cotangent):
  torch = pytest.importorskip("torch")
  t = torch.tensor(qkv, dtype=torch.float64, requires_grad=True)
  q, k, v = (t[:, :, i].transpose(1, 2) for i in range(3))    # SDPA takes [B, heads, L, d]
  out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
  (out * torch.tensor(cotangent, dtype=torch.float64)).sum().backward()
  return out.detach().numpy(), t.grad.numpy()


@pytest.mark.parametrize("batch,length,heads,head_dim,spread", [
    (2, 65, 6, 64, 1.0),     # ViT-S/4 at 32 px: 64 patches + cls
    (2, 1, 2, 16, 1.0),      # a single token
    (3, 7, 2, 32, 1.0),      # fewer tokens than one vector
    (2, 16, 4, 16, 1.0),     # exactly one vector, no padded columns
    (2, 33, 3, 48, 1.0),     # head_dim of three vectors
    (1, 256, 2, 128, 1.0),   # the kernel's limits
    (2, 17, 4, 32, 30.0),    # logits of ~1e3, which an unshifted exp would overflow
])
def test_kernel_matches_torch_sdpa_values_and_gradients(kernels_on, batch, length, heads, head_dim, spread):
  rng = np.random.default_rng(length)
  qkv = rng.normal(size=(batch, length, 3, heads, head_dim)).astype(np.float32)
  bias = rng.normal(size=(3, heads, head_dim)).astype(np.float32)
  qkv[:, :, :2] *= spread
  bias[:2] *= spread
  cotangent = rng.normal(size=(batch, length, heads, head_dim)).astype(np.float32)
  scale = head_dim ** -0.5
  out, vjp = jax.vjp(lambda x, b: transformer.attention_kernel(x, b, scale), jnp.asarray(qkv), jnp.asarray(bias))
  grad, grad_bias = vjp(jnp.asarray(cotangent))
  want_out, want_grad = _torch_reference(qkv + bias, cotangent)   # the gradient is the same for both
  assert out.shape == (batch, length, heads, head_dim)
  np.testing.assert_allclose(np.asarray(out), want_out, atol=2e-5 * np.abs(want_out).max())
  np.testing.assert_allclose(np.asarray(grad), want_grad, atol=5e-5 * np.abs(want_grad).max())
  np.testing.assert_allclose(np.asarray(grad_bias), want_grad.sum(axis=(0, 1)), atol=5e-5 * np.abs(want_grad).max() * length)


def _attention_program(x, num_queries=0, dtype=jnp.float32, heads=4):
  module = transformer.Attention(num_heads=heads, dtype=dtype)
  variables = module.init(jax.random.key(0), x)
  loss = lambda v, x: jnp.sum(module.apply(v, x, num_queries=num_queries).astype(jnp.float32) ** 2)
  return variables, jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), module


def test_attention_module_calls_the_kernel_and_matches_its_xla_formulation():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 65, 64)), jnp.float32)
  with cpu_kernels.kernels_enabled(True):
    variables, step, _ = _attention_program(x)
    assert "@fmjax_attention_backward(" in step.lower(variables, x).as_text()
    (loss_k, (grads_k, dx_k)) = step(variables, x)
  with cpu_kernels.kernels_enabled(False):
    variables_x, step_x, _ = _attention_program(x)
    assert "@fmjax_attention" not in step_x.lower(variables, x).as_text()
    (loss_x, (grads_x, dx_x)) = step_x(variables, x)
  # Checkpoints move between the two: the same parameter names and shapes (DenseBiasApart's too).
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, variables_x)
  np.testing.assert_allclose(float(loss_k), float(loss_x), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(dx_k), np.asarray(dx_x), atol=1e-4 * float(jnp.abs(dx_x).max()))
  for got, want in zip(jax.tree.leaves(grads_k), jax.tree.leaves(grads_x)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("case", ["too_long", "head_dim", "cls_query_only", "bfloat16"])
def test_attention_module_keeps_xla_where_the_kernel_does_not_apply(kernels_on, case):
  length = transformer.KERNEL_MAX_LENGTH + 1 if case == "too_long" else 9
  width, heads = (48, 2) if case == "head_dim" else (64, 4)   # head_dim 24: not a multiple of 16
  x = jnp.ones((1, length, width), jnp.float32)
  variables, step, _ = _attention_program(x, num_queries=1 if case == "cls_query_only" else 0,
                                          dtype=jnp.bfloat16 if case == "bfloat16" else jnp.float32, heads=heads)
  assert "@fmjax_attention" not in step.lower(variables, x).as_text()


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "full")])
def test_vit_with_the_kernel_matches_the_xla_formulation(scan, remat):
  """A SpecViT (unrolled, or scanned and rematerialised: the custom calls inside a loop body and a
  checkpoint) gives the same embedding and parameter gradients with its CPU kernels (attention and
  LayerNorm) as with the XLA formulation."""
  make = lambda: build_model("spec_vit", width=64, depth=2, num_heads=4, patch_size=4, image_size=16,
                             num_bands=8, use_adapter=False, scan=scan, remat=remat)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 16, 16, 8)), jnp.float32)
  # A random projection of the embedding: a sum of squares after the final LayerNorm would barely
  # depend on the blocks, leaving their gradients at round-off level.
  weights = jnp.asarray(rng.normal(size=(2, 64)), jnp.float32)
  results = []
  for enabled in (True, False):
    with cpu_kernels.kernels_enabled(enabled):
      model = make()
      variables = model.init(jax.random.key(0), x, train=False)
      loss = lambda v: jnp.sum(model.apply(v, x, train=False)["embedding"] * weights)
      lowered = jax.jit(jax.value_and_grad(loss)).lower(variables)
      assert ("@fmjax_attention(" in lowered.as_text()) == enabled
      assert ("@fmjax_layer_norm(" in lowered.as_text()) == enabled   # tests/test_layer_norm_kernel.py
      results.append(lowered.compile()(variables))
  (loss_k, grads_k), (loss_x, grads_x) = results
  np.testing.assert_allclose(float(loss_k), float(loss_x), rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads_k), jax.tree.leaves(grads_x)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4 * float(jnp.abs(want).max()))


def test_kernel_refuses_shapes_beyond_its_limits(kernels_on):
  """Called directly past its limits (the module never does), the kernel says why instead of reading
  past its buffers."""
  with pytest.raises(Exception, match=r"needs 1 <= L <= 256 and head_dim a multiple of 16"):
    jax.block_until_ready(transformer.attention_kernel(jnp.ones((1, 257, 3, 2, 16)), jnp.ones((3, 2, 16)), 0.25))
  with pytest.raises(Exception, match=r"needs 1 <= L <= 256 and head_dim a multiple of 16"):
    jax.block_until_ready(transformer.attention_kernel(jnp.ones((1, 9, 3, 2, 24)), jnp.ones((3, 2, 24)), 0.25))
  with pytest.raises(Exception, match=r"the qkv bias must be \[3, heads, d\]"):
    jax.block_until_ready(transformer.attention_kernel(jnp.ones((1, 9, 3, 2, 16)), jnp.ones((3, 2, 8)), 0.25))
