"""Orbax checkpoints in the workdir: keep the last N and the best by a metric; auto-resume.

A checkpoint holds three items:
  * `state`: the sharded TrainState, restored straight into its target shardings;
  * `host`: JSON (epoch, position in the epoch, the sampler's and the miner's scalars, ...);
  * `arrays`: host numpy arrays (hard-negative sets, sampler histories, cached data order).
Orbax writes each step into a temporary directory and renames it when complete, so a
process killed while saving leaves the previous step as the latest loadable one; stale
temporary directories are ignored on resume and cleaned up.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm


class _QuietUntrackedSaves(logging.Filter):
  # Orbax warns on every save without metrics when a best metric is tracked; cirjax saves
  # mid-epoch checkpoints without evaluation by design.
  def filter(self, record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietUntrackedSaves())


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the three items above."""

  def __init__(self, directory: str, *, keep: int = 2, best_metric: str | None = None,
               best_mode: str = "max", async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    self.best_mode = best_mode
    policies = [ocm.LatestN(n=max(1, int(keep)))]
    if best_metric:
      if best_mode not in ("max", "min"):
        raise ValueError(f"config.checkpoint.best_mode must be max or min, got {best_mode!r}")
      policies.append(ocm.BestN(get_metric_fn=lambda m: float(m[best_metric]),
                                reverse=(best_mode == "min"), n=1,
                                keep_checkpoints_without_metrics=False))
    best_fn = (lambda m: float(m[best_metric])) if best_metric else None
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode=best_mode,
        preservation_policy=ocm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "host", "arrays"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def best_step(self) -> int | None:
    """The kept step with the best `best_metric` (None without metrics)."""
    return self.manager.best_step() if self.best_metric else None

  def save(self, step: int, state: Any, host: dict, arrays: dict[str, np.ndarray] | None = None,
           metrics: dict | None = None, force: bool = True) -> bool:
    """Starts saving `step` (asynchronously by default; `wait()` to block)."""
    arrays = dict(arrays or {})
    arrays.setdefault("_present", np.zeros((), np.int32))  # orbax refuses empty trees
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    # Orbax cannot save zero-size arrays (e.g. no mined sets yet): keep their shape and
    # dtype in the JSON item and rebuild them on restore.
    empty = {k: [list(v.shape), v.dtype.str] for k, v in arrays.items() if v.size == 0}
    arrays = {k: v for k, v in arrays.items() if k not in empty}
    host = dict(host, _empty_arrays=empty)
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      metrics = None
    return self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                host=ocp.args.JsonSave(host),
                                arrays=ocp.args.StandardSave(arrays)),
        metrics={k: float(v) for k, v in metrics.items()} if metrics else None,
        force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """Restores `step` into the shardings of `abstract_state` (ShapeDtypeStructs)."""
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                host=ocp.args.JsonRestore(),
                                arrays=ocp.args.StandardRestore()))
    arrays = {k: np.asarray(v) for k, v in dict(restored["arrays"]).items() if k != "_present"}
    host = dict(restored["host"])
    for k, (shape, dtype) in host.pop("_empty_arrays", {}).items():
      arrays[k] = np.zeros(shape, np.dtype(dtype))
    return restored["state"], host, arrays

  def restore_params(self, step: int | None, abstract_params: Any = None) -> Any:
    """Only the parameters of a checkpoint (e.g. stage 2 starting from stage 1).

    Works whatever devices or processes wrote the checkpoint: the arrays are read onto this
    process's first device (or into `abstract_params`' shardings when given).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    state = read_local(os.path.join(self.directory, str(step), "state"))
    params = state["params"]
    if abstract_params is not None:
      want = jax.tree.structure(abstract_params)
      if jax.tree.structure(params) != want:
        raise ValueError(f"checkpoint {self.directory}/{step}: parameter tree differs from the "
                         "model's (different config?)")
      params = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding)
                            if getattr(a, "sharding", None) is not None else x,
                            params, abstract_params)
    return params

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def read_local(item_dir: str) -> Any:
  """Reads a saved array tree (e.g. `<ckpt>/<step>/state`) onto this process's first device.

  Independent of the mesh, device ids and process count that wrote it (orbax refuses to
  reuse the saved shardings on a different topology), so tools and tests can inspect any
  checkpoint.
  """
  ck = ocp.StandardCheckpointer()
  meta = ck.metadata(item_dir)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree)
  out = ck.restore(item_dir, target)
  ck.close()
  return out
