"""The one progress logger: `log(msg)` prints `[cirjax] msg` on stderr from process 0.

Every layer logs through it (data preparation, the trainer, the tasks, `cirjax convert`), so
a multi-process run prints each line once. It imports nothing: jax is consulted only when
something already imported it (no jax, one process).
"""

from __future__ import annotations

import sys


def process_index() -> int:
  """This process's index in a multi-process JAX run (0 when jax is not imported)."""
  jax = sys.modules.get("jax")
  return jax.process_index() if jax is not None else 0


def log(msg: str, tag: str = "cirjax") -> None:
  """`[tag] msg` on stderr, flushed, from process 0 only."""
  if process_index() == 0:
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)
