"""Launchers: shell syntax and --dry-run output (what each would run)."""
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = ["launch/local.sh", "launch/tpu_pod.sh", "launch/gpu_slurm.sbatch", "launch/gpu_multinode.sh"]


def _bash(*args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest sets fake-device flags
  return subprocess.run(["bash", *args], cwd=REPO, capture_output=True, text=True, timeout=30, env=env)


@pytest.mark.parametrize("script", LAUNCHERS)
def test_bash_syntax(script):
  result = _bash("-n", script)
  assert result.returncode == 0, result.stderr


def test_local_dry_run_starts_n_processes_with_distributed_flags():
  result = _bash("launch/local.sh", "--dry-run", "3", "--devices-per-process", "2", "--",
                 "--config=configs/demo.py", "--workdir=/tmp/run")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert "-m fmjax.main --config=configs/demo.py --workdir=/tmp/run" in line
    assert "--config.distributed.coordinator=127.0.0.1:" in line
    assert "--config.distributed.num_processes=3" in line and f"--config.distributed.process_id={i}" in line
    assert "xla_force_host_platform_device_count=2" in line


def test_local_rejects_bad_process_count():
  result = _bash("launch/local.sh", "--dry-run", "zero", "--", "--workdir=/tmp/x")
  assert result.returncode == 2 and "positive integer" in result.stderr


def test_tpu_dry_run_runs_on_all_workers():
  result = _bash("launch/tpu_pod.sh", "--dry-run", "my-tpu", "us-central2-b", "--",
                 "--config=configs/mae_vit_s.py", "--workdir=gs://bucket/run")
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert "gcloud compute tpus tpu-vm ssh my-tpu --zone us-central2-b --worker=all" in out
  assert "fmjax.main" in out and "configs/mae_vit_s.py" in out


def test_slurm_dry_run_uses_srun_and_gpu_flags():
  result = _bash("launch/gpu_slurm.sbatch", "--dry-run", "--config=configs/mae_vit_b.py", "--workdir=/ckpt")
  assert result.returncode == 0, result.stderr
  assert "srun --kill-on-bad-exit=1" in result.stdout and "--config=configs/mae_vit_b.py" in result.stdout
  assert "xla_gpu_enable_latency_hiding_scheduler" in result.stdout


def test_gpu_multinode_dry_run_passes_rank():
  result = _bash("launch/gpu_multinode.sh", "--dry-run", "node0:1234", "4", "2", "--", "--config=c", "--workdir=w")
  assert result.returncode == 0, result.stderr
  assert "--config.distributed.coordinator=node0:1234" in result.stdout
  assert "--config.distributed.num_processes=4" in result.stdout
  assert "--config.distributed.process_id=2" in result.stdout
