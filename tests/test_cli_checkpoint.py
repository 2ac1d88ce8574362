"""`--checkpoint` (`cirjax.load`): a training workdir's export, or its latest checkpoint when
the run exported none (rebuilt with the run's config.json), give the same model, for QuRe
and (slow: a real tiny run) InstructCIR workdirs."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cirjax import cli
from cirjax.convert import registry
from cirjax.data.tokenizer import load_tokenizer
from cirjax.models import blip2
from cirjax.train import config_utils
from cirjax.train.workdir import load_model

REPO = Path(__file__).resolve().parents[1]


def _qure_run(synth_root, wd: Path, export: bool):
  """A QuRe workdir as `cirjax train` leaves it: config.json + checkpoints/<step>/state (and
  with `export`, model/), holding random tiny BLIP-2 params."""
  cfg = config_utils.load_config(str(REPO / "configs/synthetic.py") + ":tiny",
                                 [f"data.root={synth_root}"])
  bcfg = blip2.model_config(cfg.model, len(load_tokenizer(synth_root, "blip2")))
  params = jax.tree.map(np.asarray, blip2.init_blip2(jax.random.PRNGKey(1), bcfg))
  wd.mkdir(parents=True)
  (wd / "config.json").write_text(cfg.to_json_best_effort(indent=2))
  ck = ocp.StandardCheckpointer()
  ck.save((wd / "checkpoints" / "2" / "state").absolute(), {"params": params, "step": 2})
  ck.wait_until_finished()
  ck.close()
  if export:
    registry.save(wd / "model", "blip2", bcfg, params)
  return params


def test_workdir_export_and_checkpoint_give_the_same_model(synth_root, tmp_path, capsys):
  params = _qure_run(synth_root, tmp_path / "exported", export=True)
  _qure_run(synth_root, tmp_path / "ckpt_only", export=False)
  exported = load_model(tmp_path / "exported")
  assert exported.source == str(tmp_path / "exported" / "model")
  # A save the run has in flight (orbax's temporary directory) is left alone by a reader.
  in_flight = tmp_path / "ckpt_only" / "checkpoints" / "3.orbax-checkpoint-tmp-1764900000"
  in_flight.mkdir()
  rebuilt = load_model(tmp_path / "ckpt_only")
  assert rebuilt.source == str(tmp_path / "ckpt_only" / "checkpoints" / "2")
  assert in_flight.is_dir()
  assert rebuilt.family == exported.family == "blip2" and rebuilt.config == exported.config
  for a, b, c in zip(jax.tree.leaves(rebuilt.params), jax.tree.leaves(exported.params),
                     jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), c)
  # The CLI scores the checkpoint-only workdir (vocab from the run's data.root).
  out = tmp_path / "m.json"
  assert cli.main(["eval", "--dataset", "synthetic", "--root", str(synth_root), "--checkpoint",
                   str(tmp_path / "ckpt_only"), "--batch-size", "16", "--out", str(out)]) == 0
  rep = json.loads(out.read_text())
  assert rep["source"].endswith("checkpoints/2")
  assert "R@1" in rep["splits"]["synthetic/val"]["metrics"]


@pytest.mark.slow
def test_instructcir_checkpoint_rebuilds_the_exported_model(synth_root, tmp_path):
  """A tiny stage-1 run: its latest checkpoint, merged with the run's LoRA config, is exactly
  the exported `model/`; without the export, eval scores the checkpoint."""
  from cirjax.train.trainer import train
  cfg = config_utils.load_config(
      str(REPO / "configs/instructcir_stage1.py") + ":tiny",
      [f"data.root={synth_root}", "eval_max=16", "eval_cir=False", "model.text.num_layers=1"])
  wd = tmp_path / "run"
  assert train(cfg, str(wd))["status"] == "done"
  exported = load_model(wd)
  assert exported.source == str(wd / "model")
  shutil.rmtree(wd / "model")
  rebuilt = load_model(wd)
  assert Path(rebuilt.source).parent == wd / "checkpoints" and rebuilt.family == "llava"
  assert rebuilt.config == exported.config
  for a, b in zip(jax.tree.leaves(rebuilt.params), jax.tree.leaves(exported.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert cli.main(["eval", "--dataset", "synthetic", "--root", str(synth_root), "--checkpoint",
                   str(wd), "--batch-size", "16"]) == 0
