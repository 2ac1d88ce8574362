"""False-negative audit of mined pools, on cases whose relevant sets are known by hand."""

import numpy as np
import pytest

from cirjax import mining
from cirjax.mining import audit as ma

# The worked example of docs/mining.md (QuRe set of query 0 = corpus [3, 4, 5, 6]); query 1
# is its mirror image, so its set is [5, 4, 3, 2].
ROW = np.array([5, 4.9, 4.8, 3, 2.9, 2.8, 2.7, 1, 0.9], np.float32)
SCORES = np.stack([ROW, ROW[::-1]])
TARGETS = np.array([1, 7])
RELEVANT = [np.array([1, 2, 5]), np.array([7, 0])]   # target first, as the datasets list them


def test_hand_computed_pools_and_counts():
  audits = ma.audit_strategies(SCORES, TARGETS, RELEVANT, k=3)
  # qure: {3,4,5,6} holds 5; {5,4,3,2} holds nothing relevant.
  np.testing.assert_array_equal(audits["qure"].pool_size, [4, 4])
  np.testing.assert_array_equal(audits["qure"].false_negatives, [1, 0])
  # top-3 without the target: {0,2,3} holds 2; {8,6,5} nothing.
  np.testing.assert_array_equal(audits["topk"].false_negatives, [1, 0])
  # the 3 after the target: {2,3,4} holds 2; {6,5,4} nothing.
  np.testing.assert_array_equal(audits["after_target_topk"].false_negatives, [1, 0])
  # whole corpus minus the target: 8 entries holding {2,5} and {0}.
  np.testing.assert_array_equal(audits["corpus"].pool_size, [8, 8])
  np.testing.assert_array_equal(audits["corpus"].false_negatives, [2, 1])

  m = ma.audit_metrics(audits)
  assert m["fn_share/qure"] == pytest.approx((1 / 4 + 0) / 2)
  assert m["fn_share_pooled/qure"] == pytest.approx(1 / 8)
  assert m["pool_size/qure"] == 4.0
  assert m["fn_queries/qure"] == 0.5
  assert m["empty/qure"] == 0.0
  assert m["fn_share/topk"] == pytest.approx(1 / 6)
  assert m["pool_size/topk"] == 3.0
  assert m["fn_share/corpus"] == pytest.approx((2 / 8 + 1 / 8) / 2)
  assert m["fn_share_pooled/corpus"] == pytest.approx(3 / 16)
  assert m["fn_queries/corpus"] == 1.0
  assert "empty/topk" not in m


def test_block_function_and_mined_sets_give_the_same_audit():
  sets, _ = mining.hard_negative_sets(SCORES, TARGETS)
  a = ma.audit_strategies(lambda s, e: SCORES[s:e], TARGETS, RELEVANT, k=3, num_queries=2,
                          corpus_size=9, mined={"qure": sets}, strategies=("qure", "topk"))
  b = ma.audit_strategies(SCORES, TARGETS, RELEVANT, k=3, strategies=("qure", "topk"))
  assert ma.audit_metrics(a) == ma.audit_metrics(b)


def test_image_ids_repeats_and_empty_pools():
  # Corpus entries 0..5 show images [10, 11, 11, 12, 13, 14]; the target of query 0 is
  # entry 1 (image 11), relevant images {11, 12, 14}.
  ids = np.array([10, 11, 11, 12, 13, 14])
  pools = mining.HardNegativeSets(offsets=np.array([0, 3, 3]),
                                  indices=np.array([12, 13, 14], np.int32))
  a = ma.audit_pools(pools, [[11, 12, 14], [10]], target_ids=np.array([11, 10]))
  np.testing.assert_array_equal(a.false_negatives, [2, 0])
  s = a.summary()
  assert s["fn_share"] == pytest.approx(2 / 3)   # the empty pool is not in the mean
  assert s["pool_size"] == 1.5 and s["empty"] == 0.5 and s["fn_queries"] == 0.5
  whole = mining.whole_corpus_sets([1, 0], image_ids=ids)
  w = ma.audit_pools(whole, [[11, 12, 14, 12], [10]])     # repeated id counted once
  np.testing.assert_array_equal(w.pool_size, [4, 4])      # 5 unique images minus the target
  np.testing.assert_array_equal(w.false_negatives, [2, 0])


def test_concat_and_bad_input():
  a = ma.audit_strategies(SCORES, TARGETS, RELEVANT, k=3, strategies=("qure",))["qure"]
  both = ma.concat([a, a])
  assert both.summary()["fn_share"] == pytest.approx(a.summary()["fn_share"])
  with pytest.raises(ValueError, match="relevant sets for 1 queries, pools for 2"):
    ma.audit_pools(mining.HardNegativeSets(np.array([0, 1, 2]), np.array([0, 1], np.int32)),
                   [[1]])
  with pytest.raises(ValueError, match="strategies"):
    ma.audit_strategies(SCORES, TARGETS, RELEVANT, strategies=("bogus",))


@pytest.fixture(scope="module")
def tiny_model(synth_root, tmp_path_factory):
  """A random tiny BLIP-2 saved as a cirjax model directory (the synthetic `tiny` shapes)."""
  import jax
  from cirjax.convert import registry
  from cirjax.models import blip2
  from cirjax.train import config_utils
  from pathlib import Path
  cfg = config_utils.load_config(str(Path(__file__).parents[1] / "configs/synthetic.py")
                                 + ":tiny")
  vocab = (synth_root / "vocab.txt").read_text()
  mcfg = blip2.model_config(cfg.model, len(vocab.split()))
  d = tmp_path_factory.mktemp("model") / "m"
  registry.save(d, "blip2", mcfg, jax.tree.map(np.asarray,
                                               blip2.init_blip2(jax.random.key(0), mcfg)))
  (d / "vocab.txt").write_text(vocab)
  return d


@pytest.mark.slow  # encodes and mines with a real model: ~15 s quiet, a minute when shared
def test_cli_mine_writes_statistics_and_figures(synth_root, tiny_model, tmp_path, capsys):
  import json
  from cirjax import cli
  out = tmp_path / "mine"
  assert cli.main(["mine", "--checkpoint", str(tiny_model), "--dataset", "synthetic",
                   "--root", str(synth_root), "--out", str(out), "--k", "10",
                   "--plot-queries", "2"]) == 0
  rep = json.loads((out / "mining.json").read_text())
  assert rep["queries"] == 64 and rep["corpus"] == 60
  assert set(rep["false_negatives"]) == set(ma.STRATEGIES)
  assert rep["false_negatives"]["topk"]["pool_size"] == 10.0
  # The whole corpus holds every relevant image but the target: known from the data alone.
  from cirjax.data import synth
  split = synth.read_synthetic(synth_root, "train")
  want = np.mean([(len(q.relevant) - 1) / 59 for q in split.queries])
  assert rep["false_negatives"]["corpus"]["fn_share"] == pytest.approx(want)
  for f in ("set_sizes.png", "score_curves.png", "false_negatives.png"):
    assert (out / f).stat().st_size > 1000
  assert "fn_share" in capsys.readouterr().out
  assert cli.main(["mine", "--checkpoint", str(tmp_path / "nope"), "--dataset", "synthetic",
                   "--root", str(synth_root), "--out", str(out)]) == 1
  assert "does not exist" in capsys.readouterr().err
