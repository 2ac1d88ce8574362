#!/usr/bin/env bash
# Multi-host GPU training under Open MPI's mpirun, one process per GPU.
#
#   launch/mpirun.sh HOSTFILE GPUS_PER_HOST CONFIG[:variant] WORKDIR [--config.key=value ...]
#
# HOSTFILE lists the hosts (`node1 slots=8`, one per line); WORKDIR must be on a filesystem
# all hosts see. Open MPI 4 (mpirun sets OMPI_MCA_orte_hnp_uri): JAX's Open MPI detection
# finds the coordinator (the host mpirun runs on, a port derived from the job id; set
# JAX_COORDINATOR_PORT to choose it), the ranks and each rank's GPU (its local rank), see
# cirjax/train/distributed.py. Open MPI 5 sets no such variable: this script then passes
# JAX_COORDINATOR_ADDRESS (the first host of HOSTFILE, port JAX_COORDINATOR_PORT or 54321)
# and cirjax takes the ranks from OMPI_COMM_WORLD_SIZE / OMPI_COMM_WORLD_RANK, each process
# seeing the GPU of its local rank (JAX_LOCAL_DEVICE_IDS, set per rank below).
# SIGTERM to mpirun (forwarded to every rank) saves a checkpoint at the next common step and
# exits with status 75; run the same command again to resume.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 HOSTFILE GPUS_PER_HOST CONFIG[:variant] WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
hostfile="$1"; per_host="$2"; config="$3"; workdir="$4"; shift 4
hosts=$(grep -v '^\s*#' "$hostfile" | awk 'NF {print $1}')
num_hosts=$(echo "$hosts" | wc -l)
first_host=$(echo "$hosts" | head -n 1)
np=$((num_hosts * per_host))
coordinator_env=()
if ! mpirun --version 2>/dev/null | grep -q "Open MPI) [1-4]\."; then
  coordinator_env=(-x "JAX_COORDINATOR_ADDRESS=${first_host}:${JAX_COORDINATOR_PORT:-54321}")
fi
exec mpirun -np "$np" --hostfile "$hostfile" --map-by "ppr:${per_host}:node" --bind-to none \
  -x TF_CPP_MIN_LOG_LEVEL=3 -x XLA_PYTHON_CLIENT_PREALLOCATE=false \
  ${JAX_COORDINATOR_PORT:+-x JAX_COORDINATOR_PORT} "${coordinator_env[@]}" \
  bash -c 'if [[ -n "${JAX_COORDINATOR_ADDRESS:-}" ]]; then
             export JAX_LOCAL_DEVICE_IDS="$OMPI_COMM_WORLD_LOCAL_RANK"
           fi
           exec python -m cirjax train "$@"' cirjax \
  --config "$config" --workdir "$workdir" "$@"
