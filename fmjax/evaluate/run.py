"""`run(config, workdir)`: one evaluation (task x protocol x checkpoint x label fraction x seed).

Also `compare_with_random_init` (the demo's call: the same frozen evaluation of a pretrained
backbone and of a randomly initialised one) and the linear probe's feature cache.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from fmjax import metrics_logging, parallel
from fmjax.evaluate import data as data_lib
from fmjax.evaluate import metrics as metrics_lib
from fmjax.evaluate import protocols as P
from fmjax.models import VIT_ONLY_OPTIONS


class ArrayData:
  """A split held as arrays (cached features): the same `batch`/`__len__` interface as SplitData."""

  def __init__(self, inputs: dict, labels: np.ndarray):
    self.inputs, self.labels = inputs, labels

  def __len__(self):
    return len(self.labels)

  def batch(self, positions):
    idx = np.maximum(np.asarray(positions), 0)
    return {"image": {k: v[idx] for k, v in self.inputs.items()}, "label": self.labels[idx],
            "valid": (np.asarray(positions) >= 0).astype(np.int32)}


def cache_features(apply, variables, split, mesh, batch_size: int) -> ArrayData:
  """Backbone outputs (`apply(variables, images)`, jitted, eval mode) of every sample of a split, on host."""
  outs, labels = [], []
  n = len(split)
  for positions in tqdm(list(data_lib.epoch_batches(n, batch_size, None, drop_last=False)),
                        desc=f"features {split.split}", unit="batch"):
    local = split.batch(data_lib.host_slice(positions))
    image = jax.make_array_from_process_local_data(parallel.batch_sharding(mesh, 4), local["image"])
    out = apply(variables, image)
    out = jax.tree.map(lambda a: np.asarray(jax.experimental.multihost_utils.process_allgather(a, tiled=True))
                       if jax.process_count() > 1 else np.asarray(a), out)
    keep_n = int(np.sum(positions >= 0))
    outs.append({k: v[:keep_n] for k, v in out.items()})
    labels.append(np.stack([split.sample(int(p))[1] for p in positions[:keep_n]]))
  inputs = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
  return ArrayData(inputs, np.concatenate(labels))


def _rgb(image: np.ndarray) -> np.ndarray:
  """A displayable RGB composite of a normalised [H, W, C] image (EnMAP RGB bands when C = 202)."""
  from fmjax.data import sensors
  c = image.shape[-1]
  bands = sensors.RGB_BANDS if c == sensors.SPECTRALEARTH_NUM_BANDS else \
      tuple(int(round(f * (c - 1))) for f in (0.21, 0.14, 0.05))
  rgb = image[..., list(bands)]
  lo, hi = np.percentile(rgb, 2), np.percentile(rgb, 98)
  return np.clip((rgb - lo) / max(hi - lo, 1e-6), 0, 1)


def save_examples(path: str, images, labels, logits, info: data_lib.TaskInfo):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  n = len(images)
  if info.type == "segmentation":
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    pred = logits.argmax(-1)
    vmax = info.num_classes
    for i in range(n):
      shown = np.ma.masked_where(labels[i] == info.ignore_index, labels[i])
      for ax, im, title in zip(axes[i], (_rgb(images[i]), shown, pred[i]), ("image", "label", "prediction")):
        ax.imshow(im, vmin=0 if im.ndim == 2 else None, vmax=vmax if im.ndim == 2 else None,
                  cmap="tab20" if im.ndim == 2 else None, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
  else:
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.6), squeeze=False)
    for i in range(n):
      ax = axes[0, i]
      ax.imshow(_rgb(images[i]))
      truth = [info.class_names[k][:14] for k in np.flatnonzero(labels[i])]
      pred = [info.class_names[k][:14] for k in np.flatnonzero(logits[i] >= 0)]
      ax.set_title(f"true: {', '.join(truth)}\npred: {', '.join(pred)}", fontsize=6)
      ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def _writer(workdir: str, enabled: bool):
  if not enabled:
    return None
  return metrics_logging.metric_writers().create_default_writer(
      os.path.join(workdir, "tensorboard"), just_logging=jax.process_index() > 0)


def backbone_config(pre_config) -> dict:
  """build_model arguments of a pretraining run's backbone (as its objective built it)."""
  model = {k: v for k, v in dict(pre_config.model).items() if v is not None}
  data = pre_config.get("data", {}) or {}
  if data.get("crop_size", 0):
    model.setdefault("image_size", int(data["crop_size"]))
  if data.get("num_bands", 0):
    model.setdefault("num_bands", int(data["num_bands"]))
  objective = (pre_config.get("objective", {}) or {}).get("name", "")
  if objective == "mae" and "vit" in model.get("name", ""):
    model["sincos_pos_embed"] = True   # the MAE encoder's fixed 2-D sin-cos table
  if "vit" not in model.get("name", ""):
    model = {k: v for k, v in model.items() if k not in VIT_ONLY_OPTIONS}
  elif model.get("attention") == "cudnn":
    # The kernel belongs to the machine, not the weights: a GPU run's backbone evaluates anywhere.
    model["attention"] = "auto"
  return model


def resolve_backbone(config, image_size: int, num_bands: int, backbone_variables=None, pre_config=None):
  """(backbone module, variables or None, description) from init_from / config.model.

  With init_from the checkpoint's own model config is used, updated by any non-empty entry of
  config.model; image_size and num_bands always follow the downstream data (a mismatch with the
  checkpoint, e.g. a learned position table of another size, is reported naming both sides).
  """
  init_from = config.get("init_from", "")
  if backbone_variables is None and init_from:
    pre_config, backbone_variables = P.load_init(init_from)
  model_cfg = backbone_config(pre_config) if pre_config is not None else {}
  model_cfg.update({k: v for k, v in dict(config.get("model") or {}).items() if v not in (None, "")})
  if not model_cfg.get("name"):
    raise ValueError("no backbone: set --config.init_from=<workdir or checkpoint> or config.model.name")
  model_cfg.update(image_size=image_size, num_bands=num_bands)
  if "vit" not in model_cfg["name"]:
    model_cfg.pop("image_size")
  backbone = P.build_backbone(model_cfg)
  desc = ", ".join(f"{k}={v}" for k, v in sorted(model_cfg.items()))
  if backbone_variables is not None:
    x = jnp.zeros((1, image_size, image_size, num_bands), jnp.float32)
    expected = jax.eval_shape(lambda: backbone.init({"params": jax.random.PRNGKey(0)}, x, train=False))
    loaded = {k: v for k, v in backbone_variables.items() if k in ("params", "batch_stats")}
    P.check_compatible(loaded, {k: v for k, v in dict(expected).items() if k in ("params", "batch_stats")},
                       init_from or "<given variables>", f"({desc})")
    backbone_variables = loaded
  return backbone, backbone_variables, desc


def run(config, workdir: str, backbone_variables=None, pre_config=None) -> dict:
  """Trains and evaluates; returns the results dict (also workdir/results.json)."""
  config = ml_collections.ConfigDict(config) if not isinstance(config, ml_collections.ConfigDict) else config
  os.makedirs(workdir, exist_ok=True)
  info = data_lib.read_task(config.dataset)
  mean = None if config.get("band_mean") is None else np.asarray(config.band_mean, np.float32)
  std = None if config.get("band_std") is None else np.asarray(config.band_std, np.float32)
  splits = {s: data_lib.SplitData(config.dataset, s, info, mean, std, cache=config.cache)
            for s in ("train", "val", "test")}
  if config.label_fraction < 1.0:
    splits["train"] = splits["train"].subset(config.label_fraction, config.seed)
  example_image = splits["train"].sample(0)[0]
  image_size = example_image.shape[0]
  backbone, loaded, desc = resolve_backbone(config, image_size, info.num_bands, backbone_variables, pre_config)
  mesh = parallel.make_mesh(dict(config.mesh))
  rng = jax.random.PRNGKey(config.seed)
  if config.protocol == "linear":
    if loaded is None:
      loaded = jax.device_get(backbone.init({"params": rng}, jnp.asarray(example_image[None]), train=False))
    keep = ("embedding",) if info.type == "multilabel" else ("tokens", "features")
    bs = config.batch_size
    if keep == ("embedding",) and hasattr(backbone, "embed"):   # a ViT's cls-only last block
      apply = jax.jit(lambda v, x: {"embedding": backbone.apply(v, x, train=False, method=backbone.embed)})
    else:
      apply = jax.jit(lambda v, x: {k: o for k, o in backbone.apply(v, x, train=False).items() if k in keep})
    splits = {s: cache_features(apply, loaded, d, mesh, bs) for s, d in splits.items()}
    evaluator = P.Evaluator(config, info, None, image_size, mesh, linear=True,
                            patch_size=getattr(backbone, "patch_size", None))
    example = splits["train"].batch(np.arange(1))["image"]
  else:
    evaluator = P.Evaluator(config, info, backbone, image_size, mesh, backbone_variables=loaded)
    example = example_image[None]
  variables = evaluator.init(rng, jax.tree.map(jnp.asarray, example))
  writer = _writer(workdir, config.tensorboard)
  best, history, final = evaluator.train(variables, splits["train"], splits["val"], workdir, writer)
  test = evaluator.evaluate(best["variables"], splits["test"])
  n_train = sum(int(np.size(v)) for v in final["trainable"].values())
  n_frozen = sum(int(np.size(v)) for v in final["frozen"].values())
  results = {
      "task": info.name, "type": info.type, "protocol": config.protocol, "bn_mode": config.bn_mode,
      "init_from": config.get("init_from", "") or ("<given variables>" if backbone_variables else "random"),
      "backbone": desc, "label_fraction": config.label_fraction, "seed": config.seed,
      "train_samples": len(splits["train"]), "trainable_params": n_train, "frozen_params": n_frozen,
      "main_metric": metrics_lib.MAIN_METRIC[info.type], "best_epoch": best["epoch"],
      "val": best["val"], "test": test, "history": history,
  }
  if writer is not None:
    writer.write_scalars(config.epochs, {f"test_{k}": v for k, v in test.items() if isinstance(v, float)})
    writer.flush()
  if jax.process_index() == 0:
    P.write_json(os.path.join(workdir, "results.json"), results)
    if config.num_examples > 0:
      n = min(config.num_examples, len(splits["test"]))
      positions = np.arange(n)
      if jax.process_count() == 1:  # host-local arrays; multi-host runs skip the picture
        batch = splits["test"].batch(positions)
        logits = np.asarray(evaluator.predict_fn()(best["variables"], jax.tree.map(jnp.asarray, batch["image"])))
        images = np.stack([data_lib_image(splits, config, info, p) for p in positions])
        save_examples(os.path.join(workdir, "predictions.png"), images, batch["label"], logits, info)
  logging.info("%s %s: test %s = %.4f (best val epoch %d)", info.name, config.protocol,
               results["main_metric"], test[results["main_metric"]], best["epoch"])
  return results


def data_lib_image(splits, config, info, position):
  """The normalised image of test sample `position` (the linear probe's split holds features)."""
  test = splits["test"]
  if isinstance(test, ArrayData):
    mean = None if config.get("band_mean") is None else config.band_mean
    std = None if config.get("band_std") is None else config.band_std
    test = data_lib.SplitData(config.dataset, "test", info, mean, std, cache=False)
  return test.sample(int(position))[0]


def compare_with_random_init(checkpoint: str, dataset: str, workdir: str, **overrides) -> dict:
  """Frozen-protocol evaluation of `checkpoint`'s backbone and of the same backbone randomly
  initialised, on one downstream dataset. Returns {'metric', 'pretrained', 'random', 'margin'}."""
  from fmjax.evaluate import tasks
  pre_config, variables = P.load_init(checkpoint)
  results = {}
  for label in ("pretrained", "random"):
    config = tasks.eval_config("custom", "frozen")
    config.dataset = dataset
    config.init_from = checkpoint if label == "pretrained" else ""
    config.update(overrides)
    # Same architecture both times; the random one just gets no variables.
    results[label] = run(config, os.path.join(workdir, label),
                         backbone_variables=variables if label == "pretrained" else None,
                         pre_config=pre_config)
  metric = results["pretrained"]["main_metric"]
  out = {"metric": metric, "pretrained": results["pretrained"]["test"][metric],
         "random": results["random"]["test"][metric]}
  out["margin"] = out["pretrained"] - out["random"]
  return out
