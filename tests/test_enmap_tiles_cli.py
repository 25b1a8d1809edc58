"""End to end through the command lines: synthetic archive -> patches (1 and 2 workers give the
same dataset) -> data_prep.spectral_earth converts every patch."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import rasterio

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  env = dict(os.environ, PYTHONPATH=REPO)
  done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def _dataset(root):
  out = {}
  for loc in sorted(os.listdir(os.path.join(root, "enmap"))):
    for fname in sorted(os.listdir(os.path.join(root, "enmap", loc))):
      with rasterio.open(os.path.join(root, "enmap", loc, fname)) as ds:
        out[(loc, fname)] = (ds.read(), tuple(ds.transform), ds.crs.to_string())
  return out


def test_cli_workers_are_deterministic_and_output_converts(tmp_path):
  src = tmp_path / "tiles"
  _run("data_prep.synthetic_tiles", "--output", str(src), "--size", "72", "--extra", "2")
  outputs = {}
  for workers in (1, 2):
    root = tmp_path / f"w{workers}"
    done = _run("data_prep.enmap_tiles", "--input", str(src), "--output", str(root),
                "--patch-size", "16", "--workers", str(workers))
    assert "locations" in done.stdout
    outputs[workers] = root
  one, two = _dataset(outputs[1]), _dataset(outputs[2])
  assert one.keys() == two.keys() and len(one) > 0
  for key in one:
    np.testing.assert_array_equal(one[key][0], two[key][0])
    assert one[key][1:] == two[key][1:]
  for name in ("enmap_tiles_index.csv", "enmap_tiles_index.geojson", "enmap_tiles_tiles.csv"):
    assert (outputs[1] / name).read_text() == (outputs[2] / name).read_text()
  summary = json.loads((outputs[1] / "enmap_tiles_summary.json").read_text())
  assert summary["patches"] == len(one)

  # The layout is the official pretraining layout: data_prep.spectral_earth takes it as is.
  from data_prep import spectral_earth
  report = spectral_earth.convert(str(outputs[1]), str(tmp_path / "records"), shards=2,
                                  workers=1, size=16, stats=False, progress=False)
  assert report["inputs"] == {"files": summary["patches"], "locations": summary["locations"]}
  assert report["converted"]["files"] == summary["patches"]
  assert report["rejected"]["files"] == 0
