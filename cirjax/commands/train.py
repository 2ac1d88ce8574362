"""`cirjax train`: train a config in a workdir (resumes automatically)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax

# Importing these touches no JAX backend, so `distributed.initialize` in `run` still comes first.
from cirjax import console
from cirjax.errors import CirjaxError, UsageError
from cirjax.commands.flags import add_renamed
from cirjax.convert import hub
from cirjax.data import synth, training_splits
from cirjax.train import config_utils, distributed, state, warm_start
from cirjax.train.config_utils import load_config, split_config_overrides
from cirjax.train.preemption import PREEMPTED_EXIT
from cirjax.train.task import task_class
from cirjax.train.trainer import format_table, train

HELP = "train QuRe / InstructCIR / the synthetic demo from a config file (resumable)"
DESCRIPTION = """\
Train from an ml_collections config file, resuming from the workdir's latest checkpoint.

  cirjax train --config configs/synthetic.py --workdir /tmp/cirjax_synth
  cirjax train --config configs/qure_blip2_cirr.py:tiny --workdir runs/t --config.train.lr=1e-4
  cirjax train --config configs/synthetic.py:tiny,batch_size=8,epochs=2 --workdir /tmp/t

After the colon: the file's variants and key=value arguments (see its docstring).
A config with `warm_start.overrides` (the main job) first trains itself with those overrides
in WORKDIR/warm_start, then trains from that run's exported model (docs/train.md#warm-start).
Overrides: --config.key=value (or key=value after the flags); the key must exist.
Several processes: started by srun (SLURM), mpirun (Open MPI), a Kubernetes indexed Job or on
a TPU pod, JAX's cluster detection joins them (--cluster NAME picks a detector); anywhere else
--coordinator HOST:PORT --num-processes N --process-id I (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID); see launch/ and docs/train.md. A second run on a workdir
in use is refused (WORKDIR/cirjax.lock).
SIGTERM or SIGUSR1 (SLURM's --signal warning) saves a checkpoint at the next step boundary all
processes agree on, then stops with exit status 75; the same command resumes.
Before anything is read or written, the config's paths (data.root, model.init, init_from,
data.train_file, ...) must exist and its batch sizes and epochs be positive; an error names
the key and leaves the workdir unchanged. model.init, init_from and data.tokenizer also take
a Hugging Face hub id ORG/NAME[@REVISION] (fetched into the HF cache, HF_HUB_CACHE / HF_HOME;
HF_HUB_OFFLINE=1 reads the cache only; a local path of that name wins). The real-data configs
refuse an empty model.init; --config.model.init=random trains from random weights on purpose.
Without data.tokenizer, the tokenizer beside model.init is used when there is one.
Exit status: 0 done, 1 an error (e.g. a dataset file that cannot be read, a workdir in use),
2 a bad argument or config value, 3 stopped on a non-finite loss (the last good checkpoint is
kept), 75 preempted (saved on SIGTERM / SIGUSR1; run the same command to resume).
"""

class NonFiniteLossStop(CirjaxError):
  """The run stopped on a non-finite loss (exit status 3); the last good checkpoint is kept."""
  exit_code = 3

# Config keys naming a file or directory that must exist when set (an empty value: unused).
PATH_KEYS = ("model.init", "init_from", "data.tokenizer", "data.train_file", "data.image_root",
             "data.eval_file", "data.eval_image_root")
# Of those, the keys naming a model or tokenizer: a Hugging Face hub id is taken too.
MODEL_KEYS = ("model.init", "init_from", "data.tokenizer")
# Config keys that must be positive integers when present.
POSITIVE_KEYS = ("train.batch_size", "train.epochs", "train.accum_steps", "eval_batch_size",
                 "data.encode_batch_size", "qure.encode_batch_size")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, help="config file, e.g. configs/synthetic.py:tiny")
  parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tb/, plots")
  parser.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-process)")
  add_renamed(parser, "--num-processes", "--num_processes", type=int, default=None,
              help="processes in the run (multi-process, with --coordinator)")
  add_renamed(parser, "--process-id", "--process_id", type=int, default=None,
              help="this process's index, 0 .. N-1 (multi-process, with --coordinator)")
  add_renamed(parser, "--cpu-devices", "--cpu_devices", type=int, default=None,
              help="fake CPU devices per process (testing sharded code on CPU)")
  parser.add_argument("--platform", default=None,
                      help="force a JAX platform (cpu, gpu); one this JAX lacks is an error")
  parser.add_argument("--cluster", default=None, choices=distributed.CLUSTERS,
                      help="multi-process start-up: auto (default: detect SLURM, Open MPI, "
                      "a Kubernetes indexed Job, a TPU pod), none (one process), or one of "
                      "JAX's cluster detectors by name (or CIRJAX_CLUSTER)")
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


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "get"):
      return None
    node = node.get(part)
  return node


def check_run(config, workdir: str) -> None:
  """Refuses, before the run reads or writes anything, a workdir that cannot hold a run, a
  config path that does not exist and a batch size or epoch count that is not positive."""
  w = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(w) and not os.path.isdir(w):
    raise UsageError(f"--workdir {workdir} is a file, not a directory")
  parent = os.path.dirname(w)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UsageError(f"--workdir {workdir}: {parent} is a file, not a directory")
  for key in POSITIVE_KEYS:
    v = _get(config, key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
      raise UsageError(f"config.{key}={v!r}: must be a positive integer")
  config_utils.model_init(config)  # refuses an empty one where the config needs weights
  for key in PATH_KEYS:
    v = _get(config, key)
    if key == "model.init" and v == config_utils.RANDOM_INIT:
      continue
    # A hub id is fetched now (or found in the HF cache), so a bad one fails before the run.
    if v and key in MODEL_KEYS:
      path = hub.resolve(str(v), weights=key != "data.tokenizer")
    else:
      path = Path(os.path.expanduser(str(v)))
    if v and not path.exists():
      raise CirjaxError(f"config.{key}={v}: no such file or directory" + (
          " (nor a Hugging Face hub id ORG/NAME[@REVISION])" if key in MODEL_KEYS else ""))
  # the schedule's and the task's own checks, before a warm start writes anything
  state.check_schedule(config.get("train") or {})
  if config.get("task"):
    task_class(config.task).check_config(config)
  data = config.get("data") or {}
  synthetic = "synthetic" in (data.get("dataset"), data.get("source"))
  if synthetic and not synth.is_synthetic(os.path.expanduser(data.get("root") or "")):
    training_splits.synth_config(data.get("synth"))  # the set to generate: its sizes can be met
  if data.get("dataset") and not synthetic:
    root = data.get("root")
    if not root:
      raise UsageError(f"config.data.root is empty: give the {data.get('dataset')} dataset "
                       "directory (--config.data.root=DIR)")
    if not os.path.isdir(os.path.expanduser(root)):
      raise CirjaxError(f"config.data.root={root}: no such directory (the "
                        f"{data.get('dataset')} dataset root)")


_say = console.log


def run(args: argparse.Namespace) -> int:
  # Distributed start-up must precede any use of a JAX backend.
  distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                         args.cpu_devices, args.platform, args.cluster)
  overrides = list(getattr(args, "config_overrides", [])) + list(args.overrides or [])
  config = load_config(args.config, overrides)  # a ConfigError is a usage error (exit 2)
  check_run(config, args.workdir)
  # A warm start made in this command (config.warm_start) trains first, in WORKDIR/warm_start.
  config, stopped = warm_start.run(config, args.workdir, train, _say)
  result = stopped or train(config, args.workdir)
  if result["status"] == "nonfinite":
    raise NonFiniteLossStop(result["error"])  # printed by the CLI's one error path
  if result["status"] == "preempted":
    if jax.process_index() == 0:
      print(f"cirjax train: preempted at step {result['step']}: checkpoint saved in "
            f"{args.workdir}; run the same command to resume", file=sys.stderr)
    return PREEMPTED_EXIT
  if jax.process_index() == 0 and result["status"] == "done":
    print(format_table(result["final_metrics"], f"final metrics ({args.workdir})",
                       result.get("chance"), result.get("start_metrics")))
    if result.get("samples_per_s"):
      print(f"step time {result['step_time_s'] * 1e3:.1f} ms (median), "
            f"{result['samples_per_s']:.1f} samples/s")
    print(f"metrics: {os.path.join(args.workdir, 'metrics.jsonl')}, "
          f"plots: {os.path.join(args.workdir, 'curves.png')}")
  return 0
