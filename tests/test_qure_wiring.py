"""The QuRe task's wiring inside the trainer, held to values computed here independently.

* Mining: for scores given here (the encoders the task mines with are replaced by features
  whose scores are a known matrix), the sets the task hands its sampler equal QuRe's
  reference algorithm run here on that matrix, with each query's target read from the
  split's own caption file (so targets misaligned to their queries fail).
* Sampling: every negative the mined epoch's batches carry lies in its query's set.
* The step: for a batch, the loss the compiled train step reports equals the pairwise loss
  computed here from the model's scores, and the step moves `temp` against the sign of the
  gradient computed here in closed form.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip2_fixtures import TOL_MODEL
from cirjax.models import blip2
from cirjax.train import config_utils, sharding as shd
from cirjax.train import state as st
from cirjax.train.step import make_train_step

REPO = Path(__file__).resolve().parents[1]
THRESHOLD = 1  # the reference's consecutive_threshold (configs: qure.consecutive_threshold)


def _task(synth_root, tmp_path):
  from cirjax.train.qure import QuReTask
  cfg = config_utils.load_config(
      str(REPO / "configs/synthetic.py") + ":tiny",   # QuRe's pairwise recipe
      # Without the recipe's lr warm-up the first step moves `temp` by a full lr.
      [f"data.root={synth_root}", "model.qformer.hidden_dropout_prob=0.0",
       "model.qformer.attention_probs_dropout_prob=0.0", "train.lr=1e-3",
       "train.schedule=cosine_per_epoch"])
  assert cfg.qure.loss == "pairwise" and cfg.qure.consecutive_threshold == THRESHOLD
  mesh = shd.make_mesh((("data", -1), ("fsdp", 1)), jax.devices())
  return QuReTask(cfg, mesh, str(tmp_path / "run")), cfg


def reference_set(scores: np.ndarray, target: int, names: list[str]) -> set[str]:
  """QuRe's hard-negative set of one query (docs/reference_semantics.md#mining), literally:
  rank by score, take what follows the target, the two steepest drops of the first pair far
  enough apart, the images between them."""
  order = np.argsort(-scores, kind="stable")
  after = order[list(order).index(target) + 1:]
  drops = np.diff(scores[after])
  ranked = np.argsort(drops, kind="stable")
  for r in range(len(ranked) - 1):
    i1, i2 = sorted((int(ranked[r]), int(ranked[r + 1])))
    if i2 - i1 > THRESHOLD:
      return {names[j] for j in after[i1 + 1:i2 + 1]} - {names[target]}
  return set()


@pytest.fixture(scope="module")
def mined(synth_root, tmp_path_factory):
  """The task mined at epoch 1 (its first mining) with encoders replaced by known scores."""
  task, cfg = _task(synth_root, tmp_path_factory.mktemp("wiring"))
  captions = json.loads((synth_root / "captions" / "cap.rc2.train.json").read_text())
  corpus = sorted(json.loads((synth_root / "image_splits" / "split.rc2.train.json").read_text()))
  rng = np.random.default_rng(0)
  scores = {}  # (reference image, text) -> score of every corpus image by name
  for c in captions:
    scores[(c["reference"], c["caption"])] = dict(zip(corpus, rng.standard_normal(len(corpus))))
  # Known scores: each query's feature is its score row over the (sorted, unique) image ids
  # the task encodes, each image's feature the one-hot of its id, so score = the row's entry.
  assert len(task.groups) == 1
  g = task.groups[0]
  uniq = np.unique(g.corpus)
  uniq_names = [task.image_names[int(i)] for i in uniq]
  rows = np.array([[scores[(c["reference"], c["caption"])][n] for n in uniq_names]
                   for c in captions], np.float32)
  assert [q.reference for q in task.train_queries.queries] == [c["reference"] for c in captions]
  assert len(captions) == len(task.train_queries)

  def encode_targets(params, idx, sharded=False):
    assert np.array_equal(idx, uniq)
    return jnp.eye(len(uniq), dtype=jnp.float32)[:, None, :]

  def encode_queries(params, ref_idx, ids, mask, sharded=False):
    assert np.array_equal(ref_idx, task.train_queries.ref[g.queries])
    return jnp.asarray(rows[g.queries])
  task.encode_targets, task.encode_queries = encode_targets, encode_queries
  handed = []
  set_mined = task.sampler.set_mined
  task.sampler.set_mined = lambda sets: (handed.append(sets), set_mined(sets))[1]
  params = task.init_params(jax.random.PRNGKey(0))
  task.begin_epoch(0, params)
  task.begin_epoch(1, params)  # the tiny config mines at epoch 1 (n_def 2 of 2 epochs)
  assert task.mined_epoch == 1 and len(handed) == 1
  want = []
  for c in captions:
    row = scores[(c["reference"], c["caption"])]
    want.append(reference_set(np.array([row[n] for n in corpus]), corpus.index(c["target_hard"]),
                              corpus))
  return dict(task=task, cfg=cfg, params=params, sets=handed[0][0], want=want,
              captions=captions)


def test_mined_sets_are_the_reference_sets_of_each_query(mined):
  task, sets, want = mined["task"], mined["sets"], mined["want"]
  got = [{task.image_names[int(i)] for i in sets[q]} for q in range(len(want))]
  assert sum(len(w) for w in want) > 2 * len(want)  # sets worth comparing
  assert got == want


def test_mined_epoch_batches_draw_their_negatives_from_the_sets(mined):
  """Each row's query is found from its reference image and text; its negative (found from
  its cached features) lies in that query's set, or (an empty set: the warm-up pool) is not
  its target."""
  task, want, captions = mined["task"], mined["want"], mined["captions"]
  store = np.asarray(task.images.features[np.arange(len(task.image_names))])
  by_row = {store[i].tobytes(): i for i in range(len(store))}
  assert len(by_row) == len(store)  # every image's cached features are distinct
  queries: dict = {}
  for q in range(len(captions)):
    tq = task.train_queries
    queries.setdefault((int(tq.ref[q]), tq.ids[q].tobytes()), []).append(q)
  drawn = 0
  for index in range(task.steps_per_epoch):
    b = task.batch(1, index)
    for ref, ids, neg in zip(b["ref_feats"], b["input_ids"], b["neg_feats"]):
      found = queries[(by_row[np.asarray(ref).tobytes()], np.asarray(ids).tobytes())]
      if len(found) > 1:
        continue  # two queries with the same reference and text: ambiguous
      q = found[0]
      name = task.image_names[by_row[np.asarray(neg).tobytes()]]
      assert (name in want[q]) if want[q] else (name != captions[q]["target_hard"]), (q, name)
      drawn += bool(want[q])
  assert drawn >= task.steps_per_epoch * task.global_batch // 2


def test_step_reports_the_pairwise_loss_and_moves_temp_against_its_gradient(mined):
  task, cfg = mined["task"], mined["cfg"]
  params = jax.tree.map(jnp.asarray, mined["params"])
  mask = st.trainable_mask(params, tuple(cfg.freeze), ())
  tx, schedule = st.make_optimizer(cfg.train, mask, task.steps_per_epoch,
                                   task.steps_per_epoch * int(cfg.train.epochs))
  step = jax.jit(make_train_step(task.loss_fn, tx, mask, schedule=schedule, seed=0))
  batch = {k: jnp.asarray(v) for k, v in task.batch(1, 0).items()}
  state, metrics = step(st.init_state(params, tx), batch)
  # Independently: the model's (eval-mode; dropout is 0 here) scores and Eqs. 2-3.
  run_cfg = task.cfg
  q = np.asarray(blip2.compose_from_features(params, run_cfg, batch["ref_feats"],
                                             batch["input_ids"], batch["attention_mask"]),
                 np.float64)
  raw = {k: np.einsum("bd,bkd->bk", q, np.asarray(blip2.encode_target_from_features(
      params, run_cfg, batch[k]), np.float64)).max(-1) for k in ("pos_feats", "neg_feats")}
  temp = float(params["temp"])
  x = (raw["pos_feats"] - raw["neg_feats"]) / temp
  loss = float(np.mean(np.log1p(np.exp(-x))))
  assert abs(float(metrics["loss"]) - loss) <= TOL_MODEL * loss
  assert float(metrics["pair_acc"]) == pytest.approx(np.mean(x > 0))
  # d/dtemp of -log sigmoid((a - b) / temp) = (1 - sigmoid(x)) (a - b) / temp^2.
  grad = float(np.mean((1 / (1 + np.exp(x))) * (raw["pos_feats"] - raw["neg_feats"]))) / temp ** 2
  assert abs(grad) > 1e-3
  lr, wd = float(schedule(0)), float(cfg.train.weight_decay)
  moved = float(state.params["temp"]) - temp * (1 - lr * wd)  # AdamW: decay, then -lr m/sqrt(v)
  assert np.sign(moved) == -np.sign(grad) and abs(abs(moved) - lr) <= 1e-3 * lr
