"""The model zoo: `build_model(name, **overrides)` and `MODEL_NAMES`.

Every backbone is called `model.apply(variables, x, train=...)` with x [B, H, W, C] float
(channels last) and returns a dict with 'embedding' [B, D] (ViT: cls token after the final norm;
ResNet: global average pool), plus 'tokens' [B, N, D] (ViT) or 'features' (ResNet: list of NHWC
maps, strides in `model.feature_strides`). Models with BatchNorm (adapter, ResNets) keep running
statistics in the 'batch_stats' collection: pass `mutable=['batch_stats']` when train=True.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from flax import linen as nn

from fmjax.models.heads import ClassificationHead, FCNHead, MAEDecoder, SegmentationHead, UNetDecoder
from fmjax.models.layers import resolve_dtype, sincos_2d
from fmjax.models.resnet import ResNet, SpecResNet
from fmjax.models.spectral_adapter import SpectralAdapter
from fmjax.models.vit import SpecViT, VisionTransformer

# ViT sizes (REFERENCE.md): width, depth, heads; MLP 4x width.
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "t": (192, 12, 3), "s": (384, 12, 6), "b": (768, 12, 12),
    "l": (1024, 24, 16), "h": (1280, 32, 16), "g": (1536, 40, 24),
}


def _vit_defaults(size: str | None) -> dict[str, Any]:
  if size is None:
    return {}
  width, depth, heads = VIT_SIZES[size]
  return dict(width=width, depth=depth, num_heads=heads, mlp_dim=4 * width)


_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    **{f"spec_vit_{s}": (SpecViT, _vit_defaults(s)) for s in VIT_SIZES},
    "spec_vit": (SpecViT, {}),
    "spec_resnet50": (SpecResNet, dict(dilated=False)),
    "spec_resnet50_dilated": (SpecResNet, dict(dilated=True)),
    "resnet18": (ResNet, dict(stage_sizes=(2, 2, 2, 2), bottleneck=False)),
    "resnet50": (ResNet, dict(stage_sizes=(3, 4, 6, 3), bottleneck=True)),
}
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)

# config.model keys that only ViTs take: configs shared between ViT and ResNet backbones drop these
# for ResNets (pretraining objectives and evaluation alike).
VIT_ONLY_OPTIONS = ("patch_size", "remat", "scan", "attention", "width", "depth", "num_heads", "mlp_dim",
                    "drop_path_rate", "use_adapter", "sincos_pos_embed")

# Friendly aliases accepted as overrides.
_ALIASES = {"heads": "num_heads", "embed_dim": "width", "bands": "num_bands"}


def build_model(name: str, **overrides) -> nn.Module:
  """A backbone by name with field overrides (e.g. patch_size=8, dtype='bfloat16', scan=True).

  The generic 'spec_vit' needs width, depth and num_heads (alias heads); mlp_dim defaults to
  4 * width. ResNets take in_channels (alias num_bands) and detail_stem.
  """
  if name not in _REGISTRY:
    raise ValueError(f"model {name!r} is not known; valid names: {', '.join(MODEL_NAMES)}")
  cls, defaults = _REGISTRY[name]
  kwargs = dict(defaults)
  for key, value in overrides.items():
    kwargs[_ALIASES.get(key, key)] = value
  if cls is ResNet and "num_bands" in kwargs:
    kwargs["in_channels"] = kwargs.pop("num_bands")
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"model {name!r} has no option(s) {unknown}; valid options: {sorted(fields)}")
  if cls is SpecViT:
    missing = [k for k in ("width", "depth", "num_heads") if k not in kwargs]
    if missing:
      raise ValueError(f"model 'spec_vit' needs {missing} as overrides (or use one of spec_vit_t/s/b/l/h/g)")
    kwargs.setdefault("mlp_dim", 4 * kwargs["width"])
  for key in ("dtype", "param_dtype"):
    if key in kwargs:
      kwargs[key] = resolve_dtype(kwargs[key])
  return cls(**kwargs)


__all__ = [
    "MODEL_NAMES", "VIT_ONLY_OPTIONS", "VIT_SIZES", "build_model", "SpecViT", "VisionTransformer",
    "SpectralAdapter", "SpecResNet", "ResNet", "MAEDecoder", "ClassificationHead", "SegmentationHead", "FCNHead",
    "UNetDecoder", "sincos_2d",
]
