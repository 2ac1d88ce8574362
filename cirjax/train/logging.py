"""Training observability: progress (a bar, or plain lines off a terminal), JSON lines,
TensorBoard events (and wandb, `cirjax.train.wandb_sink`), end-of-run plots.

Only process 0 writes files and draws the bar; every process may call these methods.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm


class NonFiniteLossError(RuntimeError):
  """Raised when a step produced a NaN or infinite loss."""

  def __init__(self, step: int, value: float, epoch: int | None = None):
    where = f"step {step}" + (f" (epoch {epoch})" if epoch is not None else "")
    super().__init__(f"non-finite loss {value} at {where}: stopping. The last good checkpoint "
                     "is kept in the workdir; lower config.train.lr or check the data.")
    self.step = step
    self.value = value


def check_finite(step: int, loss: float, epoch: int | None = None) -> None:
  if not math.isfinite(loss):
    raise NonFiniteLossError(step, loss, epoch)


class MetricLogger:
  """Writes `metrics.jsonl` and TensorBoard events under `workdir` (process 0 only)."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.workdir = workdir
    self.active = jax.process_index() == 0
    self.history: list[dict] = []
    self.sinks: list = []  # more destinations (wandb): `log(step, kind, record)`, `close()`
    self._tb = None
    self._open_tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    # Resume: keep the records already written so plots cover the whole run.
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          line = line.strip()
          if line:
            try:
              self.history.append(json.loads(line))
            except json.JSONDecodeError:
              pass  # a line cut by a kill
    if tensorboard:
      try:
        # Optional: without tensorboardX a run writes metrics.jsonl only.
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        # Opened at the first record: a run that fails before it leaves no event file.
        self._open_tb = lambda: SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:
        print("[cirjax] tensorboardX not installed: no TensorBoard events", file=sys.stderr)

  def truncate_after(self, step: int) -> None:
    """Drops records beyond `step` (after resuming from an earlier checkpoint)."""
    if not self.active:
      return
    self.history = [r for r in self.history if r.get("step", 0) <= step]
    with open(self.path, "w") as f:
      for r in self.history:
        f.write(json.dumps(r) + "\n")

  def write(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
    rec = {"step": int(step), "kind": kind, "time": time.time()}
    for k, v in metrics.items():
      if isinstance(v, (np.ndarray, jax.Array)):
        v = np.asarray(v).item() if np.asarray(v).size == 1 else np.asarray(v).tolist()
      rec[k] = v
    self.history.append(rec)
    if not self.active:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")
    if self._tb is None and self._open_tb is not None:
      self._tb, self._open_tb = self._open_tb(), None
    if self._tb is not None:
      for k, v in rec.items():
        if k in ("step", "kind", "time") or not isinstance(v, (int, float)):
          continue
        self._tb.add_scalar(f"{kind}/{k}", v, step)
    for sink in self.sinks:
      sink.log(step, kind, rec)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    for sink in self.sinks:
      sink.close()
    self.sinks = []

  def plot(self, filename: str = "curves.png") -> str | None:
    """PNG of the loss, evaluation recall/mAP and hard-negative set size curves."""
    if not self.active or not self.history:
      return None
    # Heavy and only needed for the end-of-run plot.
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    train = [r for r in self.history if r["kind"] == "train" and "loss" in r]
    evals = [r for r in self.history if r["kind"] == "eval"]
    mining = [r for r in self.history if r["kind"] == "mining"]
    panels = [("loss", train, ["loss"])]
    if evals:
      keys = [k for k in evals[-1] if isinstance(evals[-1][k], (int, float))
              and k not in ("step", "time", "epoch")][:8]
      panels.append(("evaluation", evals, keys))
    if mining:
      keys = [k for k in ("set_size_mean", "set_size_median", "empty_fraction") if k in mining[-1]]
      panels.append(("hard-negative sets", mining, keys))
      fn = [k for k in mining[-1] if k.startswith("fn_share/")]
      if fn:  # full relevant sets known: the share of each strategy's pool that is relevant
        panels.append(("false negatives in the pool", mining, fn))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, recs, keys) in zip(axes[0], panels):
      for k in keys:
        xs = [r["step"] for r in recs if k in r]
        ys = [r[k] for r in recs if k in r]
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=k)
      ax.set_title(title)
      ax.set_xlabel("step")
      if len(keys) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = os.path.join(self.workdir, filename)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _clock(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  """Progress over the steps of the run with loss, samples/s and ETA (process 0 shows it).

  On a terminal: a tqdm bar. When stderr is not a terminal (a SLURM log, a pipe, a file), a
  bar's carriage-return redraws would fill the file, so it prints one plain line every
  `every_s` seconds instead (and at the last step):
  `[cirjax] toy: step 120/1000 (12.0%), epoch 1, loss 0.1234, 45.1 samples/s, data wait 3%,
  eta 0:10:02`.
  """

  def __init__(self, total_steps: int, initial: int, batch_size: int, desc: str = "train",
               every_s: float = 30.0, stream=None):
    self.batch_size = batch_size
    self.total, self.n, self.desc = total_steps, initial, desc
    self.stream = stream if stream is not None else sys.stderr
    self.every_s = float(every_s)
    self.bar = None
    self.plain = False
    self._t = None
    self._rate = None
    self._printed_at = time.monotonic()
    self._printed_n = initial
    self._line = ""
    if jax.process_index() != 0:
      return
    isatty = getattr(self.stream, "isatty", None)
    if isatty is not None and isatty():
      self.bar = tqdm(total=total_steps, initial=initial, desc=desc, unit="step",
                      dynamic_ncols=True, file=self.stream, mininterval=1.0)
    else:
      self.plain = True

  def update(self, loss: float, epoch: int, extra: dict | None = None) -> None:
    now = time.perf_counter()
    if self._t is not None:
      dt = now - self._t
      rate = self.batch_size / max(dt, 1e-9)
      self._rate = rate if self._rate is None else 0.9 * self._rate + 0.1 * rate
    self._t = now
    self.n += 1
    post = {"epoch": epoch, "loss": f"{loss:.4f}"}
    if self._rate is not None:
      post["samples/s"] = f"{self._rate:.1f}"
    if extra:
      post.update(extra)
    if self.bar is not None:
      self.bar.set_postfix(post, refresh=False)
      self.bar.update(1)
    elif self.plain:
      self._line = self._plain_line(post)
      if time.monotonic() - self._printed_at >= self.every_s or self.n >= self.total:
        self._print_line()

  def _plain_line(self, post: dict) -> str:
    parts = [f"step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.1f}%)"]
    parts += [f"{k} {v}" for k, v in post.items()]
    if self._rate:
      parts.append("eta " + _clock((self.total - self.n) * self.batch_size / self._rate))
    return f"[cirjax] {self.desc}: " + ", ".join(parts)

  def _print_line(self) -> None:
    print(self._line, file=self.stream, flush=True)
    self._printed_at, self._printed_n = time.monotonic(), self.n

  def pause(self) -> None:
    """Forget the last timestamp (evaluation/mining in between is not step time)."""
    self._t = None

  @property
  def samples_per_s(self) -> float | None:
    return self._rate

  def write(self, text: str) -> None:
    if self.bar is not None:
      self.bar.write(text, file=self.stream)
    elif jax.process_index() == 0:
      print(text, file=self.stream, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None
    if self.plain:
      if self.n > self._printed_n and self._line:  # the last position, e.g. when stopped
        self._print_line()
      self.plain = False
