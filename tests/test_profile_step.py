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


class _TwoLayerNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="head")(jnp.tanh(nn.Dense(5, name="body")(x)))


def _two_layer_grad_hlo() -> str:
  """The compiled HLO text of a gradient step through modules 'body' and 'head'."""
  net = _TwoLayerNet()
  x = jnp.ones((4, 2))
  params = net.init(jax.random.key(0), x)
  return jax.jit(jax.grad(lambda p: jnp.sum(net.apply(p, x) ** 2))).lower(params).compile().as_text()


def test_hlo_instructions_map_compiled_ops_to_their_module_scope():
  instructions = profile_step.hlo_instructions(_two_layer_grad_hlo())
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


def test_from_trace_attributes_gpu_kernels_by_their_fusion_names(tmp_path):
  """A GPU trace as accelerator_step --profile-dir saves it: kernels named after HLO fusions with '.'
  as '_', cuBLAS and memcpy kernels with no HLO name, and host events that must not count."""
  import gzip
  import json

  hlo = _two_layer_grad_hlo()
  instructions = profile_step.hlo_instructions(hlo)
  body_fwd = next(n for n, (_, op) in instructions.items() if "." in n and op and
                  profile_step.scope_of(op, 4) == ("body", "fwd"))
  head_bwd = next(n for n, (_, op) in instructions.items() if op and profile_step.scope_of(op, 4) == ("head", "bwd"))
  (tmp_path / "profile.json").write_text(json.dumps({"steps": 2}))
  with gzip.open(tmp_path / "step.hlo.txt.gz", "wt") as f:
    f.write(hlo)
  kernel = lambda name, us: {"ph": "X", "pid": 2, "tid": 7, "ts": 0, "dur": us, "name": name}
  gpu_name = lambda instruction: instruction.replace(".", "_").replace("-", "_")
  events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "X", "pid": 1, "tid": 3, "ts": 0, "dur": 5e6, "name": body_fwd},   # a host event: ignored
            kernel(gpu_name(body_fwd), 300.0), kernel(gpu_name(body_fwd), 100.0),     # two launches
            kernel(gpu_name(head_bwd), 60.0),
            kernel("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", 1000.0), kernel("memcpy32_post", 40.0)]
  with gzip.open(tmp_path / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  result = profile_step.from_trace(str(tmp_path), 4)
  by_scope = result["by_scope"]
  np.testing.assert_allclose(by_scope["body", "fwd"], 200e-6)   # (300 + 100) us over 2 steps
  np.testing.assert_allclose(by_scope["head", "bwd"], 30e-6)
  np.testing.assert_allclose(by_scope["(cuBLAS matmuls)", "-"], 500e-6)
  np.testing.assert_allclose(by_scope["(copies and memsets)", "-"], 20e-6)
  np.testing.assert_allclose(sum(by_scope.values()), 750e-6)
  assert dict(result["by_op"]) == pytest.approx({body_fwd: 200e-6, head_bwd: 30e-6})


def test_scope_of_skips_scan_and_accumulation_loops():
  op = ("jit(train_step)/while/body/eval_jaxpr/transpose(jvp(MAEModel))/encoder.encode/vit_core.encode/"
        "vit_core._blocks/encoder/while/body/eval_jaxpr/blocks/blocks._forward/norm2/add_any")
  assert profile_step.scope_of(op, 3) == ("encoder/blocks/norm2", "bwd")
