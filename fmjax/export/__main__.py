"""python -m fmjax.export --checkpoint <workdir or step dir> --out model.pt [--format torch|safetensors]
[--with-head] [--dataset-dir DIR]

Writes the backbone (adapter included) as a state_dict with the official SpectralEarth keys, so
`SpecViT(...).load_state_dict(sd, strict=True)` works, plus <out>.json describing the model
(variant, patch and image size, bands and wavelengths, normalisation statistics, objective, step).
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fmjax.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="pretraining workdir, its checkpoints/ dir, or one step dir")
  parser.add_argument("--out", required=True, help="output file (.pt / .pth / .safetensors)")
  parser.add_argument("--format", choices=("torch", "safetensors"), default=None,
                      help="file format (default: from the extension; safetensors is written streaming)")
  parser.add_argument("--with-head", action="store_true", help="also export the classifier head "
                      "(vit_core.head / resnet.fc); only fine-tuned checkpoints have one")
  parser.add_argument("--dataset-dir", default=None, help="dataset directory for the band table and statistics "
                      "in the sidecar (default: the config's data.dir)")
  parser.add_argument("--read-budget-mb", type=int, default=512, help="checkpoint bytes read per Orbax call: "
                      "only the backbone is read, group by group in write order, so peak host memory stays near "
                      "this (plus the process itself) whatever the model size")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  from fmjax.export.exporter import export_checkpoint
  sidecar = export_checkpoint(args.checkpoint, args.out, fmt=args.format, with_head=args.with_head,
                              dataset_dir=args.dataset_dir, show_progress=not args.quiet,
                              read_budget_mb=args.read_budget_mb)
  summary = {k: sidecar[k] for k in ("file", "file_format", "model", "num_keys", "num_parameters", "step", "bytes")}
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
