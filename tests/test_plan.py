"""fmjax.plan: its per-device numbers against real allocations and XLA's memory analysis."""
import jax
import numpy as np
import pytest

from fmjax import optim, parallel, plan, train_state
from fmjax.objectives import build_objective


def _tiny_config():
  from configs import demo
  c = demo.get_config()
  c.data.crop_size, c.data.num_bands = 16, 80
  c.model.width, c.model.num_heads, c.model.mlp_dim, c.model.patch_size = 64, 4, 128, 8
  c.objective.decoder_width, c.objective.decoder_heads = 32, 4
  c.batch_size = 8
  return c


def _bytes_on_first_device(tree):
  return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def test_plan_matches_real_allocation_and_memory_analysis():
  config = _tiny_config()
  mesh_shape = {"data": 2, "fsdp": 4, "tensor": 1}
  report = plan.plan(config, mesh_shape, per_device_batch=2)
  assert report["devices"] == 8 and report["global_batch"] == 16

  # Independent check 1: build the same state for real and count the bytes device 0 holds.
  mesh = parallel.make_mesh(mesh_shape)
  objective = build_objective(config)
  schedule = optim.build_schedule(config.schedule, 1000, 100)
  tx = optim.build_optimizer(config.optimizer, schedule)
  example = plan.example_batch_spec(config, objective.views, 1)
  init_fn = train_state.make_init_fn(objective, tx, example, config.seed)
  with jax.set_mesh(mesh):
    _, shardings = train_state.abstract_state_and_shardings(init_fn, mesh)
    state = train_state.create_state(init_fn, shardings)
  assert report["per_device"]["params"] == _bytes_on_first_device(state["params"])
  assert report["per_device"]["opt_state"] == _bytes_on_first_device(state["opt_state"])
  assert report["total"]["params"] == sum(x.nbytes for x in jax.tree.leaves(state["params"]))
  # FSDP over 4 shards: the width-sharded weights dominate, so we are close to total / 4.
  assert 1.0 <= report["params_opt_vs_ideal"] < 1.3

  # Independent check 2: XLA's arguments are exactly the state and the batch shard on one device.
  batch_bytes = 2 * 1 * 16 * 16 * 80 * 4  # per-device batch 2, one view, float32
  state_bytes = _bytes_on_first_device(state)
  assert report["xla"]["argument"] == state_bytes + batch_bytes
  # Donation: the new state reuses the old state's buffers.
  assert report["xla"]["alias"] > 0.9 * state_bytes
  assert report["peak_estimate"] == (report["xla"]["argument"] + report["xla"]["output"]
                                     - report["xla"]["alias"] + report["xla"]["temp"])
  # The configs' attention='auto' is cuDNN on a GPU: the CPU figures say they include XLA's [L, L] weights.
  assert report["attention"] == "auto" and "cuDNN's fused kernel on a GPU" in plan.format_report(report)
  assert "cuDNN" not in plan.format_report({**report, "attention": "xla"})


@pytest.mark.slow  # four compiles
def test_max_batch_is_fitted_and_verified():
  config = _tiny_config()
  mesh_shape = {"data": 8}
  compiled, _, _ = plan.compile_step(config, parallel.make_mesh(mesh_shape), 8 * 6)
  budget = plan.peak_bytes(plan.memory_dict(compiled.memory_analysis()))
  report = plan.plan(config, mesh_shape, device_memory=budget, per_device_batch=1, find_max_batch=True)
  found = report["max_batch"]
  assert found["verified"] and found["peak_at_predicted"] <= budget
  assert 5 <= found["predicted"] <= 7  # temporaries grow ~linearly: the fit lands next to 6


@pytest.mark.parametrize("text,value", [("95GiB", 95 * 2**30), ("16GB", 16 * 10**9), ("1024", 1024)])
def test_parse_bytes(text, value):
  assert plan.parse_bytes(text) == value


def test_parse_errors():
  with pytest.raises(ValueError, match="not a size"):
    plan.parse_bytes("lots")
  with pytest.raises(ValueError, match="axis=size"):
    plan.parse_mesh("data2")


def test_mfu_flops_count_every_scanned_layer():
  """XLA counts a scanned body once; the loop's FLOP count must match the unrolled program's."""
  from fmjax import mfu, train
  config = _tiny_config()
  config.model.use_adapter, config.data.num_bands = False, 8   # transformer blocks dominate the FLOPs
  config.model.depth, config.model.width, config.model.mlp_dim = 6, 128, 512
  config.objective.mask_ratio = 0.0
  mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  config.model.scan = False
  unrolled_compiled = mfu.compiled_flops(plan.lower_step(config, mesh, config.batch_size)[0].compile())
  config.model.scan = True
  scanned_compiled = mfu.compiled_flops(plan.lower_step(config, mesh, config.batch_size)[0].compile())
  counted = train.unrolled_flops_per_device(config, mesh, fallback=scanned_compiled)
  assert counted == pytest.approx(unrolled_compiled, rel=0.1)
  assert counted > 2.5 * scanned_compiled


def test_mfu_flops_count_every_micro_batch():
  """Gradient accumulation is a lax.scan too: the loop's count is the one-micro-batch step's (the
  same arithmetic on the same global batch), not XLA's count of the accumulating program."""
  from fmjax import mfu, train
  config = _tiny_config()
  mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  config.grad_accum = 1
  assert not train.needs_unrolled_flops(config)
  one_micro_batch = mfu.lowered_flops(plan.lower_step(config, mesh, config.batch_size)[0])
  config.grad_accum = 4
  assert train.needs_unrolled_flops(config)
  accumulating = mfu.lowered_flops(plan.lower_step(config, mesh, config.batch_size)[0])
  counted = train.unrolled_flops_per_device(config, mesh, fallback=accumulating)
  assert counted == pytest.approx(one_micro_batch, rel=1e-6)
  assert counted > 3 * accumulating   # XLA counts the 4-step accumulation loop's body once


def test_mfu_flops_unroll_for_fused_attention_only_where_it_runs(monkeypatch):
  """cuDNN's custom call counts no FLOPs: the unrolled XLA-attention count is needed where 'auto'
  picks it (a GPU), not on a CPU, where it would only cost a second trace at startup."""
  from fmjax import train
  config = _tiny_config()
  config.grad_accum = 1
  config.model.attention = "auto"
  assert not train.needs_unrolled_flops(config)
  config.model.attention = "cudnn"
  assert train.needs_unrolled_flops(config)
  config.model.attention = "auto"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert train.needs_unrolled_flops(config)


@pytest.mark.parametrize("use_adapter", [True, False])
def test_mfu_flops_count_the_cpu_kernels_work(use_adapter):
  """XLA counts no FLOPs in the CPU kernels' custom calls (the adapter's layers, attention): the
  loop's count is the same step with the XLA formulations, whichever runs."""
  from fmjax import mfu, train
  from fmjax.kernels import cpu as cpu_kernels
  if not (cpu_kernels.host_has_avx512() and cpu_kernels.find_compiler()):
    pytest.skip("the CPU kernels need an AVX-512 CPU and a C++ compiler")
  config = _tiny_config()
  config.model.use_adapter = use_adapter
  mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  with cpu_kernels.kernels_enabled(False):
    assert not train.needs_unrolled_flops(config)
    xla_ops = mfu.lowered_flops(plan.lower_step(config, mesh, config.batch_size)[0])
  with cpu_kernels.kernels_enabled(True):
    assert train.needs_unrolled_flops(config)
    lowered = plan.lower_step(config, mesh, config.batch_size)[0]
    text = lowered.as_text()
    assert ("@fmjax_adapter_layers12(" in text) == use_adapter
    assert "@fmjax_attention(" in text and "@fmjax_attention_backward(" in text
    counted = train.step_flops_per_device(config, mesh, lowered)
  assert counted == pytest.approx(xla_ops, rel=1e-6)
  # What XLA alone would have counted: without the adapter, the tiny step's attention (2 tokens).
  assert mfu.lowered_flops(lowered) < (0.95 if use_adapter else 1.0) * xla_ops
