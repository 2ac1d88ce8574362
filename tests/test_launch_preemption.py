"""Starting under every launcher, the workdir lock, and preemption.

* `launcher_settings` picks the start-up from the variables each launcher sets;
* 2 processes x 2 CPU devices started as Open MPI's mpirun and as a Kubernetes indexed Job
  start them (no coordinator flags) form one 4-device mesh and train alike (slow);
* a second run on a workdir in use is refused; stale locks are taken over;
* SIGTERM / SIGUSR1 mid-epoch saves the step every process agrees on and stops with status
  75; resumed to the end, the parameters and metrics equal an uninterrupted run's bit for bit
  (1 process in-process and through the CLI, 2 processes slow).

This file is also the config file of the runs (the toy task of test_train_core.py, which
signals itself while building batch `TOY_SIGNAL_AT`).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cirjax.errors import UsageError
from cirjax.train import distributed
from cirjax.train.preemption import PREEMPTED_EXIT
from cirjax.train.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLockError
from tests.test_train_core import REPO, ToyTask, _cli, _restore_params, _run, get_config as toy_config

HERE = os.path.abspath(__file__)
SIGNAL_AT, SIGNAL_NAME, SIGNAL_RANK = "TOY_SIGNAL_AT", "TOY_SIGNAL", "TOY_SIGNAL_RANK"


class SignalToyTask(ToyTask):
  """The toy task; process `TOY_SIGNAL_RANK` (default 0) sends itself `TOY_SIGNAL` (TERM or
  USR1) while building global batch `TOY_SIGNAL_AT`, then builds each later batch slowly, so
  that the step the processes agree on comes before the end of the run; every batch takes
  `TOY_STEP_SLEEP` seconds more."""

  def batch(self, epoch, index):
    time.sleep(float(os.environ.get("TOY_STEP_SLEEP", "0")))  # a run that lasts a while
    at = int(os.environ.get(SIGNAL_AT, "-1"))
    step = epoch * self.steps_per_epoch + index
    if at >= 0 and jax.process_index() == int(os.environ.get(SIGNAL_RANK, "0")):
      if step == at:
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get(SIGNAL_NAME, "TERM")))
      elif step > at:
        time.sleep(0.15)
    return super().batch(epoch, index)


def get_config(arg=None):
  c = toy_config(arg)
  c.task = HERE + ":SignalToyTask"
  c.train.epochs = 3  # 24 steps
  c.progress_every_s = 30.0
  c.profile_steps = ""
  c.wandb = dict(project="", entity="", name="", mode="offline")
  return c


def _records(workdir):
  recs = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if l.strip()]
  return [{k: v for k, v in r.items() if k not in ("time", "data_wait_fraction", "data_wait_s")}
          for r in recs if r["kind"] in ("train", "eval")]


def _assert_same_run(ref_dir, other_dir, total=24):
  s1, p1 = _restore_params(str(ref_dir))
  s2, p2 = _restore_params(str(other_dir))
  assert s1 == s2 == total
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  r1, r2 = _records(ref_dir), _records(other_dir)
  assert [r["step"] for r in r2 if r["kind"] == "train"] == list(range(1, total + 1))
  assert r1 == r2
  assert not os.path.exists(os.path.join(other_dir, LOCK_NAME))  # released at the end


# ---------------------------------------------------------------- start-up under launchers
def test_launcher_settings_from_each_launchers_variables():
  ls = distributed.launcher_settings
  assert ls(environ={}).mode == "single"
  assert ls(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}).mode == "single"
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16",
           "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}
  assert ls(environ=slurm).cluster == "slurm"
  ompi = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1",
          "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1"}
  assert ls(environ=ompi).cluster == "ompi"
  # Open MPI 5 sets no orte URI: a coordinator must be given, then the ranks are Open MPI's.
  ompi5 = {k: v for k, v in ompi.items() if k != "OMPI_MCA_orte_hnp_uri"}
  with pytest.raises(UsageError, match="JAX_COORDINATOR_ADDRESS=HOST:PORT"):
    ls(environ=ompi5)
  s = ls(environ=dict(ompi5, JAX_COORDINATOR_ADDRESS="h0:1234"))
  assert (s.mode, s.coordinator, s.num_processes, s.process_id) == ("explicit", "h0:1234", 4, 1)
  # Kubernetes indexed Job: the manifest's two variables + the pod's completion index.
  k8s = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "JOB_COMPLETION_INDEX": "2"}
  with pytest.raises(UsageError, match="JAX_NUM_PROCESSES"):
    ls(environ=k8s, kubernetes_client=False)
  assert ls(environ=k8s, kubernetes_client=True).cluster == "k8s"
  # Every detector cirjax may name is one JAX selects by that name (Kubernetes': by detection).
  from jax._src import clusters  # pylint: disable=import-outside-toplevel
  names = {c.name for c in clusters.ClusterEnv._cluster_types}  # pylint: disable=protected-access
  for cluster in distributed.CLUSTERS[2:]:
    method = distributed.jax_detection_method(cluster)
    assert method in names or (method is None and cluster == "k8s"), cluster
  s = ls(environ=dict(k8s, JAX_COORDINATOR_ADDRESS="job-0.svc:1234", JAX_NUM_PROCESSES="3"),
         kubernetes_client=False)
  assert (s.mode, s.num_processes, s.process_id, s.source) == (
      "explicit", 3, 2, "JAX_NUM_PROCESSES, JOB_COMPLETION_INDEX")
  assert ls(environ={"KUBERNETES_SERVICE_HOST": "x"}).mode == "single"  # a plain pod
  assert ls(environ={"TPU_WORKER_HOSTNAMES": "a,b"}).cluster == "gketpu"
  # Flags beat variables; --cluster picks a detector; contradictions are named.
  s = ls("h:1", 2, 1, environ=dict(ompi5, JAX_COORDINATOR_ADDRESS="h0:1234"))
  assert (s.coordinator, s.num_processes, s.process_id, s.source) == ("h:1", 2, 1, "flags")
  assert ls(cluster="gcetpu", environ={}).cluster == "gcetpu"
  assert ls(cluster="none", environ=slurm).mode == "single"
  with pytest.raises(UsageError, match="need --coordinator"):
    ls(None, 2, 0, environ={})
  with pytest.raises(UsageError, match="no process id"):
    ls("h:1", 2, None, environ={})
  with pytest.raises(UsageError, match="not in 0..1"):
    ls("h:1", 2, 2, environ={})
  with pytest.raises(UsageError, match="expected one of"):
    ls(cluster="pbs", environ={})


@pytest.fixture(scope="module")
def ompi_run(tmp_path_factory):
  """The toy trained by 2 processes x 2 CPU devices started as mpirun starts them."""
  sys.path.insert(0, os.path.join(REPO, "launch"))
  import multiprocess  # pylint: disable=import-outside-toplevel
  wd = tmp_path_factory.mktemp("launch") / "ompi"
  status = multiprocess.launch(["--config", HERE, "--workdir", str(wd)], timeout=240,
                               env={"CIRJAX_CPU_DEVICES": ""}, style="ompi")
  return multiprocess, wd, status


@pytest.mark.slow
def test_mpirun_and_kubernetes_styles_form_one_mesh_and_train_alike(ompi_run, tmp_path, capfd):
  multiprocess, ompi_wd, status = ompi_run
  assert status == 0
  wd = tmp_path / "k8s"
  assert multiprocess.launch(["--config", HERE, "--workdir", str(wd)], timeout=240,
                             env={"CIRJAX_CPU_DEVICES": ""}, style="k8s") == 0
  out = capfd.readouterr().out
  assert "process 1/2: 2 local of 4 devices (explicit: JAX_NUM_PROCESSES, JOB_COMPLETION_INDEX)" \
      in out, out[-3000:]
  assert "mesh {'data': 4, 'fsdp': 1} over 4 cpu device(s), 2 process(es)" in out
  _assert_same_run(ompi_wd, wd)
  assert not (wd / LOCK_NAME).exists() and not (ompi_wd / LOCK_NAME).exists()


# ---------------------------------------------------------------- the workdir lock
def test_workdir_lock_refuses_a_live_holder_and_takes_over_stale_ones(tmp_path, monkeypatch):
  monkeypatch.delenv("SLURM_JOB_ID", raising=False)
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    lock_path = tmp_path / LOCK_NAME
    held = {"host": socket.gethostname(), "pid": live.pid, "pid_start": None, "processes": 2,
            "job": None, "started": "2026-01-01T00:00:00+00:00"}
    lock_path.write_text(json.dumps(held))
    with pytest.raises(WorkdirLockError) as e:
      WorkdirLock(str(tmp_path)).acquire(1)
    msg = str(e.value)
    assert f"pid {live.pid}" in msg and "run of 2 process(es)" in msg and str(lock_path) in msg
    assert json.loads(lock_path.read_text()) == held  # untouched
    # Another host: cannot be checked, the error says how to clear it.
    lock_path.write_text(json.dumps(dict(held, host="elsewhere")))
    with pytest.raises(WorkdirLockError, match=f"delete {lock_path}"):
      WorkdirLock(str(tmp_path)).acquire(1)
    # The same scheduler job (a requeued SLURM job on another node) takes it over.
    lock_path.write_text(json.dumps(dict(held, host="elsewhere", job="77")))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    lock = WorkdirLock(str(tmp_path))
    lock.acquire(1)
    assert lock.took_over["job"] == "77" and json.loads(lock_path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_path.exists()
  finally:
    live.kill()
    live.wait()
  # A dead pid on this host (a SIGKILLed run): taken over.
  lock_path.write_text(json.dumps(dict(held, pid=live.pid)))
  lock = WorkdirLock(str(tmp_path))
  lock.acquire(1)
  assert lock.took_over["pid"] == live.pid
  lock.release()
  # Directories made for a lock that is released before the run wrote anything go with it.
  fresh = tmp_path / "new" / "wd"
  lock = WorkdirLock(str(fresh))
  lock.acquire(1)
  assert json.loads((fresh / LOCK_NAME).read_text())["pid"] == os.getpid()
  lock.release()
  assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_a_second_process_0_on_a_workdir_is_refused(tmp_path):
  """Two independent `cirjax train` on one workdir: while the first runs, the second stops
  with one error naming it (exit 1, nothing changed); the first ends normally and removes its
  lock. (tests/test_bad_inputs.py has the same refusal in the default run.)"""
  wd = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
             CIRJAX_CPU_DEVICES="4", TOY_STEP_SLEEP="0.5", SLURM_JOB_ID="")
  cmd = [sys.executable, "-m", "cirjax", "train", "--config", HERE, "--workdir", str(wd)]
  first = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 120
    while not (wd / LOCK_NAME).exists() and time.monotonic() < deadline:
      time.sleep(0.1)
    before = sorted(p.name for p in wd.iterdir())
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert first.poll() is None, "the first run ended before the second started"
    assert r.returncode == 1, r.stderr[-2000:]
    assert (f"cirjax train: error: --workdir {wd} is in use by process 0 of a run of 1 "
            f"process(es) on host {socket.gethostname()}, pid {first.pid}") in r.stderr
    assert "Traceback" not in r.stderr
    assert json.loads((wd / LOCK_NAME).read_text())["pid"] == first.pid
    assert set(before) <= {p.name for p in wd.iterdir()}
  finally:
    out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-3000:]
  assert _restore_params(str(wd))[0] == 24 and not (wd / LOCK_NAME).exists()


# ---------------------------------------------------------------- preemption
def test_a_signal_mid_epoch_saves_stops_and_resumes_bit_exactly(tmp_path, monkeypatch):
  """SIGTERM in epoch 0 of 3: the run saves the step it stops at (in general not a checkpoint
  step of every_steps=3), then resumes to the end of an uninterrupted run, bit for bit.
  SLURM's warning SIGUSR1 stops and saves the same way."""
  monkeypatch.setenv(SIGNAL_AT, "5")
  for signame in ("USR1", "TERM"):
    monkeypatch.setenv(SIGNAL_NAME, signame)
    cut = tmp_path / signame
    r = _run(get_config(), cut)
    assert r["status"] == "preempted" and 1 <= r["step"] < 8, (signame, r["step"])
    assert _restore_params(str(cut))[0] == r["step"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
  monkeypatch.delenv(SIGNAL_AT)
  assert _run(get_config(), cut)["status"] == "done"
  assert _run(get_config(), tmp_path / "ref")["status"] == "done"
  _assert_same_run(tmp_path / "ref", cut)


@pytest.mark.slow
def test_cli_sigterm_exits_75_then_resumes_bit_exactly(tmp_path):
  args = ["--config", HERE]
  assert _cli(args + ["--workdir", str(tmp_path / "ref")]).returncode == 0
  r = _cli(args + ["--workdir", str(tmp_path / "cut")], env={SIGNAL_AT: "9"})
  assert r.returncode == PREEMPTED_EXIT, r.stderr[-3000:]
  assert "[cirjax] process 0: SIGTERM received: saving a checkpoint" in r.stderr
  assert "cirjax train: preempted at step" in r.stderr and "Traceback" not in r.stderr
  assert not (tmp_path / "cut" / LOCK_NAME).exists()
  r = _cli(args + ["--workdir", str(tmp_path / "cut")])
  assert r.returncode == 0 and "resuming from" in r.stderr, r.stderr[-3000:]
  _assert_same_run(tmp_path / "ref", tmp_path / "cut")


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["TERM", "USR1"])
def test_two_processes_signal_to_one_rank_saves_and_resumes_bit_exactly(ompi_run, tmp_path,
                                                                        capfd, signame):
  """Rank 1 alone gets SIGTERM (JAX's preemption notifier takes it) or SIGUSR1 (cirjax hands
  it on as a SIGTERM): both processes save the same step, both exit 75; resumed, the run
  equals the uninterrupted 2-process run."""
  multiprocess, ref_wd, status = ompi_run
  assert status == 0
  wd = tmp_path / "cut"
  args = ["--config", HERE, "--workdir", str(wd)]
  env = {"CIRJAX_CPU_DEVICES": ""}
  assert multiprocess.launch(args, timeout=240, env=dict(env, **{
      SIGNAL_AT: "6", SIGNAL_RANK: "1", SIGNAL_NAME: signame})) == 75
  cap = capfd.readouterr()
  out = cap.out + cap.err  # the launcher's own lines go to stderr
  assert out.count("saved on a preemption signal and stopped") == 2, out[-3000:]
  if signame == "USR1":  # SIGTERM goes to JAX's notifier, which logs it in C++
    assert "[rank 1] [cirjax] process 1: SIGUSR1 received" in out
  saved = _restore_params(str(wd))[0]
  assert 6 <= saved < 24
  for rank in (0, 1):  # both agreed on the saved step
    assert (f"[rank {rank}] WARNING:absl:[process={rank}][thread=MainThread] Reached preemption "
            f"sync point, step={saved}") in out, out[-3000:]
  assert f"[rank 0] [cirjax] preempted (a signal to some process): saved step {saved}" in out
  assert multiprocess.launch(args, timeout=240, env=env) == 0
  _assert_same_run(ref_wd, wd)


# ---------------------------------------------------------------- the example launch files
def test_slurm_script_forwards_the_warning_and_requeues_on_75(tmp_path):
  """launch/slurm.sbatch with stand-ins for srun (a task that saves and exits 75 on SIGUSR1)
  and scontrol (records its arguments): SLURM's SIGUSR1 to the batch shell reaches the task,
  and exit status 75 requeues the job; another status does not."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(
      "#!/usr/bin/env bash\necho \"srun $*\" >> \"$LOG\"\n"
      "trap 'echo task got USR1 >> \"$LOG\"; exit ${TASK_STATUS}' USR1\n"
      "touch \"$LOG.ready\"\nwhile true; do sleep 0.05; done\n")
  (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho \"scontrol $*\" >> \"$LOG\"\n")
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  for task_status, requeued in ((75, True), (1, False)):
    log = tmp_path / f"log{task_status}"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", LOG=str(log),
               TASK_STATUS=str(task_status), CONFIG="configs/synthetic.py", WORKDIR="/w",
               SLURM_JOB_ID="123")
    p = subprocess.Popen(["bash", os.path.join(REPO, "launch", "slurm.sbatch")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while not os.path.exists(f"{log}.ready") and time.monotonic() < deadline:
      time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)
    out, _ = p.communicate(timeout=20)
    lines = log.read_text().splitlines()
    assert lines[0].startswith("srun --kill-on-bad-exit=1 python -m cirjax train --config "
                               "configs/synthetic.py --workdir /w"), lines
    assert "task got USR1" in lines and p.returncode == task_status, out
    assert ("scontrol requeue 123" in lines) == requeued, (lines, out)


def test_mpirun_script_passes_a_coordinator_only_where_jax_cannot_find_one(tmp_path):
  """launch/mpirun.sh with a stand-in mpirun: one rank per GPU of each host; Open MPI 4 is
  left to JAX's detection, Open MPI 5 gets JAX_COORDINATOR_ADDRESS = the first host; each
  rank's command is `cirjax train` with the arguments given."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "mpirun").write_text(
      "#!/usr/bin/env bash\n"
      "if [[ $1 == --version ]]; then echo \"mpirun (Open MPI) $MPI_VERSION\"; exit 0; fi\n"
      "printf '%s\\0' \"$@\" > \"$LOG\"\n")
  (bin_dir / "mpirun").chmod(0o755)
  hostfile = tmp_path / "hosts"
  hostfile.write_text("# the nodes\nnode1 slots=2\nnode2 slots=2\n")
  for version, coordinator in (("4.1.5", False), ("5.0.3", True)):
    log = tmp_path / f"args{version}"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", LOG=str(log),
               MPI_VERSION=version)
    r = subprocess.run(["bash", os.path.join(REPO, "launch", "mpirun.sh"), str(hostfile), "2",
                        "configs/synthetic.py", "/w", "--config.seed=1"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    args = log.read_text().split("\0")[:-1]
    assert args[args.index("-np") + 1] == "4" and "ppr:2:node" in args
    assert ("JAX_COORDINATOR_ADDRESS=node1:54321" in args) == coordinator, args
    cmd = args[args.index("bash"):]
    assert "python -m cirjax train" in cmd[2] and "JAX_LOCAL_DEVICE_IDS" in cmd[2]
    assert cmd[3:] == ["cirjax", "--config", "configs/synthetic.py", "--workdir", "/w",
                       "--config.seed=1"]


def test_kubernetes_manifest_gives_each_pod_its_place():
  yaml = pytest.importorskip("yaml")
  service, job = yaml.safe_load_all(open(os.path.join(REPO, "launch", "k8s_indexed_job.yaml")))
  spec = job["spec"]
  assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"]
  assert spec["template"]["spec"]["subdomain"] == service["metadata"]["name"]
  assert service["spec"]["clusterIP"] == "None"
  (container,) = spec["template"]["spec"]["containers"]
  env = {e["name"]: e["value"] for e in container["env"]}
  assert env["JAX_COORDINATOR_ADDRESS"].startswith(f"{job['metadata']['name']}-0."
                                                   f"{service['metadata']['name']}:")
  for index in range(spec["parallelism"]):  # what Kubernetes adds to each pod
    s = distributed.launcher_settings(
        environ=dict(env, KUBERNETES_SERVICE_HOST="10.96.0.1", JOB_COMPLETION_INDEX=str(index)),
        kubernetes_client=False)
    assert (s.mode, s.num_processes, s.process_id) == ("explicit", spec["parallelism"], index)
  rule = spec["podFailurePolicy"]["rules"][0]
  assert rule["action"] == "Ignore" and rule["onExitCodes"]["values"] == [PREEMPTED_EXIT]
