"""The QuRe study: its statistics against hand-computed values, the protocol's building blocks
(lr ladder, schedule, density knob, oracle pools, mined-pair statistics, plateau stop), the
report from constructed results, and the `:quick` plumbing end to end (one cell by default,
the whole quick study under -m slow)."""

import json
import math
import types
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cirjax import mining, study, study_report, study_stats
from cirjax.data import synth
from cirjax.eval import metrics
from cirjax.mining import audit as mining_audit
from cirjax.train import config_utils
from cirjax.train import state as st

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "study_qure_synthetic.py")


# ----------------------------------------------------------------------------- statistics

def test_paired_t_interval_by_hand():
  # d = 1, 2, 3, 4: mean 2.5, sd sqrt(5/3), se sqrt(5/3)/2 = 0.645497; t(0.975, 3) = 3.182446
  # (table); t = 2.5 / 0.645497 = 3.872983, two-sided p = 0.030466.
  r = study_stats.paired_t([1.0, 2.0, 3.0, 4.0])
  se = math.sqrt(5 / 3) / 2
  assert r["n"] == 4 and r["mean"] == 2.5 and r["se"] == pytest.approx(se)
  assert r["lo"] == pytest.approx(2.5 - 3.182446 * se, abs=1e-5)
  assert r["hi"] == pytest.approx(2.5 + 3.182446 * se, abs=1e-5)
  assert r["t"] == pytest.approx(3.872983, abs=1e-6) and r["p"] == pytest.approx(0.030466, abs=1e-6)
  one = study_stats.paired_t([2.0])
  assert one["mean"] == 2.0 and math.isnan(one["lo"]) and math.isnan(one["p"])
  assert study_stats.direction(r["lo"], r["hi"]) == "higher"
  assert study_stats.direction(-1.0, 0.5) == "no difference shown"
  assert study_stats.direction(-1.0, -0.5) == "lower"


def test_holm_by_hand():
  # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max
  # 0.02, 0.03, 0.06, 0.06, back in input order.
  assert study_stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
  adj = study_stats.holm([0.5, float("nan"), 0.2])   # NaN neither counted nor adjusted
  assert adj[0] == pytest.approx(0.5) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.4)
  assert study_stats.holm([0.9, 0.8]) == [1.0, 1.0]


def test_hierarchical_bootstrap_with_a_fixed_seed():
  # Two warm-ups with one seed each: a replicate's mean is 1 (both draws warm-up 0,
  # p = 1/4), 2 (p = 1/2) or 3 (p = 1/4), so the 95 % percentile interval is [1, 3].
  b = study_stats.hierarchical_bootstrap([[1.0], [3.0]], n_boot=4000, seed=0)
  assert (b["mean"], b["lo"], b["hi"]) == (2.0, 1.0, 3.0)
  assert study_stats.hierarchical_bootstrap([[1.0], [3.0]], n_boot=4000, seed=0) == b
  # Seeds are resampled within a warm-up: equal warm-up means still leave seed spread.
  b = study_stats.hierarchical_bootstrap([[0.0, 2.0], [0.0, 2.0]], n_boot=2000, seed=1)
  assert b["lo"] < 1.0 < b["hi"] and b["mean"] == 1.0
  assert study_stats.hierarchical_bootstrap([[0.5, 0.5]], n_boot=50)["lo"] == 0.5
  with pytest.raises(ValueError, match="warm-ups, seeds"):
    study_stats.hierarchical_bootstrap([1.0, 2.0])


# ----------------------------------------------------------------------------- building blocks

def test_lr_ladder_and_whole_run_cosine_to_a_floor():
  assert study.lr_neighbour(3e-4, up=True) == 1e-3
  assert study.lr_neighbour(1e-4, up=True) == 3e-4
  assert study.lr_neighbour(1e-5, up=False) == 3e-6
  assert study.lr_neighbour(3e-5, up=False) == 1e-5
  c = ml_collections.ConfigDict(dict(lr=2.0, schedule="warmup_cosine", warmup_ratio=0.1,
                                     final_lr_ratio=0.01))
  s = st.make_schedule(c, steps_per_epoch=10, total_steps=100)
  # warm-up 0 -> 2 over 10 steps, then 0.02 + 1.98 * (1 + cos(pi * p)) / 2, p over 90 steps.
  np.testing.assert_allclose([float(s(jnp.int32(i))) for i in (0, 5, 10, 55, 100)],
                             [0.0, 1.0, 2.0, 0.02 + 0.99, 0.02], atol=1e-6)


def test_density_knob_draws_as_before_at_one_and_fixes_the_duplicates(tmp_path):
  kw = dict(seed=0, resolution=16, num_images=(40, 30, 20), num_queries=(8, 4, 4))
  synth.generate(tmp_path / "a", synth.SynthConfig(**kw), progress=None)
  synth.generate(tmp_path / "b", synth.SynthConfig(**kw, min_duplicates=1), progress=None)
  for f in ("attributes/train.json", "captions/cap.rc2.val.json", "annotations/test1.json"):
    assert (tmp_path / "a" / f).read_text() == (tmp_path / "b" / f).read_text()
  synth.generate(tmp_path / "c", synth.SynthConfig(**kw, min_duplicates=4, max_duplicates=4),
                 progress=None)
  attrs = json.loads((tmp_path / "c" / "attributes" / "train.json").read_text())["attributes"]
  counts = {}
  for a in attrs.values():
    counts[tuple(sorted(a.items()))] = counts.get(tuple(sorted(a.items())), 0) + 1
  assert sorted(counts.values()) == [4] * 10     # 40 images, 4 per combination
  with pytest.raises(ValueError, match="min_duplicates=5"):
    synth.generate(tmp_path / "d", synth.SynthConfig(**kw, min_duplicates=5, max_duplicates=4),
                   progress=None)


def test_oracle_pools_and_pair_statistics_by_hand():
  sets = mining.HardNegativeSets(np.array([0, 3, 3, 5]), np.array([7, 8, 9, 4, 5], np.int32))
  oracle = mining_audit.without_relevant(sets, [np.array([8, 1]), np.array([2]),
                                                np.array([4, 5, 6])])
  assert [s.tolist() for s in oracle.to_list()] == [[7, 9], [], []]
  # Query 0: target column 0 (score 0.9), set {ids 7, 9} at columns 1, 2 (0.5, 1.0); query 1
  # has an empty set (left out). temp 0.5: d = (0.9 - 0.5) / 0.5 = 0.8, (0.9 - 1.0) / 0.5
  # = -0.2; loss = mean(log(1 + e^-0.8), log(1 + e^0.2)), accuracy 1/2.
  scores = np.array([[0.9, 0.5, 1.0], [0.1, 0.2, 0.3]])
  pos = np.zeros(10, np.int64)
  pos[[7, 9]] = [1, 2]
  got = mining_audit.pair_stats(scores, np.array([0, 0]),
                                mining.HardNegativeSets(np.array([0, 2, 2]), np.array([7, 9])),
                                pos, 0.5)
  want = (math.log1p(math.exp(-0.8)) + math.log1p(math.exp(0.2))) / 2
  assert got["pair_loss"] == pytest.approx(want) and got["pair_acc"] == 0.5
  block = lambda a, b: scores[a:b]
  assert mining_audit.pair_stats(block, np.array([0, 0]), mining.HardNegativeSets(
      np.array([0, 2, 2]), np.array([7, 9])), pos, 0.5, block_rows=1) == got


def test_plateau_stop_ends_the_run_after_patience_epochs(tmp_path):
  trainer = types.SimpleNamespace(workdir=str(tmp_path), total_steps=1000)
  hook = study.PlateauStop(trainer, metric="mAP@10", patience=2, min_delta=0.1)
  info = lambda step, v: types.SimpleNamespace(step=step, end_of_epoch=True,
                                               eval_metrics={"mAP@10": v})
  for step, v in [(10, 1.0), (20, 2.0), (30, 2.05), (40, 1.9)]:
    hook(info(step, v))
  assert trainer.total_steps == 40   # 2.05 and 1.9 did not beat 2.0 by 0.1
  trainer.total_steps = 1000
  hook = study.PlateauStop(trainer, metric="mAP@10", patience=2, min_delta=0.1, min_epochs=5)
  for step, v in [(10, 3.0), (20, 2.0), (30, 2.05), (40, 1.9)]:
    hook(info(step, v))
  assert trainer.total_steps == 1000  # a plateau, but only 4 epochs
  hook(info(50, 2.5))
  assert trainer.total_steps == 50
  # A resumed run reads the evaluations back from its log.
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(
      {"kind": "eval", "epoch": e, "mAP@10": v}) for e, v in enumerate([1.0, 3.0, 2.0])))
  trainer.total_steps = 1000
  hook = study.PlateauStop(trainer, metric="mAP@10", patience=2, min_delta=0.1)
  hook(info(40, 2.5))
  assert trainer.total_steps == 40


def test_arm_configs_share_the_budget_and_differ_in_loss_and_negatives():
  arms = config_utils.load_config(CONFIG).study.arms
  cfgs = {a: config_utils.load_config(study.arm_spec(CONFIG, a)) for a in ("warmup",) + arms}
  assert [c.qure.loss for c in cfgs.values()] == [
      "infonce", "infonce_inbatch", "pairwise", "pairwise", "pairwise", "pairwise", "infonce"]
  assert cfgs["pairwise_topk_oracle"].qure.strategy == "topk_oracle"
  assert cfgs["pairwise_corpus"].qure.n_def == 0 and cfgs["pairwise_qure"].qure.n_def == 6
  budget = {(c.train.epochs, c.train.batch_size, c.train.schedule, c.train.warmup_ratio,
             c.train.final_lr_ratio, c.qure.init_temp) for a, c in cfgs.items() if a != "warmup"}
  assert budget == {(12, 64, "warmup_cosine", 0.05, 0.01, 0.07)}
  assert cfgs["warmup"].qure.init_temp == 0 and cfgs["warmup"].eval_every_epochs == 1
  st_ = cfgs["warmup"].study
  assert set(st_.lrs) >= {1e-5, 3e-5, 1e-4, 3e-4} and st_.warmups * st_.seeds >= 5
  high = config_utils.load_config(study.arm_spec(CONFIG, "pairwise_qure", density="high"))
  assert high.data.synth.min_duplicates > cfgs["pairwise_qure"].data.synth.max_duplicates
  assert high.data.root != cfgs["pairwise_qure"].data.root
  with pytest.raises(config_utils.ConfigError, match="density='x'"):
    config_utils.load_config(CONFIG + ":density=x")
  with pytest.raises(config_utils.ConfigError, match="arm='nope'"):
    config_utils.load_config(CONFIG + ":arm=nope")


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
  assert {1, 2} <= set(pref.tolist())
  score = lambda sets, sign: np.array([[sign * (c in r) for c in s] for s, r in zip(sets, rel)],
                                      float)
  assert metrics.preference_rate(score(s1, 1), score(s2, 1), pref)["preference_rate"] == 100
  assert metrics.preference_rate(score(s1, -1), score(s2, -1), pref)["preference_rate"] == 0


# ----------------------------------------------------------------------------- report

def _run(value, **extra):
  return {"train_s": 1.0, "score_s": 0.5, "val": {"mAP@10": value}, "curve": [
      {"epoch": 0, "mAP@10": value - 1}, {"epoch": 1, "mAP@10": value}],
      "mined": [{"epoch": 1, "mined_pair_loss": 0.5, "mined_pair_acc": 0.8,
                 "fn_share/topk": 0.1, "fn_share/qure": 0.01}],
      "test": {"mAP@10": value, "rel@5": value / 2, "final/fn_share/topk": 0.1,
               "final/fn_share/qure": 0.01, "final/fn_share_pooled/qure": 0.02,
               "final/fn_share/corpus": 0.02, **extra}}


def _density(qure_minus_topk):
  base = {"0/0": 10.0, "0/1": 11.0, "1/0": 12.0, "1/1": 13.0}
  return {"warmups": {"0": _run(9.0), "1": _run(9.5)}, "synth": {"min_duplicates": 1,
                                                                 "max_duplicates": 3},
          "k": 50, "lr": {"pairwise_topk": 1e-4, "pairwise_qure": 3e-5},
          "tuning": {"pairwise_topk": {"0.0001": 10.0}, "pairwise_qure": {"3e-05": 11.0}},
          "final": {"pairwise_topk": {k: _run(v) for k, v in base.items()},
                    "pairwise_qure": {k: _run(v + d) for (k, v), d in
                                      zip(base.items(), qure_minus_topk)}}}


def test_report_from_constructed_results(tmp_path):
  st_ = dict(config_utils.load_config(CONFIG + ":quick").study, warmups=2, seeds=2)
  results = {"low": _density([1.0, 1.2, 0.8, 1.0]), "high": _density([0.5, -0.5, 0.4, -0.4])}
  rep = study_report.build("c", st_, ["pairwise_topk", "pairwise_qure"], results,
                           elapsed_s=60.0)
  low, high = rep["densities"]["low"], rep["densities"]["high"]
  # low: d = 1, 1.2, 0.8, 1.0 -> mean 1, sd sqrt(0.08/3), t(0.975, 3) = 3.182446.
  half = 3.182446 * math.sqrt(0.08 / 3) / 2
  assert low["primary"]["lo"] == pytest.approx(1 - half, abs=1e-5)
  assert low["verdict"].startswith("QuRe's claim holds here")
  assert high["verdict"].startswith("No difference shown")
  assert low["lr"] == {"pairwise_topk": 1e-4, "pairwise_qure": 3e-5}
  sec = [c for d in rep["densities"].values() for c in d["secondary"]]
  assert all("p_holm" in c for c in sec) and {c["b"] for c in sec} >= {"start", "pairwise_topk"}
  assert rep["runs"] == 2 * (2 + 8) and rep["compute_s"] == pytest.approx(20 * 1.5)
  study_report.write(rep, tmp_path)
  md = (tmp_path / "study.md").read_text()
  assert "**Verdict:** QuRe's claim holds here" in md and "| pairwise_qure | 3e-05 |" in md
  assert "| qure | 1.00 ± 0.00 | 2.00 ± 0.00 |" in md
  assert json.loads((tmp_path / "study.json").read_text())["densities"]["low"]["verdict"]
  assert (tmp_path / "study_curves.png").stat().st_size > 1000
  worse = study_report.build("c", st_, ["pairwise_topk", "pairwise_qure"],
                             {"low": _density([-1.0, -1.2, -0.8, -1.0])}, elapsed_s=1.0)
  assert worse["densities"]["low"]["verdict"].startswith("QuRe's claim fails here")


def test_a_non_empty_out_needs_overwrite(tmp_path):
  from cirjax import cli
  out = tmp_path / "committed"
  out.mkdir()
  (out / "study.md").write_text("the committed report")
  assert cli.main(["study", "--config", CONFIG + ":quick", "--workdir", str(tmp_path / "w"),
                   "--out", str(out)]) == 2
  assert (out / "study.md").read_text() == "the committed report"
  assert not (tmp_path / "w").exists()
  assert cli.main(["study", "--config", CONFIG + ":quick", "--workdir", str(tmp_path / "w"),
                   "--arms", "nope"]) == 2


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow  # 100 s of the default suite's 10 minutes on a fresh 2-core clone
def test_quick_study_one_cell_and_resume(synth_root, tmp_path, monkeypatch, capsys):
  """Plumbing, not the outcome: one warm-up to its plateau, one arm at one lr, scored and
  reported; a rerun trains nothing and rewrites the report from the results."""
  from cirjax import cli
  monkeypatch.setenv("CIRJAX_DATA", str(synth_root.parent))   # :quick reads synthetic_tiny
  spec = CONFIG + ":quick,warmups=1,seeds=1,lrs=1e-4"
  args = ["study", "--config", spec, "--workdir", str(tmp_path / "w"), "--arms",
          "pairwise_qure", "--densities", "low"]
  assert cli.main(args) == 0
  rep = json.loads((tmp_path / "w" / "report" / "study.json").read_text())
  run = rep["results"]["low"]["final"]["pairwise_qure"]["0/0"]
  assert {"R@1", "R@50", "mAP@25", "rel@5", "preference_rate"} <= set(run["test"])
  assert [r["epoch"] for r in run["curve"]] == [0, 1, 2] and len(run["mined"]) == 2
  assert all(0 <= m["mined_pair_acc"] <= 1 and m["mined_pair_loss"] > 0 for m in run["mined"])
  cfg = json.loads((tmp_path / "w" / "low" / "pairwise_qure" / "lr0.0001_w0_s0" /
                    "config.json").read_text())
  assert cfg["model"]["init"] == str(tmp_path / "w" / "low" / "warmup0" / "model")
  assert cfg["qure"]["init_temp"] == 0.07
  assert rep["results"]["low"]["lr"] == {"pairwise_qure": 1e-4}
  assert "**Verdict:**" in (tmp_path / "w" / "report" / "study.md").read_text()
  capsys.readouterr()
  assert cli.main(args) == 0
  assert "[study] training" not in capsys.readouterr().out
  again = json.loads((tmp_path / "w" / "report" / "study.json").read_text())
  assert again["results"] == rep["results"]


def test_a_preempted_run_stops_the_study_with_exit_75(synth_root, tmp_path, monkeypatch, capsys):
  """A run preempted mid-study (checkpoint saved) ends `cirjax study` with `cirjax train`'s
  status 75 and one error line, so a scheduler requeues the command, which resumes."""
  from cirjax import cli
  from cirjax.train import trainer
  monkeypatch.setenv("CIRJAX_DATA", str(synth_root.parent))
  monkeypatch.setattr(trainer.Trainer, "run", lambda self: {"status": "preempted"})
  spec = CONFIG + ":quick,warmups=1,seeds=1,lrs=1e-4"
  assert cli.main(["study", "--config", spec, "--workdir", str(tmp_path / "w"), "--arms",
                   "pairwise_qure", "--densities", "low"]) == 75
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("cirjax study: error: ") and "rerun the same command" in err[-1]
  assert "Traceback" not in "\n".join(err)


@pytest.mark.slow  # the whole quick study: 3 densities x every arm x 2 lrs x 2 warm-ups
def test_quick_study_runs_end_to_end(synth_root, tmp_path, monkeypatch):
  from cirjax import cli
  monkeypatch.setenv("CIRJAX_DATA", str(synth_root.parent))
  assert cli.main(["study", "--config", CONFIG + ":quick", "--workdir",
                   str(tmp_path / "w")]) == 0
  rep = json.loads((tmp_path / "w" / "report" / "study.json").read_text())
  assert set(rep["densities"]) == {"low", "mid", "high"}
  arms = set(config_utils.load_config(CONFIG).study.arms)
  for name, d in rep["densities"].items():
    assert set(d["summary"]) == arms and set(d["lr"]) == arms
    assert all(len(r) == 2 for r in rep["results"][name]["final"].values())   # 2 warm-ups
    assert d["verdict"] and all(math.isfinite(c["p_holm"]) for c in d["secondary"])
    rounds = d["mining_rounds"]
    assert all(x["fn_share"] == 0.0 for x in rounds["pairwise_topk_oracle"])   # audited
    assert all(math.isfinite(x["pair_acc"]) for x in rounds["pairwise_qure"])


def test_data_made_with_other_generator_settings_is_refused(tmp_path, monkeypatch):
  monkeypatch.setenv("CIRJAX_DATA", str(tmp_path))
  cfg = config_utils.load_config(CONFIG + ":density=mid")
  root = tmp_path / "synthetic_study_mid"
  root.mkdir()
  meta = {"generator": "cirjax.data.synth", **dict(cfg.data.synth)}
  (root / "meta.json").write_text(json.dumps(meta))
  study.check_data(cfg)
  meta.pop("min_duplicates")   # written before the knob: 1 image at least, not 16
  (root / "meta.json").write_text(json.dumps(meta))
  with pytest.raises(study.UsageError, match="min_duplicates = 1, but the study config wants 12"):
    study.check_data(cfg)
