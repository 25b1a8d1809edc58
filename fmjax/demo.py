"""`make demo`: the whole flow on a laptop CPU in a few minutes.

  python -m fmjax.demo --output demo_out [--objective mae|dino|moco] [--steps 150] [--locations 64]

1. writes a small synthetic EnMAP-like archive (202 bands, GeoTIFFs per location/timestamp),
2. converts it to an ArrayRecord dataset directory (with band statistics),
3. streams a few batches through the Grain pipeline (throughput, preview PNG),
4. pretrains a tiny SpecViT with MAE (configs/demo.py), printing a falling loss, and writes the
   reconstruction PNG (input | masked | reconstruction),
5. evaluates the checkpoint under the frozen protocol against random initialisation on a synthetic
   downstream segmentation task derived from the archive's latent land cover,
6. exports the backbone to a PyTorch state_dict (official SpectralEarth keys) and prints the
   JAX-vs-PyTorch parity,
7. says where everything is.
Re-running resumes: existing archive/dataset/checkpoints are reused.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _banner(text: str):
  print(f"\n=== {text} ===", flush=True)


def make_dataset(output: str, locations: int, size: int) -> str:
  from data_prep import spectral_earth, synthetic
  archive = os.path.join(output, "archive")
  dataset = os.path.join(output, "dataset")
  if not os.path.exists(os.path.join(archive, "synthetic.json")):
    _banner(f"1/7 synthetic archive: {locations} locations, {size}x{size} px, 202 bands -> {archive}")
    synthetic.generate(archive, locations, seed=0, size=size, bands=202)
  else:
    _banner(f"1/7 synthetic archive exists: {archive}")
  if not os.path.exists(os.path.join(dataset, "dataset_info.json")):
    _banner(f"2/7 converting to ArrayRecord -> {dataset}")
    report = spectral_earth.convert(archive, dataset, shards=2, workers=2, size=size, bands=202)
    print(json.dumps({k: report[k] for k in ("records", "rejected") if k in report}), flush=True)
  else:
    _banner(f"2/7 dataset exists: {dataset}")
  return dataset


def stream_batches(config, output: str, num_batches: int = 5) -> str:
  """Reads a few batches through the real pipeline; returns the preview PNG path."""
  import jax
  from fmjax import parallel
  from fmjax.data import pipeline
  from fmjax.objectives import build_objective
  _banner("3/7 streaming batches through the Grain pipeline")
  mesh = parallel.make_mesh(dict(config.mesh))
  views = build_objective(config).views
  it = pipeline.build_input(config.data, global_batch_size=config.batch_size, views=views, mesh=mesh,
                            seed=config.seed)
  batch = next(it)  # includes start-up
  jax.block_until_ready(batch)
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(it)
    jax.block_until_ready(batch)
  seconds = time.perf_counter() - start
  print(f"  batch {dict((k, v.shape) for k, v in batch.items())}; "
        f"{num_batches * config.batch_size / seconds:.1f} samples/s", flush=True)
  path = os.path.join(output, "input_preview.png")
  try:
    from fmjax.data import preview, records, sources
    # Whole locations, every timestamp side by side: multi-timestamp locations first.
    source = sources.open_split(config.data.dir, "train")
    locations = [records.decode(source[i]) for i in range(min(len(source), 64))]
    locations.sort(key=lambda r: -r.num_timestamps)
    preview.write_preview_png(locations[:4], path)
    print(f"  preview (pseudo-RGB, timestamps side by side): {path}")
  except Exception as e:  # the preview is a nicety; never fail the demo on it
    print(f"  (no preview: {e})")
    path = ""
  it.close() if hasattr(it, "close") else None
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output", default="demo_out")
  parser.add_argument("--objective", default="mae", help="mae | dino | moco")
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--locations", type=int, default=64)
  parser.add_argument("--size", type=int, default=64, help="synthetic patch size (crops are 32 px)")
  parser.add_argument("--eval-epochs", type=int, default=10, help="frozen-protocol epochs; 0 skips the evaluation")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
  from fmjax.main import quiet_library_logs
  quiet_library_logs()
  output = os.path.abspath(args.output)
  os.makedirs(output, exist_ok=True)
  started = time.perf_counter()

  dataset = make_dataset(output, args.locations, args.size)
  sys.path.insert(0, REPO)
  from configs import demo as demo_config
  config = demo_config.get_config(f"objective={args.objective},data_dir={dataset},steps={args.steps}")
  preview_path = stream_batches(config, output)

  _banner(f"4/7 pretraining a tiny SpecViT with {args.objective} for {config.total_steps} steps")
  from fmjax import train
  workdir = os.path.join(output, f"run_{args.objective}")
  summary = train.train(config, workdir)
  losses = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  first, last = losses[0]["loss"], losses[-1]["loss"]

  evaluation = evaluate_frozen(output, workdir, args.eval_epochs) if args.eval_epochs else None
  parity = export_and_check(output, workdir)

  _banner("7/7 outputs")
  images = sorted(glob.glob(os.path.join(workdir, "images", "*.png")))
  print(f"  loss {first:.4f} (step {losses[0]['step']}) -> {last:.4f} (step {losses[-1]['step']})")
  print(f"  dataset:         {dataset}")
  if preview_path:
    print(f"  input preview:   {preview_path}")
  print(f"  checkpoints:     {os.path.join(workdir, 'checkpoints')}")
  print(f"  metrics (JSONL): {os.path.join(workdir, 'metrics.jsonl')}")
  print(f"  TensorBoard:     tensorboard --logdir {os.path.join(workdir, 'tensorboard')}")
  if images:
    print(f"  reconstruction:  {images[-1]}")
  if evaluation:
    print(f"  frozen-protocol {evaluation['metric']} on the synthetic segmentation task: "
          f"pretrained {evaluation['pretrained']:.3f} vs random init {evaluation['random']:.3f}")
  print(f"  PyTorch export:  {parity['path']} (max |JAX - PyTorch| = {parity['max_abs_diff']:.2e})")
  print(f"  finished in {time.perf_counter() - started:.0f} s (compile {summary['compile_s']:.0f} s)")
  summary.update(evaluation=evaluation, export=parity)
  return summary


def evaluate_frozen(output: str, workdir: str, epochs: int) -> dict:
  """Frozen backbone + trained head vs the same architecture randomly initialised."""
  from data_prep import synthetic_downstream
  from fmjax.evaluate import run
  _banner("5/7 frozen-protocol evaluation: pretrained vs random init (synthetic segmentation)")
  down = os.path.join(output, "downstream")
  names = ("synthetic_seg", "synthetic_cls")
  if all(os.path.exists(os.path.join(down, n, "downstream.json")) for n in names):
    tasks = {n: os.path.join(down, n) for n in names}
  else:
    tasks = synthetic_downstream.build(os.path.join(output, "archive"), down, workers=2)
  result = run.compare_with_random_init(workdir, tasks["synthetic_seg"], os.path.join(output, "eval"),
                                        epochs=epochs, batch_size=8, bn_mode="eval", head_channels=64)
  print(f"  {result['metric']}: pretrained {result['pretrained']:.3f}  random {result['random']:.3f}  "
        f"margin {result['margin']:+.3f}")
  return result


def export_and_check(output: str, workdir: str) -> dict:
  """Exports the encoder to PyTorch and compares both frameworks' outputs on one random input."""
  _banner("6/7 export to PyTorch (official SpectralEarth layout) and parity check")
  import jax
  import numpy as np
  import torch

  from fmjax.evaluate import protocols, run
  from fmjax.export import exporter, files, torch_modules
  path = os.path.join(output, "export", "spec_vit_demo.pt")
  sidecar = exporter.export_checkpoint(workdir, path, show_progress=False)
  torch_model = torch_modules.build_torch_model(**sidecar["torch_model"]).eval()
  state_dict = files.read_state_dict(path)
  torch_model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True)
  pre_config, variables = protocols.load_init(workdir)
  encoder = protocols.build_backbone(run.backbone_config(pre_config))
  size, bands = int(pre_config.data.crop_size), int(pre_config.data.num_bands)
  x = np.random.RandomState(0).randn(2, size, size, bands).astype(np.float32)
  ours = jax.jit(lambda v, x: encoder.apply(v, x, train=False))(variables, x)
  with torch.no_grad():
    theirs = torch_model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
  diff = max(float(np.abs(np.asarray(ours[k]) - theirs[k].numpy()).max()) for k in ("embedding", "tokens"))
  print(f"  {len(state_dict)} tensors -> {path}; max |JAX - PyTorch| over embedding and tokens: {diff:.2e}")
  return {"path": path, "max_abs_diff": diff}


if __name__ == "__main__":
  from fmjax import host_memory
  host_memory.reexec_with_host_allocator()
  main()
