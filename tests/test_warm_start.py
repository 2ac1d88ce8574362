"""The main job's warm start made in the same command, and the start's metrics beside the
final ones (cirjax/train/warm_start.py, configs/synthetic.py)."""

import json
import os
from pathlib import Path

import pytest

from cirjax import cli
from cirjax.train import config_utils, warm_start
from cirjax.train.trainer import format_table

REPO = Path(__file__).resolve().parents[1]
SYNTH = str(REPO / "configs/synthetic.py")


def test_warm_config_is_the_config_with_its_overrides():
  cfg = config_utils.load_config(SYNTH + ":tiny")
  assert (cfg.qure.loss, cfg.qure.n_def, cfg.qure.init_temp) == ("pairwise", 2, 0.07)
  warm = warm_start.warm_config(cfg)
  assert (warm.qure.loss, warm.qure.n_def, warm.qure.init_temp) == ("infonce", 0, 0.0)
  assert (warm.train.epochs, warm.train.lr, warm.train.schedule) == (2, 1e-3, "cosine_per_epoch")
  assert warm.export and tuple(warm.warm_start.overrides) == ()
  assert warm.model.qformer.to_dict() == cfg.model.qformer.to_dict()
  assert cfg.qure.loss == "pairwise"   # the config itself is left as it was
  assert warm_start.warm_config(config_utils.load_config(SYNTH + ":tiny,infonce")) is None
  with cfg.ignore_type():
    cfg.warm_start.overrides = ("qure.los=infonce",)
  with pytest.raises(config_utils.ConfigError,
                     match=r"config.warm_start.overrides: no key 'qure.los'"):
    warm_start.warm_config(cfg)


def test_start_metrics_are_kept_and_read_back_on_resume(tmp_path):
  calls = []

  def evaluate():
    calls.append(1)
    return {"R@10": 12.5}
  assert warm_start.start_metrics(str(tmp_path), False, evaluate, True) == {}
  assert warm_start.start_metrics(str(tmp_path), True, evaluate, True) == {"R@10": 12.5}
  assert warm_start.start_metrics(str(tmp_path), False, evaluate, True) == {"R@10": 12.5}
  assert len(calls) == 1   # a resumed run does not evaluate its start again
  other = tmp_path / "other"
  other.mkdir()
  warm_start.start_metrics(str(other), True, evaluate, False)   # not the writing process
  assert not (other / warm_start.START_FILE).exists()


def test_several_processes_are_told_to_make_the_warm_start_with_one(tmp_path, monkeypatch):
  """Process 0 alone writes the warm start's export: a multi-process command that would
  have to make it is refused, before anything is written."""
  import jax
  from cirjax.errors import UsageError
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  cfg = config_utils.load_config(SYNTH + ":tiny")
  with pytest.raises(UsageError, match="made by a single process"):
    warm_start.run(cfg, str(tmp_path / "w"), lambda *a: pytest.fail("trained"), print)
  assert not (tmp_path / "w").exists()


def test_table_shows_the_start_beside_the_final_metrics():
  table = format_table({"R@10": 30.0, "loss": 0.5}, "final", chance={"R@10": 1.0},
                       start={"R@10": 20.0})
  lines = table.splitlines()
  assert lines[2].split() == ["metric", "value", "start", "chance"]
  assert lines[3].split() == ["R@10", "30.0000", "20.0000", "1.0000"]
  assert lines[4].split() == ["loss", "0.5000"]
  assert "start" not in format_table({"R@10": 30.0}, "final", chance={"R@10": 1.0})


def test_train_makes_the_warm_start_then_trains_qure_from_it(synth_root, tmp_path, capsys):
  """`cirjax train` on the main job's config (tiny): the warm start trains and exports in
  WORKDIR/warm_start, QuRe's pairwise recipe starts from its model, and the start's metrics
  (evaluated before the first step) are the warm start's final ones -- a reset temperature
  does not change a ranking. A rerun trains neither again."""
  work = tmp_path / "run"
  args = ["train", "--config", SYNTH + ":tiny", "--workdir", str(work),
          f"--config.data.root={synth_root}"]
  assert cli.main(args) == 0
  out = capsys.readouterr()
  warm = json.loads((work / "warm_start" / "config.json").read_text())
  main = json.loads((work / "config.json").read_text())
  assert (warm["qure"]["loss"], warm["qure"]["n_def"]) == ("infonce", 0)
  assert (main["qure"]["loss"], main["qure"]["strategy"]) == ("pairwise", "qure")
  assert main["model"]["init"] == os.path.join(str(work), "warm_start", "model")
  warm_final = json.loads((work / "warm_start" / "final_metrics.json").read_text())
  final = json.loads((work / "final_metrics.json").read_text())
  assert final["start_metrics"] == pytest.approx(warm_final["final_metrics"], abs=1e-9)
  mining = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()
            if '"mining"' in x]
  assert len(mining) == 1 and mining[0]["epoch"] == 1   # QuRe's sets, mined at epoch 1
  header = [x for x in out.out.splitlines() if x.startswith("metric")]
  assert header and header[0].split() == ["metric", "value", "start", "chance"]
  stamp = (work / "warm_start" / "final_metrics.json").stat().st_mtime_ns
  assert cli.main(args) == 0
  again = capsys.readouterr()
  assert "warm start: done" in again.err and "warm start: training" not in again.err
  assert (work / "warm_start" / "final_metrics.json").stat().st_mtime_ns == stamp
  assert json.loads((work / "final_metrics.json").read_text())["start_metrics"] == \
      final["start_metrics"]
