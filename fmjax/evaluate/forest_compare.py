"""Forest monitoring on Sentinel-2: tree-cover segmentation / density regression, and the stem comparison.

Training (config task 'forest', configs/s2/forest_*.py):
  python -m fmjax.main --config=configs/s2/forest_unet_resnet18.py:dataset=DIR --workdir=runs/forest_rn18
Stem comparison (the standard ResNet stem vs the detail-preserving one, same data, seed and init):
  python -m fmjax.evaluate.forest_compare --data DIR --out OUT [--model resnet18] [--epochs 20]
      [--batch-size 8] [--loss ce|boundary_ce] [--crop 0] [--tolerance 2]
  -> OUT/compare.png (RGB | truth | standard stem | detail stem, per test sample), OUT/compare.json
     (accuracy, tree IoU, mean IoU and boundary F1 of both), OUT/{standard,detail}/results.json.

The dataset is what `python -m data_prep.forest` writes (downstream.json, 'mask' 0/1/255, optional
'density' in percent). Models: a ResNet-18/50 (optionally `detail_stem`: stride-1 stem, no max-pool,
stride 2 in the first stage) with the UNet decoder of fmjax.models.heads, or a ViT with the token
SegmentationHead. Targets: 'mask' (2-class logits; loss 'ce' or 'boundary_ce', which weights pixels
on a tree/non-tree edge by `boundary_weight`, fmjax.evaluate.protocols.boundary_weights) or
'density' (one sigmoid output regressed on density/100 with MSE; metrics MAE/RMSE in percent plus the
IoU of density >= 50% against the mask). Protocols: 'finetune' (all parameters) or 'frozen' (head
only, backbone in eval mode). Best epoch on val, reported on test.
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from tqdm import tqdm

from fmjax import parallel
from fmjax.data import sources
from fmjax.evaluate import data as data_lib
from fmjax.evaluate import metrics as metrics_lib
from fmjax.evaluate import protocols as P
from fmjax.models.heads import SegmentationHead, UNetDecoder

TARGETS = ("mask", "density")
LOSSES = ("ce", "boundary_ce")
FOREST_PROTOCOLS = ("finetune", "frozen")
NORMS = ("dataset", "scale10000")
RGB = (3, 2, 1)  # B4, B3, B2 in the Sentinel-2 band order of fmjax.data.sensors


def forest_config(model: str = "resnet18", detail_stem: bool = False, target: str = "mask", loss: str = "ce",
                  arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of one forest run; `arg` 'key=value,...' overrides top-level keys."""
  c = ml_collections.ConfigDict()
  c.task = "forest"
  c.dataset = "data/downstream/forest"   # written by python -m data_prep.forest
  c.init_from = ""                       # pretraining workdir / checkpoint; '' = random init
  c.model = ml_collections.ConfigDict({"name": model})
  if "vit" in model:
    c.model.update(patch_size=16, use_adapter=False)
  else:
    c.model.detail_stem = detail_stem
  c.target = target                      # 'mask' | 'density'
  c.loss = loss                          # mask: 'ce' | 'boundary_ce'; density: always MSE
  c.boundary_weight = 5.0
  c.protocol = "finetune"                # 'finetune' | 'frozen'
  c.norm = "dataset"                     # 'dataset' (downstream.json mean/std) | 'scale10000' (/10000, clip 0-1)
  c.crop_size = 256 if "vit" in model else 0  # random crop in training, centre crop in eval; 0: full patch
  c.epochs = 50
  c.batch_size = 16
  c.lr = 1e-3
  c.weight_decay = 0.01
  c.seed = 0
  c.num_devices = 0                      # 0: all devices
  c.num_examples = 4                     # test samples drawn into predictions.png
  c.tolerance = 2                        # boundary F1 tolerance in pixels
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in c:
      raise ValueError(f"forest config has no key {key!r}; valid keys: {sorted(c)}")
    c[key] = type(c[key])(value) if not isinstance(c[key], bool) else value.lower() in ("1", "true", "yes")
  return c


class ForestModel(nn.Module):
  """backbone + head: 'features' -> UNetDecoder, 'tokens' -> SegmentationHead; logits at input size."""
  backbone: nn.Module
  out_channels: int
  patch_size: int = 16

  @nn.compact
  def __call__(self, x, *, train: bool, backbone_train: bool):
    outputs = self.backbone(x, train=backbone_train)
    if "features" in outputs:
      y = UNetDecoder(self.out_channels, name="head")(outputs["features"], train=train, output_size=x.shape[1:3])
    else:
      y = SegmentationHead(self.out_channels, patch_size=self.patch_size, name="head")(outputs["tokens"], train=train)
    return y.astype(jnp.float32)


# ------------------------------------------------------------------------------------------ data

class ForestData:
  """One split, decoded on demand: batch(indices) -> {'image', 'label', 'density', 'valid'}."""

  def __init__(self, directory: str, split: str, mean: np.ndarray, std: np.ndarray, clip: bool, crop: int):
    self.source = sources.open_split(directory, split)
    self.split, self.mean, self.std, self.clip, self.crop = split, mean, std, clip, crop

  def __len__(self):
    return len(self.source)

  def sample(self, index: int, rng: np.random.Generator | None = None):
    record = self.source.decode(int(index))
    pixels, mask = record.pixels[0], record.arrays["mask"]
    density = record.arrays.get("density")
    h, w = mask.shape
    if self.crop and self.crop < h:
      top, left = ((int(rng.integers(0, h - self.crop + 1)), int(rng.integers(0, w - self.crop + 1)))
                   if rng is not None else ((h - self.crop) // 2, (w - self.crop) // 2))
      box = (slice(top, top + self.crop), slice(left, left + self.crop))
      pixels, mask = pixels[box], mask[box]
      density = None if density is None else density[box]
    image = (pixels.astype(np.float32) - self.mean) / self.std
    if self.clip:
      image = np.clip(image, 0.0, 1.0)
    image[(pixels == record.nodata).all(-1)] = 0.0
    if rng is not None and rng.random() < 0.5:   # flips keep the mask aligned
      image, mask = image[:, ::-1], mask[:, ::-1]
      density = None if density is None else density[:, ::-1]
    out = {"image": image, "label": mask.astype(np.int32)}
    out["density"] = (np.zeros(mask.shape, np.float32) if density is None else density.astype(np.float32) / 100.0)
    return out

  def batch(self, positions, rng=None):
    items = [self.sample(max(int(p), 0), rng) for p in positions]
    out = {k: np.stack([i[k] for i in items]) for k in items[0]}
    out["valid"] = (np.asarray(positions) >= 0).astype(np.int32)
    return out


def normalisation(config, info: data_lib.TaskInfo) -> tuple[np.ndarray, np.ndarray, bool]:
  if config.norm not in NORMS:
    raise ValueError(f"norm {config.norm!r}; valid choices: {NORMS}")
  if config.norm == "scale10000":
    return np.zeros(info.num_bands, np.float32), np.full(info.num_bands, 1e4, np.float32), True
  return info.band_mean, info.band_std, False


# ------------------------------------------------------------------------------------------ losses / metrics

def forest_loss(config, logits, batch):
  if config.target == "density":
    ok = ((batch["label"] == 0) | (batch["label"] == 1)).astype(jnp.float32) * batch["valid"][:, None, None]
    err = jnp.square(jax.nn.sigmoid(logits[..., 0]) - batch["density"])
    return jnp.sum(err * ok) / jnp.maximum(ok.sum(), 1.0)
  return P.task_loss(config.loss, logits, batch, 2, 255, config.boundary_weight)


def boundary(labels: np.ndarray) -> np.ndarray:
  """[..., H, W] bool: pixels with a differently-labelled 4-neighbour (edges of the image excluded)."""
  edge = np.zeros(labels.shape, bool)
  edge[..., 1:, :] |= labels[..., 1:, :] != labels[..., :-1, :]
  edge[..., :-1, :] |= labels[..., :-1, :] != labels[..., 1:, :]
  edge[..., :, 1:] |= labels[..., :, 1:] != labels[..., :, :-1]
  edge[..., :, :-1] |= labels[..., :, :-1] != labels[..., :, 1:]
  return edge


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
  """Binary dilation of [..., H, W] with a (2r+1)^2 square (Chebyshev distance <= r)."""
  out = mask.copy()
  h, w = mask.shape[-2:]
  for dy in range(-radius, radius + 1):
    for dx in range(-radius, radius + 1):
      src = mask[..., max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
      out[..., max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)] |= src
  return out


def boundary_counts(pred: np.ndarray, labels: np.ndarray, tolerance: int, ignore: int = 255) -> np.ndarray:
  """[matched predicted edge px, predicted edge px, matched true edge px, true edge px] (summable)."""
  known = labels != ignore
  # Edges between a labelled and an unlabelled pixel are not tree boundaries: drop pixels next to unlabelled ones.
  inside = known & ~dilate(~known, 1)
  true_edge = boundary(np.where(known, labels, 0)) & inside
  pred_edge = boundary(pred) & inside
  return np.array([(pred_edge & dilate(true_edge, tolerance)).sum(), pred_edge.sum(),
                   (true_edge & dilate(pred_edge, tolerance)).sum(), true_edge.sum()], np.int64)


def boundary_f1(counts: np.ndarray) -> dict[str, float]:
  precision = counts[0] / max(counts[1], 1)
  recall = counts[2] / max(counts[3], 1)
  return {"boundary_precision": float(precision), "boundary_recall": float(recall),
          "boundary_f1": float(2 * precision * recall / max(precision + recall, 1e-12))}


def predicted_classes(config, logits: np.ndarray) -> np.ndarray:
  return (logits[..., 0] >= 0).astype(np.int32) if config.target == "density" else logits.argmax(-1)


# ------------------------------------------------------------------------------------------ the run

class ForestRun:
  def __init__(self, config, backbone: nn.Module, mesh, backbone_variables=None):
    if config.target not in TARGETS:
      raise ValueError(f"target {config.target!r}; valid choices: {TARGETS}")
    if config.target == "mask" and config.loss not in LOSSES:
      raise ValueError(f"loss {config.loss!r}; valid choices for target 'mask': {LOSSES}")
    if config.protocol not in FOREST_PROTOCOLS:
      raise ValueError(f"protocol {config.protocol!r}; valid choices: {FOREST_PROTOCOLS}")
    self.config, self.mesh, self.backbone_variables = config, mesh, backbone_variables
    out = 1 if config.target == "density" else 2
    self.model = ForestModel(backbone, out, patch_size=int(getattr(backbone, "patch_size", 16) or 16))
    self.backbone_train = config.protocol == "finetune"

  def init(self, example):
    rng = jax.random.PRNGKey(self.config.seed)
    variables = jax.jit(lambda r, x: self.model.init(r, x, train=False, backbone_train=False))(rng, example)
    variables = jax.tree.map(np.asarray, jax.device_get(dict(nn.meta.unbox(variables))))
    for collection, tree in (self.backbone_variables or {}).items():
      if collection in variables:
        variables[collection] = {**variables[collection], "backbone": jax.tree.map(np.asarray, tree)}
    return variables

  def _shard(self, batch):
    return {k: jax.make_array_from_process_local_data(parallel.batch_sharding(self.mesh, np.ndim(v)), v)
            for k, v in batch.items()}

  def train(self, variables, train_data: ForestData, val_data: ForestData):
    cfg, model, backbone_train = self.config, self.model, self.backbone_train
    if cfg.batch_size % parallel.data_parallel_size(self.mesh):
      raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {parallel.data_parallel_size(self.mesh)} devices")
    steps = max(1, len(train_data) // cfg.batch_size) * cfg.epochs
    adamw = optax.adamw(optax.cosine_decay_schedule(cfg.lr, steps), weight_decay=cfg.weight_decay)
    labels = {k: ("train" if k == "head" or cfg.protocol == "finetune" else "frozen") for k in variables["params"]}
    tx = optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)
    params = jax.device_put(variables["params"], parallel.replicated(self.mesh))
    stats = jax.device_put(variables.get("batch_stats", {}), parallel.replicated(self.mesh))
    opt_state = jax.jit(tx.init)(params)

    @jax.jit
    def step(params, stats, opt_state, batch):
      def loss_fn(p):
        logits, new = model.apply({"params": p, "batch_stats": stats}, batch["image"], train=True,
                                  backbone_train=backbone_train, mutable=["batch_stats"])
        return forest_loss(cfg, logits, batch), new["batch_stats"]
      (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), new_stats, opt_state, loss

    rng = np.random.default_rng(cfg.seed)
    best, history = {"score": -np.inf, "epoch": -1}, []
    for epoch in tqdm(range(cfg.epochs), desc=f"forest {cfg.model.name}", unit="epoch"):
      losses = []
      for positions in data_lib.epoch_batches(len(train_data), cfg.batch_size, rng, drop_last=True):
        batch = self._shard(train_data.batch(data_lib.host_slice(positions), rng))
        params, stats, opt_state, loss = step(params, stats, opt_state, batch)
        losses.append(loss)
      current = {"params": params, "batch_stats": stats}
      val = self.evaluate(current, val_data)
      score = val["mae_percent"] * -1 if cfg.target == "density" else val["tree_iou"]
      history.append({"epoch": epoch, "train_loss": float(np.mean(jax.device_get(losses))), "val": val})
      if score > best["score"]:
        best = {"score": score, "epoch": epoch, "val": val,
                "variables": jax.tree.map(np.asarray, jax.device_get(current))}
    return best, history

  def predict(self, variables, images):
    if getattr(self, "_predict", None) is None:
      self._predict = jax.jit(lambda v, x: self.model.apply(v, x, train=False, backbone_train=False))
    return np.asarray(self._predict(variables, jnp.asarray(images)))

  def evaluate(self, variables, data: ForestData) -> dict:
    """accuracy, tree IoU, mean IoU, boundary F1 (+ density MAE/RMSE) over a split."""
    cfg = self.config
    confusion, edges, abs_err, sq_err, n = np.zeros((2, 2), np.int64), np.zeros(4, np.int64), 0.0, 0.0, 0
    for positions in data_lib.epoch_batches(len(data), cfg.batch_size, None, drop_last=False):
      batch = data.batch(positions)
      logits = self.predict(variables, batch["image"])
      keep = batch["valid"] > 0
      labels, pred = batch["label"][keep], predicted_classes(cfg, logits)[keep]
      confusion += np.asarray(metrics_lib.confusion_from_labels(pred, labels, 2, 255), np.int64)
      edges += boundary_counts(pred, labels, cfg.tolerance)
      if cfg.target == "density":
        ok = labels != 255
        density = 0.5 * (1 + np.tanh(0.5 * logits[keep][..., 0]))   # sigmoid without exp overflow
        err = (density - batch["density"][keep])[ok] * 100
        abs_err, sq_err, n = abs_err + np.abs(err).sum(), sq_err + np.square(err).sum(), n + err.size
    seg = metrics_lib.segmentation_metrics({"confusion": confusion})
    out = {"accuracy": seg["pixel_accuracy"], "tree_iou": seg["iou_per_class"][1] or 0.0, "miou": seg["miou"],
           **boundary_f1(edges)}
    if cfg.target == "density":
      out.update(mae_percent=abs_err / max(n, 1), rmse_percent=float(np.sqrt(sq_err / max(n, 1))))
    return out


def build(config, image_size: int, num_bands: int):
  """(backbone module, loaded backbone variables or None, description) as fmjax.evaluate.run does it."""
  from fmjax.evaluate import run as run_lib
  cfg = ml_collections.ConfigDict({"init_from": config.init_from, "model": config.model.to_dict()})
  return run_lib.resolve_backbone(cfg, image_size, num_bands)


def _rgb(image: np.ndarray) -> np.ndarray:
  rgb = image[..., list(RGB)] if image.shape[-1] > max(RGB) else image[..., :3]
  lo, hi = np.percentile(rgb, 2), np.percentile(rgb, 98)
  return np.clip((rgb - lo) / max(hi - lo, 1e-6), 0, 1)


def save_panels(path: str, images, labels, predictions: dict[str, np.ndarray]):
  """Rows: samples; columns: RGB, truth, then each named prediction (tree = green)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cols = 2 + len(predictions)
  fig, axes = plt.subplots(len(images), cols, figsize=(2.4 * cols, 2.4 * len(images)), squeeze=False)
  for i in range(len(images)):
    panels = [("RGB", _rgb(images[i])), ("truth", np.ma.masked_equal(labels[i], 255))]
    panels += [(name, p[i]) for name, p in predictions.items()]
    for ax, (title, im) in zip(axes[i], panels):
      ax.imshow(im, cmap=None if im.ndim == 3 else "Greens", vmin=0, vmax=1, interpolation="nearest")
      ax.set_title(title, fontsize=8)
      ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def train(config, workdir: str) -> dict:
  """The 'forest' task: trains, selects the best val epoch, evaluates test; writes results.json + predictions.png."""
  os.makedirs(workdir, exist_ok=True)
  info = data_lib.read_task(config.dataset)
  mean, std, clip = normalisation(config, info)
  splits = {s: ForestData(config.dataset, s, mean, std, clip, int(config.crop_size)) for s in ("train", "val", "test")}
  example = splits["train"].sample(0)["image"]
  backbone, loaded, desc = build(config, example.shape[0], info.num_bands)
  devices = jax.devices()[:config.num_devices] if config.num_devices > 0 else None
  mesh = parallel.make_mesh({"data": -1}, devices=devices)
  run = ForestRun(config, backbone, mesh, loaded)
  variables = run.init(jnp.asarray(example[None]))
  best, history = run.train(variables, splits["train"], splits["val"])
  test = run.evaluate(best["variables"], splits["test"])
  results = {"task": "forest", "target": config.target, "loss": config.loss, "protocol": config.protocol,
             "backbone": desc, "init_from": config.init_from or "random", "best_epoch": best["epoch"],
             "val": best["val"], "test": test, "history": history}
  if jax.process_index() == 0:
    P.write_json(os.path.join(workdir, "results.json"), results)
    n = min(config.num_examples, len(splits["test"]))
    if n:
      batch = splits["test"].batch(np.arange(n))
      pred = predicted_classes(config, run.predict(best["variables"], batch["image"]))
      save_panels(os.path.join(workdir, "predictions.png"), batch["image"], batch["label"], {"prediction": pred})
  results["variables"] = best["variables"]
  results["run"] = run
  return results


def compare_stems(data: str, out: str, model: str = "resnet18", **overrides) -> dict:
  """Trains `model` with the standard and the detail-preserving stem on the same data, seed and init."""
  runs = {}
  for label, detail in (("standard", False), ("detail", True)):
    config = forest_config(model, detail_stem=detail)
    config.dataset = data
    config.update(overrides)
    runs[label] = train(config, os.path.join(out, label))
  test = ForestData(data, "test", *normalisation(config, data_lib.read_task(data)), int(config.crop_size))
  n = min(4, len(test))
  batch = test.batch(np.arange(n))
  preds = {f"{label} stem": predicted_classes(r["run"].config, r["run"].predict(r["variables"], batch["image"]))
           for label, r in runs.items()}
  save_panels(os.path.join(out, "compare.png"), batch["image"], batch["label"], preds)
  summary = {label: r["test"] for label, r in runs.items()}
  summary["boundary_f1_gain"] = summary["detail"]["boundary_f1"] - summary["standard"]["boundary_f1"]
  summary["settings"] = {"data": data, "model": model, **overrides}
  P.write_json(os.path.join(out, "compare.json"), summary)
  return summary


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", required=True, help="forest dataset written by python -m data_prep.forest")
  parser.add_argument("--out", required=True)
  parser.add_argument("--model", default="resnet18", choices=("resnet18", "resnet50"))
  parser.add_argument("--epochs", type=int, default=20)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--loss", default="ce", choices=LOSSES)
  parser.add_argument("--crop", type=int, default=0, help="training crop size (0: full patches)")
  parser.add_argument("--tolerance", type=int, default=2, help="boundary F1 tolerance in pixels")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  summary = compare_stems(args.data, args.out, args.model, epochs=args.epochs, batch_size=args.batch_size,
                          lr=args.lr, loss=args.loss, crop_size=args.crop, tolerance=args.tolerance,
                          seed=args.seed, num_devices=1)
  for label in ("standard", "detail"):
    m = summary[label]
    print(f"{label:8s} stem: accuracy {m['accuracy']:.4f}  tree IoU {m['tree_iou']:.4f}  mIoU {m['miou']:.4f}  "
          f"boundary F1 {m['boundary_f1']:.4f}")
  print(f"boundary F1 gain (detail - standard): {summary['boundary_f1_gain']:+.4f} -> {args.out}/compare.png")


if __name__ == "__main__":
  main()
