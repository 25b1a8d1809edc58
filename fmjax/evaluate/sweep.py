"""Label-fraction sweeps: checkpoints x label fractions x seeds -> CSV / JSON / Markdown + PNG.

  python -m fmjax.evaluate.sweep --config=configs/eval/cdl_frozen.py --workdir=/tmp/sweep \
      --checkpoints=random,/ckpt/mae_vit_s,/ckpt/dino_vit_s --fractions=0.01,0.1,1.0 --seeds=0,1,2

Each cell is one `fmjax.evaluate.run.run` in <workdir>/<checkpoint name>/frac<f>_seed<s>/ (a cell
whose results.json exists is reused, so an interrupted sweep resumes). 'random' means a randomly
initialised backbone (config.model must then name it, or the first checkpoint's model is used).
Outputs: sweep.csv (one row per run), sweep.json, sweep.md (mean +- std over seeds of the test
main metric) and sweep.png (metric vs label fraction, one line per checkpoint, log x axis).
"""
from __future__ import annotations

import csv
import json
import os
import re

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from fmjax.evaluate import protocols as P


def define_flags() -> None:
  """Command-line flags, defined only when run as a program: importing this module next to
  fmjax.main (which owns --config/--workdir in the same absl registry) must not clash."""
  config_flags.DEFINE_config_file("config", None, "An evaluation config (configs/eval/*.py).")
  flags.DEFINE_string("workdir", None, "Output directory of the sweep.")
  flags.DEFINE_list("checkpoints", ["random"], "Workdirs / checkpoints, or 'random'.")
  flags.DEFINE_list("fractions", ["0.01", "0.1", "1.0"], "Label fractions of the train split.")
  flags.DEFINE_list("seeds", ["0"], "Seeds (label subset + head init + data order).")


def checkpoint_name(checkpoint: str) -> str:
  if checkpoint == "random":
    return "random"
  parts = [p for p in os.path.normpath(checkpoint).split(os.sep) if p]
  while parts and (parts[-1].isdigit() or parts[-1] == "checkpoints"):
    parts.pop()
  return re.sub(r"[^A-Za-z0-9_.-]", "_", parts[-1] if parts else checkpoint)


def sweep(config, workdir: str, checkpoints, fractions, seeds, run_fn=None) -> list[dict]:
  """Runs (or reuses) every cell; returns one row per run and writes the tables and the plot."""
  from fmjax.evaluate import run as run_lib
  run_fn = run_fn or run_lib.run
  pre_config = None
  rows = []
  for checkpoint in checkpoints:
    name = checkpoint_name(checkpoint)
    for fraction in fractions:
      for seed in seeds:
        cell = os.path.join(workdir, name, f"frac{fraction:g}_seed{seed}")
        path = os.path.join(cell, "results.json")
        if os.path.exists(path):
          with open(path) as f:
            results = json.load(f)
        else:
          c = config.copy_and_resolve_references()
          c.label_fraction, c.seed = float(fraction), int(seed)
          c.init_from = "" if checkpoint == "random" else checkpoint
          if checkpoint == "random" and not c.model.get("name"):
            other = [k for k in checkpoints if k != "random"]
            if not other:
              raise ValueError("checkpoint 'random' needs config.model.name or another checkpoint "
                               "whose architecture to use")
            if pre_config is None:
              pre_config = P.load_init(other[0])[0]
            results = run_fn(c, cell, pre_config=pre_config)
          else:
            results = run_fn(c, cell)
        metric = results["main_metric"]
        rows.append({"checkpoint": name, "path": checkpoint, "fraction": float(fraction), "seed": int(seed),
                     "train_samples": results["train_samples"], "metric": metric,
                     "test": results["test"][metric], "val": results["val"][metric],
                     "best_epoch": results["best_epoch"]})
  write_outputs(rows, workdir)
  return rows


def summarise(rows: list[dict]) -> list[dict]:
  """Mean and sample std over seeds per (checkpoint, fraction)."""
  groups: dict[tuple, list[float]] = {}
  for r in rows:
    groups.setdefault((r["checkpoint"], r["fraction"]), []).append(r["test"])
  out = []
  for (name, fraction), values in groups.items():
    v = np.asarray(values, np.float64)
    out.append({"checkpoint": name, "fraction": fraction, "mean": float(v.mean()),
                "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "runs": len(v)})
  return out


def markdown(rows: list[dict]) -> str:
  summary = summarise(rows)
  metric = rows[0]["metric"] if rows else "metric"
  fractions = sorted({s["fraction"] for s in summary})
  names = list(dict.fromkeys(s["checkpoint"] for s in summary))
  cell = {(s["checkpoint"], s["fraction"]): s for s in summary}
  lines = [f"test {metric} (%), mean ± std over seeds",
           "", "| checkpoint | " + " | ".join(f"{f:g}" for f in fractions) + " |",
           "|---|" + "---|" * len(fractions)]
  for name in names:
    values = []
    for f in fractions:
      s = cell.get((name, f))
      values.append("" if s is None else f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}")
    lines.append(f"| {name} | " + " | ".join(values) + " |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  summary = summarise(rows)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name in dict.fromkeys(s["checkpoint"] for s in summary):
    pts = sorted((s["fraction"], s["mean"], s["std"]) for s in summary if s["checkpoint"] == name)
    f, m, sd = (np.asarray(x) for x in zip(*pts))
    ax.errorbar(f, 100 * m, yerr=100 * sd, marker="o", capsize=3, label=name)
  ax.set_xscale("log")
  ax.set_xlabel("label fraction of the train split")
  ax.set_ylabel(f"test {rows[0]['metric']} (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_outputs(rows: list[dict], workdir: str):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "sweep.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  P.write_json(os.path.join(workdir, "sweep.json"), {"runs": rows, "summary": summarise(rows)})
  with open(os.path.join(workdir, "sweep.md"), "w") as f:
    f.write(markdown(rows))
  plot(rows, os.path.join(workdir, "sweep.png"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  if not f.workdir:
    raise app.UsageError("--workdir is required")
  fractions = [float(x) for x in f.fractions]
  seeds = [int(x) for x in f.seeds]
  rows = sweep(f.config, f.workdir, f.checkpoints, fractions, seeds)
  print(markdown(rows))
  print(f"wrote {f.workdir}/sweep.{{csv,json,md,png}}")


if __name__ == "__main__":
  from fmjax import host_memory
  host_memory.reexec_with_host_allocator()
  define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
