"""Plain-PyTorch SpectralEarth backbones whose `state_dict` keys are exactly the official ones.

These are the export target: `SpecViT` and `SpecResNet50` built from `torch.nn` only (no timm, no
torchvision; neither imports with the pinned torch). Module names reproduce the official key layout
(REFERENCE.md, "Official models"):

  spectral_adapter.{0,3,6}.{weight,bias}                      Conv3d (k,1,1) over the band axis
  spectral_adapter.{1,4,7}.{weight,bias,running_*,num_batches_tracked}   BatchNorm3d
  vit_core.{cls_token,pos_embed,patch_embed.proj.*,blocks.i.*,norm.*[,head.*]}   timm ViT
  resnet.layer{1..4}.j.{conv1,bn1,conv2,bn2,conv3,bn3,downsample.{0,1}}.*[, resnet.fc.*]

Semantics follow timm's VisionTransformer (qkv bias, LayerNorm eps 1e-6, exact GELU, class token
output after the final norm, no LayerScale) and torchvision's Bottleneck (stride on the 3x3).
Input is [B, C, H, W] (channels first, any band count C >= 75).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# name -> (width D, depth, heads); MLP ratio 4 throughout (REFERENCE.md parameter counts).
VIT_VARIANTS: dict[str, tuple[int, int, int]] = {
    "spec_vit_t": (192, 12, 3),
    "spec_vit_s": (384, 12, 6),
    "spec_vit_b": (768, 12, 12),
    "spec_vit_l": (1024, 24, 16),
    "spec_vit_h": (1280, 32, 16),
    "spec_vit_g": (1536, 40, 24),
}
RESNET_VARIANTS = ("spec_resnet50", "spec_resnet50_dilated")
MODEL_NAMES = tuple(VIT_VARIANTS) + ("spec_vit",) + RESNET_VARIANTS

ADAPTER_CHANNELS = 128
MIN_BANDS = 75  # the three strided convs need at least this many bands to leave one


class SpectralAdapter(nn.Sequential):
  """Conv3d/BN3d/ReLU x3 over the band axis, then the mean over what is left of it.

  Indices 0,3,6 are the convolutions and 1,4,7 the batch norms, as in the official Sequential.
  """

  def __init__(self):
    layers = []
    for c_in, c_out, k, s in ((1, 32, 7, 5), (32, 64, 7, 5), (64, ADAPTER_CHANNELS, 5, 3)):
      layers += [nn.Conv3d(c_in, c_out, kernel_size=(k, 1, 1), stride=(s, 1, 1), padding=(1, 0, 0)),
                 nn.BatchNorm3d(c_out), nn.ReLU(inplace=True)]
    super().__init__(*layers)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] < MIN_BANDS:
      raise ValueError(f"SpectralAdapter expects [B, C, H, W] with C >= {MIN_BANDS} bands, got {tuple(x.shape)}")
    y = super().forward(x.unsqueeze(1))   # [B, 128, C', H, W]
    return y.mean(dim=2)


# ---------------------------------------------------------------------------------------------------
# ViT (timm layout)


class PatchEmbed(nn.Module):
  def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
    super().__init__()
    self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D], row-major over the patch grid


class Attention(nn.Module):
  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    if dim % num_heads:
      raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
    self.num_heads = num_heads
    self.qkv = nn.Linear(dim, 3 * dim, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    # timm's fused layout: output features ordered (q|k|v, head, head_dim).
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    x = F.scaled_dot_product_attention(q, k, v)
    return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()  # exact (erf) GELU, as timm
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, dim: int, num_heads: int, mlp_dim: int):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, mlp_dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
  """The subset of timm's VisionTransformer the official SpecViT uses (global_pool='token')."""

  def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int,
               num_heads: int, mlp_dim: int | None = None, num_classes: int = 0):
    super().__init__()
    if img_size % patch_size:
      raise ValueError(f"image size {img_size} is not divisible by patch size {patch_size}")
    self.patch_size = patch_size
    self.num_patches = (img_size // patch_size) ** 2
    self.embed_dim = embed_dim
    self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
    mlp_dim = mlp_dim or 4 * embed_dim
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_dim) for _ in range(depth)])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
    nn.init.trunc_normal_(self.pos_embed, std=0.02)
    nn.init.normal_(self.cls_token, std=1e-6)

  def forward_features(self, x):
    x = self.patch_embed(x)
    if x.shape[1] != self.num_patches:
      raise ValueError(f"input gives {x.shape[1]} patches but pos_embed has {self.num_patches}: "
                       f"the model was built for another image size")
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    for block in self.blocks:
      x = block(x)
    return self.norm(x)

  def forward(self, x):
    return self.head(self.forward_features(x)[:, 0])


class SpecViT(nn.Module):
  """SpectralAdapter + ViT. `forward` returns the head output (the cls embedding without a head)."""

  def __init__(self, embed_dim: int = 384, depth: int = 12, num_heads: int = 6, patch_size: int = 4,
               img_size: int = 128, num_classes: int = 0, mlp_dim: int | None = None, use_adapter: bool = True,
               in_chans: int | None = None):
    super().__init__()
    # use_adapter=False (fmjax option, e.g. 13-band Sentinel-2): the ViT patchifies the raw bands.
    if use_adapter:
      self.spectral_adapter = SpectralAdapter()
    elif not in_chans:
      raise ValueError("SpecViT without the adapter needs in_chans (the band count)")
    self.vit_core = VisionTransformer(img_size, patch_size, ADAPTER_CHANNELS if use_adapter else in_chans,
                                      embed_dim, depth, num_heads, mlp_dim, num_classes)

  def forward_features(self, x) -> dict[str, torch.Tensor]:
    """{'embedding': [B, D] cls token after the final norm, 'tokens': [B, N, D] patch tokens}."""
    if hasattr(self, "spectral_adapter"):
      x = self.spectral_adapter(x)
    t = self.vit_core.forward_features(x)
    return {"embedding": t[:, 0], "tokens": t[:, 1:]}

  def forward(self, x):
    return self.vit_core.head(self.forward_features(x)["embedding"])


# ---------------------------------------------------------------------------------------------------
# ResNet-50 (torchvision layout, no stem)


class Bottleneck(nn.Module):
  def __init__(self, c_in: int, width: int, c_out: int, stride: int = 1, dilation: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(c_out)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or c_in != c_out:
      self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    shortcut = x if self.downsample is None else self.downsample(x)
    return self.relu(out + shortcut)


class ResNetNoStem(nn.Module):
  """ResNet-50 body without conv1/bn1/maxpool, fed by the adapter's 128 channels.

  layer1[0] is the official custom block (width 256, stride 2, 128 -> 256); the rest are standard
  bottlenecks. `dilated=True` gives the segmentation variant: every stride 1, dilations 1/2/4/8.
  """

  def __init__(self, num_classes: int = 0, dilated: bool = False):
    super().__init__()
    strides = (1, 1, 1, 1) if dilated else (2, 2, 2, 2)
    dilations = (1, 2, 4, 8) if dilated else (1, 1, 1, 1)
    self.layer1 = nn.Sequential(Bottleneck(ADAPTER_CHANNELS, 256, 256, strides[0], dilations[0]),
                                *[Bottleneck(256, 64, 256, 1, dilations[0]) for _ in range(2)])
    c_in, layers = 256, []
    for i, (blocks, width) in enumerate(((4, 128), (6, 256), (3, 512)), start=1):
      c_out = 4 * width
      layer = [Bottleneck(c_in, width, c_out, strides[i], dilations[i])]
      layer += [Bottleneck(c_out, width, c_out, 1, dilations[i]) for _ in range(blocks - 1)]
      layers.append(nn.Sequential(*layer))
      c_in = c_out
    self.layer2, self.layer3, self.layer4 = layers
    self.embed_dim = 2048
    self.fc = nn.Linear(2048, num_classes) if num_classes > 0 else nn.Identity()

  def forward_features(self, x) -> list[torch.Tensor]:
    features = []
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      x = layer(x)
      features.append(x)
    return features

  def forward(self, x):
    return self.fc(self.forward_features(x)[-1].mean(dim=(2, 3)))


class SpecResNet50(nn.Module):
  def __init__(self, num_classes: int = 0, dilated: bool = False):
    super().__init__()
    self.spectral_adapter = SpectralAdapter()
    self.resnet = ResNetNoStem(num_classes, dilated)

  def forward_features(self, x) -> dict:
    """{'embedding': [B, 2048] global average pool of layer4, 'features': [layer1..layer4 maps]}."""
    features = self.resnet.forward_features(self.spectral_adapter(x))
    return {"embedding": features[-1].mean(dim=(2, 3)), "features": features}

  def forward(self, x):
    return self.resnet.fc(self.forward_features(x)["embedding"])


def build_torch_model(name: str, *, patch_size: int = 4, image_size: int = 128, num_classes: int = 0,
                      width: int | None = None, depth: int | None = None, num_heads: int | None = None,
                      mlp_dim: int | None = None, use_adapter: bool = True, num_bands: int | None = None) -> nn.Module:
  """The official-layout PyTorch module for an fmjax model name (see MODEL_NAMES).

  `spec_vit` is the generic ViT: width/depth/num_heads (and optionally mlp_dim) must be given.
  """
  if name in VIT_VARIANTS or name == "spec_vit":
    if name == "spec_vit":
      if None in (width, depth, num_heads):
        raise ValueError(f"spec_vit needs width, depth and num_heads, got {width}, {depth}, {num_heads}")
    else:
      width, depth, num_heads = [given if given is not None else default
                                 for given, default in zip((width, depth, num_heads), VIT_VARIANTS[name])]
    if image_size % patch_size:
      raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
    return SpecViT(width, depth, num_heads, patch_size, image_size, num_classes, mlp_dim, use_adapter, num_bands)
  if name in RESNET_VARIANTS:
    return SpecResNet50(num_classes, dilated=name.endswith("_dilated"))
  raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}")
