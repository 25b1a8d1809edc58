"""python -m fmjax.export.import_torch --state-dict model.pt --model spec_vit_s --out <checkpoint dir>

Official-layout PyTorch weights (SpectralEarth SpecViT / SpecResNet-50 state_dicts, or files written
by `python -m fmjax.export`) -> an fmjax checkpoint that `fmjax.checkpoint.load_backbone` and the
evaluation's `--config.init_from` read. Every missing key, unexpected key and shape mismatch is
reported by name before anything is written (strict, like torch's load_state_dict(strict=True)).

Model options default to the sidecar JSON next to the file when there is one (files from
`fmjax.export`), else to the named variant's defaults; override with the flags below.

The checkpoint is <out>/checkpoints/<step>/{state, config}: state = {params: {backbone: ...},
model_state: {batch_stats: {backbone: ...}}, step}; config.model holds every build_model option so
the backbone is rebuilt exactly. config.objective.name is 'imported' (`build_objective` below)
where the objective registry knows it, else 'moco', whose backbone layout is the same.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.export import files, mapping
from fmjax.export.convert import ImportReport, state_dict_to_variables
from fmjax.export.exporter import sidecar_path, torch_model_on_meta

# build_model options that matter for the weights' layout (the rest are compute options).
_MODEL_OPTIONS = ("patch_size", "image_size", "num_bands", "num_classes", "width", "depth", "num_heads", "mlp_dim",
                  "scan", "sincos_pos_embed", "use_adapter")


def _strip_prefix(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops a wrapper prefix every key shares (DistributedDataParallel's 'module.', Lightning's 'model.')."""
  for prefix in ("module.", "model.", "backbone."):
    if state_dict and all(k.startswith(prefix) for k in state_dict):
      return {k[len(prefix):]: v for k, v in state_dict.items()}
  return dict(state_dict)


def _head_classes(state_dict: Mapping[str, np.ndarray]) -> int:
  for key in ("vit_core.head.weight", "resnet.fc.weight"):
    if key in state_dict:
      return int(state_dict[key].shape[0])
  return 0


def model_options(model: str, state_dict: Mapping[str, np.ndarray], sidecar: Mapping[str, Any] | None,
                  overrides: Mapping[str, Any]) -> dict[str, Any]:
  """build_model overrides: sidecar < facts read off the state_dict < explicit overrides."""
  options: dict[str, Any] = {}
  if sidecar:
    tm = sidecar.get("torch_model", {})
    options.update({k: tm[k] for k in ("patch_size", "image_size", "width", "depth", "num_heads", "mlp_dim",
                                       "use_adapter", "num_bands") if k in tm})
    if sidecar.get("bands", {}).get("count"):
      options.setdefault("num_bands", int(sidecar["bands"]["count"]))
  if "vit" in model:
    if "vit_core.patch_embed.proj.weight" in state_dict:
      options.setdefault("patch_size", int(state_dict["vit_core.patch_embed.proj.weight"].shape[-1]))
    if state_dict and not any(k.startswith("spectral_adapter.") for k in state_dict) \
        and "vit_core.patch_embed.proj.weight" in state_dict:  # fmjax ViT without adapter: raw bands
      options.setdefault("use_adapter", False)
      options.setdefault("num_bands", int(state_dict["vit_core.patch_embed.proj.weight"].shape[1]))
    if "vit_core.pos_embed" in state_dict and "patch_size" in options:
      grid = int(round((state_dict["vit_core.pos_embed"].shape[1] - 1) ** 0.5))
      options.setdefault("image_size", grid * int(options["patch_size"]))
  classes = _head_classes(state_dict)
  if classes:
    options.setdefault("num_classes", classes)
  options.update({k: v for k, v in overrides.items() if v is not None})
  if "vit" not in model:  # ResNets have no ViT options
    options = {k: v for k, v in options.items() if k in ("num_bands", "image_size", "num_classes")}
  return options


def torch_kwargs_for(model_name: str, flax_model) -> dict[str, Any]:
  """build_torch_model arguments matching a built Flax backbone."""
  if "vit" in model_name:
    kw = dict(name="spec_vit", width=flax_model.width, depth=flax_model.depth, num_heads=flax_model.num_heads,
              mlp_dim=flax_model.mlp_dim, patch_size=flax_model.patch_size, image_size=flax_model.image_size,
              num_classes=flax_model.num_classes)
    if not flax_model.use_adapter:
      kw.update(use_adapter=False, num_bands=flax_model.num_bands)
    return kw
  return dict(name=model_name, num_classes=flax_model.num_classes)


def import_state_dict(state_dict: Mapping[str, np.ndarray], model: str, *, sidecar: Mapping[str, Any] | None = None,
                      strict: bool = True, **overrides) -> tuple[dict, dict[str, Any], ImportReport]:
  """(Flax variables as numpy, build_model options, report). Raises ImportMismatchError when strict."""
  from fmjax.models import build_model
  state_dict = _strip_prefix(state_dict)
  options = model_options(model, state_dict, sidecar, overrides)
  flax_model = build_model(model, **options)
  x = jax.ShapeDtypeStruct(flax_model.input_shape(1), jnp.float32)
  from flax import linen as nn
  abstract = nn.meta.unbox(jax.eval_shape(lambda x: flax_model.init(jax.random.key(0), x, train=False), x))
  table = mapping.key_table(torch_model_on_meta(torch_kwargs_for(model, flax_model)),
                            scanned=mapping.scanned_blocks_path(abstract))
  variables, report = state_dict_to_variables(state_dict, table, abstract, strict=strict)
  return variables, options, report


def _objective_name() -> str:
  from fmjax.objectives import available_objectives
  return "imported" if "imported" in available_objectives() else "moco"


def write_checkpoint(out_dir: str, variables: Mapping[str, Any], model: str, options: Mapping[str, Any], *,
                     step: int = 0, source: str = "", sidecar: Mapping[str, Any] | None = None) -> str:
  """Writes <out_dir>/checkpoints/<step>/ with the engine's Checkpointer; returns the step dir."""
  import ml_collections
  from fmjax import checkpoint as checkpoint_lib
  config = ml_collections.ConfigDict()
  config.task = "pretrain"
  config.model = ml_collections.ConfigDict({"name": model, **dict(options)})
  config.data = ml_collections.ConfigDict({"dir": "", "num_bands": int(options.get("num_bands", 202)),
                                           "crop_size": int(options.get("image_size", 128))})
  config.objective = ml_collections.ConfigDict({"name": _objective_name(), "imported_from": source,
                                                "queue_size": 65536})
  config.batch_size = 256
  if sidecar and sidecar.get("normalisation"):
    config.normalisation = ml_collections.ConfigDict(sidecar["normalisation"])
  state = {"params": {"backbone": variables["params"]}, "step": np.asarray(step, np.int32)}
  if "batch_stats" in variables:
    state["model_state"] = {"batch_stats": {"backbone": variables["batch_stats"]}}
  state = jax.tree.map(jnp.asarray, state)
  ckpt = checkpoint_lib.Checkpointer(out_dir, keep=1, async_save=False)
  try:
    ckpt.save(step, state, config=config, force=True)
    ckpt.wait()
  finally:
    ckpt.close()
  return os.path.join(ckpt.directory, str(step))


class ImportedBackbone:
  """Objective-registry entry for imported weights: it only hands out the backbone (evaluation,
  export); it cannot pretrain. Register as "imported": "fmjax.export.import_torch:build_objective"."""
  name = "imported"

  def __init__(self, config):
    self.config = config
    from fmjax.objectives.base import ViewSpec
    self.views = ViewSpec()

  def init(self, rng, batch):
    raise NotImplementedError("an imported checkpoint holds a backbone only; pretrain it with mae/dino/moco "
                              "(init from it) or use it with the evaluation's init_from")

  loss = after_update = init

  def backbone_variables(self, variables, objective_state):
    del objective_state
    return {col: tree["backbone"] for col, tree in variables.items() if "backbone" in tree}


def build_objective(config) -> ImportedBackbone:
  return ImportedBackbone(config)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fmjax.export.import_torch", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--state-dict", required=True, help=".pt/.pth (a state_dict or {'state_dict': ...}) or .safetensors")
  parser.add_argument("--model", required=True, help="fmjax model name: spec_vit_{t,s,b,l,h,g}, spec_vit, "
                      "spec_resnet50, spec_resnet50_dilated")
  parser.add_argument("--out", required=True, help="output checkpoint directory (a workdir)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the sidecar's, else 0)")
  for flag in ("patch-size", "image-size", "num-bands", "num-classes", "width", "depth", "num-heads", "mlp-dim"):
    parser.add_argument(f"--{flag}", type=int, default=None)
  parser.add_argument("--scan", action="store_true", default=None, help="store the ViT blocks stacked (nn.scan)")
  parser.add_argument("--sincos-pos-embed", action="store_true", default=None,
                      help="model with MAE's fixed sin-cos table (the file's pos_embed must equal it)")
  parser.add_argument("--sidecar", default=None, help="sidecar JSON (default: <state-dict>.json when it exists)")
  args = parser.parse_args(argv)

  sidecar = None
  sidecar_file = args.sidecar or sidecar_path(args.state_dict)
  if os.path.exists(sidecar_file):
    with open(sidecar_file) as f:
      sidecar = json.load(f)
  state_dict = files.read_state_dict(args.state_dict)
  overrides = {k: getattr(args, k) for k in ("patch_size", "image_size", "num_bands", "num_classes", "width",
                                             "depth", "num_heads", "mlp_dim", "scan", "sincos_pos_embed")}
  variables, options, report = import_state_dict(state_dict, args.model, sidecar=sidecar, **overrides)
  print(report)
  step = args.step if args.step is not None else int((sidecar or {}).get("step", 0))
  step_dir = write_checkpoint(args.out, variables, args.model, options, step=step,
                              source=os.path.abspath(args.state_dict), sidecar=sidecar)
  print(json.dumps({"checkpoint": step_dir, "model": args.model, "options": options,
                    "keys": len(state_dict)}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
