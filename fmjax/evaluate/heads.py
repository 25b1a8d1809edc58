"""Task heads for evaluation, and the model = backbone + head that protocols train.

The heads themselves are fmjax.models.heads (official SpectralEarth downstream heads);
`TaskHead` chooses one from the task type and what the backbone returns.
`EvalModel(backbone=None)` runs the head on pre-computed backbone outputs (linear probe on
cached features).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from fmjax.models.heads import ClassificationHead, FCNHead, SegmentationHead


class TaskHead(nn.Module):
  """Picks the fmjax.models head that fits the task and the backbone's outputs.

  multi-label -> ClassificationHead(embedding); segmentation with ViT 'tokens' -> SegmentationHead
  (full-size upsampling; `linear=True`: a 1x1 conv on the token grid, bilinearly resized - the
  linear probe); with ResNet 'features' -> FCNHead on the last map (or a 1x1 conv when linear).
  """
  task_type: str
  num_classes: int
  patch_size: int = 4
  channels: int = 256
  linear: bool = False

  @nn.compact
  def __call__(self, outputs: dict, *, train: bool, image_size: int | None = None):
    if self.task_type == "multilabel":
      return ClassificationHead(self.num_classes, name="classifier")(outputs["embedding"], train=train)
    if self.task_type != "segmentation":
      raise ValueError(f"task type {self.task_type!r}; valid choices: 'multilabel', 'segmentation'")
    if "tokens" in outputs:
      ups = 0 if self.linear else None
      x = SegmentationHead(self.num_classes, patch_size=self.patch_size, channels=self.channels,
                           num_upsamples=ups, name="segmentation")(outputs["tokens"], train=train)
    else:
      features = outputs["features"]
      last = features[-1] if isinstance(features, (list, tuple)) else features
      if self.linear:
        x = nn.Conv(self.num_classes, (1, 1), name="classifier")(last)
      else:
        x = FCNHead(self.num_classes, name="fcn")(last, train=train)
    if image_size is not None and x.shape[1] != image_size:
      x = jax.image.resize(x.astype(jnp.float32), (x.shape[0], image_size, image_size, x.shape[3]), "bilinear")
    return x.astype(jnp.float32)


class EvalModel(nn.Module):
  """backbone (any module `(x, *, train) -> {'embedding', 'tokens'|'features'}`) + head.

  Parameters live under 'backbone/...' and 'head/...' so protocols select them by path.
  """
  backbone: nn.Module | None
  head: nn.Module
  image_size: int | None = None   # segmentation output size (needed with cached features)

  @nn.compact
  def __call__(self, x, *, train: bool, backbone_train: bool):
    if self.backbone is None:         # x is a dict of cached backbone outputs
      outputs, size = x, self.image_size
    else:
      outputs, size = self.backbone(x, train=backbone_train), x.shape[1]
    return self.head(outputs, train=train, image_size=size)

  def features(self, x):
    """Backbone outputs in eval mode (for the linear probe's feature cache)."""
    return self.backbone(x, train=False)
