"""What a parity check reports, for every family (`blip2_parity`, `llava_parity`).

A stage passes when its max abs error over the reference's max magnitude is within the
tolerance: 1e-4 for whole models in fp32 (docs/reference_semantics.md#parity), never
loosened.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

TOLERANCE = 1e-4


class ParityRow(NamedTuple):
  name: str
  max_abs_err: float
  max_rel_err: float
  tolerance: float
  ok: bool


def compare(name: str, got: Any, want: Any, tol: float = TOLERANCE) -> ParityRow:
  """One row: max abs error and max abs error over the reference's max magnitude."""
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  if got.shape != want.shape:
    return ParityRow(f"{name} (shape {got.shape} vs {want.shape})", float("inf"),
                     float("inf"), tol, False)
  abs_err = float(np.max(np.abs(got - want))) if got.size else 0.0
  rel = abs_err / max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-30)
  ok = bool(np.isfinite(got).all()) and rel <= tol
  return ParityRow(name, abs_err, rel, tol, ok)


def format_table(rows: Sequence[ParityRow]) -> str:
  w = max([len(r.name) for r in rows] + [5])
  lines = [f"{'stage':<{w}}  {'max abs err':>12}  {'max rel err':>12}  {'tol':>8}  ok",
           "-" * (w + 44)]
  for r in rows:
    lines.append(f"{r.name:<{w}}  {r.max_abs_err:12.3e}  {r.max_rel_err:12.3e}  "
                 f"{r.tolerance:8.0e}  {'yes' if r.ok else 'NO'}")
  return "\n".join(lines)
