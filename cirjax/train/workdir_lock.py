"""The workdir lock: one run (one process 0) per workdir at a time.

Two runs writing one workdir corrupt each other's checkpoints and logs; the usual way to get
there on a cluster is a launcher whose ranks never joined one distributed run (each believes
it is process 0). Process 0 of a run creates `<workdir>/cirjax.lock` (JSON: host, pid, the
pid's start time, process count, scheduler job id, start time) atomically: the complete file
is written under a temporary name and hard-linked to the lock name, which fails if the lock
exists. A lock found there is
  * taken over when it is stale: its pid is gone (or is another process by now: the recorded
    start time differs) on this host, or it names this process, or it was written by an
    earlier attempt of this scheduler job (`SLURM_JOB_ID`, a requeued job keeps it);
  * otherwise refused with one `WorkdirLockError` naming the holder. A lock left on another
    host by a run that died there (a node failure) cannot be checked from here: the error
    says to delete the file once that run is known to be gone.
The lock is removed when the run ends (done, stopped, preempted, an error), and with it the
workdir if the lock created it and the run wrote nothing else (a run that fails to start
leaves the disk as it was); a SIGKILLed run leaves it, and its next start on the same host
takes it over.
"""

from __future__ import annotations

import datetime
import json
import os
import socket

import jax

from cirjax.errors import CirjaxError
from cirjax.train import distributed

LOCK_NAME = "cirjax.lock"
_JOB_VARS = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID")


class WorkdirLockError(CirjaxError):
  """The workdir is in use by another run; the message names it and how to clear the lock."""


def _pid_start(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (/proc), None where unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # exists, another user's
  now = _pid_start(pid)
  return start is None or now is None or now == start


def _job_id() -> str | None:
  return next((os.environ[v] for v in _JOB_VARS if os.environ.get(v)), None)


def _record(num_processes: int) -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
          "processes": int(num_processes), "job": _job_id(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


class WorkdirLock:
  """`acquire()` (process 0) before anything is written to the workdir, `release()` at exit."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self.held = False
    self.took_over: dict | None = None
    self._created: list[str] = []  # directories made for the lock, deepest first

  def read(self) -> dict | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # unreadable (a torn write cannot happen: it was linked complete)

  def acquire(self, num_processes: int) -> None:
    d = os.path.abspath(self.workdir)
    while not os.path.exists(d):
      self._created.append(d)
      d = os.path.dirname(d)
    os.makedirs(self.workdir, exist_ok=True)
    mine = _record(num_processes)
    tmp = f"{self.path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump(mine, f)
    try:
      for _ in range(3):
        try:
          os.link(tmp, self.path)  # atomic, and fails if a lock exists
          self.held = True
          return
        except FileExistsError:
          pass
        held = self.read()
        if held is None:
          continue  # released meanwhile: try again
        if not self._stale(held, mine):
          raise WorkdirLockError(self._refusal(held))
        os.replace(tmp, self.path)
        if self.read() == mine:  # not taken over by someone else at the same moment
          self.held, self.took_over = True, held
          return
        with open(tmp, "w") as f:
          json.dump(mine, f)
      raise WorkdirLockError(self._refusal(self.read() or {}))
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)

  def _stale(self, held: dict, mine: dict) -> bool:
    if held.get("job") and held.get("job") == mine["job"]:
      return True  # an earlier attempt of this scheduler job (requeued)
    if held.get("host") != mine["host"]:
      return False
    pid = held.get("pid")
    if not isinstance(pid, int):
      return False
    return pid == mine["pid"] or not _alive(pid, held.get("pid_start"))

  def _refusal(self, held: dict) -> str:
    who = (f"process 0 of a run of {held.get('processes', '?')} process(es) on host "
           f"{held.get('host', '?')}, pid {held.get('pid', '?')}"
           + (f", job {held['job']}" if held.get("job") else "")
           + f", started {held.get('started', '?')}")
    same_host = held.get("host") == socket.gethostname()
    how = ("wait for it to end or stop it" if same_host else
           "its liveness cannot be checked from this host; once that run is known to be gone "
           f"(e.g. its node failed), delete {self.path}")
    return (f"--workdir {self.workdir} is in use by {who} ({self.path}): a workdir holds one "
            f"run at a time; {how}, or use another --workdir. If every process of a "
            "multi-host run says this, they did not join one run: see docs/train.md, "
            "'Several processes, GPUs, clusters'")

  def release(self) -> None:
    """Removes the lock if it is still this process's (never another run's)."""
    if not self.held:
      return
    self.held = False
    held = self.read()
    if held and held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
      try:
        os.remove(self.path)
      except OSError:
        pass
    for d in self._created:  # a run that failed before writing anything leaves no directory
      try:
        os.rmdir(d)
      except OSError:
        break  # not empty: the run wrote there
    self._created = []


def lock_run(workdir: str, log) -> WorkdirLock:
  """Process 0 takes the lock of `workdir`; when it is refused, every process raises (the
  others with a pointer to process 0's error). Returns the lock (held on process 0 only)."""
  lock = WorkdirLock(workdir)
  refused = None
  if jax.process_index() == 0:
    try:
      lock.acquire(jax.process_count())
    except WorkdirLockError as e:
      refused = e
    if lock.took_over:
      log(f"took over the stale workdir lock of pid {lock.took_over.get('pid')} on "
          f"{lock.took_over.get('host')} ({lock.path})")
  if not distributed.all_processes(refused is None):
    raise refused or WorkdirLockError(f"--workdir {workdir}: process 0 found it in use by "
                                      "another run (its error names the run)")
  return lock


def release_on_error(lock: WorkdirLock, fn, *args):
  """`fn(*args)`, releasing `lock` if it raises (a run that fails to start leaves no lock)."""
  try:
    return fn(*args)
  except BaseException:
    lock.release()
    raise
