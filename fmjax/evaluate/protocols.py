"""Evaluation protocols: which parameters train, with which loss and optimiser, and the loop.

  frozen    head only; the backbone's BatchNorm either uses its running statistics
            (bn_mode='eval') or, as the official SpectralEarth code does (a frozen encoder left in
            train mode), batch statistics that also update the running ones (bn_mode='train',
            the default, so numbers are comparable with the paper);
  adapter   spectral adapter (56K params) + head;
  finetune  everything, optionally with layer-wise lr decay (layer_decay < 1);
  linear    a linear head on cached backbone features (computed once, eval-mode backbone).

`run(config, workdir)` trains on train, selects the best epoch on val (main metric: F1 micro for
multi-label, pooled IoU for segmentation), reports val and test at that epoch, and writes
results.json, TensorBoard scalars and predictions.png into workdir.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import traverse_util
from tqdm import tqdm

from fmjax import parallel
from fmjax.evaluate import data as data_lib
from fmjax.evaluate import metrics as metrics_lib
from fmjax.evaluate.heads import EvalModel, TaskHead

PROTOCOLS = ("frozen", "adapter", "finetune", "linear")
BN_MODES = ("train", "eval")
LOSSES = ("auto", "bce", "ce", "boundary_ce")


# ------------------------------------------------------------------------- backbone + init

def build_backbone(model_config) -> nn.Module:
  """fmjax.models.build_model(name, **overrides) from a config's `model` block."""
  from fmjax.models import build_model
  cfg = dict(model_config)
  name = cfg.pop("name", None)
  if not name:
    raise ValueError("config.model.name is empty: set a model name (e.g. spec_vit_s) or init_from")
  return build_model(name, **cfg)


def load_init(init_from: str):
  """(pretraining config, backbone variables) from a workdir or checkpoint directory."""
  from fmjax import checkpoint
  try:
    return checkpoint.load_backbone(init_from)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"init_from={init_from!r}: no pretraining checkpoint there ({e})") from e


def _shapes(tree) -> dict[str, tuple]:
  flat = traverse_util.flatten_dict(nn.meta.unbox(tree), sep="/")
  return {k: tuple(np.shape(v)) for k, v in flat.items()}


def check_compatible(loaded, expected, init_from: str, model_desc: str):
  """Raises naming both sides when the checkpoint's backbone does not fit the evaluation model."""
  got, want = _shapes(loaded), _shapes(expected)
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  mismatched = sorted(k for k in set(got) & set(want) if got[k] != want[k])
  if missing or unexpected or mismatched:
    detail = []
    if missing:
      detail.append(f"missing in checkpoint: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
      detail.append(f"not in the model: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if mismatched:
      detail.append("shape mismatch: " + ", ".join(f"{k} checkpoint {got[k]} vs model {want[k]}"
                                                    for k in mismatched[:5]))
    raise ValueError(f"checkpoint {init_from} does not fit the evaluation backbone {model_desc}: "
                     + "; ".join(detail))


# ------------------------------------------------------------------------- parameter groups

def _path_str(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def trainable(path: tuple, protocol: str) -> bool:
  """Whether the parameter at `path` (under 'backbone/' or 'head/') trains under `protocol`."""
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol {protocol!r}; valid choices: {PROTOCOLS}")
  if path[0] == "head" or protocol == "finetune":
    return True
  if protocol == "adapter":
    return "spectral_adapter" in path
  return False


def layer_id(path: tuple, num_layers: int) -> int:
  """Layer index for layer-wise lr decay: 0 input side (adapter, patch embedding, cls/pos),
  i + 1 for transformer block / ResNet stage i, num_layers + 1 for the final norm and the head."""
  if path[0] == "head":
    return num_layers + 1
  s = _path_str(path)
  match = re.search(r"blocks_(\d+)", s) or re.search(r"layer(\d+)", s) or re.search(r"stage_?(\d+)", s)
  if match:
    return min(int(match.group(1)) + 1, num_layers)
  if any(k in s for k in ("spectral_adapter", "patch_embed", "cls_token", "pos_embed", "stem")):
    return 0
  return num_layers  # final norm


def split_params(params, protocol: str):
  """(trainable, frozen) flat dicts {path tuple: array}."""
  flat = traverse_util.flatten_dict(params)
  train = {k: v for k, v in flat.items() if trainable(k, protocol)}
  frozen = {k: v for k, v in flat.items() if not trainable(k, protocol)}
  return train, frozen


def merge_params(train: dict, frozen: dict):
  return traverse_util.unflatten_dict({**frozen, **train})


def make_optimizer(config, train_params: dict, total_steps: int) -> optax.GradientTransformation:
  warmup = int(config.get("warmup_epochs", 0) * total_steps / max(config.epochs, 1))
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, max(warmup, 0), max(total_steps, 1), 0.0) \
      if warmup > 0 else optax.cosine_decay_schedule(config.lr, max(total_steps, 1))
  decay_mask = {k: np.ndim(v) > 1 for k, v in train_params.items()}  # no decay on biases / norms

  def adamw(scale):
    return optax.adamw(lambda step: scale * schedule(step), b1=0.9, b2=0.999,
                       weight_decay=config.weight_decay, mask=decay_mask)

  decay = float(config.get("layer_decay", 1.0))
  if decay == 1.0:
    return adamw(1.0)
  if not 0 < decay < 1:
    raise ValueError(f"layer_decay {decay} must be in (0, 1]")
  num_layers = 1 + max((int(m.group(1)) for k in train_params
                        for m in [re.search(r"blocks_(\d+)", _path_str(k))] if m), default=0)
  labels = {k: f"layer_{layer_id(k, num_layers)}" for k in train_params}
  groups = {f"layer_{i}": adamw(decay ** (num_layers + 1 - i)) for i in range(num_layers + 2)}
  return optax.multi_transform(groups, labels)


# ------------------------------------------------------------------------------- losses

def boundary_weights(labels, ignore_index, weight: float):
  """1 inside regions, `weight` on pixels with a differently-labelled 4-neighbour."""
  padded = jnp.pad(labels, ((0, 0), (1, 1), (1, 1)), mode="edge")
  centre = padded[:, 1:-1, 1:-1]
  edge = ((padded[:, :-2, 1:-1] != centre) | (padded[:, 2:, 1:-1] != centre)
          | (padded[:, 1:-1, :-2] != centre) | (padded[:, 1:-1, 2:] != centre))
  return 1.0 + (weight - 1.0) * edge.astype(jnp.float32)


def task_loss(kind: str, logits, batch, num_classes: int, ignore_index, boundary_weight: float = 5.0):
  valid = batch["valid"].astype(jnp.float32)
  labels = batch["label"]
  if kind == "bce":
    per = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)).mean(-1)
    return jnp.sum(per * valid) / jnp.maximum(valid.sum(), 1.0)
  if kind in ("ce", "boundary_ce"):
    ok = (labels >= 0) & (labels < num_classes)
    if ignore_index is not None:
      ok &= labels != ignore_index
    w = ok.astype(jnp.float32) * valid[:, None, None]
    if kind == "boundary_ce":
      w = w * boundary_weights(labels, ignore_index, boundary_weight)
    per = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(ok, labels, 0))
    return jnp.sum(per * w) / jnp.maximum(w.sum(), 1.0)
  raise ValueError(f"loss {kind!r}; valid choices: {LOSSES}")


# ------------------------------------------------------------------------------- the loop

class Evaluator:
  """Holds the model, its variables and the jitted train / eval steps of one evaluation run."""

  def __init__(self, config, info: data_lib.TaskInfo, backbone: nn.Module | None, image_size: int,
               mesh, backbone_variables=None, linear: bool = False, patch_size: int | None = None):
    self.config, self.info, self.mesh = config, info, mesh
    self.protocol = config.protocol
    if self.protocol not in PROTOCOLS:
      raise ValueError(f"protocol {self.protocol!r}; valid choices: {PROTOCOLS}")
    if config.bn_mode not in BN_MODES:
      raise ValueError(f"bn_mode {config.bn_mode!r}; valid choices: {BN_MODES}")
    loss = config.loss if config.loss != "auto" else ("bce" if info.type == "multilabel" else "ce")
    if loss not in LOSSES:
      raise ValueError(f"loss {loss!r}; valid choices: {LOSSES}")
    if (loss == "bce") != (info.type == "multilabel"):
      raise ValueError(f"loss {loss!r} does not fit a {info.type} task (multilabel: bce; "
                       f"segmentation: ce or boundary_ce)")
    self.loss = loss
    patch = int(patch_size or getattr(backbone, "patch_size", 4) or 4)
    head = TaskHead(info.type, info.num_classes, patch_size=patch, channels=config.head_channels, linear=linear)
    self.model = EvalModel(backbone, head, image_size=image_size)
    # The frozen backbone trains its BN statistics only in the official 'train' mode.
    self.backbone_train = self.protocol in ("adapter", "finetune") or (
        self.protocol == "frozen" and config.bn_mode == "train")
    self.backbone_variables = backbone_variables

  def init(self, rng, example):
    # Under jit: one compilation instead of one per initialiser op (minutes on 8 fake CPU devices).
    variables = jax.jit(lambda r, x: self.model.init({"params": r, "dropout": r}, x, train=False,
                                                     backbone_train=False))(rng, example)
    variables = nn.meta.unbox(variables)
    variables = jax.tree.map(np.asarray, jax.device_get(dict(variables)))
    if self.backbone_variables is not None:
      for collection, tree in self.backbone_variables.items():
        if collection in variables:
          variables[collection] = {**variables[collection], "backbone": jax.tree.map(np.asarray, tree)}
    return variables

  def _shard_batch(self, batch):
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        parallel.batch_sharding(self.mesh, np.ndim(x)), x), batch)

  def train(self, variables, train_data, val_data, workdir: str, writer=None):
    cfg = self.config
    batch_size = cfg.batch_size
    dp = parallel.data_parallel_size(self.mesh)
    if batch_size % dp:
      raise ValueError(f"batch_size {batch_size} is not divisible by the {dp} data-parallel devices")
    train_p, frozen_p = split_params(variables["params"], self.protocol)
    stats = variables.get("batch_stats", {})
    steps_per_epoch = max(1, -(-len(train_data) // batch_size) if len(train_data) < batch_size
                          else len(train_data) // batch_size)
    total = steps_per_epoch * cfg.epochs
    tx = make_optimizer(cfg, train_p, total)
    replicate = parallel.replicated(self.mesh)
    train_p, frozen_p, stats = jax.device_put((train_p, frozen_p, stats), replicate)
    opt_state = jax.jit(tx.init)(train_p)
    model, info, loss_kind, backbone_train = self.model, self.info, self.loss, self.backbone_train

    @jax.jit
    def step(train_p, frozen_p, stats, opt_state, batch, rng):
      def loss_fn(tp):
        logits, new = model.apply({"params": merge_params(tp, frozen_p), "batch_stats": stats},
                                  batch["image"], train=True, backbone_train=backbone_train,
                                  mutable=["batch_stats"], rngs={"dropout": rng})
        loss = task_loss(loss_kind, logits, batch, info.num_classes, info.ignore_index, cfg.boundary_weight)
        return loss, new.get("batch_stats", stats)
      (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_p)
      updates, opt_state = tx.update(grads, opt_state, train_p)
      return optax.apply_updates(train_p, updates), new_stats, opt_state, loss

    rng = np.random.default_rng(cfg.seed)
    key = jax.random.PRNGKey(cfg.seed)
    best = {"epoch": -1, "score": -np.inf}
    history = []
    main = metrics_lib.MAIN_METRIC[info.type]
    for epoch in tqdm(range(cfg.epochs), desc=f"{self.protocol} {info.name}", unit="epoch"):
      losses = []
      for positions in data_lib.epoch_batches(len(train_data), batch_size, rng, drop_last=True):
        batch = self._shard_batch(train_data.batch(data_lib.host_slice(positions)))
        key, sub = jax.random.split(key)
        train_p, stats, opt_state, loss = step(train_p, frozen_p, stats, opt_state, batch, sub)
        losses.append(loss)
      entry = {"epoch": epoch, "train_loss": float(np.mean(jax.device_get(losses)))}
      if (epoch + 1) % cfg.eval_every == 0 or epoch == cfg.epochs - 1:
        current = {"params": merge_params(train_p, frozen_p), "batch_stats": stats}
        val = self.evaluate(current, val_data)
        entry["val_" + main] = val[main]
        if val[main] > best["score"]:
          best = {"epoch": epoch, "score": val[main], "val": val,
                  "variables": jax.tree.map(np.asarray, jax.device_get(current))}
      history.append(entry)
      if writer is not None:
        writer.write_scalars(epoch, {k: v for k, v in entry.items() if k != "epoch"})
    return best, history, {k: v for k, v in zip(("trainable", "frozen"), (train_p, frozen_p))}

  def predict_fn(self):
    model = self.model
    return jax.jit(lambda variables, image: model.apply(variables, image, train=False, backbone_train=False))

  def _stats_fn(self):
    if getattr(self, "_stats_jit", None) is None:
      info, model, ap_bins = self.info, self.model, self.config.ap_bins

      def stats_fn(variables, batch):
        logits = model.apply(variables, batch["image"], train=False, backbone_train=False)
        if info.type == "multilabel":
          return metrics_lib.multilabel_batch_stats(logits, batch["label"], ap_bins, batch["valid"])
        labels = jnp.where(batch["valid"][:, None, None] > 0, batch["label"], -1)
        return metrics_lib.segmentation_batch_stats(logits, labels, info.num_classes, info.ignore_index)
      self._stats_jit = jax.jit(stats_fn)   # one compilation for every evaluation of this run
    return self._stats_jit

  def evaluate(self, variables, split_data, batch_size: int | None = None):
    """Metrics over a whole split (padding excluded), from summed on-device counts."""
    batch_size = batch_size or self.config.batch_size
    stats_fn = self._stats_fn()
    total = None
    for positions in data_lib.epoch_batches(len(split_data), batch_size, None, drop_last=False):
      batch = self._shard_batch(split_data.batch(data_lib.host_slice(positions)))
      total = metrics_lib.merge(total, stats_fn(variables, batch))
    return metrics_lib.compute(self.info.type, total)


def count_changed(before, after, atol: float = 0.0) -> dict[str, int]:
  """{'changed': n params (scalars) that differ, 'total': n} between two param trees."""
  a = traverse_util.flatten_dict(before)
  b = traverse_util.flatten_dict(after)
  changed = sum(int(np.sum(np.abs(np.asarray(a[k]) - np.asarray(b[k])) > atol)) for k in a)
  return {"changed": changed, "total": sum(int(np.size(v)) for v in a.values())}


def _now() -> float:
  return time.perf_counter()


def to_jsonable(obj: Any):
  if isinstance(obj, dict):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, (np.floating, np.integer)):
    return obj.item()
  if isinstance(obj, float) and not np.isfinite(obj):
    return None
  return obj


def write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(to_jsonable(obj), f, indent=1)
  logging.info("wrote %s", path)
