"""Multi-label AP: fmjax's on-device score histograms vs scikit-learn on stored scores.

  python benchmarks/eval_metrics.py [--samples 20000] [--classes 19] [--bins 1000] [--batch 256]

Prints, side by side for one run: time to accumulate the statistics batch by batch and to finish
the metric, the memory the state needs, and how far macro/micro AP are from sklearn's.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from fmjax.evaluate import metrics as M  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--samples", type=int, default=20000)
  p.add_argument("--classes", type=int, default=19)
  p.add_argument("--bins", type=int, default=1000)
  p.add_argument("--batch", type=int, default=256)
  a = p.parse_args()
  rng = np.random.default_rng(0)
  targets = (rng.random((a.samples, a.classes)) < 0.25).astype(np.int32)
  logits = rng.normal(1.5 * targets - 0.8, 1.0).astype(np.float32)
  scores = 1 / (1 + np.exp(-logits))

  step = jax.jit(lambda l, t: M.multilabel_batch_stats(l, t, a.bins))
  jax.block_until_ready(step(logits[:a.batch], targets[:a.batch]))  # compile outside the timing
  start = time.perf_counter()
  total = None
  n_full = a.samples - a.samples % a.batch
  for i in range(0, n_full, a.batch):
    total = M.merge(total, step(logits[i:i + a.batch], targets[i:i + a.batch]))
  ours = M.multilabel_metrics(total)
  t_ours = time.perf_counter() - start
  state_bytes = sum(v.nbytes for v in total.values())

  start = time.perf_counter()
  kept_scores, kept_targets = [], []
  for i in range(0, n_full, a.batch):  # what a stored-scores metric has to keep
    kept_scores.append(scores[i:i + a.batch])
    kept_targets.append(targets[i:i + a.batch])
  s, t = np.concatenate(kept_scores), np.concatenate(kept_targets)
  sk_macro = skm.average_precision_score(t, s, average="macro")
  sk_micro = skm.average_precision_score(t, s, average="micro")
  t_sk = time.perf_counter() - start
  stored_bytes = s.nbytes + t.nbytes

  print(f"{n_full} samples x {a.classes} classes, batch {a.batch}, {a.bins} bins")
  print(f"{'':24s}{'fmjax histograms':>18s}{'sklearn stored':>18s}{'ratio':>8s}")
  print(f"{'time (s)':24s}{t_ours:18.3f}{t_sk:18.3f}{t_ours / t_sk:8.2f}")
  print(f"{'state (MB)':24s}{state_bytes / 1e6:18.2f}{stored_bytes / 1e6:18.2f}{state_bytes / stored_bytes:8.2f}")
  print(f"{'AP macro':24s}{ours['ap_macro']:18.5f}{sk_macro:18.5f}  |diff| {abs(ours['ap_macro'] - sk_macro):.1e}")
  print(f"{'AP micro':24s}{ours['ap_micro']:18.5f}{sk_micro:18.5f}  |diff| {abs(ours['ap_micro'] - sk_micro):.1e}")


if __name__ == "__main__":
  main()
