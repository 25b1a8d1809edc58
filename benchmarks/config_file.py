"""Loading a config file the way `--config=FILE[:ARG]` does, for benchmarks with argparse flags."""
from __future__ import annotations

import ast
import importlib.util


def load(path: str, arg: str | None = None, overrides=()):
  """`get_config(arg)` of the config file at `path`, then `key.sub=value` overrides (Python literals;
  anything else is taken as a string). New keys may be added, as ml_collections' unlocked configs allow."""
  module_spec = importlib.util.spec_from_file_location("benchmark_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  for item in overrides:
    key, _, text = item.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *path_keys, leaf = key.split(".")
    node = config
    for part in path_keys:
      node = node[part]
    with config.unlocked():
      node[leaf] = value
  return config
