"""Optional Weights & Biases logging of what `metrics.jsonl` records (process 0 only).

On when `config.wandb.project` is set. `wandb` is imported only then (extra `cirjax[wandb]`);
a project set without wandb installed is a `UsageError` before the run writes anything.
`config.wandb.mode` is passed to `wandb.init`: `offline` (the default: no network, the run is
written under `<workdir>/wandb/`, upload it later with `wandb sync`), `online` or `disabled`;
the `WANDB_MODE` environment variable overrides it, as wandb does. The wandb run id is kept in
`<workdir>/wandb_run_id`, so a resumed run (also after preemption) continues the same wandb
run. Each record goes to `wandb.log` at its training step as `<kind>/<key>` (`train/loss`,
`eval/recall@10`, `mining/set_size_mean`, `data/data_wait_fraction`); wandb keeps steps
increasing, so after a resume from a checkpoint older than the last logged step (a SIGKILL)
it drops the repeated steps' records with a warning.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import ml_collections

from cirjax.errors import UsageError

RUN_ID_FILE = "wandb_run_id"


def enabled(config: ml_collections.ConfigDict) -> bool:
  return bool((config.get("wandb") or {}).get("project"))


def check_installed(config: ml_collections.ConfigDict) -> None:
  if not enabled(config):
    return
  try:
    import wandb  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise UsageError(f"config.wandb.project={config.wandb.project!r} but wandb is not "
                     "installed: pip install 'cirjax[wandb]' (or leave config.wandb.project "
                     "empty)") from None


def sinks(config: ml_collections.ConfigDict, workdir: str, active: bool) -> list:
  """[a WandbSink] when wandb is on and this process writes logs (process 0), else []."""
  return [WandbSink(config, workdir)] if active and enabled(config) else []


class WandbSink:
  """`log(step, kind, record)` / `close()` over one wandb run."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    import wandb  # pylint: disable=g-import-not-at-top  # optional, only when enabled
    w = config.wandb
    id_path = os.path.join(workdir, RUN_ID_FILE)
    if os.path.exists(id_path):
      with open(id_path) as f:
        run_id = f.read().strip()
    else:
      run_id = uuid.uuid4().hex[:12]  # wandb ids: letters and digits
      with open(id_path + ".tmp", "w") as f:
        f.write(run_id + "\n")
      os.replace(id_path + ".tmp", id_path)
    self.run = wandb.init(
        project=w.project, entity=w.get("entity") or None,
        name=w.get("name") or os.path.basename(os.path.normpath(workdir)),
        mode=os.environ.get("WANDB_MODE") or w.get("mode") or "offline",
        dir=workdir, id=run_id, resume="allow",
        config=config.to_dict(), settings=wandb.Settings(console="off", silent=True))

  def log(self, step: int, kind: str, record: dict[str, Any]) -> None:
    values = {f"{kind}/{k}": v for k, v in record.items()
              if k not in ("step", "kind", "time") and isinstance(v, (int, float))
              and not isinstance(v, bool)}
    if values:
      self.run.log(values, step=int(step))

  def close(self) -> None:
    if self.run is not None:
      self.run.finish()
      self.run = None
