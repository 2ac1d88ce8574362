"""Multi-process start-up: `jax.distributed.initialize()` from SLURM or explicit flags.

Call `initialize(...)` before anything touches a JAX backend. Three cases:
  * a coordinator address is given (flags or CIRJAX_COORDINATOR / CIRJAX_NUM_PROCESSES /
    CIRJAX_PROCESS_ID): explicit multi-process, used by launch/multiprocess.py;
  * running under SLURM with more than one task: JAX auto-detects the cluster;
  * otherwise: a single process, nothing to do.
On CPU (tests, laptops) collectives across processes use gloo.

A process that dies stops sending heartbeats to the coordination service, which then stops
every other process with a message naming the dead one ("The following tasks are unhealthy
(stopped sending heartbeats): N"). The timeout is `HEARTBEAT_TIMEOUT_S` (15 s; JAX's default
is 100 s), or `CIRJAX_HEARTBEAT_TIMEOUT` seconds. launch/multiprocess.py also stops the others
as soon as one exits with an error.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils


# Seconds without a heartbeat after which the coordination service declares a process dead
# and stops the others, naming it. JAX's default (100 s) leaves the survivors of a crashed
# worker waiting that long; heartbeats come from a runtime thread, so a long step or compile
# does not miss them.
HEARTBEAT_TIMEOUT_S = 15


def _env_int(name: str) -> int | None:
  v = os.environ.get(name)
  return int(v) if v not in (None, "") else None


def heartbeat_timeout() -> int:
  """`CIRJAX_HEARTBEAT_TIMEOUT` seconds, or `HEARTBEAT_TIMEOUT_S`."""
  return _env_int("CIRJAX_HEARTBEAT_TIMEOUT") or HEARTBEAT_TIMEOUT_S


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_devices: int | None = None,
               platform: str | None = None) -> dict:
  """Initialises JAX's distributed runtime when needed; returns what was done."""
  coordinator = coordinator or os.environ.get("CIRJAX_COORDINATOR")
  num_processes = num_processes if num_processes is not None else _env_int("CIRJAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("CIRJAX_PROCESS_ID")
  cpu_devices = cpu_devices if cpu_devices is not None else _env_int("CIRJAX_CPU_DEVICES")
  platform = platform or os.environ.get("CIRJAX_PLATFORM")
  if platform:
    jax.config.update("jax_platforms", platform)
  if cpu_devices:
    jax.config.update("jax_num_cpu_devices", int(cpu_devices))
  info = {"mode": "single"}
  if coordinator:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator needs --num_processes and --process_id "
                       "(or CIRJAX_NUM_PROCESSES / CIRJAX_PROCESS_ID)")
    if platform == "cpu" or os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(num_processes),
                               process_id=int(process_id),
                               heartbeat_timeout_seconds=heartbeat_timeout())
    info = {"mode": "coordinator", "coordinator": coordinator}
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    # One process per GPU: JAX reads SLURM_* for the coordinator, ranks and local devices.
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout())
    info = {"mode": "slurm", "job": os.environ["SLURM_JOB_ID"]}
  if info["mode"] != "single":
    info.update(process=jax.process_index(), processes=jax.process_count(),
                local_devices=jax.local_device_count(), devices=jax.device_count())
    print(f"[cirjax] process {info['process']}/{info['processes']}: "
          f"{info['local_devices']} local of {info['devices']} devices ({info['mode']})",
          file=sys.stderr, flush=True)
  return info


def is_main() -> bool:
  return jax.process_index() == 0


def all_processes(flag: bool) -> bool:
  """Whether `flag` holds on every process (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.all(multihost_utils.process_allgather(np.int32(bool(flag)))))


def barrier(name: str) -> None:
  """Waits until every process has reached `name` (nothing to wait for in one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
