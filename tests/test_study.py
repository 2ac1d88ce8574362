"""The QuRe study: its preference pairs, aggregation and report, and the `:quick` plumbing
(warm-up, one arm from it, scoring, report) end to end."""

import json
from pathlib import Path

import numpy as np
import pytest

from cirjax import study, study_report
from cirjax.data import synth
from cirjax.eval import metrics
from cirjax.train import config_utils

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "study_qure_synthetic.py")


def test_preference_pairs_prefer_the_set_with_more_relevant_images(synth_root):
  split = synth.read_synthetic(synth_root, "val")
  rows, s1, s2, pref = study.preference_pairs(split, synth_root, seed=0)
  assert len(rows) == len(split.queries) and s1.shape == s2.shape == (len(rows), 5)
  idx = split.corpus_index()
  ref = np.array([idx[split.queries[r].reference] for r in rows])
  assert not (s1 == ref[:, None]).any() and not (s2 == ref[:, None]).any()
  rel = [set(idx[n] for n in split.queries[r].relevant) for r in rows]
  n1 = np.array([len(set(a) & r) for a, r in zip(s1, rel)])
  n2 = np.array([len(set(a) & r) for a, r in zip(s2, rel)])
  assert (n1 != n2).all() and ((n1 > n2) == (pref == 1)).all()
  assert {1, 2} <= set(pref.tolist())          # set 1 is not always the better one
  # A model scoring relevant images higher is always right (Eq. 9 = 100 %); the opposite
  # model never is; fixed sets: the same seed gives the same pairs.
  score = lambda sets, sign: np.array([[sign * (c in r) for c in s] for s, r in zip(sets, rel)],
                                      float)
  assert metrics.preference_rate(score(s1, 1), score(s2, 1), pref)["preference_rate"] == 100
  assert metrics.preference_rate(score(s1, -1), score(s2, -1), pref)["preference_rate"] == 0
  again = study.preference_pairs(split, synth_root, seed=0)
  np.testing.assert_array_equal(again[1], s1)


def test_arm_configs_share_everything_but_loss_and_negatives():
  cfgs = {a: config_utils.load_config(study.arm_spec(CONFIG, a))
          for a in ("warmup",) + tuple(config_utils.load_config(CONFIG).study.arms)}
  assert [c.qure.loss for c in cfgs.values()] == [
      "infonce", "infonce_inbatch", "pairwise", "pairwise", "pairwise", "infonce"]
  assert cfgs["pairwise_corpus"].qure.n_def == 0 and cfgs["pairwise_topk"].qure.strategy == "topk"
  budget = {(c.train.epochs, c.train.lr, c.train.batch_size) for a, c in cfgs.items()
            if a != "warmup"}
  assert len(budget) == 1
  assert config_utils.load_config(CONFIG + ":pairwise_qure").study.arm == "pairwise_qure"
  with pytest.raises(config_utils.ConfigError, match="arm='nope'"):
    config_utils.load_config(CONFIG + ":arm=nope")


def test_summary_and_report_from_a_constructed_study(tmp_path):
  runs = {"pairwise_qure": [{"R@1": 10.0, "mAP@10": 20.0, "final/fn_share/qure": 0.01},
                            {"R@1": 12.0, "mAP@10": 22.0, "final/fn_share/qure": 0.03}],
          "pairwise_topk": [{"R@1": 11.0, "mAP@10": 10.0}, {"R@1": 11.0, "mAP@10": 10.0}]}
  summ = {a: study.summarize(r) for a, r in runs.items()}
  assert summ["pairwise_qure"]["R@1"] == {"mean": 11.0, "std": pytest.approx(np.sqrt(2)),
                                          "n": 2, "values": [10.0, 12.0]}
  report = {"config": "c", "arms": list(runs), "seeds": [0, 1], "warmup": {"R@1": 1.0},
            "runs": runs, "summary": summ, "train_s": {"warmup": 60.0}, "elapsed_s": 120.0}
  study_report.write(report, tmp_path)
  md = (tmp_path / "study.md").read_text()
  assert "| pairwise_qure | 11.00 ± 1.41 |" in md
  assert "pairwise_qure − pairwise_topk on mAP@10: +11.00" in md and ": higher" in md
  assert "pairwise_qure − pairwise_topk on R@1: +0.00" in md and "within the seed spread" in md
  assert "* qure: 2.00 ± 1.41" in md
  assert (tmp_path / "study_metrics.png").stat().st_size > 1000


@pytest.mark.slow  # an end-to-end run, 40 s: the default suite keeps the report's tests
def test_quick_study_runs_end_to_end(synth_root, tmp_path, monkeypatch):
  """Plumbing, not the outcome: a warm-up, one arm trained from its export, scored."""
  from cirjax import cli
  monkeypatch.setenv("CIRJAX_DATA", str(synth_root.parent))   # :quick reads synthetic_tiny
  out = tmp_path / "report"
  assert cli.main(["study", "--config", CONFIG + ":quick", "--workdir", str(tmp_path / "w"),
                   "--out", str(out), "--arms", "pairwise_qure", "--seeds", "0"]) == 0
  rep = json.loads((out / "study.json").read_text())
  run, = rep["runs"]["pairwise_qure"]
  assert {"R@1", "R@50", "Rsubset@1", "mAP@25", "rel@5", "preference_rate"} <= set(run)
  assert 0 <= run["mined/fn_share/qure"] <= 1 and 0 <= run["final/fn_share/corpus"] <= 1
  cfg = json.loads((tmp_path / "w" / "pairwise_qure_seed0" / "config.json").read_text())
  assert cfg["model"]["init"] == str(tmp_path / "w" / "warmup" / "model")
  assert "| pairwise_qure |" in (out / "study.md").read_text()
  assert cli.main(["study", "--config", CONFIG + ":quick", "--workdir", str(tmp_path / "w"),
                   "--out", str(out), "--seeds", "x"]) == 1
