"""Objective registry: `build_objective(config) -> Objective` (protocol in fmjax/objectives/base.py).

Entries are 'module:function' strings, imported lazily so that importing fmjax never pulls in every
algorithm. A factory takes the whole config (it reads config.model and config.objective).
Tests and plug-ins may add entries at run time with `register_objective`.
"""
from __future__ import annotations

import importlib
from typing import Callable

from fmjax.objectives.base import LossOutput, Objective, ViewSpec  # noqa: F401  (re-exported)

_REGISTRY: dict[str, str | Callable] = {
    "mae": "fmjax.objectives.mae:build",
    "dino": "fmjax.objectives.dino:build",
    "moco": "fmjax.objectives.moco:build",
    # a backbone imported from PyTorch weights (fmjax.export.import_torch): evaluation / export only
    "imported": "fmjax.export.import_torch:build_objective",
}


def register_objective(name: str, factory: str | Callable) -> None:
  _REGISTRY[name] = factory


def available_objectives() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def build_objective(config) -> Objective:
  name = config.objective.name
  if name not in _REGISTRY:
    raise ValueError(f"objective.name={name!r} is not known; valid choices: {available_objectives()}")
  factory = _REGISTRY[name]
  if isinstance(factory, str):
    module_name, fn_name = factory.split(":")
    factory = getattr(importlib.import_module(module_name), fn_name)
  return factory(config)
