"""The backbone alone, fmjax vs the official-layout torch model, with the same weights: forward,
forward + backward, and forward + backward + SGD update + a second forward (the shape of a MoCo
step without its projector, loss and queue).

  python -m benchmarks.backbone_step [--model spec_vit_s] [--image-size 32] [--batch 8] [--rounds 2]

Tells whether a `benchmarks/train_step` row's ratio comes from the backbone or from the objective's
own parts (heads, loss, EMA, optimiser). Both sides run the backbone in train mode (BatchNorm on
batch statistics) and take the loss as the mean square of the embedding; fmjax through the
objectives' path (`embed`: a ViT's last block for the cls token only), torch through the model's
forward. Each side runs in its own fresh process, alternating for `--rounds` rounds, as in
`benchmarks/train_step`. The fmjax process exports its initial weights with the exporter
(`fmjax.export.convert.plan_export`) and its first forward's embedding; the torch process loads
both and prints the largest difference, so the two time the same maths.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.train_step import RESNETS, RESULT, VIT, run_child, step_times  # noqa: E402

PARTS = ("forward", "forward_backward", "forward_backward_sgd_forward")
LEARNING_RATE, MOMENTUM = 1e-3, 0.9


def _inputs(args) -> tuple[np.ndarray, np.ndarray]:
  """Two fixed batches [B, H, W, C] (channels last, fmjax's layout)."""
  rng = np.random.default_rng(0)
  shape = (args.batch, args.image_size, args.image_size, args.bands)
  return rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


def _model_kwargs(args) -> dict:
  if args.model in RESNETS:
    return dict(num_bands=args.bands, image_size=args.image_size)
  return dict(patch_size=args.patch, image_size=args.image_size, num_bands=args.bands)


def run_fmjax(args) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from flax import linen as nn
  from fmjax.export import convert, import_torch, mapping, torch_modules
  from fmjax.models import build_model

  model = build_model(args.model, **_model_kwargs(args))
  x, x2 = (jnp.asarray(a) for a in _inputs(args))
  variables = nn.meta.unbox(model.init(jax.random.key(0), x, train=False))
  params, batch_stats = variables["params"], {"batch_stats": variables["batch_stats"]}
  embed = getattr(model, "embed", None)

  def embedding(p, x):
    apply = dict(method=embed) if embed is not None else {}
    out, _ = model.apply({"params": p, **batch_stats}, x, train=True, mutable=["batch_stats"], **apply)
    return out if embed is not None else out["embedding"]

  loss = lambda p, x: jnp.mean(jnp.square(embedding(p, x)))
  tx = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)

  def train_like(p, opt_state, x, x2):
    grads = jax.grad(loss)(p, x)
    updates, opt_state = tx.update(grads, opt_state, p)
    p = optax.apply_updates(p, updates)
    return p, opt_state, embedding(p, x2)

  programs = {"forward": jax.jit(loss), "forward_backward": jax.jit(jax.grad(loss)),
              "forward_backward_sgd_forward": jax.jit(train_like)}
  opt_state = tx.init(params)
  calls = {"forward": lambda: programs["forward"](params, x),
           "forward_backward": lambda: programs["forward_backward"](params, x),
           "forward_backward_sgd_forward": lambda: programs["forward_backward_sgd_forward"](params, opt_state, x, x2)}
  times = {part: step_times(lambda: jax.block_until_ready(calls[part]()), args.warmup, args.calls) for part in PARTS}

  torch_model = torch_modules.build_torch_model(**import_torch.torch_kwargs_for(args.model, model))
  table = mapping.key_table(torch_model)
  state_dict = convert.plan_export(variables, table).state_dict()
  np.savez(os.path.join(args.exchange, "weights.npz"), **state_dict)
  np.save(os.path.join(args.exchange, "embedding.npy"), np.asarray(jax.jit(embedding)(params, x)))
  return {"times": times, "device": jax.devices()[0].device_kind}


def run_torch(args) -> dict:
  import torch
  from fmjax.export import import_torch, torch_modules
  from fmjax.models import build_model

  model = torch_modules.build_torch_model(
      **import_torch.torch_kwargs_for(args.model, build_model(args.model, **_model_kwargs(args))))
  with np.load(os.path.join(args.exchange, "weights.npz")) as weights:
    model.load_state_dict({k: torch.from_numpy(weights[k].copy()) for k in weights.files}, strict=True)
  model.train()
  x, x2 = (torch.from_numpy(a).permute(0, 3, 1, 2).contiguous() for a in _inputs(args))
  with torch.no_grad():
    # Before any timed call: the forward updates BatchNorm's running statistics, not the output.
    max_abs_diff = float(np.abs(model(x).numpy() - np.load(os.path.join(args.exchange, "embedding.npy"))).max())
  opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)

  def forward():
    with torch.no_grad():
      model(x).square().mean()

  def forward_backward():
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()

  def forward_backward_sgd_forward():
    forward_backward()
    opt.step()
    with torch.no_grad():
      model(x2)

  calls = {"forward": forward, "forward_backward": forward_backward,
           "forward_backward_sgd_forward": forward_backward_sgd_forward}
  times = {part: step_times(calls[part], args.warmup, args.calls) for part in PARTS}
  return {"times": times, "threads": torch.get_num_threads(), "max_abs_diff": max_abs_diff}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="spec_vit_s", choices=sorted(VIT) + sorted(RESNETS))
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--patch", type=int, default=4)
  parser.add_argument("--bands", type=int, default=202)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--calls", type=int, default=8, help="timed calls of each part per side and round")
  parser.add_argument("--warmup", type=int, default=6, help="untimed calls of each part per side and round")
  parser.add_argument("--rounds", type=int, default=2, help="rounds of (fmjax process, torch process)")
  parser.add_argument("--side", choices=("both", "fmjax", "torch"), default="both",
                      help="internal: run one side in this process")
  parser.add_argument("--exchange", default="", help="internal: the folder the two sides share weights through")
  return parser


def main(argv=None) -> dict | None:
  """Runs the comparison and prints its table; returns {part: {fmjax_ms, torch_ms, ratio}} and the
  largest difference between the two sides' embeddings (None for a `--side` child)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = build_parser().parse_args(argv)
  if args.side != "both":
    run = run_fmjax if args.side == "fmjax" else run_torch
    print(RESULT + json.dumps(run(args)), flush=True)
    return None
  times = {side: {part: [] for part in PARTS} for side in ("fmjax", "torch")}
  max_abs_diff = 0.0
  with tempfile.TemporaryDirectory(prefix="fmjax_backbone_") as exchange:
    for round_index in range(args.rounds):
      for side in ("fmjax", "torch"):   # fmjax first: it writes the weights torch loads
        result = run_child("benchmarks.backbone_step", [*argv, "--side", side, "--exchange", exchange], side)
        for part in PARTS:
          times[side][part] += result["times"][part]
        if side == "torch":
          max_abs_diff = max(max_abs_diff, result["max_abs_diff"])
        print(f"round {round_index + 1}/{args.rounds} {side} done", flush=True)
  model = args.model if args.model in RESNETS else f"{args.model}/{args.patch}"
  print(f"{model} backbone, {args.batch} x {args.image_size} px x {args.bands} bands, train-mode BN, "
        f"{args.rounds} rounds x {args.calls} calls per side (median ms); max |fmjax - torch| of the "
        f"embedding {max_abs_diff:.1e}")
  print(f"{'part':<32s}{'fmjax ms':>10s}{'torch ms':>10s}{'torch/fmjax':>13s}")
  summary = {"max_abs_diff": max_abs_diff}
  for part in PARTS:
    fmjax_ms = float(np.median(times["fmjax"][part])) * 1e3
    torch_ms = float(np.median(times["torch"][part])) * 1e3
    summary[part] = {"fmjax_ms": fmjax_ms, "torch_ms": torch_ms, "ratio": torch_ms / fmjax_ms}
    print(f"{part.replace('_', ' + '):<32s}{fmjax_ms:10.1f}{torch_ms:10.1f}{torch_ms / fmjax_ms:12.2f}x")
  return summary


if __name__ == "__main__":
  from fmjax import host_memory
  host_memory.reexec_with_host_allocator()
  main()
