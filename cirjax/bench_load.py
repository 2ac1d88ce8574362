"""How a benchmark was taken: the machine's load and each framework's threads, recorded at
the start and end of every suite run, and a bounded wait for a busy machine to settle.

A ratio measured on a loaded machine measures the machine: under load PyTorch's threads lose
more than XLA's, so cirjax / PyTorch ratios move with the load, not with the code (issue 28
re-measured rows taken at a load average of 3.5 on 2 cores and found several wins gone).
`cirjax bench` therefore waits, before each suite run, until the 1-minute load average is at
most `LoadPolicy.per_core` per core (`wait_for_idle`, a bounded time), records a `snapshot`
(load, XLA's intra-op threads, `torch.get_num_threads()`) at the run's start and end, and
marks a run that started above the threshold "loaded". `--update-readme` refuses loaded rows
unless told (`refuse_loaded`); the README shows each suite's load and threads and the mark
(`conditions_table`).

The load is the whole machine's (the load average counts every runnable thread on it), so
the threshold scales with the machine's CPU count. The bench's own previous suite counts too:
after a suite that kept 2 cores busy the load is about 2 and falls below 1.5 in about 20 s
of waiting (the 1-minute average decays with a 1-minute time constant).

Nothing here imports JAX or torch at module level; the load reader, clock and sleep of a
`LoadPolicy` are injectable so tests run without a busy machine or real sleeping.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from cirjax import errors

IDLE_LOAD_PER_CORE = 0.75
DEFAULT_MAX_WAIT_S = 300.0
POLL_S = 15.0
# The name XLA's CPU client gives the threads of its intra-op pool (its Eigen pool "XLAEigen"
# under TSL's "tf_" prefix): counting them reads the pool's real size.
XLA_POOL_THREAD = "tf_XLAEigen"


def load_1m() -> float | None:
  """The machine's 1-minute load average (None where the OS has none)."""
  try:
    return os.getloadavg()[0]
  except (OSError, AttributeError):
    return None


def machine_cores() -> int:
  """CPUs of the machine (not of this process's affinity): the load average counts them all."""
  return os.cpu_count() or 1


def _count_threads(name: str) -> int:
  """Threads of this process named `name` (0 where /proc is missing)."""
  task_dir = Path("/proc/self/task")
  count = 0
  try:
    tasks = list(task_dir.iterdir())
  except OSError:
    return 0
  for task in tasks:
    try:
      if (task / "comm").read_text().strip() == name:
        count += 1
    except OSError:
      continue  # a thread that ended while being read
  return count


def xla_threads() -> tuple[int, str]:
  """(threads of XLA's CPU intra-op pool, how that is known).

  Counted from this process's threads once the CPU backend is up (XLA sizes the pool by
  `$PJRT_NPROC` or `$NPROC` when set, else by the CPUs this process may run on, and gives it
  at least one thread per CPU device); before that, or without /proc, that configured size
  (without the per-device rule: the device count is not known yet)."""
  counted = _count_threads(XLA_POOL_THREAD)
  if counted:
    return counted, f"counted: this process's {XLA_POOL_THREAD} threads"
  for var in ("PJRT_NPROC", "NPROC"):
    value = os.environ.get(var, "").strip()
    if value.isdigit():
      return int(value), f"${var} (XLA's pool size when set; pool not started)"
  try:
    n = len(os.sched_getaffinity(0))
  except AttributeError:
    n = os.cpu_count() or 1
  return n, "CPUs this process may run on (XLA's default pool size; pool not started)"


def torch_threads() -> int | None:
  """`torch.get_num_threads()`; None without torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top  # optional: only its thread count
  except ImportError:
    return None
  return torch.get_num_threads()


@dataclasses.dataclass
class LoadPolicy:
  """When a machine counts as idle and how long to wait for it (`--idle-load-per-core`,
  `--max-wait`). `read_load`, `clock`, `sleep`: None for the real ones (tests inject)."""
  max_wait_s: float = DEFAULT_MAX_WAIT_S
  per_core: float = IDLE_LOAD_PER_CORE
  cores: int = dataclasses.field(default_factory=machine_cores)
  poll_s: float = POLL_S
  read_load: Callable[[], float | None] | None = None
  clock: Callable[[], float] | None = None
  sleep: Callable[[float], None] | None = None

  def __post_init__(self):
    if self.max_wait_s < 0:
      raise errors.UsageError(f"--max-wait {self.max_wait_s}: must be >= 0 seconds")
    if self.per_core <= 0:
      raise errors.UsageError(f"--idle-load-per-core {self.per_core}: must be > 0")

  @property
  def threshold(self) -> float:
    return self.per_core * self.cores

  def load(self) -> float | None:
    return (self.read_load or load_1m)()

  def now(self) -> float:
    return (self.clock or time.monotonic)()

  def wait(self, seconds: float) -> None:
    (self.sleep or time.sleep)(seconds)


def snapshot(policy: LoadPolicy) -> dict:
  """The load and the threads each framework runs with, now."""
  return {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "load_1m": policy.load(), "threads_jax": xla_threads()[0],
          "threads_torch": torch_threads()}


def wait_for_idle(policy: LoadPolicy, what: str = "", log: Callable[[str], None] = print) -> dict:
  """Waits until the 1-minute load is at most `policy.threshold`, at most `max_wait_s`,
  printing a progress line per poll. Returns the wait's record: `loaded` is True when the
  load was still above the threshold when the time ran out (None: no load average here)."""
  t0 = policy.now()
  first = load = policy.load()
  record = {"load_1m_before_wait": first, "threshold_load_1m": policy.threshold,
            "max_wait_s": policy.max_wait_s}
  if load is None:
    return {**record, "waited_s": 0.0, "loaded": None}
  while load > policy.threshold:
    waited = policy.now() - t0
    if waited >= policy.max_wait_s:
      log(f"[bench] {what}: 1-minute load {load:.2f} on {policy.cores} cores is still above "
          f"{policy.threshold:.2f} after {waited:.0f} s: measuring anyway, marked loaded")
      return {**record, "waited_s": round(waited, 1), "loaded": True}
    log(f"[bench] {what}: 1-minute load {load:.2f} on {policy.cores} cores is above "
        f"{policy.threshold:.2f} ({policy.per_core:g} per core); waiting for it to settle, "
        f"{waited:.0f} of at most {policy.max_wait_s:.0f} s")
    policy.wait(min(policy.poll_s, policy.max_wait_s - waited))
    load = policy.load()
  return {**record, "waited_s": round(policy.now() - t0, 1), "loaded": False}


def run_record(wait: dict, start: dict, end: dict) -> dict:
  """One suite run's conditions: the wait before it, the snapshots at its start and end."""
  return {"loaded": wait["loaded"], "waited_s": wait["waited_s"],
          "load_1m_before_wait": wait["load_1m_before_wait"], "start": start, "end": end}


def suite_conditions(policy: LoadPolicy, runs: Sequence[dict]) -> dict:
  """A suite's conditions over its runs (loaded if any run was)."""
  return {"cores": policy.cores, "threshold_load_1m": policy.threshold,
          "idle_load_per_core": policy.per_core, "max_wait_s": policy.max_wait_s,
          "threads_jax_source": xla_threads()[1], "loaded": any(r["loaded"] for r in runs),
          "runs": list(runs)}


def mark_rows(rows: Iterable[dict], run: dict) -> list[dict]:
  """Rows with their run's conditions (`conditions`) and `loaded` flag."""
  return [dict(r, conditions=run, loaded=bool(run["loaded"])) for r in rows]


# ------------------------------------------------------------------ README and publication


def _num(x) -> str:
  return "?" if x is None else f"{x:.2f}"


def _threads(runs: Sequence[dict], key: str) -> str:
  seen = []
  for r in runs:
    for v in (r["start"].get(key), r["end"].get(key)):
      if v not in seen:
        seen.append(v)
  return " -> ".join("-" if v is None else str(v) for v in seen)


def conditions_table(suites: Sequence[str], conditions: dict, dates: dict) -> str:
  """Markdown: per suite, when (its first run's start), how many runs, the load at each run's start and end, the
  threads, and the 'loaded' mark; suites measured before any of this was recorded say so."""
  lines = ["| suite | measured (UTC) | runs | 1-min load, start -> end of each run | cores "
           "(idle at most) | threads jax / torch | mark |", "|---|---|---|---|---|---|---|"]
  for s in suites:
    c = conditions.get(s)
    if not c:
      lines.append(f"| {s} | {dates.get(s) or '-'} | - | not recorded | - | - | - |")
      continue
    runs = c["runs"]
    when = runs[0]["start"].get("time") if runs else None
    loads = ", ".join(f"{_num(r['start']['load_1m'])} -> {_num(r['end']['load_1m'])}"
                      for r in runs)
    mark = "**loaded**" if c.get("loaded") else ""
    lines.append(f"| {s} | {when or dates.get(s) or '-'} | {len(runs)} | {loads} | {c['cores']} "
                 f"({_num(c['threshold_load_1m'])}) | {_threads(runs, 'threads_jax')} / "
                 f"{_threads(runs, 'threads_torch')} | {mark} |")
  return "\n".join(lines)


def loaded_suites(payload: dict) -> list[str]:
  """Suites of a results payload with a row measured on a loaded machine."""
  found = []
  for r in payload.get("rows", []):
    if r.get("loaded") and r.get("suite") not in found:
      found.append(r.get("suite"))
  return found


def refuse_loaded(path: Path, payload: dict) -> None:
  """Raises a UsageError naming the loaded suites of `payload` (read from `path`)."""
  suites = loaded_suites(payload)
  if not suites:
    return
  conds = payload.get("suite_conditions") or {}
  detail = []
  for s in suites:
    c = conds.get(s) or {}
    starts = [_num(r["start"]["load_1m"]) for r in c.get("runs", []) if r.get("loaded")]
    detail.append(f"{s} (1-minute load at start {', '.join(starts) or '?'} on "
                  f"{c.get('cores', '?')} cores, idle at most {_num(c.get('threshold_load_1m'))})")
  raise errors.UsageError(
      f"{path}: suite(s) {'; '.join(detail)} measured on a loaded machine: not written to the "
      "README. Re-measure them when the machine is idle (`cirjax bench --suite "
      f"{','.join(suites)} --merge --update-readme`), or pass --allow-loaded to publish them "
      "marked 'loaded'")
