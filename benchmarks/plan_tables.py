"""Scale tables for MAE pretraining: XLA FLOPs per sample, implied throughput, and fmjax.plan memory runs.

  # FLOPs per sample (XLA cost analysis of the real train step) and the throughput they imply:
  python -m benchmarks.plan_tables flops --models b,l,h,g --patches 4,8,16 --json /tmp/flops.json
  # Memory / compile plans, one `python -m fmjax.plan` subprocess at a time, each under `timeout`:
  python -m benchmarks.plan_tables memory --models g --devices 64 --remat full --scan --max-batch --out /tmp/mem
  # Markdown tables from those JSON files:
  python -m benchmarks.plan_tables tables --flops-json /tmp/flops.json --mem-dir /tmp/mem

Small defaults (ViT-B, patch 16, 8 devices) finish on a 2-core CPU in a few minutes.

Why FLOPs come from depth 1 and depth 2 unrolled compiles: XLA's cost analysis counts the body of a
while loop once, whatever its trip count, so a scanned (scan=True) step under-reports the encoder
FLOPs by a factor of `depth` (measured: a 2-block and a 4-block scanned stack report the same FLOPs).
An unrolled stack is exact but compiling a 40-block ViT-g unrolled is slow. The step is linear in
depth (identical blocks, per-parameter optimiser), so F(depth) = F(1) + (depth - 1) * (F(2) - F(1)),
computed from two small exact compiles; `--check-depth` compiles the full unrolled model too.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

# Dense bf16 peak FLOP/s per chip / GPU (vendor datasheets; the same numbers as fmjax/mfu.py).
PEAKS = {"TPU v5p": 459e12, "H100 SXM": 989e12}
MFUS = (0.4, 0.6)
SIZES = ("b", "l", "h", "g")


def _config(size: str, patch: int):
  from configs import common
  c = common.mae_config(size, f"patch={patch}")
  c.model.scan, c.model.remat = False, "none"
  return c


def step_flops(config, batch: int, compiled: bool = True) -> float:
  """XLA FLOPs of one train step of `config` on one device (global batch `batch`): of the compiled
  (optimised) HLO, or of the lowered HLO before optimisation (no compile: seconds instead of minutes)."""
  import jax

  from fmjax import mfu, parallel, plan
  mesh = parallel.make_mesh({"data": 1}, devices=[jax.devices()[0]])
  lowered, _ = plan.lower_step(config, mesh, batch)
  if compiled:
    return mfu.compiled_flops(lowered.compile())
  analysis = lowered.cost_analysis()
  return float((analysis[0] if isinstance(analysis, (list, tuple)) else analysis).get("flops", 0.0))


def extrapolated_flops(config, depth: int, batch: int = 2, compiled: bool = True) -> dict:
  """Per-sample FLOPs of `config`'s unrolled train step at `depth` from depth-1 and depth-2 steps."""
  one, two = config.copy_and_resolve_references(), config.copy_and_resolve_references()
  for c, d in ((one, 1), (two, 2)):
    c.model.depth, c.model.scan = d, False
  f1 = step_flops(one, batch, compiled) / batch
  f2 = step_flops(two, batch, compiled) / batch
  return {"per_block": f2 - f1, "outside_blocks": f1 - (f2 - f1), "per_sample": f1 + (depth - 1) * (f2 - f1)}


def flops_per_sample(size: str, patch: int, batch: int = 2, check_depth: bool = False, compiled: bool = True) -> dict:
  """Per-sample FLOPs of the MAE train step, extrapolated in depth from two exact unrolled compiles."""
  from fmjax.models import VIT_SIZES
  depth = VIT_SIZES[size][1]
  out = {"model": f"vit_{size}", "patch": patch, "depth": depth, "tokens": (128 // patch) ** 2,
         "cost": "compiled" if compiled else "lowered",
         **extrapolated_flops(_config(size, patch), depth, batch, compiled)}
  if check_depth:
    out["per_sample_full_depth"] = step_flops(_config(size, patch), batch, compiled) / batch
  return out


def implied(per_sample: float, peak: float, mfu: float, per_device_batch: int) -> tuple[float, float]:
  """(samples/s per device, step seconds at `per_device_batch`) at a given MFU."""
  rate = mfu * peak / per_sample
  return rate, per_device_batch / rate


def cmd_flops(args) -> list[dict]:
  from tqdm import tqdm
  rows = []
  jobs = [(s, p) for s in args.models.split(",") for p in map(int, args.patches.split(","))]
  for size, patch in tqdm(jobs, desc="FLOPs compiles (depth 1 and 2 per model)"):
    rows.append(flops_per_sample(size, patch, check_depth=args.check_depth, compiled=args.cost == "compiled"))
    tqdm.write(json.dumps(rows[-1]))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  print(flops_markdown(rows, args.per_device_batch))
  return rows


def flops_markdown(rows: list[dict], per_device_batch: int) -> str:
  head = ["model", "patch", "tokens", "GFLOP/sample (fwd+bwd+opt)", "of which blocks"]
  for name in PEAKS:
    for m in MFUS:
      head.append(f"{name} @{int(m * 100)}%: samples/s/dev, step s @B={per_device_batch}")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    blocks = r["per_block"] * r["depth"] / r["per_sample"]
    cells = [r["model"], str(r["patch"]), str(r["tokens"]), f"{r['per_sample'] / 1e9:,.1f}", f"{blocks:.0%}"]
    for peak in PEAKS.values():
      for m in MFUS:
        rate, step = implied(r["per_sample"], peak, m, per_device_batch)
        cells.append(f"{rate:,.0f}, {step:.3f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def cmd_memory(args) -> None:
  """One fmjax.plan subprocess per (model, devices, remat, scan), each under `timeout`; resumable."""
  os.makedirs(args.out, exist_ok=True)
  for size in args.models.split(","):
    for devices in map(int, args.devices.split(",")):
      for remat in args.remat.split(","):
        name = f"{size}{devices}_{remat}_{'scan' if args.scan else 'unrolled'}"
        target = os.path.join(args.out, name + ".json")
        if os.path.exists(target):
          print(f"{name}: already planned ({target})")
          continue
        cmd = [sys.executable, "-m", "fmjax.plan", f"--config=configs/mae_vit_{size}.py", "--devices", str(devices),
               "--mesh", f"data=1,fsdp={devices},tensor=1", "--remat", remat, "--scan" if args.scan else "--noscan",
               "--device-memory", args.device_memory, "--per-device-batch", str(args.per_device_batch),
               "--json", target] + (["--max-batch"] if args.max_batch else [])
        load = os.getloadavg()[0]
        start = time.perf_counter()
        try:
          proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
          status = "ok" if proc.returncode == 0 else f"failed rc={proc.returncode}: {proc.stderr[-2000:]}"
        except subprocess.TimeoutExpired:
          status = f"timeout after {args.timeout} s"
        wall = time.perf_counter() - start
        with open(os.path.join(args.out, name + ".status"), "w") as f:
          json.dump({"status": status, "wall_s": wall, "load_before": load, "load_after": os.getloadavg()[0],
                     "cmd": " ".join(cmd)}, f)
        print(f"{name}: {status.splitlines()[0] if status else status}  ({wall:.0f} s, load {load:.1f})", flush=True)


def _fit(r: dict) -> tuple[float, float]:
  """(fixed, slope) of peak = fixed + slope * batch; when the plan's verification compile did not fit
  (a run without --refine), the secant through the fit's 2nd point and the failed one."""
  m = r["max_batch"]
  fixed, slope = m["fixed_bytes"], m["bytes_per_sample"]
  if m.get("verified") is False and not m.get("tries"):
    b2 = 2 * r["per_device_batch"]
    p2, (b3, p3) = fixed + slope * b2, (m["predicted"], m["peak_at_predicted"])
    slope = (p3 - p2) / (b3 - b2)
    fixed = p2 - slope * b2
  return fixed, slope


def _max_batch(r: dict, memory: float) -> int:
  """Largest per-device batch for `memory` bytes from the plan's linear fit (fixed + slope * batch)."""
  fixed, slope = _fit(r)
  return int((memory - fixed) // slope)


def _max_batch_cell(r: dict) -> str:
  m = r["max_batch"]
  if m.get("verified") is False and not m.get("tries"):
    return f"{m['predicted']} failed ({m['peak_at_predicted'] / 2**30:.1f} GiB); secant: {_max_batch(r, r['device_memory'])}"
  return f"{m['predicted']} ({m['verified']})"


def memory_markdown(reports: list[dict]) -> str:
  gi = 2**30
  head = ["model", "devices (fsdp)", "remat", "scan", "params", "params+opt/dev GiB", "vs ideal",
          "temp GiB @B", "peak GiB @B", "GiB/sample", "max B 95 GiB (verified)", "max B 80 GB",
          "compile s (CPU s, load)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  order = {"none": 0, "dots_saveable": 1, "full": 2}
  reports = sorted(reports, key=lambda r: (r["num_params"], r["devices"], r["mesh"]["fsdp"], r["per_device_batch"],
                                           not r["scan"], order.get(r["remat"], 3)))
  for r in reports:
    mb = r.get("max_batch")
    cells = [r["model"].replace("spec_", ""), f"{r['devices']} ({r['mesh']['fsdp']})", r["remat"], str(r["scan"]),
             f"{r['num_params'] / 1e9:.3f}B", f"{r['params_opt_per_device'] / gi:.3f}", f"{r['params_opt_vs_ideal']:.3f}x",
             f"{r['xla']['temp'] / gi:.2f} @{r['per_device_batch']}", f"{r['peak_estimate'] / gi:.2f}",
             f"{mb['bytes_per_sample'] / gi:.3f}" if mb else "-",
             _max_batch_cell(r) if mb else "-",
             str(_max_batch(r, 80e9)) if mb else "-",
             f"{r['compile_s']:.0f} ({r['compile_cpu_s']:.0f}, {r['load_average']:.0f})" if "compile_cpu_s" in r
             else f"{r['compile_s']:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def cmd_tables(args) -> None:
  if args.flops_json:
    with open(args.flops_json) as f:
      print(flops_markdown(json.load(f), args.per_device_batch), end="\n\n")
  if args.mem_dir:
    reports = []
    for path in sorted(glob.glob(os.path.join(args.mem_dir, "*.json"))):
      with open(path) as f:
        reports.extend(json.load(f))
    print(memory_markdown(reports))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  flops = sub.add_parser("flops", help="XLA FLOPs per sample and the throughput they imply")
  flops.add_argument("--models", default="b", help="comma list of ViT sizes among b,l,h,g")
  flops.add_argument("--patches", default="16")
  flops.add_argument("--per-device-batch", type=int, default=32, help="for the implied step time")
  flops.add_argument("--check-depth", action="store_true", help="also compile the full-depth unrolled step")
  flops.add_argument("--cost", choices=("compiled", "lowered"), default="compiled",
                     help="cost analysis of the compiled HLO (exact XLA count) or the lowered HLO (fast)")
  flops.add_argument("--json", default="")
  memory = sub.add_parser("memory", help="fmjax.plan runs, one at a time, each under a timeout")
  memory.add_argument("--models", default="b")
  memory.add_argument("--devices", default="8")
  memory.add_argument("--remat", default="full", help="comma list among none,full,dots_saveable")
  memory.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True)
  memory.add_argument("--max-batch", action="store_true")
  memory.add_argument("--per-device-batch", type=int, default=4)
  memory.add_argument("--device-memory", default="95GiB")
  memory.add_argument("--timeout", type=float, default=900)
  memory.add_argument("--out", default="/tmp/fmjax_plan_tables")
  tables = sub.add_parser("tables", help="markdown from the JSON files of the other two commands")
  tables.add_argument("--flops-json", default="")
  tables.add_argument("--mem-dir", default="")
  tables.add_argument("--per-device-batch", type=int, default=32)
  args = parser.parse_args(argv)
  if args.command == "flops":
    for size in args.models.split(","):
      if size not in SIZES:
        raise SystemExit(f"model size {size!r} is not known; valid choices: {SIZES}")
  {"flops": cmd_flops, "memory": cmd_memory, "tables": cmd_tables}[args.command](args)


if __name__ == "__main__":
  main()
