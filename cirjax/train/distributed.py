"""Multi-process start-up: `jax.distributed.initialize()` under every launcher, before any
use of a JAX backend.

`initialize(...)` picks one of these, first match wins (`launcher_settings` decides, from the
flags and the environment alone, so tests check each case without starting anything):
  * explicit: a coordinator address from `--coordinator`, `CIRJAX_COORDINATOR` or JAX's own
    `JAX_COORDINATOR_ADDRESS`; the process count from `--num-processes`,
    `CIRJAX_NUM_PROCESSES`, `JAX_NUM_PROCESSES` or Open MPI's `OMPI_COMM_WORLD_SIZE`; the
    process id from `--process-id`, `CIRJAX_PROCESS_ID`, `JAX_PROCESS_ID`, a Kubernetes
    indexed Job's `JOB_COMPLETION_INDEX` or `OMPI_COMM_WORLD_RANK`. JAX's cluster detection
    is then switched off (each process sees all its local devices unless
    `JAX_LOCAL_DEVICE_IDS` says otherwise). launch/multiprocess.py and
    launch/k8s_indexed_job.yaml use this;
  * `--cluster NAME` / `CIRJAX_CLUSTER=NAME`: one of JAX's detectors by name (`slurm`,
    `ompi`, `k8s`, `gcetpu`, `gketpu`, `mpi4py`; `k8s` runs JAX's general detection, as its
    Kubernetes detector has no name), e.g. a multi-host Cloud TPU VM, whose hosts are known
    only to the TPU metadata server;
  * detected (`--cluster auto`, the default) from the variables JAX's detectors read:
    SLURM (`SLURM_JOB_ID`, `SLURM_STEP_NODELIST`, `SLURM_NTASKS` > 1, `SLURM_PROCID`,
    `SLURM_LOCALID`: inside `srun`), Open MPI 4 `mpirun` (`OMPI_MCA_orte_hnp_uri`,
    `OMPI_COMM_WORLD_SIZE` > 1; the coordinator is the launching host, port
    `JAX_COORDINATOR_PORT` or one derived from the job id), a Kubernetes indexed Job with
    the `kubernetes` client installed (`KUBERNETES_SERVICE_HOST`, `JOB_COMPLETION_INDEX`;
    JAX asks the API server for the Job's parallelism and pod names), GKE TPU
    (`TPU_WORKER_HOSTNAMES` naming several hosts). SLURM and Open MPI give each process the
    one GPU of its local rank. A launcher that started several processes but cannot be used
    as found (Open MPI 5, which sets no `OMPI_MCA_orte_hnp_uri`; an indexed Job without the
    `kubernetes` client) is a `UsageError` saying what to set, never N independent
    process 0s;
  * otherwise (`--cluster none`, or nothing found): a single process, nothing to do.
On CPU (tests, laptops) collectives across processes use gloo.

A process that dies stops sending heartbeats to the coordination service, which then stops
every other process with a message naming the dead one ("The following tasks are unhealthy
(stopped sending heartbeats): N"). The timeout is `HEARTBEAT_TIMEOUT_S` (15 s; JAX's default
is 100 s), or `CIRJAX_HEARTBEAT_TIMEOUT` seconds. launch/multiprocess.py also stops the others
as soon as one exits with an error.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from cirjax.errors import UsageError


# Seconds without a heartbeat after which the coordination service declares a process dead
# and stops the others, naming it. JAX's default (100 s) leaves the survivors of a crashed
# worker waiting that long; heartbeats come from a runtime thread, so a long step or compile
# does not miss them.
HEARTBEAT_TIMEOUT_S = 15


def _env_int(name: str, environ=None) -> int | None:
  environ = os.environ if environ is None else environ
  v = environ.get(name)
  if v in (None, ""):
    return None
  try:
    return int(v)
  except ValueError:
    raise UsageError(f"{name}={v!r}: expected an integer") from None


def heartbeat_timeout() -> int:
  """`CIRJAX_HEARTBEAT_TIMEOUT` seconds, or `HEARTBEAT_TIMEOUT_S`."""
  return _env_int("CIRJAX_HEARTBEAT_TIMEOUT") or HEARTBEAT_TIMEOUT_S


# JAX's cluster detectors by name (`cluster_detection_method`), and `auto` / `none`.
CLUSTERS = ("auto", "none", "slurm", "ompi", "k8s", "gcetpu", "gketpu", "mpi4py")
# Where an explicit run's process count and id come from, first set wins.
_COUNT_VARS = ("CIRJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES", "OMPI_COMM_WORLD_SIZE")
_ID_VARS = ("CIRJAX_PROCESS_ID", "JAX_PROCESS_ID", "JOB_COMPLETION_INDEX", "OMPI_COMM_WORLD_RANK")


@dataclasses.dataclass(frozen=True)
class LaunchSettings:
  """How this process joins a run: `mode` is `single`, `explicit` or `cluster` (then `cluster`
  names JAX's detector); `source` says where the values came from, for the start-up line."""
  mode: str
  cluster: str | None = None
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  source: str = ""


def _first(names, environ) -> tuple[int | None, str | None]:
  for n in names:
    v = _env_int(n, environ)
    if v is not None:
      return v, n
  return None, None


def _kubernetes_client() -> bool:
  try:
    import kubernetes  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def launcher_settings(coordinator: str | None = None, num_processes: int | None = None,
                      process_id: int | None = None, cluster: str | None = None,
                      environ=None, kubernetes_client: bool | None = None) -> LaunchSettings:
  """The start-up this process needs, from the flags and `environ` (see the module docstring);
  a `UsageError` names what is missing or contradictory."""
  env = os.environ if environ is None else environ
  cluster = cluster or env.get("CIRJAX_CLUSTER") or "auto"
  if cluster not in CLUSTERS:
    raise UsageError(f"--cluster {cluster!r} (or CIRJAX_CLUSTER): expected one of "
                     f"{', '.join(CLUSTERS)}")
  coordinator = coordinator or env.get("CIRJAX_COORDINATOR") or env.get("JAX_COORDINATOR_ADDRESS")
  if coordinator and cluster in ("auto", "none"):
    srcs = []
    if num_processes is None:
      num_processes, n = _first(_COUNT_VARS, env)
      srcs.append(n)
    if process_id is None:
      process_id, n = _first(_ID_VARS, env)
      srcs.append(n)
    if num_processes is None or process_id is None:
      raise UsageError(
          f"coordinator {coordinator} given but no process "
          f"{'count' if num_processes is None else 'id'}: pass --num-processes N and "
          "--process-id I, or set " + " / ".join(
              _COUNT_VARS if num_processes is None else _ID_VARS))
    if not 0 <= process_id < num_processes or num_processes < 1:
      raise UsageError(f"process id {process_id} is not in 0..{num_processes - 1} "
                       f"(process count {num_processes})")
    source = ", ".join(s for s in srcs if s) or "flags"
    return LaunchSettings("explicit", coordinator=coordinator, num_processes=num_processes,
                          process_id=process_id, source=source)
  if coordinator or num_processes is not None or process_id is not None:
    if cluster not in ("auto", "none"):
      raise UsageError(f"--cluster {cluster} detects the coordinator and process ids itself: "
                       "drop --coordinator / --num-processes / --process-id")
    raise UsageError("--num-processes / --process-id need --coordinator HOST:PORT (or "
                     "CIRJAX_COORDINATOR / JAX_COORDINATOR_ADDRESS)")
  if cluster == "none":
    return LaunchSettings("single")
  if cluster != "auto":
    return LaunchSettings("cluster", cluster=cluster, source=f"--cluster {cluster}")
  return _detect(env, _kubernetes_client() if kubernetes_client is None else kubernetes_client)


def _detect(env, kubernetes_client: bool) -> LaunchSettings:
  """`auto`: the launcher whose variables are set, as JAX's detectors read them."""
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(v in env for v in slurm) and (_env_int("SLURM_NTASKS", env) or 1) > 1:
    return LaunchSettings("cluster", cluster="slurm", source=f"SLURM job {env['SLURM_JOB_ID']}")
  ompi_size = _env_int("OMPI_COMM_WORLD_SIZE", env) or 1
  if ompi_size > 1:
    if "OMPI_MCA_orte_hnp_uri" in env:
      return LaunchSettings("cluster", cluster="ompi", source="Open MPI (mpirun)")
    raise UsageError(
        f"started by mpirun as {ompi_size} processes (OMPI_COMM_WORLD_SIZE), but this Open MPI "
        "sets no OMPI_MCA_orte_hnp_uri (Open MPI 5) for JAX to find the coordinator: set "
        "JAX_COORDINATOR_ADDRESS=HOST:PORT (the first rank's host, a free port) for every rank, "
        "e.g. mpirun -x JAX_COORDINATOR_ADDRESS=... (launch/mpirun.sh does)")
  if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env:
    if kubernetes_client:
      return LaunchSettings("cluster", cluster="k8s", source="Kubernetes indexed Job")
    raise UsageError(
        "a Kubernetes indexed Job (JOB_COMPLETION_INDEX) without the kubernetes client, so JAX "
        "cannot ask for the Job's size: set JAX_COORDINATOR_ADDRESS=<job>-0.<service>:PORT and "
        "JAX_NUM_PROCESSES=<parallelism> in the pod spec (launch/k8s_indexed_job.yaml), set "
        "JAX_NUM_PROCESSES=1 with JAX_COORDINATOR_ADDRESS=localhost:PORT for a one-pod Job, or "
        "pip install kubernetes")
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return LaunchSettings("cluster", cluster="gketpu", source=f"TPU pod ({len(hosts)} hosts)")
  return LaunchSettings("single")


def jax_detection_method(cluster: str) -> str | None:
  """The `cluster_detection_method` for `cluster`. JAX's Kubernetes detector has no name to
  select it by (JAX 0.10): it runs in JAX's own detection, which tries every detector."""
  return None if cluster == "k8s" else cluster


def _use_gloo_on_cpu(platform: str | None) -> None:
  if platform == "cpu" or os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_devices: int | None = None,
               platform: str | None = None, cluster: str | None = None) -> dict:
  """Initialises JAX's distributed runtime when needed (see the module docstring); returns
  what was done."""
  cpu_devices = cpu_devices if cpu_devices is not None else _env_int("CIRJAX_CPU_DEVICES")
  platform = platform or os.environ.get("CIRJAX_PLATFORM")
  settings = launcher_settings(coordinator, num_processes, process_id, cluster)
  if platform:
    jax.config.update("jax_platforms", platform)
  if cpu_devices:
    jax.config.update("jax_num_cpu_devices", int(cpu_devices))
  info = {"mode": settings.mode}
  if settings.mode == "explicit":
    _use_gloo_on_cpu(platform)
    # Everything is given: JAX's detectors would only probe (the Kubernetes one asks the API
    # server and warns without its client).
    jax.distributed.initialize(coordinator_address=settings.coordinator,
                               num_processes=settings.num_processes,
                               process_id=settings.process_id,
                               cluster_detection_method="deactivate",
                               heartbeat_timeout_seconds=heartbeat_timeout())
    info.update(coordinator=settings.coordinator, source=settings.source)
  elif settings.mode == "cluster":
    _use_gloo_on_cpu(platform)
    # JAX reads the launcher's variables: coordinator, process count and id, and (SLURM,
    # Open MPI) the local rank's GPU.
    jax.distributed.initialize(cluster_detection_method=jax_detection_method(settings.cluster),
                               heartbeat_timeout_seconds=heartbeat_timeout())
    info.update(cluster=settings.cluster, source=settings.source)
  if platform:
    check_platform(platform)
  if info["mode"] != "single":
    info.update(process=jax.process_index(), processes=jax.process_count(),
                local_devices=jax.local_device_count(), devices=jax.device_count())
    print(f"[cirjax] process {info['process']}/{info['processes']}: "
          f"{info['local_devices']} local of {info['devices']} devices ({info['mode']}: "
          f"{info['source']})", file=sys.stderr, flush=True)
  return info


def check_platform(platform: str) -> None:
  """Refuses a forced platform this JAX cannot run (CPU-only jaxlib asked for `gpu`): one
  line naming it instead of the backend's traceback. Called after the distributed start-up,
  which must come before any use of a backend."""
  try:
    jax.devices()
  except RuntimeError as e:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UsageError(
        f"--platform {platform}: this JAX ({jax.__version__}) cannot use it ({reason}); on a "
        "GPU machine install CUDA JAX (pip install -e '.[cuda]', README 'Set-up'), or leave "
        "--platform (and CIRJAX_PLATFORM) unset to use the backends JAX finds") from None


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
