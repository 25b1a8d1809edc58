"""benchmarks/profile_step.py: op_name -> scope parsing on hand-written names, and a traced train step
whose op times land on the model's modules."""
import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from benchmarks import profile_step, train_step


def test_scope_of_strips_autodiff_wrappers_method_calls_and_layer_indices():
  bwd = ("jit(train_step)/transpose(jvp(MAEModel))/encoder.encode/vit_core.encode/encoder/blocks_11/"
         "blocks_11._forward/attn/qkv/dot_general")
  assert profile_step.scope_of(bwd, 4) == ("encoder/blocks_*/attn/qkv", "bwd")
  assert profile_step.scope_of(bwd, 1) == ("encoder", "bwd")
  fwd = ("jit(train_step)/jvp(MAEModel)/encoder.encode/encoder.adapt/spectral_adapter/"
         "spectral_adapter._first_two_layers/...k,kn->...n/dot_general")
  assert profile_step.scope_of(fwd, 4) == ("spectral_adapter", "fwd")
  assert profile_step.scope_of("jit(train_step)/mul", 4) == ("(outside the model)", "fwd")


def test_hlo_instructions_map_compiled_ops_to_their_module_scope():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name="head")(jnp.tanh(nn.Dense(5, name="body")(x)))

  net = Net()
  x = jnp.ones((4, 2))
  params = net.init(jax.random.key(0), x)
  loss = lambda p: jnp.sum(net.apply(p, x) ** 2)
  compiled = jax.jit(jax.grad(loss)).lower(params).compile()
  instructions = profile_step.hlo_instructions(compiled.as_text())
  scopes = {profile_step.scope_of(op, 4) for _, op in instructions.values() if op}
  assert {("head", "fwd"), ("body", "fwd"), ("head", "bwd"), ("body", "bwd")} <= scopes
  shapes = [shape for shape, _ in instructions.values()]
  assert "f32[4,5]{1,0}" in shapes and "f32[2,5]{1,0}" in shapes   # the body's activations, its kernel


@pytest.mark.slow
def test_profiled_mae_step_attributes_time_to_adapter_encoder_and_decoder(tmp_path):
  parser = argparse.ArgumentParser()
  train_step.add_step_arguments(parser)   # the step flags with their defaults, as profile_step's main
  args = parser.parse_args(["--objective", "mae", "--model", "spec_vit_t", "--image-size", "16", "--bands", "80",
                            "--batch", "8", "--mask-ratio", "0.75"])
  args.warmup, args.steps, args.depth, args.trace_dir = 1, 1, 1, str(tmp_path)
  result = profile_step.profile(args)
  by_scope, by_op = result["by_scope"], result["by_op"]
  for scope in ("spectral_adapter", "encoder", "decoder"):
    assert by_scope[scope, "fwd"] > 0 and by_scope[scope, "bwd"] > 0, scope
  assert set(by_op) <= set(result["instructions"])
  np.testing.assert_allclose(sum(by_op.values()), sum(by_scope.values()), rtol=1e-9)
  assert by_scope["(outside the model)", "fwd"] > 0   # the optimiser update


def test_scope_of_merged_ops():
  same = ("jit(train_step)/transpose(jvp(MAEModel))/(encoder.encode/encoder.adapt/spectral_adapter/bn_7/"
          "reduce_sum:encoder.encode/encoder.adapt/spectral_adapter/bn_7/reduce_sum)")
  assert profile_step.scope_of(same, 2) == ("spectral_adapter/bn_7", "bwd")
  several = ("jit(train_step)/(transpose(jvp(MAEModel))/decoder/decoder_pred/dot_general:"
             "transpose(jvp(MAEModel))/encoder.encode/vit_core.encode/norm/reduce_sum:jvp()/reduce_sum)")
  assert profile_step.scope_of(several, 2) == ("(merged over several scopes)", "bwd")
