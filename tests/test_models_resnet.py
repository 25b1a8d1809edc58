"""ResNets: SpecResNet-50 size and strides, multispectral ResNet-18/50 strides (incl. detail_stem),
and a bottleneck block against the same block written with torch.nn (stride, dilation, BN)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from fmjax.models import build_model
from fmjax.models.resnet import Bottleneck


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract(model, size=None):
  shape = model.input_shape(2) if size is None else (2, size, size, model.input_shape()[-1])
  return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False),
                        jax.ShapeDtypeStruct(shape, jnp.float32))


def test_spec_resnet50_matches_official_size_and_strides():
  model = build_model("spec_resnet50")
  out, variables = _abstract(model)
  n = _count(variables["params"])
  assert abs(n - 24.20e6) / 24.20e6 < 0.005, n
  assert [f.shape[1:] for f in out["features"]] == [(64, 64, 256), (32, 32, 512), (16, 16, 1024), (8, 8, 2048)]
  assert out["embedding"].shape == (2, 2048) and model.embed_dim == 2048
  layer1_0 = nn.unbox(variables["params"])["resnet"]["layer1_0"]
  assert layer1_0["conv1"]["kernel"].shape == (1, 1, 128, 256)
  assert layer1_0["conv2"]["kernel"].shape == (3, 3, 256, 256)
  assert layer1_0["downsample_conv"]["kernel"].shape == (1, 1, 128, 256)


@pytest.mark.parametrize("name,detail,channels", [("resnet18", False, 512), ("resnet50", False, 2048),
                                                  ("resnet50", True, 2048)])
def test_multispectral_resnet_strides(name, detail, channels):
  model = build_model(name, in_channels=13, detail_stem=detail, num_classes=3)
  out, _ = _abstract(model, 64)
  assert [64 // f.shape[1] for f in out["features"]] == list(model.feature_strides)
  assert out["embedding"].shape == (2, channels) and out["logits"].shape == (2, 3)
  with pytest.raises(ValueError, match="in_channels"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 12)), train=False))


def test_bottleneck_matches_torch():
  """Stride-2 dilated bottleneck with a projection shortcut, train-mode BN, vs torch.nn."""
  c_in, width, out, stride, dil = 6, 4, 16, 2, 2
  block = Bottleneck(width, stride=stride, dilation=dil, out_features=out)
  x = np.random.default_rng(0).normal(size=(2, 9, 9, c_in)).astype(np.float32)
  v = jax.jit(lambda x: block.init(jax.random.key(0), x, train=False))(x)
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: rng.normal(0, 0.4, a.shape).astype(np.float32) + (a.ndim == 1),
                        jax.tree.map(np.asarray, nn.unbox(v["params"])))
  ours, new = jax.jit(lambda p, s, x: block.apply({"params": p, "batch_stats": s}, x, train=True,
                                                  mutable=["batch_stats"]))(params, v["batch_stats"], x)

  def tconv(name, k, s=1, d=1):
    w = params[name]["kernel"]
    c = torch.nn.Conv2d(w.shape[2], w.shape[3], k, s, padding=d * (k // 2), dilation=d, bias=False)
    c.weight.data = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
    return c

  def tbn(name):
    b = torch.nn.BatchNorm2d(params[name]["scale"].shape[0])
    b.weight.data, b.bias.data = torch.from_numpy(params[name]["scale"]), torch.from_numpy(params[name]["bias"])
    return b

  bns = {n: tbn(n) for n in ("bn1", "bn2", "bn3", "downsample_bn")}
  convs = {n: tconv(n, *a) for n, a in (("conv1", (1,)), ("conv2", (3, stride, dil)), ("conv3", (1,)),
                                        ("downsample_conv", (1, stride)))}
  t = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
  h = torch.relu(bns["bn1"](convs["conv1"](t)))
  h = torch.relu(bns["bn2"](convs["conv2"](h)))
  h = bns["bn3"](convs["conv3"](h))
  ref = torch.relu(h + bns["downsample_bn"](convs["downsample_conv"](t)))
  np.testing.assert_allclose(np.asarray(ours), ref.permute(0, 2, 3, 1).detach().numpy(), rtol=1e-4, atol=1e-4)

  # Gradients of every parameter and of the input (the convolutions' 2-D products and the
  # closed-form BatchNorm backward) against torch autograd.
  target = rng.normal(size=ours.shape).astype(np.float32)
  loss = lambda p, x: jnp.sum(block.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                                          mutable=["batch_stats"])[0] * target)
  grad_params, grad_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  (ref * torch.from_numpy(target).permute(0, 3, 1, 2)).sum().backward()
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=2e-4, atol=2e-4 * np.abs(b.numpy()).max())
  close(grad_x, t.grad.permute(0, 2, 3, 1))
  for n, c in convs.items():
    close(grad_params[n]["kernel"], c.weight.grad.permute(2, 3, 1, 0))
  for n, b in bns.items():
    close(grad_params[n]["scale"], b.weight.grad)
    close(grad_params[n]["bias"], b.bias.grad)
  for n, b in bns.items():
    np.testing.assert_allclose(np.asarray(new["batch_stats"][n]["var"]), b.running_var.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new["batch_stats"][n]["mean"]), b.running_mean.numpy(), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("size,kernel,stride,dilation", [(5, 3, 1, 1), (8, 3, 2, 1), (7, 1, 2, 1), (9, 7, 2, 1),
                                                         (6, 3, 1, 2), (4, 3, 1, 4)])
def test_patch_matmul_conv_equals_xla_convolution(size, kernel, stride, dilation):
  """The CPU patches @ kernel path (values and both gradients) against lax.conv_general_dilated."""
  from fmjax.models.convolution import patch_matmul_conv
  rng = np.random.default_rng(size * 10 + kernel)
  x = jnp.asarray(rng.normal(size=(2, size, size + 1, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 5, 3)), jnp.float32)
  pad = dilation * (kernel // 2)

  def xla(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                        rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)
  ours = lambda x, w: patch_matmul_conv(x, w, stride, dilation)
  np.testing.assert_allclose(ours(x, w), xla(x, w), rtol=1e-5, atol=1e-5)
  target = jnp.asarray(rng.normal(size=xla(x, w).shape), jnp.float32)
  grads = [jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) * target), argnums=(0, 1))(x, w) for f in (ours, xla)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv_picks_patch_matmul_only_on_cpu_for_strided_1x1_and_small_maps():
  from fmjax.models.convolution import use_patch_matmul
  assert use_patch_matmul(2, 2, 3, 1, "cpu") and use_patch_matmul(64, 64, 3, 2, "cpu")
  assert use_patch_matmul(64, 64, 1, 1, "cpu") and use_patch_matmul(16, 16, 3, 1, "cpu")
  assert not use_patch_matmul(32, 32, 3, 1, "cpu")
  assert not any(use_patch_matmul(2, 2, 3, 2, backend) for backend in ("gpu", "tpu"))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_batch_norm_train_mode_matches_torch_values_and_gradients(dtype, tol):
  """BatchNorm in train mode (its closed-form backward) against torch.nn.BatchNorm2d: output,
  running statistics and the gradients of input, scale and bias, with an input whose mean is far
  from zero (the path through the batch statistics matters) and in bfloat16 compute."""
  from fmjax.models.layers import BatchNorm
  rng = np.random.default_rng(2)
  x = (rng.normal(size=(3, 5, 4, 6)) * 2 + 3).astype(np.float32)
  scale, bias = rng.normal(size=6).astype(np.float32), rng.normal(size=6).astype(np.float32)
  target = rng.normal(size=x.shape).astype(np.float32)
  module = BatchNorm(dtype=dtype)
  state = {"mean": jnp.zeros(6), "var": jnp.ones(6)}

  def loss(x, scale, bias):
    y, new = module.apply({"params": {"scale": scale, "bias": bias}, "batch_stats": state}, x.astype(dtype),
                          train=True, mutable=["batch_stats"])
    return jnp.sum(y.astype(jnp.float32) * target), (y, new["batch_stats"])
  (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)

  ref_bn = torch.nn.BatchNorm2d(6).double()
  ref_bn.weight.data, ref_bn.bias.data = (torch.from_numpy(a).double() for a in (scale, bias))
  tx = torch.from_numpy(x).double().permute(0, 3, 1, 2).requires_grad_()
  ref = ref_bn(tx)
  (ref * torch.from_numpy(target).double().permute(0, 3, 1, 2)).sum().backward()
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float64), b, atol=tol * np.abs(b).max())
  close(y, ref.permute(0, 2, 3, 1).detach().numpy())
  close(stats["mean"], ref_bn.running_mean.numpy())
  close(stats["var"], ref_bn.running_var.numpy())
  for got, want in zip(grads, (tx.grad.permute(0, 2, 3, 1), ref_bn.weight.grad, ref_bn.bias.grad)):
    close(got, want.numpy())
  assert grads[0].dtype == jnp.float32 and y.dtype == dtype
