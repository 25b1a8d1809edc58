"""Export fmjax backbones to official-layout PyTorch state_dicts (+ a JSON sidecar).

`export_variables(variables, out, ...)` works on in-memory Flax variables; `export_checkpoint(path,
out, ...)` reads a pretraining checkpoint with `fmjax.checkpoint.load_backbone` first. The torch
module that fits is described from the variables' shapes (width, depth, patch size, MLP width,
head) plus the two facts shapes cannot tell: the head count and, for models with a fixed sin-cos
position table, the image size (both from the config).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Mapping

import torch
from tqdm import tqdm

from fmjax.export import files, mapping, torch_modules
from fmjax.export.convert import ExportPlan, plan_export
from fmjax.export.mapping import MappingError

SIDECAR_FORMAT = "fmjax-export/1"


def _cfg_get(config, dotted: str, default=None):
  node = config
  for part in dotted.split("."):
    if node is None:
      return default
    try:
      node = node[part] if part in node else None
    except TypeError:
      node = getattr(node, part, None)
  return default if node is None else node


def describe_backbone(variables: Mapping[str, Any], config=None) -> dict[str, Any]:
  """build_torch_model(**kwargs) arguments of the official module that fits `variables`."""
  params = variables["params"]
  model_name = _cfg_get(config, "model.name")
  if "vit_core" in params:
    core = params["vit_core"]
    width = int(core["cls_token"].shape[-1])
    patch = int(core["patch_embed"]["kernel"].shape[0])
    scanned = mapping.scanned_blocks_path(variables)
    if scanned:
      block = mapping.get_leaf(params, scanned)
      depth = int(block["norm1"]["scale"].shape[0])
      mlp_dim = int(block["mlp"]["fc1"]["kernel"].shape[-1])
    else:
      encoder = core["encoder"]
      depth = sum(1 for k in encoder if str(k).startswith("blocks_"))
      mlp_dim = int(encoder["blocks_0"]["mlp"]["fc1"]["kernel"].shape[-1])
    if "pos_embed" in core:
      image_size = math.isqrt(int(core["pos_embed"].shape[1]) - 1) * patch
    else:  # fixed sin-cos table: the grid comes from the training image size
      image_size = int(_cfg_get(config, "model.image_size", 0) or _cfg_get(config, "data.crop_size", 0))
      if not image_size:
        raise MappingError("the model uses a fixed sin-cos position table, so the image size must come from the "
                           "config (model.image_size or data.crop_size) and neither is set")
    num_heads = _cfg_get(config, "model.num_heads")
    if num_heads is None:
      size = str(model_name or "").rsplit("_", 1)[-1]
      from fmjax.models import VIT_SIZES
      if str(model_name or "").startswith("spec_vit_") and size in VIT_SIZES:
        num_heads = VIT_SIZES[size][2]
      else:
        raise MappingError(f"cannot tell the head count of model {model_name!r}: set model.num_heads in the config")
    use_adapter = "spectral_adapter" in params
    kwargs = dict(name=model_name if str(model_name or "").startswith("spec_vit") else "spec_vit",
                  width=width, depth=depth, num_heads=int(num_heads), mlp_dim=mlp_dim, patch_size=patch,
                  image_size=image_size, num_classes=int(core["head"]["kernel"].shape[-1]) if "head" in core else 0)
    if not use_adapter:
      kwargs.update(use_adapter=False, num_bands=int(core["patch_embed"]["kernel"].shape[2]))
    return kwargs
  if "resnet" in params and "spectral_adapter" in params:
    dilated = bool(_cfg_get(config, "model.dilated", False)) or str(model_name).endswith("_dilated")
    return dict(name="spec_resnet50_dilated" if dilated else "spec_resnet50",
                num_classes=int(params["fc"]["kernel"].shape[-1]) if "fc" in params else 0)
  raise MappingError(f"variables with top-level modules {sorted(params)} are neither a SpecViT "
                     f"(spectral_adapter + vit_core) nor a SpecResNet-50 (spectral_adapter + resnet); "
                     f"only those have an official PyTorch layout")


def torch_model_on_meta(kwargs: Mapping[str, Any]) -> torch.nn.Module:
  """The official module with shapes only (no memory), for building the key table of any size."""
  with torch.device("meta"):
    return torch_modules.build_torch_model(**kwargs)


def _band_facts(config, dataset_dir: str | None, num_bands: int | None) -> tuple[dict, dict | None]:
  """(bands, normalisation) for the sidecar, from the dataset directory when it is readable."""
  info = {}
  directory = dataset_dir or _cfg_get(config, "data.dir", "")
  if directory:
    try:
      from fmjax.data import dataset_dir as dataset_dir_lib
      info = dataset_dir_lib.read_dataset_info(directory)
    except (FileNotFoundError, ImportError, ValueError, OSError):
      info = {}
  count = info.get("num_bands") or num_bands or _cfg_get(config, "data.num_bands")
  wavelengths = info.get("wavelengths")
  sensor = info.get("sensor")
  if wavelengths is None and count:
    try:
      from fmjax.data import sensors
      sensor = sensor or ("enmap" if int(count) == sensors.SPECTRALEARTH_NUM_BANDS else None)
      if sensor:
        wavelengths = sensors.wavelengths(sensor, int(count)).tolist()
    except (ImportError, ValueError):
      wavelengths = None
  bands = {"count": int(count) if count else None, "sensor": sensor,
           "wavelengths_nm": [float(w) for w in wavelengths] if wavelengths is not None else None}
  stats = info.get("band_stats") or {}
  norm = None
  mean = stats.get("mean") if stats.get("mean") is not None else stats.get("band_mean")
  std = stats.get("std") if stats.get("std") is not None else stats.get("band_std")
  if mean is not None and std is not None:
    norm = {"mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "formula": "(x - mean) / std per band, after augmentation", "source": str(directory)}
  return bands, norm


def write_plan(plan: ExportPlan, out: str, fmt: str | None = None, metadata: Mapping[str, str] | None = None,
               show_progress: bool = True) -> int:
  fmt = files.format_from_path(out, fmt)
  progress = (lambda it: tqdm(it, desc=f"export {os.path.basename(out)}", unit="tensor")) if show_progress \
      else (lambda it: it)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  if fmt == "safetensors":
    return files.write_safetensors_streaming(out, plan.specs, plan.produce, metadata, progress)
  return files.write_torch(out, plan.specs, plan.produce, progress)


def sidecar_path(out: str) -> str:
  root, _ = os.path.splitext(out)
  return root + ".json"


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


def export_variables(variables: Mapping[str, Any], out: str, *, config=None, fmt: str | None = None,
                     with_head: bool = False, step: int = 0, dataset_dir: str | None = None,
                     source: str = "", show_progress: bool = True) -> dict[str, Any]:
  """Writes `out` (state_dict) and its sidecar JSON; returns the sidecar dict."""
  kwargs = describe_backbone(variables, config)
  # The table covers the head whenever the variables hold one; plan_export drops it unless asked.
  table = mapping.key_table(torch_model_on_meta(kwargs), scanned=mapping.scanned_blocks_path(variables))
  plan = plan_export(variables, table, step=step, with_head=with_head)
  lazy = plan.lazy_leaves_in_order()
  if lazy:  # leaves still on disk: read them group by group in the order they are written
    lazy[0].source.set_order(lazy)
  fmt = files.format_from_path(out, fmt)
  torch_kwargs = dict(kwargs, num_classes=kwargs.get("num_classes", 0) if with_head else 0)
  sidecar = {
      "format": SIDECAR_FORMAT,
      "file": os.path.basename(out), "file_format": fmt,
      "model": _cfg_get(config, "model.name") or torch_kwargs["name"],
      "torch_model": torch_kwargs,
      "rebuild": "fmjax.export.torch_modules.build_torch_model(**sidecar['torch_model'])",
      "with_head": bool(with_head),
      "num_keys": len(plan.entries),
      "num_parameters": int(sum(math.prod(e.torch_shape) for e in plan.entries
                                if e.kind != "counter" and not e.torch_key.endswith(("running_mean", "running_var")))),
      "generated_keys": list(plan.generated),
      "scanned_blocks": mapping.scanned_blocks_path(variables) is not None,
      "objective": _cfg_get(config, "objective.name"),
      "step": int(step),
      "checkpoint": source,
      "input": "[B, C, H, W] float32 (channels first), normalised per band",
  }
  num_bands = torch_kwargs.get("num_bands")
  sidecar["bands"], sidecar["normalisation"] = _band_facts(config, dataset_dir, num_bands)
  size = write_plan(plan, out, fmt, metadata={"fmjax": json.dumps({k: sidecar[k] for k in ("model", "torch_model",
                                                                                             "step", "objective")})},
                    show_progress=show_progress)
  sidecar["bytes"] = size
  sidecar["sha256"] = _sha256(out)
  with open(sidecar_path(out), "w") as f:
    json.dump(sidecar, f, indent=2)
  return sidecar


def export_checkpoint(checkpoint: str, out: str, *, fmt: str | None = None, with_head: bool = False,
                      dataset_dir: str | None = None, show_progress: bool = True,
                      read_budget_mb: int = 512) -> dict[str, Any]:
  """A workdir or step directory -> state_dict file + sidecar (see export_variables)."""
  from fmjax import checkpoint as checkpoint_lib
  from fmjax.export.restore import load_backbone_lazy
  step_dir = checkpoint_lib.resolve_step_dir(checkpoint)
  # Only the backbone's leaves are read, and only when written (<= read_budget_mb at a time).
  config, variables, _ = load_backbone_lazy(step_dir, budget_bytes=int(read_budget_mb) << 20)
  step = int(os.path.basename(step_dir)) if os.path.basename(step_dir).isdigit() else 0
  return export_variables(variables, out, config=config, fmt=fmt, with_head=with_head, step=step,
                          dataset_dir=dataset_dir, source=step_dir, show_progress=show_progress)
