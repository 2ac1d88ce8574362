"""Logs a cluster user can read: plain progress lines off a terminal, wandb (offline), and a
jax.profiler trace of chosen steps, on the toy task of test_train_core.py."""

import glob
import io
import json
import os
import struct
import sys

import pytest

from cirjax.errors import UsageError
from cirjax.train.logging import Progress
from cirjax.train.profiling import parse_steps
from tests.test_train_core import _run, get_config as toy_config


def _config(**fields):
  c = toy_config()
  c.train.epochs = 1
  c.progress_every_s = 30.0
  c.profile_steps = ""
  c.wandb = dict(project="", entity="", name="", mode="offline")
  for k, v in fields.items():
    c[k] = v
  return c


class _Tty(io.StringIO):
  def isatty(self):
    return True


def test_progress_off_a_terminal_is_plain_lines_every_n_seconds():
  out = io.StringIO()
  p = Progress(10, 0, 4, desc="toy", every_s=0.0, stream=out)
  assert p.bar is None and p.plain
  for i in range(3):
    p.update(0.5 - i / 10, 0, extra={"data wait": "3%"})
  p.close()
  lines = out.getvalue().splitlines()
  assert "\r" not in out.getvalue() and len(lines) == 3
  assert lines[0] == "[cirjax] toy: step 1/10 (10.0%), epoch 0, loss 0.5000, data wait 3%"
  assert lines[2].startswith("[cirjax] toy: step 3/10 (30.0%), epoch 0, loss 0.3000, samples/s ")
  assert ", data wait 3%, eta 0:" in lines[2]
  # Every 1000 s: nothing until the run ends (here, stops early), then the last position.
  out = io.StringIO()
  p = Progress(10, 4, 4, desc="toy", every_s=1000.0, stream=out)
  p.update(0.25, 1)
  p.update(0.25, 1)
  assert out.getvalue() == ""
  p.write("eval after epoch 1: x 1.0")
  p.close()
  assert out.getvalue().splitlines()[0] == "eval after epoch 1: x 1.0"
  assert out.getvalue().splitlines()[1].startswith("[cirjax] toy: step 6/10 (60.0%), epoch 1")
  # On a terminal: the tqdm bar.
  tty = _Tty()
  p = Progress(10, 0, 4, stream=tty)
  assert p.bar is not None and not p.plain
  p.update(0.1, 0)
  p.close()


def test_training_log_off_a_terminal_and_a_profile_of_chosen_steps(tmp_path, capsys):
  """Plain progress lines (no carriage returns) in a captured stderr; `profile_steps="3,5"`
  leaves one jax.profiler trace where TensorBoard's profile plugin looks for it."""
  wd = tmp_path / "run"
  assert _run(_config(progress_every_s=0.0, profile_steps="3,5"), wd)["status"] == "done"
  err = capsys.readouterr().err
  assert "\r" not in err
  steps = [l for l in err.splitlines() if l.startswith("[cirjax] toy: step ")]
  assert len(steps) == 8 and steps[-1].startswith("[cirjax] toy: step 8/8 (100.0%), epoch 0")
  traces = glob.glob(str(wd / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  assert parse_steps("") is None and parse_steps("7") == (7, 7) and parse_steps("2,4") == (2, 4)
  for bad in ("5,2", "0,3", "a,b", "1,2,3"):
    with pytest.raises(UsageError, match="profile_steps"):
      parse_steps(bad)


def test_wandb_offline_logs_the_run_and_resumes_it(tmp_path, monkeypatch):
  wandb = pytest.importorskip("wandb", reason="optional extra cirjax[wandb] not installed")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
  monkeypatch.setenv("WANDB_SILENT", "true")
  wd = tmp_path / "run"
  cfg = _config(wandb=dict(project="cirjax-test", entity="", name="", mode="offline"))
  cfg.train.max_steps = 4
  assert _run(cfg, wd)["status"] == "done"
  wandb.teardown()  # the wandb service writes the run file asynchronously: flush it
  run_id = (wd / "wandb_run_id").read_text().strip()
  runs = glob.glob(str(wd / "wandb" / f"offline-run-*-{run_id}"))
  assert len(runs) == 1
  history = _wandb_history(wandb, runs[0])
  logged = {s: row["train/loss"] for s, row in history if "train/loss" in row}
  jsonl = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  assert logged == {r["step"]: r["loss"] for r in jsonl if r["kind"] == "train"}
  assert sorted(logged) == [1, 2, 3, 4]
  assert any("eval/neg_mse" in row for _, row in history)
  # A resumed run continues the same wandb run.
  cfg.train.max_steps = 6
  assert _run(cfg, wd)["status"] == "done"
  wandb.teardown()
  assert (wd / "wandb_run_id").read_text().strip() == run_id
  runs = sorted(glob.glob(str(wd / "wandb" / f"offline-run-*-{run_id}")))
  steps = [s for r in runs for s, row in _wandb_history(wandb, r) if "train/loss" in row]
  assert sorted(steps) == [1, 2, 3, 4, 5, 6]


def _wandb_history(wandb, run_dir):  # pylint: disable=unused-argument
  """(step, row) of each `wandb.log` call recorded in an offline run's .wandb file: a 7-byte
  header, then LevelDB's log format (32 KiB blocks of CRC, length, type, data; a record may
  span blocks) around `wandb_internal_pb2.Record` messages."""
  del wandb
  from wandb.proto import wandb_internal_pb2  # pylint: disable=import-outside-toplevel
  (path,) = glob.glob(os.path.join(run_dir, "*.wandb"))
  raw = open(path, "rb").read()
  assert raw[:4] == b":W&B"
  records, part, off, block = [], b"", 7, 32768
  while off + 7 <= len(raw):
    if block - off % block < 7:  # a block's tail too short for a header is padding
      off += block - off % block
      continue
    _, length, kind = struct.unpack("<IHB", raw[off:off + 7])
    data, off = raw[off + 7:off + 7 + length], off + 7 + length
    if kind == 0:
      break
    part = data if kind in (1, 2) else part + data  # full / first, middle / last
    if kind in (1, 4):
      records.append(part)
  rows = []
  for data in records:
    rec = wandb_internal_pb2.Record()
    rec.ParseFromString(data)
    if rec.WhichOneof("record_type") == "history":
      row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
      rows.append((int(row["_step"]), row))
  return rows


def test_wandb_project_without_wandb_is_an_error_before_anything_is_written(tmp_path,
                                                                            monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
  cfg = _config(wandb=dict(project="p", entity="", name="", mode="offline"))
  with pytest.raises(UsageError, match=r"config.wandb.project='p' but wandb is not installed: "
                     r"pip install 'cirjax\[wandb\]'"):
    _run(cfg, tmp_path / "run")
  assert not (tmp_path / "run").exists()
