"""Engine tests with real processes: kill -9 and exact resume, SIGTERM, two processes vs one.

Each run is `python -m tests.test_engine_support` (toy objective, Grain toy input) in its own
process with fake CPU devices.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import test_engine_support as support

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("engine_processes")]


def _start(workdir, *args, devices=8, log=None):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  cmd = [sys.executable, "-m", "tests.test_engine_support", "--workdir", str(workdir), "--devices", str(devices),
         *args]
  out = open(log or os.path.join(str(workdir) + ".log"), "w")
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _finish(proc, timeout=240):
  rc = proc.wait(timeout=timeout)
  return rc


def _log(workdir):
  with open(str(workdir) + ".log") as f:
    return f.read()


def _wait_for(predicate, proc, timeout=240):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f"process ended early with rc {proc.returncode}")
    time.sleep(0.2)
  raise AssertionError("timed out")


def _metric_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line)["step"] for line in f if line.strip()]


def test_kill_minus_9_then_resume_gives_bit_identical_losses(tmp_path):
  reference, killed = tmp_path / "reference", tmp_path / "killed"
  ref_proc = _start(reference)
  # slow down after step 11 so the kill lands after checkpoint 10 and before the end
  proc = _start(killed, "--slow_after", "11", "--sleep_s", "1.0")
  _wait_for(lambda: os.path.isdir(killed / "checkpoints" / "10" / "state") and max(_metric_steps(killed), default=0) >= 11,
            proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert _finish(ref_proc) == 0, _log(reference)
  resumed = _start(killed, log=str(killed) + ".resume.log")
  assert _finish(resumed) == 0, open(str(killed) + ".resume.log").read()
  assert "resumed from checkpoint step 10" in open(str(killed) + ".resume.log").read()
  ref_losses, losses = support.read_losses(reference), support.read_losses(killed)
  for step in range(11, 21):
    assert losses[step] == ref_losses[step], (step, losses[step], ref_losses[step])


def test_sigterm_saves_and_exits_zero(tmp_path):
  workdir = tmp_path / "term"
  proc = _start(workdir, "--set", "total_steps=1000", "--slow_after", "3", "--sleep_s", "0.3")
  _wait_for(lambda: max(_metric_steps(workdir), default=0) >= 4, proc)
  proc.send_signal(signal.SIGTERM)
  assert _finish(proc) == 0, _log(workdir)
  log = _log(workdir)
  final = json.loads(log.split("FINAL ", 1)[1].splitlines()[0])
  assert final["stopped_by"] == "SIGTERM" and 4 <= final["final_step"] < 1000
  assert os.path.isdir(workdir / "checkpoints" / str(final["final_step"]) / "state")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path):
  one = tmp_path / "one"
  settings = ["--set", "total_steps=6", "--set", "checkpoint.every_steps=3"]
  proc = _start(one, *settings)
  port = _free_port()
  procs = []
  for pid in range(2):
    workdir = tmp_path / "two"
    procs.append(_start(workdir, *settings, "--set", f'distributed.coordinator="127.0.0.1:{port}"',
                        "--set", "distributed.num_processes=2", "--set", f"distributed.process_id={pid}",
                        devices=4, log=str(tmp_path / f"two_{pid}.log")))
  assert _finish(proc) == 0, _log(one)
  for pid, p in enumerate(procs):
    assert _finish(p) == 0, open(tmp_path / f"two_{pid}.log").read()
  single, multi = support.read_losses(one), support.read_losses(tmp_path / "two")
  steps = list(range(1, 7))
  np.testing.assert_allclose([multi[s] for s in steps], [single[s] for s in steps], rtol=1e-6)
  assert os.path.isdir(tmp_path / "two" / "checkpoints" / "6" / "state")
