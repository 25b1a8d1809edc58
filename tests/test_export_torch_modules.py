"""The official-layout torch modules against REFERENCE.md facts (keys, shapes, parameter counts) and
timm/torchvision semantics written out in NumPy. Shapes only where possible (meta device: no memory)."""
import math

import numpy as np
import pytest
import torch

from fmjax.export import torch_modules
from fmjax.export.torch_modules import build_torch_model

ADAPTER_KEYS = {f"spectral_adapter.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")} | {
    f"spectral_adapter.{i}.{p}" for i in (1, 4, 7)
    for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


def meta(name, **kw):
  with torch.device("meta"):
    return build_torch_model(name, **kw)


def n_params(module):
  return sum(p.numel() for p in module.parameters())


def test_vit_s4_keys_and_shapes_match_reference():
  sd = meta("spec_vit_s", num_classes=10).state_dict()
  assert len(sd) == 173  # 21 adapter + cls/pos + patch 2 + 12 x 12 block keys + norm 2 + head 2
  shapes = {k: tuple(v.shape) for k, v in sd.items()}
  assert ADAPTER_KEYS <= set(sd)
  assert shapes["vit_core.cls_token"] == (1, 1, 384)
  assert shapes["vit_core.pos_embed"] == (1, 1025, 384)
  assert shapes["vit_core.patch_embed.proj.weight"] == (384, 128, 4, 4)
  assert shapes["vit_core.blocks.11.attn.qkv.weight"] == (1152, 384)
  assert shapes["vit_core.blocks.0.mlp.fc1.weight"] == (1536, 384)
  assert shapes["vit_core.blocks.0.mlp.fc2.weight"] == (384, 1536)
  assert shapes["vit_core.head.weight"] == (10, 384)
  per_block = {k.split(".", 3)[3] for k in sd if k.startswith("vit_core.blocks.0.")}
  assert per_block == {f"{m}.{p}" for m in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
                       for p in ("weight", "bias")}
  assert len(meta("spec_vit_s").state_dict()) == 171  # no head


def test_parameter_counts_match_reference():
  assert n_params(torch_modules.SpectralAdapter()) == 56_192
  assert n_params(meta("spec_vit_s")) == 22_531_328              # REFERENCE: 22.53M (p=4, no head)
  assert abs(n_params(meta("spec_resnet50")) - 24.20e6) / 24.20e6 < 5e-4
  reference = {"spec_vit_t": 5.99e6, "spec_vit_b": 87.47e6, "spec_vit_l": 305.5e6, "spec_vit_h": 633.7e6,
               "spec_vit_g": 1.138e9}
  for name, count in reference.items():
    assert abs(n_params(meta(name)) - count) / count < 5e-3, name


def test_resnet_layout_has_no_stem_and_custom_first_block():
  sd = {k: tuple(v.shape) for k, v in meta("spec_resnet50", num_classes=19).state_dict().items()}
  assert not any(k.startswith(("resnet.conv1", "resnet.bn1", "resnet.maxpool")) for k in sd)
  assert sd["resnet.layer1.0.conv1.weight"] == (256, 128, 1, 1)
  assert sd["resnet.layer1.0.conv2.weight"] == (256, 256, 3, 3)
  assert sd["resnet.layer1.0.conv3.weight"] == (256, 256, 1, 1)
  assert sd["resnet.layer1.0.downsample.0.weight"] == (256, 128, 1, 1)
  assert sd["resnet.layer1.0.downsample.1.running_var"] == (256,)
  assert sd["resnet.layer1.1.conv1.weight"] == (64, 256, 1, 1)
  assert sd["resnet.layer4.2.conv3.weight"] == (2048, 512, 1, 1)
  assert sd["resnet.fc.weight"] == (19, 2048)
  blocks = {k.split(".")[1] + "." + k.split(".")[2] for k in sd if k.startswith("resnet.layer")}
  assert len(blocks) == 3 + 4 + 6 + 3
  model = build_torch_model("spec_resnet50").eval()
  with torch.no_grad():
    feats = model.forward_features(torch.randn(1, 202, 32, 32))["features"]
  assert [tuple(f.shape[1:]) for f in feats] == [(256, 16, 16), (512, 8, 8), (1024, 4, 4), (2048, 2, 2)]


def test_adapter_matches_numpy_band_convolution():
  """Conv3d (k,1,1) over the band axis == a strided 1-D correlation per pixel, written in NumPy."""
  torch.manual_seed(0)
  adapter = torch_modules.SpectralAdapter().eval()
  with torch.no_grad():
    for m in adapter:
      if isinstance(m, torch.nn.BatchNorm3d):
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
  x = np.random.RandomState(1).randn(2, 202, 3, 2).astype(np.float32)
  with torch.no_grad():
    got = adapter(torch.from_numpy(x)).numpy()
  h = x.transpose(0, 2, 3, 1)[..., None].astype(np.float64)  # [B, H, W, L, c]
  lengths = [202]
  for conv, bn in ((adapter[0], adapter[1]), (adapter[3], adapter[4]), (adapter[6], adapter[7])):
    w = conv.weight.detach().numpy()[:, :, :, 0, 0].astype(np.float64)  # [O, I, k]
    k, s = w.shape[-1], conv.stride[0]
    hp = np.pad(h, [(0, 0)] * 3 + [(1, 1), (0, 0)])
    n_out = (hp.shape[3] - k) // s + 1
    out = np.stack([np.einsum("bhwki,oik->bhwo", hp[:, :, :, j * s:j * s + k], w) for j in range(n_out)], axis=3)
    out = out + conv.bias.detach().numpy()
    out = (out - bn.running_mean.numpy()) / np.sqrt(bn.running_var.numpy() + 1e-5) * bn.weight.detach().numpy() \
        + bn.bias.detach().numpy()
    h = np.maximum(out, 0)
    lengths.append(n_out)
  assert lengths == [202, 40, 8, 2]
  want = h.mean(axis=3).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_vit_block_matches_numpy_timm_formula():
  """Pre-norm block with fused qkv (q|k|v, head, dim), LN eps 1e-6, exact GELU."""
  torch.manual_seed(0)
  block = torch_modules.Block(16, 4, 32).eval()
  x = np.random.RandomState(2).randn(2, 5, 16).astype(np.float32)
  with torch.no_grad():
    got = block(torch.from_numpy(x)).numpy()
  p = {k: v.detach().numpy().astype(np.float64) for k, v in block.state_dict().items()}

  def ln(v, name):
    mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + 1e-6) * p[f"{name}.weight"] + p[f"{name}.bias"]

  h = ln(x.astype(np.float64), "norm1")
  qkv = (h @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]).reshape(2, 5, 3, 4, 4)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  attn = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 5, 16)
  y = x + attn @ p["attn.proj.weight"].T + p["attn.proj.bias"]
  h = ln(y, "norm2") @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]
  gelu = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
  want = y + gelu @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_bad_names_and_sizes_are_explained():
  with pytest.raises(ValueError, match="valid: .*spec_vit_s"):
    build_torch_model("vit_tiny")
  with pytest.raises(ValueError, match="not divisible"):
    build_torch_model("spec_vit_t", patch_size=16, image_size=40)
  with pytest.raises(ValueError, match="75"):
    torch_modules.SpectralAdapter()(torch.zeros(1, 13, 4, 4))
