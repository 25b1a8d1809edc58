"""The six train-step rows of benchmarks/RESULTS.md §5 in one sitting, fmjax vs PyTorch eager on this CPU.

  python -m benchmarks.cpu_sitting [--rounds 2] [--rows mae128,moco_vit] [--json sittings.jsonl]
  python -m benchmarks.cpu_sitting --summarise benchmarks/sittings/*.jsonl

Runs `benchmarks.train_step` for each row with the flags RESULTS.md uses (each side in its own fresh
process, alternating rounds), then prints the rows as the markdown table of RESULTS.md §5, headed by
the CPU (family, model, AVX-512 or not) and the commit, because the ratios depend on the CPU. Issue
8's target is every row at >= 1.25x in one sitting; the last line counts the rows that reach it. The
last two columns give, against the measured matmul peak, torch's MFU (the step's FLOPs in torch's
time) and the MFU that the target asks of each row. A record kept with `--json` also has each
process's median step time per side (`fmjax_process_s`, `torch_process_s`, one per round), so a
process that ran slow throughout, as VM processes here sometimes do, shows up as such.
Nothing else should run meanwhile: a row's ratio moves by up to 0.2 between sittings on a busy VM.
A full sitting takes 12-20 minutes on two cores.

`--summarise FILE...` reads sittings kept with `--json` (benchmarks/sittings/ has this project's) and
prints, per CPU, each row's ratio range and median, how many sittings reached the target, the range
of each side's step time, and how many sittings had every row at the target.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET_RATIO = 1.25
# (key, label in RESULTS.md, train_step flags)
ROWS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("mae128", "MAE SpecViT-S/4, 128 px, batch 4, mask 0.9",
     ("--objective", "mae", "--model", "spec_vit_s", "--image-size", "128", "--batch", "4")),
    ("mae32", "MAE SpecViT-S/4, 32 px, batch 8", ("--objective", "mae", "--image-size", "32", "--batch", "8")),
    ("dino_vit", "DINO SpecViT-S/4, two views, 32 px, batch 8",
     ("--objective", "dino", "--image-size", "32", "--batch", "8")),
    ("moco_vit", "MoCo-v2 SpecViT-S/4, 32 px, batch 8", ("--objective", "moco", "--image-size", "32", "--batch", "8")),
    ("moco_resnet", "MoCo-v2 SpecResNet-50, 32 px, batch 4",
     ("--objective", "moco", "--model", "spec_resnet50", "--image-size", "32", "--batch", "4")),
    ("dino_resnet", "DINO SpecResNet-50, 32 px, batch 4",
     ("--objective", "dino", "--model", "spec_resnet50", "--image-size", "32", "--batch", "4")),
)
ROW_KEYS = tuple(key for key, _, _ in ROWS)


def describe_cpu(cpuinfo_path: str = "/proc/cpuinfo") -> str:
  """'AMD EPYC (family 25 model 17, AVX-512), 2 CPUs': what decides the ratios, from /proc/cpuinfo."""
  fields = {}
  try:
    with open(cpuinfo_path) as f:
      for line in f:
        if not line.strip():
          break   # the first processor's block is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  name = fields.get("model name", "unknown CPU")
  isa = "AVX-512" if "avx512f" in fields.get("flags", "").split() else "no AVX-512"
  family = f"family {fields['cpu family']} model {fields['model']}, " if "cpu family" in fields else ""
  return f"{name} ({family}{isa}), {len(os.sched_getaffinity(0))} CPUs"


def describe_commit() -> str:
  """The checkout's short commit, '+changes' when the tree differs from it."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                           capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown commit"
  return head + ("+changes" if dirty else "")


def mfu_for_target(mfu: float, ratio: float, target: float = TARGET_RATIO) -> float:
  """The MFU fmjax's step would need to run `target` times faster than torch's measured step: the
  same FLOPs in torch's time / target. With target 1 it is torch's own MFU on fmjax's FLOP count."""
  return target * mfu / ratio


def table(results: dict[str, dict]) -> str:
  """RESULTS.md §5's markdown table for the rows measured (or failed), in ROWS order. The last two
  columns put the target in the units of the hardware: torch's MFU (the step's FLOPs in torch's
  time) and the MFU that 1.25x torch's time would take."""
  lines = [f"| step (fp32, 202 bands) | fmjax / torch s | ratio | MFU | torch MFU | MFU for {TARGET_RATIO}x |",
           "|---|---|---|---|---|---|"]
  for key, label, _ in ROWS:
    if key in results:
      r = results[key]
      if "error" in r:
        lines.append(f"| {label} | failed: {r['error']} | | | | |")
      else:
        lines.append(f"| {label} | {r['fmjax_s']:.3f} / {r['torch_s']:.3f} | **{r['ratio']:.2f}x** | {r['mfu']:.1%} "
                     f"| {mfu_for_target(r['mfu'], r['ratio'], 1.0):.1%} | {mfu_for_target(r['mfu'], r['ratio']):.1%} |")
  return "\n".join(lines)


def read_sittings(paths) -> list[dict]:
  """The sitting records of `--json` files, in file order (one JSON object per line)."""
  records = []
  for path in paths:
    with open(path) as f:
      records += [json.loads(line) for line in f if line.strip()]
  return records


def summarise_sittings(records: list[dict]) -> str:
  """Per CPU: a markdown table of each row over the sittings (ratio min / median / max, sittings at the
  target, fmjax's and torch's step-time ranges) and the count of sittings with every row at the target.
  A row that failed in a sitting counts as a sitting below the target."""
  by_cpu: dict[str, list[dict]] = {}
  for record in records:
    by_cpu.setdefault(record["cpu"], []).append(record)
  blocks = []
  for cpu, sittings in by_cpu.items():
    dates = sorted(s["date"] for s in sittings)
    lines = [f"{cpu}: {len(sittings)} sittings, {dates[0]} to {dates[-1]}", "",
             f"| step | sittings | ratio min / median / max | at >= {TARGET_RATIO}x | fmjax s | torch s |",
             "|---|---|---|---|---|---|"]
    for key, label, _ in ROWS:
      rows = [s["rows"][key] for s in sittings if key in s["rows"]]
      if not rows:
        continue
      measured = [r for r in rows if "ratio" in r]
      reached = sum(r["ratio"] >= TARGET_RATIO for r in measured)
      if measured:
        ratios = [r["ratio"] for r in measured]
        span = lambda side: f"{min(r[side] for r in measured):.3f}-{max(r[side] for r in measured):.3f}"
        lines.append(f"| {label} | {len(rows)} | {min(ratios):.2f}x / {statistics.median(ratios):.2f}x / "
                     f"{max(ratios):.2f}x | {reached} | {span('fmjax_s')} | {span('torch_s')} |")
      else:
        lines.append(f"| {label} | {len(rows)} | failed in every sitting | 0 | | |")
    complete = [s for s in sittings if set(ROW_KEYS) <= set(s["rows"])]
    every_row = sum(all(s["rows"][k].get("ratio", 0.0) >= TARGET_RATIO for k in ROW_KEYS) for s in complete)
    lines += ["", f"sittings with all {len(ROW_KEYS)} rows at >= {TARGET_RATIO}x torch: {every_row} of "
              f"{len(complete)} complete sittings"]
    blocks.append("\n".join(lines))
  return "\n\n".join(blocks)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rows", default=",".join(ROW_KEYS), help=f"comma-separated subset of {ROW_KEYS}")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=None, help="timed steps per side and round (train_step's default)")
  parser.add_argument("--warmup", type=int, default=None, help="untimed steps per side and round (train_step's default)")
  parser.add_argument("--json", default=None, help="append the sitting as one JSON line to this file")
  parser.add_argument("--summarise", nargs="+", metavar="FILE", default=None,
                      help="summarise sittings kept with --json instead of running one")
  args = parser.parse_args(argv)
  if args.summarise:
    records = read_sittings(args.summarise)
    if not records:
      parser.error(f"no sitting records in {' '.join(args.summarise)}")
    print(summarise_sittings(records))
    return {"sittings": len(records)}
  keys = [k for k in args.rows.split(",") if k]
  unknown = sorted(set(keys) - set(ROW_KEYS))
  if unknown:
    parser.error(f"unknown rows {unknown}; choose from {ROW_KEYS}")

  from benchmarks import train_step
  extra = ["--rounds", str(args.rounds)]
  extra += ["--steps", str(args.steps)] if args.steps is not None else []
  extra += ["--warmup", str(args.warmup)] if args.warmup is not None else []
  cpu, commit, start = describe_cpu(), describe_commit(), time.time()
  print(f"sitting on {cpu}, {commit}: rows {', '.join(keys)}", flush=True)
  results = {}
  for key, label, flags in ROWS:
    if key in keys:
      print(f"=== {key}: {label}", flush=True)
      try:
        summary = train_step.main([*flags, *extra])
      except SystemExit as failure:   # a side's process failed: keep the other rows of the sitting
        results[key] = {"error": str(failure)}
        continue
      results[key] = {k: summary[k] for k in ("fmjax_s", "torch_s", "ratio", "mfu", "flops", "peak")}
      for side in ("fmjax", "torch"):   # each process's median (kept from sitting HH on; older records lack it)
        if summary.get(f"{side}_process_s"):
          results[key][f"{side}_process_s"] = summary[f"{side}_process_s"]
  minutes = (time.time() - start) / 60
  print(f"\n{cpu}, {commit}, `python -m benchmarks.train_step <row> {' '.join(extra)}`, {minutes:.0f} min:\n")
  print(table(results))
  reached = sum("ratio" in r and r["ratio"] >= TARGET_RATIO for r in results.values())
  print(f"\nrows at >= {TARGET_RATIO}x torch (unrounded ratios): {reached} of {len(results)}")
  record = {"cpu": cpu, "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime(start)),
            "flags": extra, "rows": results}
  if args.json:
    with open(args.json, "a") as f:
      f.write(json.dumps(record) + "\n")
  return record


if __name__ == "__main__":
  if "--summarise" not in sys.argv:   # reading records needs no allocator re-exec
    from fmjax import host_memory
    host_memory.reexec_with_host_allocator()
  main()
