"""Export of fmjax backbones to PyTorch state_dicts with the official SpectralEarth keys, and import back.

  python -m fmjax.export --checkpoint WORKDIR --out model.pt [--format safetensors] [--with-head]
  python -m fmjax.export.import_torch --state-dict model.pt --model spec_vit_s --out CKPT_DIR

Modules: torch_modules (plain torch.nn SpecViT / SpecResNet-50 in the official layout), mapping
(the key table), convert (Flax <-> state_dict arrays), files (.pt / streamed safetensors),
exporter (checkpoint -> file + sidecar JSON), import_torch (file -> checkpoint).
Importing this package does not import torch; the submodules do.
"""
