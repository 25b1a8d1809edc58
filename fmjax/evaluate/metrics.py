"""Downstream metrics as additive sufficient statistics.

Every metric here is computed in two steps:
  1. per batch, on device, a small dict of *counts* (`multilabel_batch_stats`,
     `segmentation_batch_stats`) - summing them over batches, devices and hosts is exact, so a
     jitted step over a global (sharded) batch already returns global counts;
  2. once, on host, the final numbers from the summed counts (`multilabel_metrics`,
     `segmentation_metrics`).

Average precision uses per-class score *histograms* (positives and negatives per score bin,
`ap_bins` bins on [0, 1]) rather than stored scores: the state stays O(classes x bins) whatever the
dataset size and merges by addition across hosts. Scores falling in one bin are treated as tied,
exactly like scikit-learn treats equal scores, so AP equals sklearn's exactly when scores are
multiples of 1/ap_bins and is within ~1/ap_bins otherwise (default 1000 bins -> error < 1e-3).

Conventions (chosen to match the official SpectralEarth numbers and scikit-learn):
  * multi-label predictions are `sigmoid(logit) >= 0.5`;
  * F1 macro averages per-class F1 with zero_division=0 (sklearn's default behaviour);
    `absent='ignore'` instead averages only classes with >= 1 positive label or prediction;
  * AP macro with `absent='zero'` counts classes without positives as AP 0 (sklearn); the default
    `absent='ignore'` averages over classes that have positives (an absent class has no AP);
  * segmentation `iou` is the official pooled (micro) Jaccard sum(TP) / sum(TP + FP + FN);
    `miou` is the mean of per-class IoU over classes present in labels or predictions;
    pixels whose label equals `ignore_index` count nowhere.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

Stats = dict[str, np.ndarray]


# ----------------------------------------------------------------------------- multi-label

def multilabel_batch_stats(logits: jax.Array, targets: jax.Array, ap_bins: int = 1000,
                           valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """Counts for one batch. logits, targets: [B, K] (targets 0/1); valid: optional [B] mask.

  Returns tp/fp/fn/tn [K], exact [] (samples with all K labels right), count [],
  pos_hist/neg_hist [K, ap_bins] (score histograms of positive / negative labels).
  """
  logits = logits.astype(jnp.float32)
  targets = targets.astype(jnp.int32)
  weight = jnp.ones(logits.shape[:1], jnp.int32) if valid is None else valid.astype(jnp.int32)
  scores = jax.nn.sigmoid(logits)
  pred = (scores >= 0.5).astype(jnp.int32)
  w = weight[:, None]
  stats = {
      "tp": jnp.sum(w * pred * targets, 0),
      "fp": jnp.sum(w * pred * (1 - targets), 0),
      "fn": jnp.sum(w * (1 - pred) * targets, 0),
      "tn": jnp.sum(w * (1 - pred) * (1 - targets), 0),
      "exact": jnp.sum(weight * jnp.all(pred == targets, axis=1)),
      "count": jnp.sum(weight),
  }
  # Bin b holds scores in [b/bins, (b+1)/bins); score 1.0 goes to the last bin.
  bins = jnp.clip(jnp.floor(scores * ap_bins).astype(jnp.int32), 0, ap_bins - 1)
  num_classes = logits.shape[1]
  flat = (jnp.arange(num_classes)[None, :] * ap_bins + bins).reshape(-1)
  pos_w = (w * targets).reshape(-1)
  neg_w = (w * (1 - targets)).reshape(-1)
  size = num_classes * ap_bins
  stats["pos_hist"] = jnp.zeros(size, jnp.int32).at[flat].add(pos_w).reshape(num_classes, ap_bins)
  stats["neg_hist"] = jnp.zeros(size, jnp.int32).at[flat].add(neg_w).reshape(num_classes, ap_bins)
  return stats


def _ap_from_hist(pos: np.ndarray, neg: np.ndarray) -> float:
  """sklearn's step-wise AP = sum_n (R_n - R_{n-1}) P_n over descending score thresholds."""
  pos = pos[::-1].astype(np.float64)
  neg = neg[::-1].astype(np.float64)
  total_pos = pos.sum()
  if total_pos == 0:
    return float("nan")
  keep = (pos + neg) > 0   # empty bins are no threshold at all
  tp = np.cumsum(pos)[keep]
  fp = np.cumsum(neg)[keep]
  precision = tp / (tp + fp)
  recall = tp / total_pos
  return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def _safe_ratio(num, den):
  num = np.asarray(num, np.float64)
  den = np.asarray(den, np.float64)
  return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def multilabel_metrics(stats: Mapping[str, np.ndarray], absent: str = "ignore") -> dict[str, float | list]:
  """F1 micro/macro, AP (mAP) micro/macro, accuracies at 0.5, per-class F1 and AP (in %-free units).

  absent: 'ignore' (average only classes that occur) or 'zero' (they count as 0, as sklearn does).
  """
  if absent not in ("ignore", "zero"):
    raise ValueError(f"absent={absent!r}; valid choices: 'ignore', 'zero'")
  s = {k: np.asarray(v, np.int64) for k, v in stats.items()}
  tp, fp, fn, tn = s["tp"], s["fp"], s["fn"], s["tn"]
  f1_per_class = _safe_ratio(2 * tp, 2 * tp + fp + fn)
  ap_per_class = np.array([_ap_from_hist(p, n) for p, n in zip(s["pos_hist"], s["neg_hist"])])
  has_pos = (tp + fn) > 0
  if absent == "ignore":
    f1_classes = (tp + fp + fn) > 0
    f1_macro = float(f1_per_class[f1_classes].mean()) if f1_classes.any() else 0.0
    ap_macro = float(ap_per_class[has_pos].mean()) if has_pos.any() else float("nan")
  else:
    f1_macro = float(f1_per_class.mean())
    ap_macro = float(np.nan_to_num(ap_per_class, nan=0.0).mean())
  return {
      "f1_micro": float(_safe_ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())),
      "f1_macro": f1_macro,
      "ap_micro": _ap_from_hist(s["pos_hist"].sum(0), s["neg_hist"].sum(0)),
      "ap_macro": ap_macro,
      "subset_accuracy": float(_safe_ratio(s["exact"], s["count"])),
      "label_accuracy": float(_safe_ratio(tp.sum() + tn.sum(), tp.sum() + tn.sum() + fp.sum() + fn.sum())),
      "count": int(s["count"]),
      "f1_per_class": f1_per_class.tolist(),
      "ap_per_class": [None if np.isnan(a) else float(a) for a in ap_per_class],
  }


# ---------------------------------------------------------------------------- segmentation

def segmentation_batch_stats(logits: jax.Array, labels: jax.Array, num_classes: int,
                             ignore_index: int | None = None) -> dict[str, jax.Array]:
  """Confusion matrix [K, K] (rows: true class, columns: predicted) of one batch.

  logits: [B, H, W, K]; labels: [B, H, W] ints. Labels equal to `ignore_index` (or outside
  [0, K), e.g. a padded batch marked with the ignore value) are not counted.
  """
  pred = jnp.argmax(logits, axis=-1)
  return {"confusion": confusion_from_labels(pred, labels, num_classes, ignore_index)}


def confusion_from_labels(pred: jax.Array, labels: jax.Array, num_classes: int,
                          ignore_index: int | None = None) -> jax.Array:
  labels = labels.astype(jnp.int32).reshape(-1)
  pred = pred.astype(jnp.int32).reshape(-1)
  valid = (labels >= 0) & (labels < num_classes)
  if ignore_index is not None:
    valid &= labels != ignore_index
  index = jnp.where(valid, labels * num_classes + pred, 0)
  counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index].add(valid.astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def segmentation_metrics(stats: Mapping[str, np.ndarray]) -> dict[str, float | list]:
  """Pooled IoU (official), per-class IoU, mean IoU, pixel accuracy, mean class accuracy."""
  confusion = np.asarray(stats["confusion"], np.int64)
  tp = np.diag(confusion)
  fp = confusion.sum(0) - tp
  fn = confusion.sum(1) - tp
  union = tp + fp + fn
  iou = _safe_ratio(tp, union)
  present = union > 0
  recall = _safe_ratio(tp, tp + fn)
  has_label = (tp + fn) > 0
  total = confusion.sum()
  return {
      "iou": float(_safe_ratio(tp.sum(), union.sum())),
      "miou": float(iou[present].mean()) if present.any() else 0.0,
      "pixel_accuracy": float(_safe_ratio(tp.sum(), total)),
      "mean_class_accuracy": float(recall[has_label].mean()) if has_label.any() else 0.0,
      "count": int(total),
      "iou_per_class": [float(v) if p else None for v, p in zip(iou, present)],
  }


# ---------------------------------------------------------------------------- accumulation

def zeros_like_stats(stats: Mapping[str, jax.Array]) -> Stats:
  return {k: np.zeros(np.shape(v), np.int64) for k, v in stats.items()}


def merge(a: Mapping[str, np.ndarray] | None, b: Mapping[str, np.ndarray]) -> Stats:
  """a + b, key-wise (a may be None: the empty accumulator). Host-side int64, no overflow."""
  b = {k: np.asarray(jax.device_get(v), np.int64) for k, v in b.items()}
  if a is None:
    return b
  if set(a) != set(b):
    raise ValueError(f"cannot merge statistics with keys {sorted(a)} and {sorted(b)}")
  return {k: a[k] + b[k] for k in a}


def sum_across_hosts(stats: Mapping[str, np.ndarray]) -> Stats:
  """Sums host-local statistics over all processes (a no-op on one host).

  Only needed for statistics accumulated from host-local data; statistics computed by a jitted
  function over global arrays are global already.
  """
  stats = {k: np.asarray(v, np.int64) for k, v in stats.items()}
  if jax.process_count() == 1:
    return stats
  from jax.experimental import multihost_utils
  gathered = multihost_utils.process_allgather(stats)  # leading axis: process
  return {k: np.asarray(v, np.int64).sum(0) for k, v in gathered.items()}


def compute(task_type: str, stats: Mapping[str, np.ndarray], **kwargs) -> dict:
  if task_type == "multilabel":
    return multilabel_metrics(stats, **kwargs)
  if task_type == "segmentation":
    return segmentation_metrics(stats)
  raise ValueError(f"task type {task_type!r}; valid choices: 'multilabel', 'segmentation'")


# The number model selection looks at, per task type (higher is better).
MAIN_METRIC = {"multilabel": "f1_micro", "segmentation": "iou"}
