"""Concurrent builders of one store take turns (cirjax.data.build_lock): two real processes
build the same row store / TFDS dataset at once; one builds, the other waits, then opens
the finished store; nothing is built twice or left damaged."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cirjax.data import build_lock, row_store, synth, tfds_builders

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
           PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))

ROW_STORE_BUILDER = """
import json, os, sys, time
from pathlib import Path
import numpy as np
from cirjax.data import row_store
directory, marks = sys.argv[1], Path(sys.argv[2])

def fill(rows, lo, hi):
  (marks / f"filled_by_{os.getpid()}").touch()
  # Build until the other builder has arrived at the lock (and a little longer).
  while not [p for p in marks.glob("arrived_*") if p.name != f"arrived_{os.getpid()}"]:
    time.sleep(0.05)
  time.sleep(1.5)
  rows[lo:hi] = np.arange(lo, hi, dtype=np.float32)[:, None] * np.ones(4, np.float32)

(marks / f"arrived_{os.getpid()}").touch()
store = row_store.open_or_build(directory, "demo", "ab" * 32, (8, 4), "float32", fill,
                                log=lambda m: print(m, flush=True))
print(json.dumps({"built": store.built, "rows": store[np.arange(8)].tolist()}), flush=True)
"""


def _wait_for(cond, what, timeout=120.0):
  t0 = time.time()
  while not cond():
    if time.time() - t0 > timeout:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.05)


def _start(args):
  return subprocess.Popen([sys.executable, *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def test_second_row_store_builder_waits_and_opens_the_first_ones_store(tmp_path):
  marks = tmp_path / "marks"
  marks.mkdir()
  directory = tmp_path / "store"
  first = _start(["-c", ROW_STORE_BUILDER, str(directory), str(marks)])
  # The first holds the lock once it fills; only then the second starts.
  _wait_for(lambda: any(marks.glob("filled_by_*")) or first.poll() is not None,
            "the first build")
  second = _start(["-c", ROW_STORE_BUILDER, str(directory), str(marks)])
  out = [p.communicate(timeout=300)[0] for p in (first, second)]
  assert [p.returncode for p in (first, second)] == [0, 0], out
  results = [json.loads(o.strip().splitlines()[-1]) for o in out]
  assert [r["built"] for r in results] == [True, False]
  assert len(list(marks.glob("filled_by_*"))) == 1  # filled once
  assert "waiting for another build of the store" in out[1]
  want = (np.arange(8, dtype=np.float32)[:, None] * np.ones(4)).tolist()
  assert results[0]["rows"] == results[1]["rows"] == want
  # Published intact: the checksum verifies, no temporary file is left.
  row_store.check(directory, "demo", "ab" * 32, (8, 4), "float32", verify=True)
  assert not list(directory.glob(".demo_*.tmp"))


TFDS_BUILDER = """
import os, sys, time
from pathlib import Path
from cirjax.data import tfds_builders
marks = Path(sys.argv[3])
read = tfds_builders.read_for_tfds

def read_when_the_other_arrived(*args, **kwargs):
  while not [p for p in marks.glob("arrived_*") if p.name != f"arrived_{os.getpid()}"]:
    time.sleep(0.05)
  time.sleep(1.5)
  return read(*args, **kwargs)

tfds_builders.read_for_tfds = read_when_the_other_arrived  # keeps the build going meanwhile
(marks / f"arrived_{os.getpid()}").touch()
tfds_builders.build("synthetic", sys.argv[1], sys.argv[2])
print("BUILD_RETURNED", flush=True)
"""


@pytest.mark.slow  # default-suite budget: CI runs it with -m slow
def test_concurrent_tfds_builds_take_turns(tmp_path):
  root = tmp_path / "synth"
  synth.generate(root, synth.SynthConfig(seed=3, resolution=16, num_images=(60, 60, 20),
                                         num_queries=(12, 8, 4)), progress=None)
  data_dir, marks = tmp_path / "tfds", tmp_path / "marks"
  marks.mkdir()
  lock = data_dir / ".cirjax_synthetic.lock"
  first = _start(["-c", TFDS_BUILDER, str(root), str(data_dir), str(marks)])
  _wait_for(lambda: f"pid {first.pid}" in build_lock.holder(lock) or first.poll() is not None,
            "the first build to take the lock")
  second = _start(["-c", TFDS_BUILDER, str(root), str(data_dir), str(marks)])
  out = [p.communicate(timeout=300)[0] for p in (first, second)]
  assert [p.returncode for p in (first, second)] == [0, 0], out
  assert "Downloading and preparing" in out[0]
  assert "Downloading and preparing" not in out[1]  # reused the first build
  assert "waiting for another build" in out[1]
  s, _ = tfds_builders.load_split(data_dir, "synthetic", "train")
  assert len(s.queries) == 12


def _can_lock(path) -> bool:
  import fcntl
  fd = os.open(path, os.O_RDWR)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    return False
  finally:
    os.close(fd)


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
  lock = tmp_path / ".x.lock"
  holder = _start(["-c", "import sys, time\nfrom cirjax.data import build_lock\n"
                   "with build_lock.build_lock(sys.argv[1]):\n"
                   "  print('HELD', flush=True); time.sleep(600)\n", str(lock)])
  try:
    assert holder.stdout.readline().strip() == "HELD"
    assert f"pid {holder.pid}" in build_lock.holder(lock)
    assert not _can_lock(lock)
  finally:
    holder.kill()
    holder.wait()
  assert _can_lock(lock)
  with build_lock.build_lock(lock, "x") as waited:
    assert waited < 5
