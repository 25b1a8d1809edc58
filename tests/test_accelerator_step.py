"""benchmarks/accelerator_step.py on the CPU: config overrides, the kernel check, one step per
attention implementation with a refused one reported rather than fatal. And what it relies on when
the pipeline is not installed (as on the GPU machine it was written for): configs load without Grain."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import accelerator_step
from fmjax import plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_load_config_applies_typed_overrides():
  config = accelerator_step.load_config(
      "configs/mae_vit_g_h100x64.py", ["model.name=spec_vit_t", "data.crop_size=32", "model.scan=False",
                                       "objective.steps_per_epoch=100", "data.aug.scale=(0.5, 1.0)"])
  assert config.model.name == "spec_vit_t" and config.data.crop_size == 32 and config.model.scan is False
  assert config.objective.steps_per_epoch == 100 and tuple(config.data.aug.scale) == (0.5, 1.0)
  assert config.grad_accum == 2   # the rest of the file's config is untouched


def test_attention_check_on_cpu_compares_bf16_with_float32():
  rows = accelerator_step.attention_check([(2, 17, 64, 4)], steps=1)
  assert [r["attention"] for r in rows] == ["xla"]   # no cuDNN without a GPU
  row = rows[0]
  assert "error" not in row and row["ms"] > 0
  # bf16 compute against the float32 module: errors of bf16's size, not zero and not garbage.
  for key in ("rel_err_dx", "rel_err_dqkv", "rel_err_loss"):
    assert 0 < row[key] < 0.05, (key, row[key])


@pytest.mark.slow  # two child processes, each compiling a tiny MAE step
def test_one_step_per_implementation_and_refusals_reported(tmp_path):
  out = tmp_path / "rows.jsonl"
  accelerator_step.main(["--config", "configs/mae_vit_g_h100x64.py", "--set", "model.name=spec_vit_t",
                         "--set", "data.crop_size=16", "--set", "data.num_bands=80", "--per-device-batch", "4",
                         "--attention", "xla,cudnn", "--steps", "2", "--warmup", "1", "--json", str(out)])
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  xla, cudnn = rows
  assert xla["attention"] == "xla" and xla["grad_accum"] == 2 and xla["scan"] is True
  assert np.isfinite(xla["loss"]) and xla["step_s"] > 0 and xla["flops_per_device_step"] > 0
  assert xla["xla_peak_bytes"] == plan.peak_bytes(xla["xla_memory"])
  assert "needs a GPU backend" in cudnn["error"]


def test_configs_load_without_the_pipeline_installed():
  """The GPU machine had no Grain: the data section must not come from the pipeline module."""
  code = ("import sys; sys.modules['grain'] = None\n"   # makes `import grain` fail
          "from benchmarks.accelerator_step import load_config\n"
          "c = load_config('configs/dino_vit_b.py', [])\n"
          "assert tuple(c.data.aug.scale) == (0.05, 1.0) and c.data.local.size == 48, c.data\n"
          "assert 'fmjax.data.pipeline' not in sys.modules\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]


def test_accelerator_suite_runs_valid_benchmark_commands(tmp_path):
  """The suite's command lines, recorded by a stand-in interpreter, parse with the benchmarks' own
  argument parsers (a renamed flag would break the GPU run, which CI cannot do)."""
  from benchmarks import train_step
  recorder = tmp_path / "python"
  recorder.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {tmp_path}/calls\n')
  recorder.chmod(0o755)
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHON": str(recorder)}
  result = subprocess.run(["bash", "benchmarks/accelerator_suite.sh", str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env=env)
  assert result.returncode == 0, result.stderr
  calls = [line.split() for line in (tmp_path / "calls").read_text().splitlines()]
  steps = [c[2:] for c in calls if c[:2] == ["-m", "benchmarks.accelerator_step"]]
  torch_steps = [c[2:] for c in calls if c[:2] == ["-m", "benchmarks.train_step"]]
  assert len(steps) == 5 and len(torch_steps) == 2   # kernels, vit_g and dino per attention; MAE with and without torch
  (tmp_path / "calls").unlink()
  result = subprocess.run(["bash", "benchmarks/accelerator_suite.sh", str(tmp_path / "out"), "vit_g_layout"],
                          cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
  assert result.returncode == 0, result.stderr
  layout = [line.split()[2:] for line in (tmp_path / "calls").read_text().splitlines()
            if line.startswith("-m benchmarks.accelerator_step")]
  assert len(layout) == 3
  steps += layout
  for argv in steps:
    args = accelerator_step.build_parser().parse_args(argv)
    assert args.json.endswith("accelerator_step.jsonl")
    if not args.attention_check:
      assert os.path.exists(os.path.join(REPO, args.config))
      config = accelerator_step.load_config(args.config, [])
      for item in args.set:   # overrides of keys the config has (a typo would add a new, unused key)
        *parents, leaf = item.partition("=")[0].split(".")
        node = config
        for part in parents:
          node = node[part]
        assert leaf in node, item
  for argv in torch_steps:
    train_step.parse_step_arguments(train_step.build_parser(), argv)
  assert "unknown part" in subprocess.run(
      ["bash", "benchmarks/accelerator_suite.sh", str(tmp_path / "out"), "nonsense"], cwd=REPO,
      capture_output=True, text=True, timeout=60, env=env).stdout
