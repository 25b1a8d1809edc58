"""A conversion killed with SIGKILL mid-run and rerun yields every location exactly once."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from data_prep import spectral_earth, synthetic
from fmjax.data import dataset_dir, records

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _converter(archive, out, workers):
  return [sys.executable, "-m", "data_prep.spectral_earth", "--input", str(archive), "--output", str(out),
          "--shards", "12", "--workers", str(workers), "--val-fraction", "0.2", "--size", "48",
          "--bands", "202", "--no-stats"]


@pytest.mark.parametrize("workers", [1, 2])
def test_killed_conversion_resumes_exactly_once(tmp_path, workers):
  from array_record.python.array_record_module import ArrayRecordReader
  archive, out = tmp_path / "archive", tmp_path / "out"
  synthetic.generate(archive, locations=60, seed=7, defects=True, size=48, bands=202, progress=False)
  work = out / spectral_earth.WORK_DIR
  env = dict(os.environ, PYTHONPATH=REPO)
  # Own session: the kill takes the pool workers with it, like a pre-empted job.
  proc = subprocess.Popen(_converter(archive, out, workers), cwd=REPO, env=env, start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 120
  done_before_kill = []
  while time.monotonic() < deadline and proc.poll() is None:
    done_before_kill = sorted(work.glob("*.done.json")) if work.exists() else []
    if done_before_kill:
      break
    time.sleep(0.002)
  assert proc.poll() is None, "the converter finished before it could be killed; make the input bigger"
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  total_shards = 12 + spectral_earth.num_val_shards(12, 0.2)
  done_before_kill = sorted(work.glob("*.done.json"))
  assert 1 <= len(done_before_kill) < total_shards, len(done_before_kill)
  assert not (out / "dataset_info.json").exists()
  kept = {p.name: p.read_text() for p in done_before_kill}

  result = subprocess.run(_converter(archive, out, workers), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  for name, text in kept.items():  # finished shards were skipped, not redone
    assert (work / name).read_text() == text
  seen = []
  info = dataset_dir.read_dataset_info(out)
  for split in info["splits"].values():
    for path, length in zip(split["shards"], split["shard_lengths"]):
      ids = [records.decode(d, arrays=()).location_id for d in ArrayRecordReader(path).read_all()]
      assert len(ids) == length
      seen += ids
  expected = sorted(p.name for p in (archive / "enmap").iterdir())
  assert sorted(seen) == expected  # every location, exactly once
  report = json.loads((out / "report.json").read_text())
  assert report["consistent"] and report["inputs"]["files"] == report["converted"]["files"] + report["rejected"]["files"]
  assert not list(work.glob("*.tmp"))
