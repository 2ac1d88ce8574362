"""QuRe training end to end on tiny data in the real formats: every QuRe config's `tiny`
variant runs, mining state survives a resume exactly, the exported model loads, and
1 device equals 4 devices for the full QuRe step (mining, sampler, frozen-feature cache)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from cirjax.train import config_utils, sharding as shd

REPO = Path(__file__).resolve().parents[1]


def _fashioniq(root: Path, vocab: Path) -> None:
  """Three categories, 60 images each, 24 training triplets and 8 validation ones."""
  rng = np.random.default_rng(0)
  words = ["is", "red", "blue", "longer", "shorter", "has", "no", "sleeves", "darker"]
  for cat in ("dress", "shirt", "toptee"):
    names = [f"{cat}{i:03d}" for i in range(60)]
    for n in names:
      (root / "images").mkdir(parents=True, exist_ok=True)
      Image.new("RGB", (24, 30), tuple(int(x) for x in rng.integers(0, 255, 3))).save(
          root / "images" / f"{n}.png")
    for split, k in (("train", 24), ("val", 8)):
      split_names = names if split == "val" else names[:40]
      (root / "image_splits").mkdir(parents=True, exist_ok=True)
      (root / "image_splits" / f"split.{cat}.{split}.json").write_text(json.dumps(split_names))
      caps = []
      for _ in range(k):
        a, b = rng.choice(len(split_names), 2, replace=False)
        caps.append({"candidate": split_names[a], "target": split_names[b],
                     "captions": [" ".join(rng.choice(words, 3)), " ".join(rng.choice(words, 2))]})
      (root / "captions").mkdir(parents=True, exist_ok=True)
      (root / "captions" / f"cap.{cat}.{split}.json").write_text(json.dumps(caps))
  (root / "vocab.txt").write_text(vocab.read_text())


def _train(config, workdir, devices=None):
  from cirjax.train.trainer import train
  mesh = shd.make_mesh(tuple(tuple(a) for a in config.mesh), devices or jax.devices())
  return train(config, str(workdir), mesh=mesh)


def _params(result):
  return jax.tree.map(np.asarray, jax.device_get(result["state"].params))


def test_synthetic_tiny_trains_mines_evaluates_and_exports(synth_root, tmp_path):
  cfg = config_utils.load_config(str(REPO / "configs/synthetic.py") + ":tiny",
                                 [f"data.root={synth_root}"])
  r = _train(cfg, tmp_path / "run")
  assert r["status"] == "done" and np.isfinite(r["losses"]).all()
  assert len(r["losses"]) == 8  # 64 queries / 16 per batch x 2 epochs
  recs = [json.loads(l) for l in
          Path(tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if l]
  mining = [x for x in recs if x["kind"] == "mining"]
  assert len(mining) == 1 and mining[0]["epoch"] == 1 and mining[0]["set_size_mean"] > 0
  # The synthetic set knows every relevant image: each strategy's false negatives are logged.
  assert all(0 <= mining[0][f"fn_share/{s}"] <= 1 for s in ("qure", "topk", "corpus"))
  assert {"R@10", "mAP@10"} <= set(r["final_metrics"])
  final = json.loads(Path(tmp_path / "run" / "final_metrics.json").read_text())
  assert final["chance"]["R@10"] == pytest.approx(100 * 10 / 59)
  assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
  # The exported model is a cirjax BLIP-2 directory the evaluator loads, and reproduces
  # the trained parameters.
  import cirjax
  model = cirjax.load_blip2(tmp_path / "run" / "model")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
               model.params, _params(r))


@pytest.mark.slow
def test_qure_resume_after_mining_is_exact(synth_root, tmp_path, monkeypatch):
  """Stopped mid-epoch 1 (after its mining), resumed: same losses and parameters."""
  cfg = config_utils.load_config(str(REPO / "configs/synthetic.py") + ":tiny",
                                 [f"data.root={synth_root}", "checkpoint.every_steps=1",
                                  "eval_every_epochs=0", "export=False"])
  full = _train(cfg, tmp_path / "full")
  monkeypatch.setenv("CIRJAX_STOP_AFTER_STEP", "6")
  part = _train(cfg, tmp_path / "cut")
  assert part["status"] == "stopped" and len(part["losses"]) == 6
  monkeypatch.delenv("CIRJAX_STOP_AFTER_STEP")
  rest = _train(cfg, tmp_path / "cut")
  assert rest["status"] == "done"
  np.testing.assert_array_equal(part["losses"] + rest["losses"], full["losses"])
  jax.tree.map(np.testing.assert_array_equal, _params(full), _params(rest))


@pytest.mark.slow
def test_qure_one_device_equals_four_devices(synth_root, tmp_path):
  cfg = config_utils.load_config(str(REPO / "configs/synthetic.py") + ":tiny",
                                 [f"data.root={synth_root}", "eval_every_epochs=0",
                                  "export=False", "mesh=(('data', 2), ('fsdp', 2))",
                                  "fsdp_min_size=256"])
  r4 = _train(cfg, tmp_path / "four")
  cfg.mesh = (("data", 1), ("fsdp", 1))
  r1 = _train(cfg, tmp_path / "one", devices=jax.devices()[:1])
  np.testing.assert_allclose(r1["losses"], r4["losses"], rtol=1e-5)
  # Adam divides by sqrt(v): for word-embedding rows with near-zero gradients (tokens seen
  # once) the 4-device reduction order changes an update by a fraction of one lr step
  # (1e-4 here); every other parameter agrees to 1e-4 relative.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4),
               _params(r1), _params(r4))


@pytest.mark.slow
def test_cirr_config_tiny_runs(synth_root, tmp_path):
  cfg = config_utils.load_config(
      str(REPO / "configs/qure_blip2_cirr.py") + ":tiny",
      [f"data.root={synth_root}", f"data.tokenizer={synth_root / 'vocab.txt'}"])
  assert cfg.model.vision.num_layers == 1 and cfg.train.max_steps == 6
  r = _train(cfg, tmp_path / "cirr")
  assert r["status"] == "done" and len(r["losses"]) == 6 and np.isfinite(r["losses"]).all()
  assert "avg" in r["final_metrics"]


@pytest.mark.slow
def test_fashioniq_config_tiny_runs(synth_root, tmp_path):
  root = tmp_path / "fiq"
  _fashioniq(root, synth_root / "vocab.txt")
  cfg = config_utils.load_config(str(REPO / "configs/qure_blip2_fashioniq.py") + ":tiny",
                                 [f"data.root={root}"])
  r = _train(cfg, tmp_path / "fiq_run")
  assert r["status"] == "done" and len(r["losses"]) == 6
  m = r["final_metrics"]
  assert {"dress/R@10", "shirt/R@50", "avg/R@10", "avg/R@50", "avg"} <= set(m)


def test_real_configs_have_the_paper_settings():
  cirr = config_utils.load_config(str(REPO / "configs/qure_blip2_cirr.py"))
  fiq = config_utils.load_config(str(REPO / "configs/qure_blip2_fashioniq.py"))
  for c, epochs, lr in ((cirr, 50, 1e-5), (fiq, 30, 5e-6)):
    assert c.train.epochs == epochs and c.train.lr == lr and c.train.batch_size == 32
    assert c.qure.n_def == 6 and c.train.weight_decay == 0.05 and c.seed == 1000
    assert c.model.vision.hidden_size == 1024 and c.model.num_query_tokens == 32
    assert "vision/.*" in c.freeze and c.qure.cache_features
  with pytest.raises(config_utils.ConfigError, match="unknown variant"):
    config_utils.load_config(str(REPO / "configs/qure_blip2_cirr.py") + ":nope")


def test_cache_features_needs_a_frozen_vit(synth_root, tmp_path):
  cfg = config_utils.load_config(str(REPO / "configs/synthetic.py") + ":tiny",
                                 [f"data.root={synth_root}", "freeze=('itm_head/.*',)"])
  with pytest.raises(ValueError, match="frozen vision tower"):
    _train(cfg, tmp_path / "bad")


def test_fashioniq_mining_target_is_the_first_copy():
  """FashionIQ mines over the category's triplet targets (one entry per triplet); the
  reference takes a query's target position as the first entry of its target image."""
  from cirjax import mining
  from cirjax.data.records import CIRSplit, Query
  from cirjax.mining import groups
  images = ["dress_0", "dress_1", "dress_2"]
  targets = [0, 1, 2, 0, 1, 2, 2]  # 7 triplets over 3 images; query 6 is the 3rd copy of 2
  queries = [Query(str(i), images[(t + 1) % 3], "x", target=images[t]) for i, t in
             enumerate(targets)]
  split = CIRSplit("fashioniq", "dress.train", queries, images, {})
  names = {n: i for i, n in enumerate(images)}
  q_tgt = np.array(targets, np.int32)
  first, = groups.mining_groups([split], names, q_tgt, per_triplet=True)
  slot, = groups.mining_groups([split], names, q_tgt, per_triplet=True, target_position="slot")
  np.testing.assert_array_equal(first.corpus, targets)
  np.testing.assert_array_equal(first.target_pos, [0, 1, 2, 0, 1, 2, 2])
  np.testing.assert_array_equal(slot.target_pos, np.arange(7))
  # Copies score alike: query 6 ranks its target's copies 2, 5, 6 first. From the first copy,
  # everything after it (the other copies are dropped as the target's id) can be mined; from
  # its own slot (the last copy) only what ranks below it.
  s = np.array([[0.1, 0.5, 0.9, 0.1, 0.5, 0.9, 0.9]] * 7, np.float32)
  sets = {}
  for name, g in (("first", first), ("slot", slot)):
    hn, _ = mining.hard_negative_sets(s[6:7], g.target_pos[6:7], image_ids=g.corpus)
    sets[name] = hn.indices[hn.offsets[0]:hn.offsets[1]].tolist()
  assert sets["first"] != sets["slot"]
  with pytest.raises(ValueError, match="target_position"):
    groups.mining_groups([split], names, q_tgt, per_triplet=True, target_position="last")


def test_feature_store_is_reused_on_resume_and_rebuilt_for_changed_vision(synth_root, tmp_path):
  """The task's frozen-feature store: built once, reused by a task on the same workdir,
  rebuilt when a vision parameter changes; batches read their rows from it."""
  from cirjax.train import qure
  cfg = config_utils.load_config(str(REPO / "configs/synthetic.py") + ":tiny",
                                 [f"data.root={synth_root}", "qure.feature_dtype=float16"])
  mesh = shd.make_mesh(tuple(tuple(a) for a in cfg.mesh), jax.devices())
  params = qure.blip2.init_blip2(jax.random.PRNGKey(0), qure.QuReTask(
      cfg, mesh, str(tmp_path)).cfg)

  def opened(p):
    task = qure.QuReTask(cfg, mesh, str(tmp_path))
    task.images.open(p)
    return task

  first = opened(params)
  stats = first.images.features.stats
  assert stats["store_built"] and stats["store_dtype"] == "float16"
  n = len(first.image_names)
  assert stats["store_shape"][0] == n
  want = np.asarray(jax.device_get(qure.blip2.vision_features(
      params, first._run_cfg(),  # pylint: disable=protected-access
      first.images.pixels(np.arange(3)))))
  np.testing.assert_allclose(first.images.features[np.arange(3)].astype(np.float32), want,
                             rtol=1e-2, atol=1e-2)  # fp16 rounding of the stored rows
  again = opened(params)
  assert not again.images.features.stats["store_built"]
  assert again.images.features.stats["store_path"] == stats["store_path"]
  changed = jax.tree.map(lambda x: x, params)
  leaf_path = next(iter(jax.tree_util.tree_leaves_with_path(changed["vision"])))[0]
  changed["vision"] = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 1.0 if p == leaf_path else x, changed["vision"])
  rebuilt = opened(changed)
  assert rebuilt.images.features.stats["store_built"]
  assert rebuilt.images.features.stats["store_path"] != stats["store_path"]
  assert not Path(stats["store_path"]).exists()  # the stale store is gone


@pytest.mark.slow
def test_scan_layers_trains_mines_and_exports_like_the_loop(synth_root, tmp_path):
  """The tiny run (mining at epoch 1, evaluation, export) with scan_layers: the state holds
  the ViT and Q-Former layers stacked, losses, metrics and parameters are the looped run's
  (fp32, 1e-5), and the exported model directory has the looped run's files and parameter
  tree."""
  from cirjax.models import blip2
  import cirjax
  # Adam's eps 1e-6 (config: 1e-8): a parameter whose exact gradient is 0 (a key bias, by
  # softmax's shift invariance) then stays put instead of moving by float noise / eps, which
  # differs between any two formulations; every other parameter trains as configured.
  over = [f"data.root={synth_root}", "train.eps=1e-6"]
  cfg = config_utils.load_config(str(REPO / "configs/synthetic.py") + ":tiny", over)
  loop = _train(cfg, tmp_path / "loop")
  scan = _train(config_utils.load_config(str(REPO / "configs/synthetic.py") + ":tiny",
                                         over + ["scan_layers=True"]), tmp_path / "scan")
  assert "layer_groups" in scan["state"].params["qformer"]
  assert "layers" in scan["state"].params["vision"]
  np.testing.assert_allclose(scan["losses"], loop["losses"], rtol=1e-5)
  assert scan["final_metrics"].keys() == loop["final_metrics"].keys()
  model = cirjax.load_blip2(tmp_path / "scan" / "model")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), model.params,
               blip2.unstack_layers(_params(scan), model.config))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.tree.map(np.asarray, model.params), _params(loop))
  assert sorted(p.name for p in (tmp_path / "scan" / "model").iterdir()) == \
      sorted(p.name for p in (tmp_path / "loop" / "model").iterdir())
