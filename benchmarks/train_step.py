"""One pretraining step: fmjax (jitted, XLA) vs a plain torch.nn implementation of the official recipe.

  python -m benchmarks.train_step --objective mae --model spec_vit_s [--image-size 32] [--batch 8]

Both sides run the same model shape (SpecViT: spectral adapter + ViT, MAE 1-block 512-wide decoder),
the same batch, band count and mask ratio, and one AdamW update per step, on the same CPU in one run.
On a GPU machine, `--dtype bfloat16 --torch-device cuda` runs both there (MAE only; torch with bf16
autocast): jax takes the GPU as its default device. Prints samples/s of each, their ratio, fmjax's
compile time and MFU (the train loop's model FLOPs over the device peak).
Each side runs in a fresh subprocess (same environment, same thread count), the two alternating
for --rounds rounds; the medians over all timed steps are compared.
Other objectives register a (jax_setup, torch_setup) pair in OBJECTIVES.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

RESULT = "RESULT "
VIT = {"spec_vit_t": (192, 12, 3), "spec_vit_s": (384, 12, 6), "spec_vit_b": (768, 12, 12)}
RESNETS = ("spec_resnet50",)
# Both sides' first steps fault their heaps in (torch: steps 2-3 at 1.4x its steady time); fmjax's
# heap keeps growing for 10-20 steps at 32 px (steps 7-11 at 1.2x), so fewer warm-up steps time the
# allocator rather than the step. Shared with benchmarks/profile_step.py.
WARMUP_STEPS = 10


# --------------------------------------------------------------------------------------------- JAX

def _compile_fmjax_step(args, config, objective, tx, schedule, views: int):
  """The train loop's own step on random data: (compiled, state, batch, compile s, FLOPs per step)."""
  import jax
  from fmjax import parallel, train, train_state
  mesh = parallel.make_mesh({"data": -1})
  rng = np.random.default_rng(0)
  image = rng.normal(size=(args.batch, views, args.image_size, args.image_size, args.bands)).astype(np.float32)
  batch = {"image": jax.device_put(image, parallel.batch_sharding(mesh, 5))}
  spec = {"image": jax.ShapeDtypeStruct((1, *image.shape[1:]), np.float32)}
  init_fn = train_state.make_init_fn(objective, tx, spec, 0)
  abstract, shardings = train_state.abstract_state_and_shardings(init_fn, mesh)
  state = train_state.create_state(init_fn, shardings)
  # As the train loop builds it (the loop measures the parameter and update norms around logged steps only).
  step = jax.jit(train.make_train_step(objective, tx, schedule, 1, mesh), donate_argnums=0)
  start = time.perf_counter()
  lowered = train_state.trace_with_rules(lambda: step.lower(abstract, batch))
  compiled = train_state.trace_with_rules(lowered.compile)
  compile_s = time.perf_counter() - start
  return compiled, state, batch, compile_s, train.step_flops_per_device(config, mesh, lowered, compiled)


def jax_mae_setup(args):
  """(step_fn(state, batch) -> (state, metrics), state, batch, compile seconds, flops per step)."""
  from configs import common
  from fmjax import optim
  from fmjax.objectives import build_objective
  config = common.mae_config(args.model.split("_")[-1])
  config.data.crop_size = args.image_size
  config.data.num_bands = args.bands
  config.model.patch_size = args.patch
  config.model.dtype = args.dtype
  config.model.attention = args.attention
  config.objective.mask_ratio = args.mask_ratio
  config.batch_size = args.batch
  objective = build_objective(config)
  schedule = optim.build_schedule(config.schedule, 1000)
  return _compile_fmjax_step(args, config, objective, optim.build_optimizer(config.optimizer, schedule), schedule,
                             views=1)


# --------------------------------------------------------------------------------------------- torch

def torch_sincos(dim, grid):
  """MAE's 2-D sin-cos table with a zero cls row (first half: column index, second: row)."""
  def one(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
  table = np.concatenate([one(dim // 2, gw), one(dim // 2, gh)], axis=1)
  return np.concatenate([np.zeros([1, dim]), table], axis=0).astype(np.float32)


def torch_mae_setup(args):
  import torch
  from torch import nn
  torch.manual_seed(0)
  device = torch.device(args.torch_device)
  width, depth, heads = VIT[args.model]
  grid = args.image_size // args.patch
  num_patches = grid * grid

  class Block(nn.Module):
    def __init__(self, dim, num_heads):
      super().__init__()
      self.norm1 = nn.LayerNorm(dim, eps=1e-6)
      self.qkv = nn.Linear(dim, 3 * dim)
      self.proj = nn.Linear(dim, dim)
      self.norm2 = nn.LayerNorm(dim, eps=1e-6)
      self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
      self.num_heads = num_heads

    def forward(self, x):
      b, n, d = x.shape
      qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
      attn = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # timm's fused attention
      x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
      return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))

  class MAE(nn.Module):
    def __init__(self):
      super().__init__()
      self.adapter = nn.Sequential(
          nn.Conv3d(1, 32, (7, 1, 1), (5, 1, 1), (1, 0, 0)), nn.BatchNorm3d(32), nn.ReLU(),
          nn.Conv3d(32, 64, (7, 1, 1), (5, 1, 1), (1, 0, 0)), nn.BatchNorm3d(64), nn.ReLU(),
          nn.Conv3d(64, 128, (5, 1, 1), (3, 1, 1), (1, 0, 0)), nn.BatchNorm3d(128), nn.ReLU())
      self.patch_embed = nn.Conv2d(128, width, args.patch, args.patch)
      self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
      self.register_buffer("pos", torch.from_numpy(torch_sincos(width, grid))[None])
      self.blocks = nn.ModuleList([Block(width, heads) for _ in range(depth)])
      self.norm = nn.LayerNorm(width, eps=1e-6)
      self.decoder_embed = nn.Linear(width, 512)
      self.mask_token = nn.Parameter(torch.zeros(1, 1, 512))
      self.register_buffer("dec_pos", torch.from_numpy(torch_sincos(512, grid))[None])
      self.decoder_block = Block(512, 16)
      self.decoder_norm = nn.LayerNorm(512, eps=1e-6)
      self.decoder_pred = nn.Linear(512, args.patch ** 2 * args.bands)

    def forward(self, imgs):  # imgs [B, C, H, W]
      b = imgs.shape[0]
      x = self.adapter(imgs[:, None]).mean(dim=2)
      x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos[:, 1:]
      keep = int(num_patches * (1 - args.mask_ratio))
      noise = torch.rand(b, num_patches, device=imgs.device)
      ids_shuffle = torch.argsort(noise, dim=1)
      ids_restore = torch.argsort(ids_shuffle, dim=1)
      x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, width))
      mask = torch.ones(b, num_patches, device=imgs.device)
      mask[:, :keep] = 0
      mask = torch.gather(mask, 1, ids_restore)
      x = torch.cat([(self.cls_token + self.pos[:, :1]).expand(b, -1, -1), x], dim=1)
      for block in self.blocks:
        x = block(x)
      x = self.decoder_embed(self.norm(x))
      fill = self.mask_token.expand(b, num_patches - keep, -1)
      y = torch.gather(torch.cat([x[:, 1:], fill], 1), 1, ids_restore[..., None].expand(-1, -1, 512))
      x = torch.cat([x[:, :1], y], 1) + self.dec_pos
      pred = self.decoder_pred(self.decoder_norm(self.decoder_block(x)))[:, 1:]
      p = args.patch
      target = imgs.reshape(b, args.bands, grid, p, grid, p)
      target = torch.einsum("nchpwq->nhwpqc", target).reshape(b, num_patches, -1)
      mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
      target = (target - mean) / (var + 1e-6) ** 0.5
      loss = ((pred - target) ** 2).mean(-1)
      return (loss * mask).sum() / mask.sum()

  model = MAE().to(device)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  rng = np.random.default_rng(0)
  imgs = torch.from_numpy(rng.normal(size=(args.batch, args.bands, args.image_size, args.image_size))
                          .astype(np.float32)).to(device)
  # fmjax's bfloat16 compute (fp32 master weights) is torch's bf16 autocast (Lightning's "bf16-mixed").
  autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

  def step():
    opt.zero_grad(set_to_none=True)
    with autocast:
      loss = model(imgs)
    loss.backward()
    opt.step()
    return float(loss)   # also waits for the device
  return step


def _jax_ssl_setup(args, config):
  """DINO / MoCo: the fmjax step on two temporal views (torch side: benchmarks/torch_ssl_reference.py)."""
  from fmjax import optim
  from fmjax.objectives import build_objective
  config.data.crop_size = args.image_size
  config.data.num_bands = args.bands
  if args.model in RESNETS:   # ViT-only options (as configs/dino_rn50.py and moco_rn50.py drop them)
    for key in ("patch_size", "remat", "scan", "attention"):
      if key in config.model:
        del config.model[key]
  else:
    config.model.patch_size = args.patch
    config.model.attention = args.attention
  config.model.dtype = args.dtype
  config.batch_size = args.batch
  config.total_steps = 1000
  config.objective.steps_per_epoch = 100   # no dataset here to count an epoch (DINO's epoch options)
  objective = build_objective(config)
  schedule = optim.build_schedule(config.schedule, 1000)
  tx = optim.build_optimizer(config.optimizer, schedule)
  if hasattr(objective, "wrap_optimizer"):
    tx = objective.wrap_optimizer(tx)
  return _compile_fmjax_step(args, config, objective, tx, schedule, views=2)


def jax_dino_setup(args):
  from configs.dino_vit_s import dino_config
  return _jax_ssl_setup(args, dino_config(args.model))


def jax_moco_setup(args):
  from configs.moco_vit_s import moco_config
  config = moco_config(args.model)
  config.objective.queue_size = 64 * args.batch
  return _jax_ssl_setup(args, config)


def torch_dino_setup(args):
  from benchmarks.torch_ssl_reference import torch_dino_setup as setup
  return setup(args)


def torch_moco_setup(args):
  from benchmarks.torch_ssl_reference import torch_moco_setup as setup
  return setup(args)


OBJECTIVES = {"mae": (jax_mae_setup, torch_mae_setup), "dino": (jax_dino_setup, torch_dino_setup),
              "moco": (jax_moco_setup, torch_moco_setup)}


def step_times(fn, warmup: int, steps: int) -> list[float]:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def median_ms(fn, rounds: int, warmup: int = 5) -> float:
  """Median milliseconds of `rounds` timed calls of fn after `warmup` untimed ones."""
  return float(np.median(step_times(fn, warmup, rounds))) * 1e3


def run_side(args) -> dict:
  """One side in this process: warm-up steps (the first one faults the allocator's memory in),
  then `steps` timed steps."""
  if args.side == "torch":
    import torch
    step = OBJECTIVES[args.objective][1](args)
    return {"times": step_times(step, args.warmup, args.steps), "threads": torch.get_num_threads()}
  import jax
  from fmjax import mfu
  compiled, state, batch, compile_s, flops = OBJECTIVES[args.objective][0](args)
  holder = {"state": state}

  def jax_step():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])
  times = step_times(jax_step, args.warmup, args.steps)
  peak, source = mfu.peak_flops_per_device(compute_dtype=args.dtype)
  return {"times": times, "compile_s": compile_s, "flops": flops, "peak": peak, "peak_source": source,
          "device": jax.devices()[0].device_kind}


def run_child(module: str, argv, side: str) -> dict:
  """`python -m <module> <argv>` (one side of a comparison) in a fresh process: the JSON of its last
  RESULT line; exits with the child's output if it failed. Shared with benchmarks/backbone_step.py."""
  out = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, capture_output=True, text=True)
  lines = [l for l in out.stdout.splitlines() if l.startswith(RESULT)]
  if out.returncode or not lines:
    sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
    raise SystemExit(f"the {side} side failed (exit {out.returncode})")
  return json.loads(lines[-1][len(RESULT):])


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags that define the step (shared with benchmarks/profile_step.py)."""
  parser.add_argument("--objective", default="mae", choices=sorted(OBJECTIVES))
  parser.add_argument("--model", default="spec_vit_s", choices=sorted(VIT) + sorted(RESNETS),
                      help="spec_resnet50 with --objective dino|moco only (MAE needs a ViT)")
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--patch", type=int, default=4)
  parser.add_argument("--bands", type=int, default=202)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--mask-ratio", type=float, default=0.9)
  parser.add_argument("--dtype", default="float32",
                      help="compute dtype: fmjax's model dtype, torch's autocast; bfloat16 on CPU runs on AVX512-BF16 "
                           "where the CPU has it (MFU is then against the measured bf16 peak)")
  parser.add_argument("--torch-device", default="cpu", help="torch side's device (MAE only): cpu, cuda")
  parser.add_argument("--attention", default="auto", help="fmjax ViTs' attention: auto (cuDNN on a GPU, else XLA), xla, cudnn")


def parse_step_arguments(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
  args = parser.parse_args(argv)
  if args.model in RESNETS and args.objective == "mae":
    parser.error("MAE needs a ViT: choose --model from " + ", ".join(sorted(VIT)))
  if args.torch_device != "cpu" and args.objective != "mae":
    parser.error("--torch-device is implemented for the MAE reference only")
  return args


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_step_arguments(parser)
  parser.add_argument("--steps", type=int, default=5, help="timed steps per side and round")
  parser.add_argument("--warmup", type=int, default=WARMUP_STEPS, help="untimed steps per side and round")
  parser.add_argument("--rounds", type=int, default=2,
                      help="rounds of (fmjax process, torch process), alternating to share any drift")
  parser.add_argument("--skip-torch", action="store_true")
  parser.add_argument("--side", choices=("both", "fmjax", "torch"), default="both",
                      help="internal: run one side in this process and print its step times")
  return parser


def main(argv=None) -> dict | None:
  """Runs the comparison and prints it; returns the summary (None for a `--side` child)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = build_parser()
  args = parse_step_arguments(parser, argv)
  if args.side != "both":
    print(RESULT + json.dumps(run_side(args)), flush=True)
    return
  # Each side runs in its own fresh process, one after the other, never both at once: in one
  # process the two frameworks' allocations fragment each other's heap and thread pools contend.
  child_argv = [a for a in argv if a != "--skip-torch"]
  sides = ("fmjax",) if args.skip_torch else ("fmjax", "torch")
  times = {side: [] for side in sides}
  process_medians = {side: [] for side in sides}   # one per process: a slow process shows up here
  results = {}
  for round_index in range(args.rounds):
    for side in sides:
      results[side] = run_child("benchmarks.train_step", [*child_argv, "--side", side], side)
      times[side] += results[side]["times"]
      process_medians[side].append(float(np.median(results[side]["times"])))
      print(f"round {round_index + 1}/{args.rounds} {side:6s} step s: "
            + ", ".join(f"{t:.3f}" for t in results[side]["times"]), flush=True)
  from fmjax import mfu
  jax_s = float(np.median(times["fmjax"]))
  info = results["fmjax"]
  model = args.model if args.model in RESNETS else f"{args.model}/{args.patch}"
  mask = f"mask {args.mask_ratio}, " if args.objective == "mae" else ""
  print(f"{args.objective} {model}, image {args.image_size}, {args.bands} bands, batch {args.batch}, {mask}"
        f"{args.rounds} rounds x {args.steps} timed steps per side (median), device {info['device']}, "
        f"host allocator {os.environ.get('FMJAX_HOST_ALLOCATOR', 'system')}")
  print(f"{'':10s} {'step s':>9s} {'samples/s':>10s}")
  print(f"{'fmjax':10s} {jax_s:9.4f} {args.batch / jax_s:10.2f}")
  summary = {"fmjax_s": jax_s, "torch_s": None, "ratio": None, "compile_s": info["compile_s"],
             "flops": info["flops"], "peak": info["peak"], "mfu": mfu.mfu(info["flops"], jax_s, info["peak"]),
             "fmjax_process_s": process_medians["fmjax"], "torch_process_s": None}
  if "torch" in times:
    torch_s = float(np.median(times["torch"]))
    summary.update(torch_s=torch_s, ratio=torch_s / jax_s, torch_process_s=process_medians["torch"])
    print(f"{'torch':10s} {torch_s:9.4f} {args.batch / torch_s:10.2f}   (torch threads {results['torch']['threads']})")
    print(f"ratio fmjax/torch samples/s: {torch_s / jax_s:.2f}x")
  print(f"fmjax compile: {info['compile_s']:.1f} s; model FLOPs/step {info['flops']:.3g}; peak {info['peak']:.3g} "
        f"FLOP/s ({info['peak_source']}); MFU {summary['mfu']:.1%}")
  return summary


if __name__ == "__main__":
  from fmjax import host_memory
  host_memory.reexec_with_host_allocator()
  main()
