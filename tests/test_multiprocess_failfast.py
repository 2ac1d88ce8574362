"""A killed worker of a multi-process run brings the others down fast, naming it; the
launcher streams every worker's output live with a `[rank N]` prefix; a damaged latest
checkpoint falls back to the previous one in a multi-process run too.

This file is also the config file of the runs (the toy task of test_train_core.py, with one
rank killing itself mid-training).
"""

import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from cirjax.train import config_utils
from cirjax.train.trainer import train
from tests.test_train_core import REPO, ToyTask, _params_np, _restore_params, get_config as toy_config

HERE = os.path.abspath(__file__)
KILL_RANK, KILL_AT = "TOY_KILL_RANK", "TOY_KILL_AT"


class RankKillToyTask(ToyTask):
  """The toy task; the process `TOY_KILL_RANK` SIGKILLs itself before global step
  `TOY_KILL_AT`."""

  def batch(self, epoch, index):
    if (jax.process_index() == int(os.environ.get(KILL_RANK, "-1"))
        and epoch * self.steps_per_epoch + index == int(os.environ.get(KILL_AT, "-1"))):
      print(f"toy: rank {jax.process_index()} kills itself", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    return super().batch(epoch, index)


def get_config(arg=None):
  c = toy_config(arg)
  c.task = HERE + ":RankKillToyTask"
  c.mesh = (("data", 2), ("fsdp", 2))
  return c


def _launch_and_kill(tmp_path, *launcher_flags):
  """Runs the launcher on 2 processes x 2 CPU devices with rank 1 killing itself before step
  5 of 16; returns (lines, seconds from the kill to the launcher's exit, exit status)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
             CIRJAX_CPU_DEVICES="", **{KILL_RANK: "1", KILL_AT: "5"})
  cmd = [sys.executable, os.path.join(REPO, "launch", "multiprocess.py"), "--timeout", "240",
         *launcher_flags, "--", "--config", HERE, "--workdir", str(tmp_path / "run")]
  p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, errors="replace")
  timer = threading.Timer(300, p.kill)  # never hang the suite
  timer.start()
  lines, killed_at = [], None
  try:
    for line in p.stdout:
      lines.append(line.rstrip("\n"))
      if killed_at is None and "toy: rank 1 kills itself" in line:
        killed_at = time.monotonic()
    status = p.wait()
  finally:
    timer.cancel()
  assert killed_at is not None, "\n".join(lines[-50:])
  return lines, time.monotonic() - killed_at, status


def _assert_streamed_with_ranks(lines):
  kill = next(i for i, l in enumerate(lines) if "kills itself" in l)
  assert lines[kill].startswith("[rank 1] ")
  # Live: rank 0's start-up lines arrive before rank 1 dies (not when rank 0 exits).
  assert any(l.startswith("[rank 0] [cirjax] compiled") for l in lines[:kill]), lines[:kill]
  assert all(l.startswith(("[rank 0] ", "[rank 1] ", "[launcher] ")) for l in lines), \
      [l for l in lines if not l.startswith(("[rank 0] ", "[rank 1] ", "[launcher] "))][:5]


@pytest.mark.slow
def test_launcher_stops_the_others_when_a_worker_dies(tmp_path):
  lines, after_kill, status = _launch_and_kill(tmp_path)
  text = "\n".join(lines)
  assert status == 128 + signal.SIGKILL, text[-3000:]
  assert after_kill < 30, (after_kill, text[-3000:])
  assert "[launcher] rank 1 (pid " in text and "was killed by SIGKILL: stopping the other" in text
  _assert_streamed_with_ranks(lines)


@pytest.mark.slow
def test_survivors_exit_by_themselves_naming_the_dead_task(tmp_path):
  """Without the launcher's watchdog (e.g. under SLURM): the coordination service's shortened
  heartbeat timeout stops rank 0, whose last words name task 1."""
  lines, after_kill, status = _launch_and_kill(tmp_path, "--no_watchdog")
  text = "\n".join(lines)
  assert status == 128 + signal.SIGKILL, text[-3000:]
  assert after_kill < 30, (after_kill, text[-3000:])
  assert "[launcher] rank 1 (pid " in text
  dead = text.index("stopped sending heartbeats")
  assert text[dead:dead + 80].split("\n")[1] == "[rank 0] 1", text[dead:dead + 200]
  _assert_streamed_with_ranks(lines)


@pytest.mark.slow
def test_two_processes_fall_back_past_a_damaged_checkpoint(tmp_path):
  sys.path.insert(0, os.path.join(REPO, "launch"))
  import multiprocess  # pylint: disable=import-outside-toplevel
  wd = tmp_path / "run"
  args = ["--config", HERE, "--workdir", str(wd)]
  env = {"CIRJAX_CPU_DEVICES": "", "CIRJAX_STOP_AFTER_STEP": "9"}
  assert multiprocess.launch(args, timeout=200, env=env) == 0
  assert sorted(os.listdir(wd / "checkpoints")) == ["8", "9"]
  for f in (wd / "checkpoints" / "9" / "state" / "d").iterdir():
    f.write_bytes(f.read_bytes()[:100])
  assert multiprocess.launch(args, timeout=200, env={"CIRJAX_CPU_DEVICES": ""}) == 0
  assert (wd / "checkpoints" / "9.corrupt").is_dir()
  # The 1-process 4-device run of the same mesh (as test_train_core's 2-process test).
  ref = train(config_utils.load_config(HERE, []), str(tmp_path / "ref"))
  step, params = _restore_params(str(wd))
  assert step == 16
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               _params_np(ref), params)
