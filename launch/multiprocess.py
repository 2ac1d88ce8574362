#!/usr/bin/env python
"""Runs `cirjax train` as N processes on this machine (CPU, gloo collectives).

Each process gets `--devices_per_process` fake CPU devices and joins a coordinator on
127.0.0.1, exactly like the hosts of a cluster would; used by the tests to check that a
multi-process run equals a single-process one.

  python launch/multiprocess.py --num_processes 2 --devices_per_process 2 -- \
      --config configs/synthetic.py:tiny --workdir /tmp/mp

Everything after `--` goes to `cirjax train`. Exit status: the first non-zero child status.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(train_args: list[str], num_processes: int = 2, devices_per_process: int = 2,
           timeout: float | None = None, env: dict | None = None) -> int:
  """Starts the processes, streams their output with a `[pI]` prefix, returns a status."""
  port = free_port()
  procs = []
  base_env = dict(os.environ)
  base_env.update(env or {})
  base_env.setdefault("JAX_PLATFORMS", "cpu")
  base_env.setdefault("CUDA_VISIBLE_DEVICES", "")
  base_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  for i in range(num_processes):
    cmd = [sys.executable, "-m", "cirjax", "train", *train_args,
           "--coordinator", f"127.0.0.1:{port}", "--num_processes", str(num_processes),
           "--process_id", str(i), "--cpu_devices", str(devices_per_process),
           "--platform", "cpu"]
    procs.append(subprocess.Popen(cmd, env=base_env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  deadline = None if timeout is None else time.time() + timeout
  status = 0
  outputs = [""] * num_processes
  try:
    for i, p in enumerate(procs):
      remaining = None if deadline is None else max(1.0, deadline - time.time())
      out, _ = p.communicate(timeout=remaining)
      outputs[i] = out
      for line in out.splitlines():
        print(f"[p{i}] {line}", flush=True)
      if p.returncode and not status:
        status = p.returncode
  except subprocess.TimeoutExpired:
    status = 124
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return status


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" in argv:
    k = argv.index("--")
    own, train_args = argv[:k], argv[k + 1:]
  else:
    own, train_args = argv, []
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--num_processes", type=int, default=2)
  ap.add_argument("--devices_per_process", type=int, default=2)
  ap.add_argument("--timeout", type=float, default=None, help="seconds before all are killed")
  args = ap.parse_args(own)
  if not train_args:
    ap.error("give the `cirjax train` arguments after `--`")
  return launch(train_args, args.num_processes, args.devices_per_process, args.timeout)


if __name__ == "__main__":
  sys.exit(main())
