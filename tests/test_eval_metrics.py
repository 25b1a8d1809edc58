"""Metrics against scikit-learn and hand-computed examples."""
import numpy as np
import pytest
from sklearn import metrics as skm

from fmjax.evaluate import metrics as M


def _logit(p):
  p = np.clip(p, 1e-7, 1 - 1e-7)
  return np.log(p / (1 - p)).astype(np.float32)


def _multilabel_case(seed=0, n=64, k=7, bins=100):
  rng = np.random.default_rng(seed)
  targets = (rng.random((n, k)) < 0.3).astype(np.int32)
  targets[:, 5] = 0                          # class 5 never occurs
  # Scores at bin centres: histogram AP is then exactly sklearn's (ties included).
  # (integer bin + shift computed in integers so equal bins give bit-equal float scores)
  index = rng.integers(0, bins, (n, k))
  index = np.where(targets == 1, np.minimum(index + bins // 5, bins - 1), index)
  scores = (index + 0.5) / bins
  return targets, scores, bins


def test_multilabel_matches_sklearn():
  targets, scores, bins = _multilabel_case()
  stats = M.merge(None, M.multilabel_batch_stats(_logit(scores), targets, ap_bins=bins))
  preds = scores >= 0.5
  zero = M.multilabel_metrics(stats, absent="zero")
  assert zero["f1_micro"] == pytest.approx(skm.f1_score(targets, preds, average="micro", zero_division=0))
  assert zero["f1_macro"] == pytest.approx(skm.f1_score(targets, preds, average="macro", zero_division=0))
  assert zero["subset_accuracy"] == pytest.approx(skm.accuracy_score(targets, preds))
  assert zero["label_accuracy"] == pytest.approx((preds == targets).mean())
  with pytest.warns(UserWarning):  # sklearn warns about the class without positives
    sk_ap_macro = skm.average_precision_score(targets, scores, average="macro")
  assert zero["ap_macro"] == pytest.approx(sk_ap_macro, abs=1e-12)
  assert zero["ap_micro"] == pytest.approx(skm.average_precision_score(targets, scores, average="micro"), abs=1e-12)
  # 'ignore': the absent class drops out of both macro averages.
  ignore = M.multilabel_metrics(stats)
  present = [c for c in range(targets.shape[1]) if targets[:, c].any()]
  assert ignore["ap_macro"] == pytest.approx(
      skm.average_precision_score(targets[:, present], scores[:, present], average="macro"), abs=1e-12)
  f1_present = [c for c in range(targets.shape[1]) if targets[:, c].any() or preds[:, c].any()]
  assert ignore["f1_macro"] == pytest.approx(
      skm.f1_score(targets[:, f1_present], preds[:, f1_present], average="macro", zero_division=0))
  assert ignore["ap_per_class"][5] is None


def test_multilabel_ap_continuous_scores_close_to_sklearn():
  rng = np.random.default_rng(1)
  targets = (rng.random((500, 4)) < 0.4).astype(np.int32)
  scores = np.clip(rng.normal(0.4 + 0.2 * targets, 0.2), 0, 1)
  stats = M.merge(None, M.multilabel_batch_stats(_logit(scores), targets, ap_bins=1000))
  out = M.multilabel_metrics(stats)
  assert out["ap_macro"] == pytest.approx(skm.average_precision_score(targets, scores, average="macro"), abs=2e-3)


def test_multilabel_hand_example():
  # 2 samples, 2 classes. Preds: [1,0],[1,1]; targets [1,0],[0,1] -> tp=(1,1), fp=(1,0), fn=(0,0).
  logits = np.array([[3.0, -3.0], [3.0, 3.0]], np.float32)
  targets = np.array([[1, 0], [0, 1]])
  out = M.multilabel_metrics(M.merge(None, M.multilabel_batch_stats(logits, targets, ap_bins=10)))
  assert out["f1_micro"] == pytest.approx(2 * 2 / (2 * 2 + 1))
  assert out["f1_per_class"] == pytest.approx([2 / 3, 1.0])
  assert out["subset_accuracy"] == pytest.approx(0.5)


def test_accumulation_over_batches_and_simulated_hosts():
  targets, scores, bins = _multilabel_case(seed=3, n=96)
  whole = M.merge(None, M.multilabel_batch_stats(_logit(scores), targets, ap_bins=bins))
  # 3 "hosts", each accumulating 2 batches, then summed (what sum_across_hosts does).
  host_stats = []
  for host in range(3):
    acc = None
    for b in range(2):
      sl = slice(host * 32 + b * 16, host * 32 + (b + 1) * 16)
      acc = M.merge(acc, M.multilabel_batch_stats(_logit(scores[sl]), targets[sl], ap_bins=bins))
    host_stats.append(acc)
  summed = {k: np.stack([h[k] for h in host_stats]).sum(0) for k in whole}
  for k in whole:
    np.testing.assert_array_equal(summed[k], whole[k])
  assert M.sum_across_hosts(summed)["tp"].tolist() == whole["tp"].tolist()  # one process: identity


def test_padded_samples_do_not_count():
  targets, scores, bins = _multilabel_case(n=10)
  valid = np.array([1] * 7 + [0] * 3)
  a = M.multilabel_batch_stats(_logit(scores), targets, ap_bins=bins, valid=valid)
  b = M.multilabel_batch_stats(_logit(scores[:7]), targets[:7], ap_bins=bins)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def test_segmentation_matches_sklearn_with_ignore_index():
  rng = np.random.default_rng(0)
  k, ignore = 5, 5
  labels = rng.integers(0, k + 1, (4, 16, 16))          # value 5 = background, ignored
  labels[labels == 3] = 2                               # class 3 absent from labels...
  logits = rng.normal(size=(4, 16, 16, k)).astype(np.float32)
  logits[..., 3] -= 100.0                               # ...and never predicted
  logits[..., 4] -= 100.0
  logits[labels == 4, 4] += 200.0                       # class 4 always right
  stats = M.merge(None, M.segmentation_batch_stats(logits, labels, k, ignore_index=ignore))
  out = M.segmentation_metrics(stats)
  keep = labels.reshape(-1) != ignore
  y, p = labels.reshape(-1)[keep], logits.argmax(-1).reshape(-1)[keep]
  np.testing.assert_array_equal(stats["confusion"], skm.confusion_matrix(y, p, labels=list(range(k))))
  assert out["pixel_accuracy"] == pytest.approx(skm.accuracy_score(y, p))
  assert out["iou"] == pytest.approx(skm.jaccard_score(y, p, average="micro"))
  per_class = skm.jaccard_score(y, p, average=None, labels=[0, 1, 2, 4])
  assert out["iou_per_class"][3] is None
  assert out["iou_per_class"][4] == pytest.approx(1.0)
  assert out["miou"] == pytest.approx(per_class.mean())
  assert out["count"] == keep.sum()


def test_segmentation_hand_example():
  labels = np.array([[[0, 0, 1, 9]]])                  # 9: ignore
  pred_onehot = np.eye(2, dtype=np.float32)[np.array([[[0, 1, 1, 0]]])]
  out = M.segmentation_metrics(M.merge(None, M.segmentation_batch_stats(pred_onehot, labels, 2, ignore_index=9)))
  # class 0: tp 1, fn 1, fp 0 -> 1/2; class 1: tp 1, fp 1 -> 1/2; pooled 2 / 4.
  assert out["iou_per_class"] == pytest.approx([0.5, 0.5])
  assert out["iou"] == pytest.approx(0.5)
  assert out["pixel_accuracy"] == pytest.approx(2 / 3)


def test_bad_choices_are_named():
  with pytest.raises(ValueError, match="valid choices"):
    M.compute("regression", {})
  with pytest.raises(ValueError, match="'ignore', 'zero'"):
    M.multilabel_metrics({}, absent="nan")
