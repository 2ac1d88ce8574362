#!/usr/bin/env python
"""Runs `cirjax train` as N processes on this machine (CPU, gloo collectives).

Each process gets `--devices-per-process` fake CPU devices and joins a coordinator on
127.0.0.1, exactly like the hosts of a cluster would; used by the tests to check that a
multi-process run equals a single-process one.

  python launch/multiprocess.py --num-processes 2 --devices-per-process 2 -- \
      --config configs/synthetic.py:tiny --workdir /tmp/mp

Everything after `--` goes to `cirjax train`. Each worker's output is streamed as it comes,
every line prefixed with `[rank N]`. When a worker exits with a non-zero status (crash,
kill), the launcher says which one and stops the others at once: the rest of a collective
job cannot finish without it. A worker that saved on a preemption signal and stopped (status
75, `cirjax.train.preemption.PREEMPTED_EXIT`) is not a failure: the others stop at the same
step by themselves. Exit status: 0 when all succeed, else the failed worker's status (128 +
the signal number for a worker killed by a signal), 124 on `--timeout`.

`--env ompi` / `--env k8s` start the workers without the coordinator flags, with the
variables `mpirun` (Open MPI 4) or a Kubernetes indexed Job (with launch/k8s_indexed_job.yaml's
settings) would give them instead, so that `cirjax train` finds its place in the run the way
it does under that launcher (`rank_env`; the tests use it).
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

# SIGTERM, then SIGKILL after this long: JAX's preemption notifier takes SIGTERM over, and a
# worker blocked in a collective with a dead peer never gets to exit by itself.
GRACE_S = 2.0
PREEMPTED_EXIT = 75  # cirjax.train.preemption.PREEMPTED_EXIT (this script imports no cirjax)
ENVS = ("flags", "ompi", "k8s")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def describe_status(code: int) -> str:
  if code < 0:
    try:
      return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
      return f"was killed by signal {-code}"
  return f"exited with status {code}"


def _say(msg: str) -> None:
  print(f"[launcher] {msg}", file=sys.stderr, flush=True)


def _stream(rank: int, proc: subprocess.Popen, lock: threading.Lock) -> None:
  """Copies one worker's output to ours line by line, prefixed with its rank."""
  for line in proc.stdout:
    with lock:
      sys.stdout.write(f"[rank {rank}] {line.rstrip(chr(10))}\n")
      sys.stdout.flush()


def _wait(rank: int, proc: subprocess.Popen, exits: queue.Queue) -> None:
  exits.put((rank, proc.wait()))


def _stop(procs: list[subprocess.Popen]) -> None:
  for p in procs:
    if p.poll() is None:
      p.terminate()
  deadline = time.monotonic() + GRACE_S
  for p in procs:
    try:
      p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def rank_env(style: str, rank: int, num_processes: int, port: int) -> dict:
  """The variables a launcher of `style` sets for worker `rank` (coordinator on 127.0.0.1:port).

  ompi: as Open MPI 4's mpirun sets them (JAX's Open MPI detector takes the coordinator's host
  from OMPI_MCA_orte_hnp_uri, the port from JAX_COORDINATOR_PORT). k8s: what a pod of an
  indexed Job gets from Kubernetes (KUBERNETES_SERVICE_HOST, JOB_COMPLETION_INDEX, HOSTNAME)
  plus the two variables launch/k8s_indexed_job.yaml sets (JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES)."""
  if style == "ompi":
    return {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://127.0.0.1,10.0.0.7:34911",
            "JAX_COORDINATOR_PORT": str(port), "OMPI_COMM_WORLD_SIZE": str(num_processes),
            "OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_RANK": str(rank),
            "OMPI_COMM_WORLD_LOCAL_SIZE": str(num_processes),
            "OMPI_COMM_WORLD_NODE_RANK": "0", "OMPI_UNIVERSE_SIZE": str(num_processes)}
  if style == "k8s":
    return {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443",
            "JOB_COMPLETION_INDEX": str(rank), "HOSTNAME": f"cirjax-{rank}",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": str(num_processes)}
  raise ValueError(f"unknown launcher environment {style!r} (one of {', '.join(ENVS)})")


def _start(train_args: list[str], num_processes: int, devices_per_process: int,
           env: dict | None, style: str = "flags") -> list[subprocess.Popen]:
  port = free_port()
  base_env = dict(os.environ)
  base_env.update(env or {})
  base_env.setdefault("JAX_PLATFORMS", "cpu")
  base_env.setdefault("CUDA_VISIBLE_DEVICES", "")
  base_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  base_env["PYTHONUNBUFFERED"] = "1"  # lines reach the launcher as they are printed
  procs = []
  for i in range(num_processes):
    cmd = [sys.executable, "-m", "cirjax", "train", *train_args,
           "--cpu-devices", str(devices_per_process), "--platform", "cpu"]
    worker_env = dict(base_env)
    if style == "flags":
      cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(num_processes),
              "--process-id", str(i)]
    else:
      worker_env.update(rank_env(style, i, num_processes, port))
    procs.append(subprocess.Popen(cmd, env=worker_env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, bufsize=1,
                                  errors="replace"))
  return procs


def launch(train_args: list[str], num_processes: int = 2, devices_per_process: int = 2,
           timeout: float | None = None, env: dict | None = None, watchdog: bool = True,
           style: str = "flags") -> int:
  """Starts the workers, streams their output with a `[rank N]` prefix, returns a status:
  0, the first failed worker's (negative: killed by that signal) or 124 on timeout.

  With `watchdog`, the first worker to fail brings the others down at once; without it they
  are left to notice by themselves (JAX's coordination-service heartbeat).
  """
  procs = _start(train_args, num_processes, devices_per_process, env, style)
  lock, exits = threading.Lock(), queue.Queue()
  readers = [threading.Thread(target=_stream, args=(i, p, lock), daemon=True)
             for i, p in enumerate(procs)]
  for i, p in enumerate(procs):
    readers.append(threading.Thread(target=_wait, args=(i, p, exits), daemon=True))
  for t in readers:
    t.start()
  deadline = None if timeout is None else time.monotonic() + timeout
  status, running, first_failure = 0, num_processes, None
  try:
    while running:
      try:
        rank, code = exits.get(timeout=None if deadline is None
                               else max(0.01, deadline - time.monotonic()))
      except queue.Empty:
        _say(f"timeout after {timeout:g}s: stopping all workers")
        status = 124
        break
      running -= 1
      if code == PREEMPTED_EXIT:
        status = status or code
        _say(f"rank {rank} (pid {procs[rank].pid}) saved on a preemption signal and stopped")
        continue
      if code and first_failure is None:
        first_failure, status = time.monotonic(), code
        if watchdog and running:
          _say(f"rank {rank} (pid {procs[rank].pid}) {describe_status(code)}: stopping the "
               f"other {running} worker(s)")
          break
        _say(f"rank {rank} (pid {procs[rank].pid}) {describe_status(code)}")
  finally:
    _stop(procs)
    for t in readers:
      t.join(timeout=GRACE_S)
  if first_failure is not None and watchdog:
    _say(f"all workers stopped {time.monotonic() - first_failure:.1f}s after the failure")
  return status


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" in argv:
    k = argv.index("--")
    own, train_args = argv[:k], argv[k + 1:]
  else:
    own, train_args = argv, []
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  # The underscore spellings are the launcher's old ones (still taken).
  ap.add_argument("--num-processes", "--num_processes", dest="num_processes", type=int, default=2)
  ap.add_argument("--devices-per-process", "--devices_per_process", dest="devices_per_process",
                  type=int, default=2)
  ap.add_argument("--timeout", type=float, default=None, help="seconds before all are killed")
  ap.add_argument("--env", dest="style", choices=ENVS, default="flags",
                  help="how workers learn their place: coordinator flags (default), or the "
                  "variables of Open MPI's mpirun / a Kubernetes indexed Job")
  ap.add_argument("--no-watchdog", "--no_watchdog", dest="watchdog", action="store_false",
                  help="leave the other workers running when one fails (they notice through "
                  "JAX's coordination service)")
  args = ap.parse_args(own)
  if not train_args:
    ap.error("give the `cirjax train` arguments after `--`")
  status = launch(train_args, args.num_processes, args.devices_per_process, args.timeout,
                  watchdog=args.watchdog, style=args.style)
  return 128 - status if status < 0 else status


if __name__ == "__main__":
  sys.exit(main())
