"""Training on the stacked (`scan_layers`) parameter layout, on a toy model with a run of
layers: the train state holds the layers stacked (params and optimizer moments, layer axis
unsharded), trains like the per-layer layout, records its layout in every checkpoint, and a run
resumed with `scan_layers` flipped converts its checkpoint and continues identically."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cirjax.models import layer_stack
from cirjax.train import config_utils, sharding as shd, task as task_lib
from cirjax.train.task import Task

HERE = str(Path(__file__).resolve())
LAYERS, WIDTH = 3, 16
STACKS = [layer_stack.Stack(("net",), "layers_{}", "layers", LAYERS)]


def _layer(h, p):
  return h + jnp.tanh(h @ p["w"] + p["b"])


def toy_forward(params, x, scan_layers: bool):
  """The model function: either layout in, the config's loop (a scan over stacked layers)."""
  params = layer_stack.to_layout(params, STACKS, scan_layers)
  h = x @ params["embed"]["kernel"]
  if scan_layers:
    h, _ = jax.lax.scan(lambda h, p: (_layer(h, p), None), h, params["net"]["layers"])
  else:
    for i in range(LAYERS):
      h = _layer(h, params["net"][f"layers_{i}"])
  return (h @ params["head"]["kernel"])[:, 0]


class LayersToyTask(Task):
  """Regression through a run of residual layers (pure batches)."""
  name = "layers_toy"
  stateful_batches = False

  def __init__(self, config, mesh, workdir):
    super().__init__(config, mesh, workdir)
    rng = np.random.default_rng(0)
    self.x = rng.normal(size=(64, 8)).astype(np.float32)
    self.y = np.sin(self.x @ rng.normal(size=(8,))).astype(np.float32)
    self.global_batch = int(config.train.batch_size)
    self.steps_per_epoch = len(self.x) // self.global_batch
    self.scan = task_lib.run_options(config)["scan_layers"]

  def init_params(self, rng):
    ks = jax.random.split(rng, LAYERS + 2)
    net = {f"layers_{i}": {"w": jax.random.normal(ks[i], (WIDTH, WIDTH)) / WIDTH,
                           "b": jnp.zeros((WIDTH,))} for i in range(LAYERS)}
    return {"embed": {"kernel": jax.random.normal(ks[-2], (8, WIDTH)) / 3},
            "net": net, "head": {"kernel": jax.random.normal(ks[-1], (WIDTH, 1)) / 4}}

  def layer_stacks(self):
    return STACKS

  def loss_fn(self, params, batch, rng):
    err = (toy_forward(params, batch["x"], self.scan) - batch["y"]) ** 2
    return err.mean(), {}

  def batch_spec(self):
    b = self.global_batch
    return {"x": jax.ShapeDtypeStruct((b, 8), jnp.float32),
            "y": jax.ShapeDtypeStruct((b,), jnp.float32)}

  def batch(self, epoch, index):
    order = np.random.default_rng(1000 + epoch).permutation(len(self.x))
    rows = order[index * self.global_batch:(index + 1) * self.global_batch]
    mine = shd.process_rows(self.global_batch)
    return {"x": self.x[rows][mine], "y": self.y[rows][mine]}


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.task = HERE + ":LayersToyTask"
  c.seed = 1
  c.mesh = (("data", 2), ("fsdp", 2))
  c.sharding_rules = ((".*", "fsdp"),)
  c.fsdp_min_size = 16
  c.freeze = ("embed/.*",)
  c.train_only = ()
  c.compute_dtype = "float32"
  c.remat = False
  c.remat_policy = "full"
  c.scan_layers = False
  c.tensorboard = False
  c.eval_every_epochs = 0
  c.log_every_steps = 1
  c.data = dict(workers=1)
  c.train = dict(batch_size=16, epochs=2, lr=3e-2, schedule="constant", weight_decay=0.01,
                 accum_steps=1, max_steps=-1)
  c.checkpoint = dict(keep=3, every_steps=1, best_metric="", best_mode="max", async_save=False)
  return c


def _config(scan: bool):
  return config_utils.load_config(HERE, [f"scan_layers={scan}"])


def _train(config, workdir):
  from cirjax.train.trainer import train
  mesh = shd.make_mesh(tuple(tuple(a) for a in config.mesh))
  return train(config, str(workdir), mesh=mesh)


def _per_layer(state):
  return jax.tree.map(np.asarray, layer_stack.unstack(jax.device_get(state.params), STACKS))


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


@pytest.fixture(scope="module")
def per_layer_run(tmp_path_factory):
  return _train(_config(False), tmp_path_factory.mktemp("per_layer"))


def test_stacked_state_trains_like_per_layer(per_layer_run, tmp_path):
  r = _train(_config(True), tmp_path / "stacked")
  state = r["state"]
  w = state.params["net"]["layers"]["w"]
  assert "layers_0" not in state.params["net"] and w.shape == (LAYERS, WIDTH, WIDTH)
  # The layer axis is whole on every device; the FSDP rule shards one layer's largest dim.
  assert w.sharding.spec == P(None, "fsdp", None)
  assert per_layer_run["state"].params["net"]["layers_0"]["w"].sharding.spec == P("fsdp", None)
  # Optimizer moments are stacked too (the frozen embedding has none).
  mu = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "shape", ()) == w.shape]
  assert len(mu) == 2
  np.testing.assert_allclose(r["losses"], per_layer_run["losses"], rtol=1e-5)
  _close(_per_layer(state), _per_layer(per_layer_run["state"]))
  host = json.loads((tmp_path / "stacked/checkpoints/8/host/metadata").read_text())
  assert host["param_layout"] == "stacked"


@pytest.mark.parametrize("first", [False, True])
def test_resume_with_scan_layers_flipped_continues(per_layer_run, tmp_path, monkeypatch, first):
  monkeypatch.setenv("CIRJAX_STOP_AFTER_STEP", "3")
  r1 = _train(_config(first), tmp_path / "run")
  assert r1["status"] == "stopped"
  monkeypatch.delenv("CIRJAX_STOP_AFTER_STEP")
  r2 = _train(_config(not first), tmp_path / "run")
  assert r2["status"] == "done" and r2["step"] == 8
  np.testing.assert_allclose(r1["losses"] + r2["losses"], per_layer_run["losses"], rtol=1e-5)
  _close(_per_layer(r2["state"]), _per_layer(per_layer_run["state"]))
  hist = [json.loads(l) for l in (tmp_path / "run/config_history.jsonl").read_text().splitlines()]
  assert hist[-1]["changed"]["scan_layers"] == {"stored": first, "requested": not first}


def test_a_run_of_layers_frozen_in_part_cannot_stack(tmp_path):
  cfg = config_utils.load_config(HERE, ["scan_layers=True"])
  cfg.freeze = ("net/layers_0/.*",)
  with pytest.raises(ValueError, match="net/layers_.* some layers and frozen in others"):
    _train(cfg, tmp_path / "run")


def test_unknown_remat_policy_is_a_config_error():
  cfg = _config(False)
  cfg.remat_policy = "save_all"
  with pytest.raises(config_utils.ConfigError,
                     match=r"config.remat_policy='save_all'.*dots_saveable.*full"):
    task_lib.run_options(cfg)


def test_stacked_leaves_keep_the_layer_axis_whole():
  mesh = shd.make_mesh((("data", 2), ("fsdp", 2)))
  abstract = {"vision": {"layers": {"k": jax.ShapeDtypeStruct((8, 3, 5), jnp.float32),
                                    "big": jax.ShapeDtypeStruct((2, 64, 3), jnp.float32)},
                         "head": jax.ShapeDtypeStruct((8, 3, 5), jnp.float32)}}
  specs = shd.param_specs(abstract, mesh, fsdp_min_size=16, stacked=["vision/layers"])
  assert specs["vision"]["layers"]["k"] == P(None)          # one layer (3, 5): no dim divides
  assert specs["vision"]["layers"]["big"] == P(None, "fsdp", None)
  assert specs["vision"]["head"] == P("fsdp", None, None)   # not a run: the usual rule
