"""What the profile scripts (profile_retrieval.py, profile_blip2.py, profile_ops.py) share:
the median of timed calls, and the JSON record of the conditions a profile was taken under
(date, the 1-minute load average at its start and end, cores, versions, torch's threads). A
profile taken on a loaded machine measures the load (docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np


def median(fn: Callable[[], object], iters: int) -> float:
  """Median seconds of `iters` calls of `fn` after one warm-up call (`fn` must block until
  its work is done: `block_until_ready` on jax arrays)."""
  fn()
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def start_record() -> dict:
  """The conditions at a profile's start; `finish` adds the load at its end."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_1min_start": os.getloadavg()[0],
          "cpus": os.cpu_count(), "jax": jax.__version__, "torch": torch.__version__,
          "torch_threads": torch.get_num_threads()}


def finish(record: dict, out: Path | None) -> None:
  """Adds the load at the end and writes the JSON to `out` (else prints it)."""
  record["load_1min_end"] = os.getloadavg()[0]
  text = json.dumps(record, indent=1)
  if out:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
  else:
    print(text)


def cli(argv, doc: str, profile: Callable[[int], dict], flag: str, default: int,
        what: str) -> int:
  """A profile script's command line: `--out` (the JSON; else stdout) and one count `flag`
  (`what` it counts, `default`) passed to `profile`, on the CPU; the record carries the
  conditions (`start_record`, `finish`)."""
  p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
  p.add_argument("--out", type=Path, default=None, help="write the JSON here (else stdout)")
  p.add_argument(flag, type=int, default=default, help=f"{what} (default {default})")
  args = p.parse_args(argv)
  os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")
  out = {**start_record(), **profile(getattr(args, flag.lstrip("-").replace("-", "_")))}
  finish(out, args.out)
  return 0
