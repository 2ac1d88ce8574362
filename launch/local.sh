#!/usr/bin/env bash
# One machine, one process, all local devices (GPUs, or CPU):
#   launch/local.sh configs/synthetic.py /tmp/cirjax_synth [--config.key=value ...]
# TensorFlow (used by data readers) must not take GPU memory; JAX uses the GPUs.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG[:variant] WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config="$1"; workdir="$2"; shift 2
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
exec python -m cirjax train --config "$config" --workdir "$workdir" "$@"
