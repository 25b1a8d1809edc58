"""Plain torch.nn training steps for the official SpectralEarth DINO and MoCo-v2 recipes (benchmark reference).

Used by benchmarks/train_step.py (`--objective dino|moco`) to time the same step as fmjax's jitted one.
Backbones come from fmjax.export.torch_modules.build_torch_model (official layout: SpectralAdapter + ViT or
ResNet-50); heads, EMA teachers/key encoders, centring, queue and optimisers are written here from the recipe
(no timm/torchvision/lightly), so the reference does not share code with the fmjax side it is timed against.
Each setup returns `step() -> float loss` on a fixed random batch of two views [B, 2, C, H, W].
"""
from __future__ import annotations

import copy

import numpy as np


def _backbone_and_dim(args):
  """The official-layout torch backbone for --model and its embedding width (found by a dummy forward)."""
  import torch
  from fmjax.export.torch_modules import build_torch_model
  model = build_torch_model(args.model, patch_size=args.patch, image_size=args.image_size, num_bands=args.bands)
  model.eval()
  with torch.no_grad():
    dim = model(torch.zeros(2, args.bands, args.image_size, args.image_size)).shape[-1]
  model.train()
  return model, int(dim)


def _two_views(args):
  import torch
  rng = np.random.default_rng(0)
  views = rng.normal(size=(args.batch, 2, args.bands, args.image_size, args.image_size)).astype(np.float32)
  return torch.from_numpy(views[:, 0].copy()), torch.from_numpy(views[:, 1].copy())


def _ema(momentum: float):
  import torch

  @torch.no_grad()
  def update(teacher, student):
    for t, s in zip(teacher.parameters(), student.parameters()):
      t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
  return update


def torch_dino_setup(args):
  """DINO (Caron et al. 2021, official main_dino.py; SpectralEarth settings): two global views, no locals."""
  import torch
  from torch import nn
  torch.manual_seed(0)
  out_dim, hidden, bottleneck = 128, 2048, 256      # configs/dino_vit_s.py recipe=spectralearth
  student_temp, teacher_temp, center_momentum, clip = 0.1, 0.04, 0.9, 3.0

  class DINOHead(nn.Module):
    def __init__(self, in_dim):
      super().__init__()
      self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                               nn.Linear(hidden, bottleneck))
      # weight-normed last layer with g fixed to 1 (norm_last_layer=True): w = v / ||v|| per output row.
      self.last_v = nn.Parameter(torch.randn(out_dim, bottleneck) * 0.02)

    def forward(self, x):
      x = nn.functional.normalize(self.mlp(x), dim=-1)
      return x @ nn.functional.normalize(self.last_v, dim=1).t()

  class Wrapper(nn.Module):
    def __init__(self):
      super().__init__()
      self.backbone, dim = _backbone_and_dim(args)
      self.head = DINOHead(dim)

    def forward(self, views):   # both views in one backbone call, as the official MultiCropWrapper does
      return self.head(self.backbone(torch.cat(views))).chunk(len(views))

  student = Wrapper()
  teacher = copy.deepcopy(student)
  for p in teacher.parameters():
    p.requires_grad_(False)
  center = torch.zeros(1, out_dim)
  # Official param groups: no weight decay on biases and norms.
  decay = [p for n, p in student.named_parameters() if p.ndim > 1]
  no_decay = [p for n, p in student.named_parameters() if p.ndim <= 1]
  opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=5e-4,
                          weight_decay=0.04)
  ema = _ema(0.996)
  views = _two_views(args)

  def step():
    nonlocal center
    student_out = student(views)
    with torch.no_grad():
      teacher_out = teacher(views)
      teacher_probs = [nn.functional.softmax((t - center) / teacher_temp, dim=-1) for t in teacher_out]
    total, terms = 0.0, 0
    for iq, q in enumerate(teacher_probs):
      for iv, s in enumerate(student_out):
        if iv == iq:
          continue
        total = total + torch.sum(-q * nn.functional.log_softmax(s / student_temp, dim=-1), dim=-1).mean()
        terms += 1
    loss = total / terms
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for p in student.parameters():          # official clip_gradients: per-tensor norm clipping
      if p.grad is not None:
        norm = p.grad.norm(2)
        p.grad.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0))
    opt.step()
    ema(teacher, student)                    # teacher EMA after the optimiser step
    with torch.no_grad():
      batch_center = torch.cat(teacher_out).mean(0, keepdim=True)
      center = center * center_momentum + batch_center * (1 - center_momentum)
    return float(loss.detach())
  return step


def torch_moco_setup(args):
  """MoCo-v2 (SpectralEarth): q from view 0, k from view 1, queue of K keys, InfoNCE T=0.1, SGD."""
  import torch
  from torch import nn
  torch.manual_seed(0)
  dim, hidden, temperature, momentum = 128, 2048, 0.1, 0.999
  queue_size = 64 * args.batch          # as the fmjax side (train_step.jax_moco_setup)

  class Encoder(nn.Module):
    def __init__(self):
      super().__init__()
      self.backbone, width = _backbone_and_dim(args)
      self.projector = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                                     nn.Linear(hidden, dim, bias=False), nn.BatchNorm1d(dim))

    def forward(self, x):
      return nn.functional.normalize(self.projector(self.backbone(x)), dim=-1)

  query = Encoder()
  key = copy.deepcopy(query)
  for p in key.parameters():
    p.requires_grad_(False)
  queue = nn.functional.normalize(torch.randn(queue_size, dim), dim=-1)
  pointer = 0
  opt = torch.optim.SGD(query.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
  ema = _ema(momentum)
  view_q, view_k = _two_views(args)

  def step():
    nonlocal queue, pointer
    q = query(view_q)
    with torch.no_grad():
      ema(key, query)                        # official MoCo: key-encoder momentum update before computing k
      k = key(view_k)
    positive = (q * k).sum(-1, keepdim=True)
    negative = q @ queue.t()
    logits = torch.cat([positive, negative], dim=1) / temperature
    loss = nn.functional.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():                    # enqueue the newest keys, dequeue the oldest
      queue[pointer:pointer + k.shape[0]] = k
      pointer = (pointer + k.shape[0]) % queue_size
    return float(loss.detach())
  return step
