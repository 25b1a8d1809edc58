"""Label-fraction sweep: cells, resume, aggregation (mean / sample std), CSV / JSON / MD / PNG."""
import csv
import json
import os

import numpy as np
import pytest

from fmjax.evaluate import sweep, tasks


def _fake_run(calls):
  def run(config, workdir, pre_config=None):
    calls.append((config.init_from, config.label_fraction, config.seed))
    score = 0.5 + 0.3 * config.label_fraction + 0.01 * config.seed + (0.1 if config.init_from else 0.0)
    results = {"main_metric": "iou", "test": {"iou": score}, "val": {"iou": score}, "best_epoch": 0,
               "train_samples": int(100 * config.label_fraction)}
    os.makedirs(workdir, exist_ok=True)
    json.dump(results, open(os.path.join(workdir, "results.json"), "w"))
    return results
  return run


def test_sweep_tables_and_resume(tmp_path):
  config = tasks.eval_config("cdl", "frozen")
  config.model.name = "spec_vit_s"
  calls = []
  rows = sweep.sweep(config, str(tmp_path), ["random", "/ck/mae_run/checkpoints/300"], [0.1, 1.0], [0, 1, 2],
                     run_fn=_fake_run(calls))
  assert len(rows) == len(calls) == 12
  assert {r["checkpoint"] for r in rows} == {"random", "mae_run"}
  summary = {(s["checkpoint"], s["fraction"]): s for s in json.load(open(tmp_path / "sweep.json"))["summary"]}
  expected = np.array([0.5 + 0.3 * 0.1 + 0.01 * s + 0.1 for s in range(3)])
  assert summary[("mae_run", 0.1)]["mean"] == pytest.approx(expected.mean())
  assert summary[("mae_run", 0.1)]["std"] == pytest.approx(expected.std(ddof=1))
  with open(tmp_path / "sweep.csv") as f:
    table = list(csv.DictReader(f))
  assert len(table) == 12 and float(table[0]["test"]) == pytest.approx(rows[0]["test"])
  md = open(tmp_path / "sweep.md").read()
  assert "| mae_run |" in md and f"{100 * expected.mean():.2f} ± {100 * expected.std(ddof=1):.2f}" in md
  assert os.path.getsize(tmp_path / "sweep.png") > 1000
  # Re-running reuses every cell's results.json.
  again = sweep.sweep(config, str(tmp_path), ["random", "/ck/mae_run/checkpoints/300"], [0.1, 1.0], [0, 1, 2],
                      run_fn=_fake_run(calls))
  assert len(calls) == 12 and again == rows


def test_random_without_model_needs_a_checkpoint(tmp_path):
  config = tasks.eval_config("cdl", "frozen")
  with pytest.raises(ValueError, match="config.model.name"):
    sweep.sweep(config, str(tmp_path), ["random"], [1.0], [0], run_fn=_fake_run([]))
