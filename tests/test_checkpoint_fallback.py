"""Checkpoint fallback: a damaged latest checkpoint is moved aside to `<step>.corrupt` and the
run resumes from the previous one, ending with an uninterrupted run's parameters; when no
checkpoint restores, one clean error (exit 1) and the workdir is left as it was.

Runs on the toy task of test_train_core.py (16 steps; checkpoints every 3 steps and at the
epoch end, the last 2 kept): a run stopped after step 9 holds steps 8 and 9.
"""

import hashlib
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from cirjax.train import config_utils, sharding as shd
from cirjax.train.checkpointing import CheckpointError
from cirjax.train.trainer import STOP_AFTER_ENV, Trainer
from tests.test_train_core import HERE, _cli, _losses, _params_np


def _trainer(workdir):
  # As `cirjax train --config HERE --config.tensorboard=True` loads it: with TensorBoard
  # events, whose writer must not add a file to the workdir before training starts.
  config = config_utils.load_config(HERE, ["tensorboard=True"])
  return Trainer(config, str(workdir), mesh=shd.make_mesh((("data", -1), ("fsdp", 1))))


def _snapshot(workdir):
  """Every file under `workdir` with a digest of its content."""
  root = Path(workdir)
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An uninterrupted run's result and a workdir stopped after step 9 (checkpoints 8, 9)."""
  base = tmp_path_factory.mktemp("fallback")
  ref = _trainer(base / "ref").run()
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(STOP_AFTER_ENV, "9")
    assert _trainer(base / "cut").run()["status"] == "stopped"
  assert sorted(os.listdir(base / "cut" / "checkpoints")) == ["8", "9"]
  return ref, base / "cut", base / "ref"


def _truncate_array_file(step_dir):
  for f in (step_dir / "state" / "d").iterdir():
    f.write_bytes(f.read_bytes()[:100])
  return "state/d/"


def _delete_array_file(step_dir):
  for f in (step_dir / "state" / "d").iterdir():
    f.unlink()
  return "state/d/"


def _garble_host_json(step_dir):
  f = step_dir / "host" / "metadata"
  f.write_text(f.read_text()[:25])
  return "host/metadata"


def _host_json_without_step(step_dir):
  (step_dir / "host" / "metadata").write_text('{"task": {}}')
  return "host/metadata"


@pytest.mark.parametrize("damage", [_truncate_array_file, _delete_array_file, _garble_host_json,
                                    _host_json_without_step])
def test_damaged_latest_checkpoint_resumes_from_the_previous(runs, damage, tmp_path, capsys):
  ref, cut, _ = runs
  wd = tmp_path / "run"
  shutil.copytree(cut, wd)
  culprit = damage(wd / "checkpoints" / "9")
  before = _snapshot(wd)
  trainer = _trainer(wd)
  err = capsys.readouterr().err
  line = next(l for l in err.splitlines() if "damaged" in l)
  assert "step 9" in line and str(wd / "checkpoints" / "9" / culprit) in line
  assert "9.corrupt" in line and f"resuming from {wd / 'checkpoints' / '8'}" in err
  # Before the first step, the only change in the workdir is the moved-aside checkpoint (and
  # the lock the live run holds, see test_launch_preemption.py).
  moved = {k.replace("checkpoints/9/", "checkpoints/9.corrupt/", 1): v for k, v in before.items()}
  now = _snapshot(wd)
  assert now.pop("cirjax.lock") and now == moved
  r = trainer.run()
  assert r["status"] == "done" and r["step"] == 16
  assert trainer.ckpt.all_steps()[-1] == 16 and (wd / "checkpoints" / "9.corrupt").is_dir()
  jax.tree.map(np.testing.assert_array_equal, _params_np(ref), _params_np(r))
  (l1, e1), (l2, e2) = _losses(runs[2]), _losses(wd)
  assert [s for s, _ in l2] == list(range(1, 17))
  np.testing.assert_array_equal([v for _, v in l1], [v for _, v in l2])
  np.testing.assert_array_equal([v for _, v in e1], [v for _, v in e2])


def test_no_restorable_checkpoint_is_one_clean_error(runs, tmp_path):
  _, cut, _ = runs
  wd = tmp_path / "run"
  shutil.copytree(cut, wd)
  _garble_host_json(wd / "checkpoints" / "9")
  _truncate_array_file(wd / "checkpoints" / "8")
  before = _snapshot(wd)
  with pytest.raises(CheckpointError) as e:
    _trainer(wd)
  msg = str(e.value)
  assert f"step 9: {wd / 'checkpoints' / '9' / 'host' / 'metadata'}: not readable JSON" in msg
  assert f"step 8: {wd / 'checkpoints' / '8' / 'state' / 'd'}" in msg and "truncated" in msg
  assert _snapshot(wd) == before
  r = _cli(["--config", HERE, "--workdir", str(wd), "--config.tensorboard=True"])
  assert r.returncode == 1, r.stderr[-3000:]
  assert "cirjax train: error: no checkpoint in" in r.stderr and "step 8:" in r.stderr
  assert "Traceback" not in r.stderr
  assert _snapshot(wd) == before
