"""`cirjax train`: train a config in a workdir (resumes automatically)."""

from __future__ import annotations

import argparse
import os
import sys

import jax

# Importing these touches no JAX backend, so `distributed.initialize` in `run` still comes first.
from cirjax.train import distributed
from cirjax.train.checkpointing import CheckpointError
from cirjax.train.config_utils import ConfigError, load_config, split_config_overrides
from cirjax.train.trainer import format_table, train

HELP = "train QuRe / InstructCIR / the synthetic demo from a config file (resumable)"
DESCRIPTION = """\
Train from an ml_collections config file, resuming from the workdir's latest checkpoint.

  cirjax train --config configs/synthetic.py --workdir /tmp/cirjax_synth
  cirjax train --config configs/qure_blip2_cirr.py:tiny --workdir runs/t --config.train.lr=1e-4
  cirjax train --config configs/synthetic.py:tiny,batch_size=8,epochs=2 --workdir /tmp/t

After the colon: the file's variants and key=value arguments (see its docstring).
Overrides: --config.key=value (or key=value after the flags); the key must exist.
Several processes: --coordinator HOST:PORT --num_processes N --process_id I (or run under
SLURM, auto-detected); see launch/ and docs/train.md.
Exit status: 0 done, 3 stopped on a non-finite loss (the last good checkpoint is kept).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, help="config file, e.g. configs/synthetic.py:tiny")
  parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tb/, plots")
  parser.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-process)")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--cpu_devices", type=int, default=None,
                      help="fake CPU devices per process (testing sharded code on CPU)")
  parser.add_argument("--platform", default=None, help="force a JAX platform (cpu, gpu)")
  parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                      help="config overrides (same as --config.key=value)")
  # `--config.key=value` items are not argparse options: pull them out before parsing.
  original = parser.parse_known_args

  def parse_known_args(args=None, namespace=None):
    rest, overrides = split_config_overrides(list(sys.argv[1:] if args is None else args))
    ns, unknown = original(rest, namespace)
    ns.config_overrides = overrides + list(getattr(ns, "config_overrides", []) or [])
    return ns, unknown

  parser.parse_known_args = parse_known_args


def run(args: argparse.Namespace) -> int:
  # Distributed start-up must precede any use of a JAX backend.
  distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                         args.cpu_devices, args.platform)
  overrides = list(getattr(args, "config_overrides", [])) + list(args.overrides or [])
  try:
    config = load_config(args.config, overrides)
  except ConfigError as e:
    print(f"cirjax train: {e}", file=sys.stderr)
    return 2
  try:
    result = train(config, args.workdir)
  except ConfigError as e:  # e.g. a resume whose config changes the model (train/workdir.py)
    print(f"cirjax train: {e}", file=sys.stderr)
    return 2
  except CheckpointError as e:  # no checkpoint in the workdir restores (train/checkpointing.py)
    print(f"cirjax train: error: {e}", file=sys.stderr)
    return 1
  if result["status"] == "nonfinite":
    print(f"cirjax train: {result['error']}", file=sys.stderr)
    return 3
  if jax.process_index() == 0 and result["status"] == "done":
    print(format_table(result["final_metrics"], f"final metrics ({args.workdir})",
                       result.get("chance")))
    if result.get("samples_per_s"):
      print(f"step time {result['step_time_s'] * 1e3:.1f} ms (median), "
            f"{result['samples_per_s']:.1f} samples/s")
    print(f"metrics: {os.path.join(args.workdir, 'metrics.jsonl')}, "
          f"plots: {os.path.join(args.workdir, 'curves.png')}")
  return 0
