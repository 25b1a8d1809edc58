"""SpectralAdapter against independent references: a torch Conv3d/BatchNorm3d stack (the official
module's layout) and XLA's own 3-D convolution with a NumPy BatchNorm; both of its formulations of
layers 1-3 (XLA ops, and the CPU kernels of fmjax/kernels/)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from fmjax.kernels import cpu as cpu_kernels
from fmjax.models.spectral_adapter import ADAPTER_LAYERS, SpectralAdapter, spectral_lengths


def kernel_unavailable_reason() -> str | None:
  if not cpu_kernels.host_has_avx512():
    return "the adapter kernels need an AVX-512 CPU (elsewhere the XLA formulation runs)"
  if cpu_kernels.find_compiler() is None:
    return "no C++ compiler to build the adapter kernels"
  return None


@pytest.fixture(params=["xla", "kernel"])
def formulation(request):
  """Runs the test once with layers 1-3 as XLA ops and once as the CPU kernels (the suite's 8 fake
  devices would otherwise keep the kernels off)."""
  if request.param == "kernel":
    reason = kernel_unavailable_reason()
    if reason:
      pytest.skip(reason)
    assert cpu_kernels.kernels_available() is False   # 8 devices: the default leaves them off
    with cpu_kernels.kernels_enabled(True):
      assert cpu_kernels.kernels_available(), "the adapter kernels did not compile on this host"
      yield request.param
  else:
    with cpu_kernels.kernels_enabled(False):
      yield request.param


def _torch_adapter():
  """The official nn.Sequential: Conv3d/BN3d/ReLU x3 with (k,1,1) kernels."""
  mods = []
  c_in = 1
  for kernel, stride, padding, c_out in ADAPTER_LAYERS:
    mods += [torch.nn.Conv3d(c_in, c_out, (kernel, 1, 1), (stride, 1, 1), (padding, 0, 0)),
             torch.nn.BatchNorm3d(c_out), torch.nn.ReLU()]
    c_in = c_out
  return torch.nn.Sequential(*mods).double()


def _load_into_torch(seq, params, stats):
  with torch.no_grad():
    for i in range(3):
      conv, bn = seq[3 * i], seq[3 * i + 1]
      k = np.asarray(params[f"conv_{3 * i}"]["kernel"])                   # [k, c_in, c_out]
      conv.weight.copy_(torch.from_numpy(k.transpose(2, 1, 0)[..., None, None].astype(np.float64)))
      conv.bias.copy_(torch.from_numpy(np.asarray(params[f"conv_{3 * i}"]["bias"], np.float64)))
      bn.weight.copy_(torch.from_numpy(np.asarray(params[f"bn_{3 * i + 1}"]["scale"], np.float64)))
      bn.bias.copy_(torch.from_numpy(np.asarray(params[f"bn_{3 * i + 1}"]["bias"], np.float64)))
      bn.running_mean.copy_(torch.from_numpy(np.asarray(stats[f"bn_{3 * i + 1}"]["mean"], np.float64)))
      bn.running_var.copy_(torch.from_numpy(np.asarray(stats[f"bn_{3 * i + 1}"]["var"], np.float64)))


def _torch_forward(seq, x_bhwc):
  x = torch.from_numpy(np.asarray(x_bhwc, np.float64)).permute(0, 3, 1, 2)[:, None]   # [B,1,C,H,W]
  return seq(x).mean(dim=2).permute(0, 2, 3, 1).detach().numpy()                     # [B,H,W,128]


def _init(bands, seed=0, shape=(3, 5, 4)):
  x = jax.random.normal(jax.random.key(seed), shape + (bands,)) * 2 + 0.5
  model = SpectralAdapter()
  variables = jax.tree.map(np.asarray, jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(x))
  params = jax.tree.map(np.asarray, nn.unbox(variables["params"]))
  # Non-trivial BN affine parameters and running statistics, so that eval mode is really tested.
  rng = np.random.default_rng(seed)
  for name in ("bn_1", "bn_4", "bn_7"):
    c = params[name]["scale"].shape[0]
    params[name] = {"scale": rng.uniform(0.5, 1.5, c).astype(np.float32),
                    "bias": rng.normal(0, 0.1, c).astype(np.float32)}
  stats = {name: {"mean": rng.normal(0, 0.2, v["mean"].shape).astype(np.float32),
                  "var": rng.uniform(0.5, 2, v["var"].shape).astype(np.float32)}
           for name, v in variables["batch_stats"].items()}
  return model, params, stats, np.asarray(x)


def test_parameter_count_is_official():
  model = SpectralAdapter()
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2, 2, 202)), train=False))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v["params"]))
  assert n == 56_192


def test_spectral_lengths():
  assert spectral_lengths(202) == [202, 40, 8, 2]
  assert spectral_lengths(75)[-1] == 1
  with pytest.raises(ValueError, match="at least 75 bands"):
    jax.eval_shape(lambda: SpectralAdapter().init(jax.random.key(0), jnp.zeros((1, 2, 2, 74)), train=False))


@pytest.mark.parametrize("bands", [202, pytest.param(75, marks=pytest.mark.slow)])
def test_matches_torch_conv3d_train_and_eval(bands, formulation):
  model, params, stats, x = _init(bands, seed=bands)
  seq = _torch_adapter()
  _load_into_torch(seq, params, stats)
  variables = {"params": params, "batch_stats": stats}

  # eval: running statistics
  seq.eval()
  ours = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
  ref = _torch_forward(seq, x)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)

  # train: batch statistics, and torch's running-statistics update (unbiased variance, momentum 0.1)
  seq.train()
  ours, new = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
  ref = _torch_forward(seq, x)
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)
  for i in range(3):
    bn = seq[3 * i + 1]
    got = new["batch_stats"][f"bn_{3 * i + 1}"]
    np.testing.assert_allclose(np.asarray(got["mean"]), bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["var"]), bn.running_var.numpy(), rtol=1e-5, atol=1e-6)


def _numpy_bn(h, scale, bias, mean, var, eps=1e-5):
  return (h - mean) / np.sqrt(var + eps) * scale + bias


def test_matches_xla_conv3d_reference(formulation):
  """Eval mode against lax.conv_general_dilated in 3-D (NCDHW) + NumPy BatchNorm."""
  model, params, stats, x = _init(202, seed=7, shape=(2, 3, 3))
  ours = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))({"params": params, "batch_stats": stats}, x))
  h = x.transpose(0, 3, 1, 2)[:, None]                                       # [B, 1, C, H, W]
  conv3d = jax.jit(lambda h, w, stride, padding: jax.lax.conv_general_dilated(
      h, w, (stride, 1, 1), [(padding, padding), (0, 0), (0, 0)], dimension_numbers=("NCDHW", "OIDHW", "NCDHW"),
      precision=jax.lax.Precision.HIGHEST), static_argnums=(2, 3))
  for i, (kernel, stride, padding, _) in enumerate(ADAPTER_LAYERS):
    w = np.asarray(params[f"conv_{3 * i}"]["kernel"]).transpose(2, 1, 0)[..., None, None]
    h = conv3d(jnp.asarray(h, jnp.float32), jnp.asarray(w), stride, padding)
    h = np.asarray(h, np.float64) + params[f"conv_{3 * i}"]["bias"][None, :, None, None, None]
    bn, st = params[f"bn_{3 * i + 1}"], stats[f"bn_{3 * i + 1}"]
    expand = lambda v: np.asarray(v, np.float64)[None, :, None, None, None]
    h = np.maximum(_numpy_bn(h, expand(bn["scale"]), expand(bn["bias"]), expand(st["mean"]), expand(st["var"])), 0)
  ref = h.mean(axis=2).transpose(0, 2, 3, 1)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bands", [202, 75, 150])   # 8, 3 and 6 layer-2 positions: the kernels' row remainders
def test_gradients_match_torch_conv3d_autograd(bands, formulation):
  """The hand-written backward passes (pixel_matmul's, BatchNorm's, the kernels') vs torch autograd
  through the official Conv3d stack (train mode, batch statistics): gradients of every parameter and
  of the input."""
  model, params, stats, x = _init(bands, seed=3, shape=(2, 4, 3))
  seq = _torch_adapter()
  _load_into_torch(seq, params, stats)
  seq.train()
  target = np.random.default_rng(0).normal(size=(2, 4, 3, 128))

  def loss(params, x):   # defined per test call: a fresh trace under this formulation
    out, _ = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(out * target)
  grads, grad_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

  x_t = torch.from_numpy(np.asarray(x, np.float64)).requires_grad_()
  out = seq(x_t.permute(0, 3, 1, 2)[:, None]).mean(dim=2).permute(0, 2, 3, 1)
  (out * torch.from_numpy(target)).sum().backward()
  np.testing.assert_allclose(np.asarray(grad_x), x_t.grad.numpy(), rtol=1e-4, atol=1e-5)
  for i in range(3):
    conv, bn = seq[3 * i], seq[3 * i + 1]
    ours = grads[f"conv_{3 * i}"]
    np.testing.assert_allclose(np.asarray(ours["kernel"]),
                               conv.weight.grad.numpy()[..., 0, 0].transpose(2, 1, 0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grads[f"bn_{3 * i + 1}"]["scale"]), bn.weight.grad.numpy(),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grads[f"bn_{3 * i + 1}"]["bias"]), bn.bias.grad.numpy(),
                               rtol=1e-4, atol=1e-4)


def test_train_mode_traces_for_batches_beyond_int32_element_counts():
  """A pod-sized global batch (3300 x 128 x 128 pixels x 40 layer-1 positions = 2.2e9 > 2^31
  BatchNorm elements) must trace: `fmjax.plan --max-batch` on 64 devices once died with an int32
  overflow in bn_1's statistics. Abstract shapes only, nothing is allocated."""
  model = SpectralAdapter()
  small = jnp.zeros((1, 4, 4, 202))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), small, train=False))
  big = jax.ShapeDtypeStruct((3300, 128, 128, 202), jnp.float32)
  assert 3300 * 128 * 128 * spectral_lengths(202)[1] > 2 ** 31
  out, state = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, big)
  assert out.shape == (3300, 128, 128, 128)
  assert state["batch_stats"]["bn_1"]["var"].shape == (32,)


def test_kernel_formulation_is_what_runs(formulation):
  """The `formulation` fixture really switches the program: the kernels' custom calls are in the
  lowered forward and backward programs exactly when it says so."""
  model, params, stats, x = _init(202, seed=5, shape=(2, 3, 3))

  def loss(params, x):
    out, _ = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(out ** 2)
  forward = jax.jit(lambda p, x: loss(p, x)).lower(params, x).as_text()
  backward = jax.jit(jax.grad(lambda p, x: loss(p, x))).lower(params, x).as_text()
  assert ("@fmjax_adapter_layers12(" in forward) == (formulation == "kernel")
  assert ("@fmjax_adapter_layers12_backward(" in backward) == (formulation == "kernel")
  assert ("@fmjax_column_moments(" in forward) == (formulation == "kernel")   # bn_1's statistics
