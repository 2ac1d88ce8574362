"""Generic training machinery on a toy Flax model: sharding equivalence, accumulation,
freezing, schedules, resume after SIGKILL, checkpoint atomicity, NaN stop, multi-process.

This file is also a config file (`get_config`) and holds the toy task, so the subprocess
tests run the real `cirjax train` command on it.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cirjax.train import config_utils, sharding as shd, state as st
from cirjax.train.task import Task

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))


# ---------------------------------------------------------------- toy task (also used by CLI)
class ToyModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(32, name="body")(x)
    h = nn.LayerNorm(name="norm")(jnp.tanh(h))
    return nn.Dense(1, name="head")(h)[:, 0]


@jax.jit
def _toy_mse(params, x, y):
  return jnp.mean((ToyModel().apply({"params": params}, x) - y) ** 2)


class ToyTask(Task):
  """Regression on fixed random data; a host-side RNG adds label noise so the checkpointed
  host state matters for an exact resume."""
  name = "toy"

  def __init__(self, config, mesh, workdir):
    super().__init__(config, mesh, workdir)
    rng = np.random.default_rng(0)
    self.x = rng.normal(size=(64, 8)).astype(np.float32)
    self.y = np.sin(self.x @ rng.normal(size=(8,))).astype(np.float32)
    self.global_batch = int(config.train.batch_size)
    self.steps_per_epoch = len(self.x) // self.global_batch
    self.noise = np.random.default_rng(int(config.seed))
    self.model = ToyModel()

  def init_params(self, rng):
    return self.model.init(rng, jnp.zeros((1, 8)))["params"]

  def loss_fn(self, params, batch, rng):
    pred = self.model.apply({"params": params}, batch["x"])
    err = (pred.astype(jnp.float32) - batch["y"]) ** 2
    return err.mean(), {"mae": jnp.sqrt(err).mean()}

  def batch_spec(self):
    b = self.global_batch
    return {"x": jax.ShapeDtypeStruct((b, 8), jnp.float32), "y": jax.ShapeDtypeStruct((b,), jnp.float32)}

  def batch(self, epoch, index):
    kill_at = int(os.environ.get("TOY_SIGKILL_AT", "-1"))
    if epoch * self.steps_per_epoch + index == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
    return self._rows(epoch, index, self.noise)

  def _rows(self, epoch, index, noise_rng):
    order = np.random.default_rng(1000 + epoch).permutation(len(self.x))
    rows = order[index * self.global_batch:(index + 1) * self.global_batch]
    noise = noise_rng.normal(size=len(rows)).astype(np.float32) * 0.01  # whole global batch
    mine = shd.process_rows(self.global_batch)
    return {"x": self.x[rows][mine], "y": (self.y[rows] + noise)[mine]}

  def host_state(self):
    return {"noise": self.noise.bit_generator.state}, {"seen": np.arange(3)}

  def load_host_state(self, host, arrays):
    assert arrays["seen"].tolist() == [0, 1, 2]
    self.noise.bit_generator.state = host["noise"]

  def evaluate(self, params):
    return {"neg_mse": -float(_toy_mse(params, self.x, self.y))}


class PureToyTask(ToyTask):
  """The toy with batches that depend only on (epoch, index): built by several workers."""
  stateful_batches = False

  def batch(self, epoch, index):
    return self._rows(epoch, index, np.random.default_rng([int(self.config.seed), epoch, index]))


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.task = HERE + ":ToyTask"
  c.seed = 3
  c.mesh = (("data", -1), ("fsdp", 1))
  c.sharding_rules = ((".*", "fsdp"),)
  c.fsdp_min_size = 16
  c.freeze = ()
  c.compute_dtype = "float32"
  c.remat = False
  c.tensorboard = False
  c.eval_every_epochs = 1
  c.log_every_steps = 1
  c.data = dict(workers=2)
  c.train = dict(batch_size=8, epochs=2, lr=3e-2, schedule="cosine_per_epoch", weight_decay=0.01,
                 accum_steps=1, max_steps=-1)
  c.checkpoint = dict(keep=2, every_steps=3, best_metric="neg_mse", best_mode="max", async_save=True)
  return c


# ---------------------------------------------------------------- helpers
def _run(cfg, workdir, devices=None, mesh=(("data", -1), ("fsdp", 1))):
  from cirjax.train.trainer import train
  devices = devices or jax.devices()
  m = shd.make_mesh(mesh, devices)
  return train(cfg, str(workdir), mesh=m)


def _params_np(result):
  return jax.tree.map(np.asarray, jax.device_get(result["state"].params))


def _cli(args, env=None, timeout=120):
  e = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
           CIRJAX_CPU_DEVICES="4")
  e.update(env or {})
  return subprocess.run([sys.executable, "-m", "cirjax", "train", *args], env=e, cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def _restore_params(workdir):
  from cirjax.train.checkpointing import Checkpointer
  c = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  step = c.latest_step()
  params = c.restore_params(step)
  c.close()
  return step, jax.tree.map(np.asarray, params)


def _losses(workdir):
  recs = [json.loads(l) for l in
          Path(os.path.join(workdir, "metrics.jsonl")).read_text().splitlines() if l]
  return [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"], \
         [(r["step"], r["neg_mse"]) for r in recs if r["kind"] == "eval"]


# ---------------------------------------------------------------- tests
def test_config_loading_and_overrides(tmp_path):
  cfg = config_utils.load_config(HERE, ["--config.train.lr=0.5", "train.epochs=3",
                                        "--config.mesh=(('data', 2), ('fsdp', 2))"])
  assert cfg.train.lr == 0.5 and cfg.train.epochs == 3 and cfg.mesh[1] == ("fsdp", 2)
  with pytest.raises(config_utils.ConfigError, match="train.lrr"):
    config_utils.load_config(HERE, ["--config.train.lrr=1"])
  with pytest.raises(config_utils.ConfigError, match="epochs"):
    config_utils.load_config(HERE, ["--config.train.epochs=abc"])
  with pytest.raises(config_utils.ConfigError, match="not found"):
    config_utils.load_config(str(tmp_path / "nope.py"))
  rest, ov = config_utils.split_config_overrides(["--workdir", "d", "--config.a", "1", "--config.b=2"])
  assert rest == ["--workdir", "d"] and ov == ["--config.a=1", "--config.b=2"]


def test_fsdp_rule_and_mesh():
  mesh = shd.make_mesh((("data", 2), ("fsdp", 2)))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2}
  assert shd.fsdp_spec((6, 8), 2, 1) == jax.sharding.PartitionSpec(None, "fsdp")
  assert shd.fsdp_spec((7, 3), 2, 1) == jax.sharding.PartitionSpec()
  assert shd.fsdp_spec((8, 8), 2, 1000) == jax.sharding.PartitionSpec()
  tree = {"vit": {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32)},
          "qf": {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32)}}
  specs = shd.param_specs({"params": tree, "opt": {"mu": tree}}, mesh,
                          (("vit/.*", "replicate"), (".*", "fsdp")), fsdp_min_size=16)
  assert specs["params"]["vit"]["w"] == jax.sharding.PartitionSpec()
  assert specs["params"]["qf"]["w"] == jax.sharding.PartitionSpec("fsdp", None)
  assert specs["opt"]["mu"]["vit"]["w"] == jax.sharding.PartitionSpec()
  with pytest.raises(ValueError, match="devices"):
    shd.make_mesh((("data", 3), ("fsdp", 1)))


def test_freezing_mask_and_no_optimizer_state():
  params = ToyModel().init(jax.random.PRNGKey(0), jnp.zeros((1, 8)))["params"]
  mask = st.trainable_mask(params, freeze=("body/.*",))
  assert mask["body"]["kernel"] is False and mask["head"]["kernel"] is True
  with pytest.raises(ValueError, match="match no parameter"):
    st.trainable_mask(params, freeze=("vision/.*",))
  cfg = get_config().train
  tx, _ = st.make_optimizer(ml_collections.ConfigDict(cfg), mask, 8, 16)
  state = st.init_state(params, tx)
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
  n_train = sum(x.size for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m)
  # mu and nu of the trained leaves plus step counters; nothing for the frozen body.
  assert 0 < n_opt - 2 * n_train <= 4


def test_schedules():
  c = ml_collections.ConfigDict(dict(lr=1.0, epochs=4, schedule="cosine_per_epoch"))
  s = st.make_schedule(c, steps_per_epoch=10, total_steps=40)
  for step, e in [(0, 0), (9, 0), (10, 1), (35, 3)]:
    want = (1 - 0.01) * 0.5 * (1 + np.cos(np.pi * e / 4)) + 0.01
    np.testing.assert_allclose(float(s(jnp.int32(step))), want, rtol=1e-6)
  c = ml_collections.ConfigDict(dict(lr=2.0, schedule="warmup_cosine", warmup_ratio=0.1))
  s = st.make_schedule(c, steps_per_epoch=100, total_steps=100)
  np.testing.assert_allclose([float(s(jnp.int32(i))) for i in (0, 5, 10, 55, 100)],
                             [0.0, 1.0, 2.0, 1.0, 0.0], atol=1e-6)


def test_one_device_equals_four_devices_fsdp(tmp_path):
  cfg = get_config()
  cfg.train.epochs = 1
  r1 = _run(cfg, tmp_path / "one", devices=jax.devices()[:1])
  r4 = _run(cfg, tmp_path / "four", mesh=(("data", 2), ("fsdp", 2)))
  # FSDP really sharded something.
  shardings = [x.sharding.spec for x in jax.tree.leaves(r4["state"].params)]
  assert any("fsdp" in tuple(s) for s in shardings)
  np.testing.assert_allclose(r1["losses"], r4["losses"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               _params_np(r1), _params_np(r4))


def test_prefetched_batches_train_as_synchronous_ones(tmp_path):
  """Batches built ahead by worker threads give bit-identical runs, for a task whose batches
  advance host state (one worker, in order) and for one whose batches are pure (several)."""
  for task in ("ToyTask", "PureToyTask"):
    losses, params = [], []
    for workers in (0, 3):
      cfg = get_config()
      cfg.task = HERE + ":" + task
      cfg.train.epochs = 1
      cfg.data.workers = workers
      r = _run(cfg, tmp_path / f"{task}_{workers}")
      losses.append(r["losses"])
      params.append(_params_np(r))
    assert losses[0] == losses[1], task
    jax.tree.map(np.testing.assert_array_equal, *params)
  recs = [json.loads(l) for l in
          Path(tmp_path / "PureToyTask_3" / "metrics.jsonl").read_text().splitlines() if l]
  waits = [r for r in recs if r["kind"] == "data"]
  assert len(waits) == 1 and 0 <= waits[0]["data_wait_fraction"] <= 1


def test_hooks_and_shutdown_on_an_exception(tmp_path):
  from cirjax.train.trainer import Trainer
  cfg = get_config()
  cfg.train.epochs = 1
  trainer = Trainer(cfg, str(tmp_path / "h"), mesh=shd.make_mesh((("data", -1), ("fsdp", 1))))
  seen = []
  trainer.add_hook(lambda info: seen.append((info.step, info.index, info.end_of_epoch)), every=3)

  def boom(info):
    if info.step == 5:
      raise RuntimeError("boom")

  trainer.add_hook(boom)
  with pytest.raises(RuntimeError, match="boom"):
    trainer.run()
  assert seen == [(3, 2, False)]
  assert trainer.progress.bar is None  # closed by the shutdown path
  # The step-3 checkpoint (every_steps=3) was completed: a new run resumes from it.
  r = _run(cfg, tmp_path / "h")
  assert r["status"] == "done" and len(r["losses"]) == 8 - 3


def test_resume_refuses_a_config_that_changes_the_model(tmp_path):
  """A workdir holds one run: a resume may change the step limit or logging, not the model,
  and a refused resume leaves the workdir's config.json as it was."""
  from cirjax.train.config_utils import ConfigError
  cfg = get_config()
  cfg.train.epochs = 1
  cfg.train.max_steps = 3
  wd = tmp_path / "run"
  assert _run(cfg, wd)["status"] == "done"
  stored = (wd / "config.json").read_bytes()
  changed = get_config()
  changed.train.epochs = 1
  changed.train.max_steps = 3
  changed.train.lr = 1e-3
  changed.seed = 4
  with pytest.raises(ConfigError) as e:
    _run(changed, wd)
  msg = str(e.value)
  assert "train.lr: stored 0.03, requested 0.001" in msg and "seed: stored 3, requested 4" in msg
  assert "new --workdir" in msg and (wd / "config.json").read_bytes() == stored
  assert not (wd / "config_history.jsonl").exists()
  # Safe keys may change; the change is recorded and config.json describes the resumed run.
  more = get_config()
  more.train.epochs = 1
  more.train.max_steps = 5
  more.log_every_steps = 2
  r = _run(more, wd)
  assert r["status"] == "done" and len(r["losses"]) == 5 - 3
  assert json.loads((wd / "config.json").read_text())["train"]["max_steps"] == 5
  hist = [json.loads(l) for l in (wd / "config_history.jsonl").read_text().splitlines()]
  assert set(hist[0]["changed"]) == {"train.max_steps", "log_every_steps"}
  assert hist[0]["changed"]["train.max_steps"] == {"stored": 3, "requested": 5}
  # The CLI prints the refusal as one error, exit 2, no traceback.
  bad = _cli(["--config", str(Path(__file__)), "--workdir", str(wd), "--config.seed=9",
              "--config.train.epochs=1", "--config.train.max_steps=5"])
  assert bad.returncode == 2 and "seed: stored 3, requested 9" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_grad_accumulation_matches_full_batch(tmp_path):
  cfg = get_config()
  cfg.train.epochs = 1
  cfg.checkpoint.every_steps = 0
  ra = _run(cfg, tmp_path / "full")
  cfg.train.accum_steps = 2
  rb = _run(cfg, tmp_path / "accum")
  np.testing.assert_allclose(ra["losses"], rb["losses"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               _params_np(ra), _params_np(rb))


def test_bf16_compute_and_remat_train(tmp_path):
  cfg = get_config()
  cfg.train.epochs = 1
  cfg.compute_dtype = "bfloat16"
  cfg.remat = True
  r = _run(cfg, tmp_path / "bf16")
  assert r["status"] == "done" and np.isfinite(r["losses"]).all()
  # Parameters stay fp32 whatever the compute dtype.
  assert {x.dtype for x in jax.tree.leaves(r["state"].params)} == {jnp.dtype("float32")}
  assert r["losses"][-1] < r["losses"][0]


def test_nan_learning_rate_stops_naming_the_step(tmp_path):
  cfg = get_config()
  cfg.train.lr = 1e25
  cfg.train.schedule = "constant"
  cfg.checkpoint.every_steps = 1
  r = _run(cfg, tmp_path / "nan")
  assert r["status"] == "nonfinite"
  assert "step 1" in r["error"] or "step 2" in r["error"]
  bad = int(r["error"].split("at step ")[1].split()[0])
  # The last good checkpoint is the one before the bad step, and it is loadable.
  assert r["last_checkpoint"] == bad
  step, params = _restore_params(str(tmp_path / "nan"))
  assert step == bad and all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_crash_mid_epoch_then_resume_equals_uninterrupted_bit_for_bit(tmp_path):
  """The default run's exact-resume check (the SIGKILL version below is `-m slow`): a run
  that dies mid epoch 1, after its step-9 checkpoint, and is resumed ends with the same
  parameters, train losses and eval metrics as an uninterrupted run, to the last bit."""
  from cirjax.train.trainer import Trainer
  cfg = get_config()  # 2 epochs x 8 steps, async checkpoints every 3 steps, host-side RNG
  ref = _run(cfg, tmp_path / "ref")
  trainer = Trainer(cfg, str(tmp_path / "cut"), mesh=shd.make_mesh((("data", -1), ("fsdp", 1))))

  def crash(info):
    if info.step == 11:
      raise RuntimeError("crash")

  trainer.add_hook(crash)
  with pytest.raises(RuntimeError, match="crash"):
    trainer.run()
  cut = _run(cfg, tmp_path / "cut")
  assert cut["status"] == "done" and len(cut["losses"]) == 16 - 9  # resumed from step 9
  jax.tree.map(np.testing.assert_array_equal, _params_np(ref), _params_np(cut))
  (l1, e1), (l2, e2) = _losses(str(tmp_path / "ref")), _losses(str(tmp_path / "cut"))
  assert [s for s, _ in l2] == list(range(1, 17))
  np.testing.assert_array_equal(l1, l2)
  np.testing.assert_array_equal(e1, e2)
  assert len(e2) == 2


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
  ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
  args = ["--config", HERE, "--config.checkpoint.every_steps=3"]
  r = _cli(args + ["--workdir", ref])
  assert r.returncode == 0, r.stderr[-3000:]
  # Killed before global step 11 (mid epoch 1 of 2, 8 steps per epoch), perhaps while the
  # step-9 checkpoint is being written: a save waits for the previous one, so step 8 or 9
  # is complete.
  r = _cli(args + ["--workdir", cut], env={"TOY_SIGKILL_AT": "11"})
  assert r.returncode == -signal.SIGKILL
  assert os.path.exists(os.path.join(cut, "cirjax.lock"))  # the killed run's, now stale
  r = _cli(args + ["--workdir", cut])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resuming from" in r.stderr and "took over the stale workdir lock" in r.stderr
  s1, p1 = _restore_params(ref)
  s2, p2 = _restore_params(cut)
  assert s1 == s2 == 16
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  (l1, e1), (l2, e2) = _losses(ref), _losses(cut)
  assert [s for s, _ in l1] == [s for s, _ in l2] == list(range(1, 17))
  np.testing.assert_array_equal(l1, l2)
  np.testing.assert_array_equal(e1, e2)
  assert "final metrics" in r.stdout and "neg_mse" in r.stdout


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
  script = textwrap.dedent(f"""
    import os, signal, jax, jax.numpy as jnp, numpy as np
    from cirjax.train.checkpointing import Checkpointer
    c = Checkpointer({str(tmp_path)!r}, keep=3)
    big = {{"w": jnp.ones((4096, 1024)) }}
    c.save(1, big, {{"step": 1}}); c.wait()
    c.save(2, jax.tree.map(lambda x: x * 2, big), {{"step": 2}})
    os.kill(os.getpid(), signal.SIGKILL)   # the async write of step 2 is in flight
  """)
  e = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", script], env=e, capture_output=True, text=True, timeout=120)
  assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
  from cirjax.train.checkpointing import Checkpointer
  c = Checkpointer(str(tmp_path), keep=3, async_save=False)
  latest = c.latest_step()
  assert latest in (1, 2)
  shd_ = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state, host, _ = c.restore(latest, {"w": jax.ShapeDtypeStruct((4096, 1024), jnp.float32, sharding=shd_)})
  assert host["step"] == latest
  np.testing.assert_array_equal(np.asarray(state["w"][:2, :2]), np.full((2, 2), float(latest)))
  c.close()


@pytest.mark.slow
def test_two_processes_equal_one_process_four_devices(tmp_path):
  sys.path.insert(0, os.path.join(REPO, "launch"))
  import multiprocess  # pylint: disable=import-outside-toplevel
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  args = ["--config", HERE, "--config.train.epochs=1", "--config.mesh=(('data', 2), ('fsdp', 2))"]
  r = _cli(args + ["--workdir", one])
  assert r.returncode == 0, r.stderr[-3000:]
  status = multiprocess.launch(args + ["--workdir", two], num_processes=2, devices_per_process=2,
                               timeout=150, env={"CIRJAX_CPU_DEVICES": ""})
  assert status == 0
  (l1, e1), (l2, e2) = _losses(one), _losses(two)
  np.testing.assert_allclose([v for _, v in l1], [v for _, v in l2], rtol=1e-5)
  _, p1 = _restore_params(one)
  _, p2 = _restore_params(two)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p2)
