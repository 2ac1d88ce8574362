"""Multi-process start-up: `jax.distributed.initialize()` from SLURM or explicit flags.

Call `initialize(...)` before anything touches a JAX backend. Three cases:
  * a coordinator address is given (flags or CIRJAX_COORDINATOR / CIRJAX_NUM_PROCESSES /
    CIRJAX_PROCESS_ID): explicit multi-process, used by launch/multiprocess.py;
  * running under SLURM with more than one task: JAX auto-detects the cluster;
  * otherwise: a single process, nothing to do.
On CPU (tests, laptops) collectives across processes use gloo.
"""

from __future__ import annotations

import os
import sys

import jax


def _env_int(name: str) -> int | None:
  v = os.environ.get(name)
  return int(v) if v not in (None, "") else None


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
                               process_id=int(process_id))
    info = {"mode": "coordinator", "coordinator": coordinator}
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    # One process per GPU: JAX reads SLURM_* for the coordinator, ranks and local devices.
    jax.distributed.initialize()
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
