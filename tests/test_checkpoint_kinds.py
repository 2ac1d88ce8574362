"""Every `--checkpoint` kind through every command that takes one: `cirjax eval`, `mine`,
`search` and the study's scoring accept a training workdir with and without an exported
model, a cirjax directory, an HF directory, a LAVIS file and a hub id, and give the same
features and the same outputs for the same model.

One tiny random BLIP-2 (an HF directory) is written in each kind: the cirjax directory, the
hub snapshot, the workdir export and the workdir checkpoint hold its parameters. A LAVIS EVA
model cannot be written as HF exactly (its ln_vision eps differs), so the LAVIS file holds a
second model (64-wide towers, so that LAVIS's head counts are inferred) whose cirjax
directory is its reference. The reference features are eager calls of `cirjax.models.blip2`
on the parameters; the reference outputs are each command's on the cirjax directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

import cirjax
from cirjax import cli, study
from cirjax.convert import registry
from cirjax.data import images, loader, synth, text
from cirjax.data.tokenizer import load_tokenizer
from cirjax.eval import encoders
from cirjax.models import blip2
from cirjax.train import config_utils
from tests import hub_fixtures
from tests.blip2_fixtures import lavis_model

REPO = Path(__file__).resolve().parents[1]
REPO_ID = "cirjax-test/tiny-qure"
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
KINDS = ("workdir", "workdir_checkpoint", "cirjax", "hf", "lavis", "hub")
# Four commands per kind: the default run takes the two kinds read by different code (a run's
# checkpoint made into a model by its task; a LAVIS file), -m slow the other four (the
# reference outputs come from the cirjax directory in every run).
DEFAULT_KINDS = ("workdir_checkpoint", "lavis")


def _save_checkpoint(step_dir: Path, params) -> None:
  ck = ocp.StandardCheckpointer()
  ck.save((step_dir / "state").absolute(), {"params": params, "step": 2})
  ck.wait_until_finished()
  ck.close()


@pytest.fixture(scope="module")
def kinds(synth_root, tmp_path_factory):
  """{kind: (path or hub id, the cirjax directory of the same model)}, the hub cache and
  {cirjax directory: (config, params)}. A LAVIS EVA model cannot be written as HF exactly
  (its ln_vision eps differs): the LAVIS file holds a second model."""
  import torch
  from tests.blip2_fixtures import hf_eva_config, hf_qformer_config, hf_retrieval_model
  d = tmp_path_factory.mktemp("kinds")
  vocab = synth_root / "vocab.txt"
  n = len(load_tokenizer(vocab, "blip2"))
  vision = hf_eva_config(image=28, patch=14)
  hf_retrieval_model(seed=4, vision=vision, qformer=hf_qformer_config(
      enc=vision.hidden_size, vocab=n)).save_pretrained(d / "hf")
  shutil.copyfile(vocab, d / "hf" / "vocab.txt")
  state, _ = lavis_model("eva", vision_kw=dict(hidden=64, heads=1, inter=64, layers=1),
                         qformer_kw=dict(hidden=64, heads=1, inter=64, vocab=n))
  (d / "lavis").mkdir()
  lavis = d / "lavis" / "model.pth"  # as LAVIS saves one: the state dict under "model"
  torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in state.items()}}, lavis)
  shutil.copyfile(vocab, d / "lavis" / "vocab.txt")
  models = {}
  for src, dst in ((d / "hf", d / "cirjax"), (lavis, d / "cirjax_lavis")):
    loaded = registry.load(src)
    models[str(dst)] = (loaded.config, jax.tree.map(np.asarray, loaded.params))
    registry.save(dst, "blip2", *models[str(dst)], tokenizer_dir=Path(src).parent
                  if Path(src).is_file() else src)
  cfg, params = models[str(d / "cirjax")]
  cache = d / "hf_cache"
  hub_fixtures.populate(cache, REPO_ID, d / "hf", commit=COMMIT)
  run_cfg = config_utils.load_config(str(REPO / "configs/synthetic.py") + ":tiny",
                                     [f"data.root={synth_root}", f"model.init={d / 'hf'}"])
  for name, export in (("workdir", True), ("workdir_checkpoint", False)):
    wd = d / name
    wd.mkdir()
    (wd / "config.json").write_text(run_cfg.to_json_best_effort(indent=2))
    _save_checkpoint(wd / "checkpoints" / "2", params)
    if export:
      registry.save(wd / "model", "blip2", cfg, params, tokenizer_dir=d / "hf")
  same = str(d / "cirjax")
  paths = {k: (str(d / k), same) for k in ("workdir", "workdir_checkpoint", "cirjax", "hf")}
  return {**paths, "lavis": (str(lavis), str(d / "cirjax_lavis")), "hub": (REPO_ID, same),
          "cache": cache, "models": models}


@pytest.fixture(scope="module")
def reference(kinds, synth_root, tmp_path_factory):
  """Per cirjax directory (lazily): eager functional features of the val split, and every
  command's output on that directory."""
  split = synth.read_synthetic(synth_root, "val")
  refs = {}

  def get(cirjax_dir):
    if cirjax_dir not in refs:
      cfg, params = kinds["models"][cirjax_dir]
      tf = images.make_transform("targetpad", cfg.vision.image_size)
      px = lambda names: np.stack([tf(images.load_image(split.images[n])) for n in names])
      tok = load_tokenizer(synth_root / "vocab.txt", "blip2")
      ids, mask = text.tokenize(tok, [loader.default_text(q) for q in split.queries], 32)
      feats = {"corpus": np.asarray(blip2.encode_image(params, cfg, px(split.corpus))),
               "queries": np.asarray(blip2.compose(
                   params, cfg, px([q.reference for q in split.queries]), ids, mask))}
      out = tmp_path_factory.mktemp("reference")
      refs[cirjax_dir] = {"features": feats, "config": cfg, "params": params,
                          **_commands(cirjax_dir, synth_root, out, split.queries[3].query_id)}
    return refs[cirjax_dir]

  return split, get


def _commands(ckpt: str, root: Path, out: Path, query_id: str) -> dict:
  """Each command's output with `ckpt`, less what names the checkpoint or the time taken."""
  got = {}
  assert cli.main(["eval", "--dataset", "synthetic", "--root", str(root), "--checkpoint", ckpt,
                   "--batch-size", "32", "--out", str(out / "eval.json")]) == 0
  got["eval"] = json.loads((out / "eval.json").read_text())["splits"]["synthetic/val"]["metrics"]
  assert cli.main(["mine", "--checkpoint", ckpt, "--dataset", "synthetic", "--root", str(root),
                   "--out", str(out / "mine"), "--k", "10", "--plot-queries", "1"]) == 0
  rep = json.loads((out / "mine" / "mining.json").read_text())
  got["mine"] = {k: v for k, v in rep.items() if k not in ("checkpoint", "elapsed_s")}
  study_cfg = ml_collections.ConfigDict({
      "data": {"root": str(root), "max_text_length": 32, "train_split": "train"},
      "study": {"preference_seed": 0}, "qure": {"k": 10, "consecutive_threshold": 1}})
  got["study"] = study.score_model(ckpt, study_cfg, "val", log=lambda s: None)
  return got


def _search(ckpt: str, root: Path, out: Path, query_id: str, capsys) -> str:
  capsys.readouterr()
  assert cli.main(["search", "--checkpoint", ckpt, "--dataset", "synthetic", "--root",
                   str(root), "--query-id", query_id, "--k", "5",
                   "--html", str(out / "s.html")]) == 0
  printed = capsys.readouterr().out
  return printed[printed.index("  rank"):printed.index("[search] wrote")]


@pytest.mark.parametrize("kind", [k if k in DEFAULT_KINDS else
                                  pytest.param(k, marks=pytest.mark.slow) for k in KINDS])
def test_every_command_takes_every_checkpoint_kind(kind, kinds, reference, synth_root,
                                                  tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_CACHE", str(kinds["cache"]))
  ckpt, same = kinds[kind]
  split, get = reference
  ref = get(same)
  # The one loader: the same model, the tokenizer beside it (or the run's).
  model = cirjax.load(ckpt)
  assert model.family == "blip2" and model.tokenizer is not None
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), model.params,
               ref["params"])
  # The one encode assembly: the eager functional features.
  scorer, _ = encoders.encode(model, split, root=synth_root, log=None)
  for what, got in (("corpus", scorer.corpus), ("queries", scorer.query)):
    np.testing.assert_allclose(np.asarray(got), ref["features"][what], rtol=1e-5,
                               atol=1e-6, err_msg=what)
  # The model's verbs compute the same features.
  q = split.queries[0]
  px = model.pixels([split.images[q.reference].path])
  qv, tv = model.query(px, [loader.default_text(q)]), model.image(px)
  np.testing.assert_allclose(qv, ref["features"]["queries"][:1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tv, ref["features"]["corpus"][
      split.corpus.index(q.reference)][None], rtol=1e-5, atol=1e-6)
  ids, mask = text.tokenize(model.tokenizer, ["a red cube"], 32)
  np.testing.assert_allclose(model.text(["a red cube"]), blip2.encode_text(
      ref["params"], ref["config"], ids, mask), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(model.score(qv, tv), blip2.score(qv, tv))
  # Every command: the outputs of the same model.
  query_id = split.queries[3].query_id
  got = _commands(ckpt, synth_root, tmp_path, query_id)
  for cmd in ("eval", "mine", "study"):
    assert got[cmd] == ref[cmd], cmd
  ref_hits = ref.setdefault("search", _search(same, synth_root, tmp_path, query_id, capsys))
  assert _search(ckpt, synth_root, tmp_path, query_id, capsys) == ref_hits
