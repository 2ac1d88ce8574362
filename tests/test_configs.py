"""The config files: every file and variant gives the settings it gave before the files were
made self-contained (tests/fixtures/configs_before.json, written from the earlier code), and
big_vision-style arguments (`:tiny,batch_size=8`) and `--config.` overrides both work."""

import json
import pathlib

import pytest

from cirjax.train import config_utils

REPO = pathlib.Path(__file__).resolve().parent.parent
BEFORE = json.loads((REPO / "tests" / "fixtures" / "configs_before.json").read_text())
# Keys added since the fixture was written, with the value every config gives them (in the
# configs that have the parent section).
ADDED = {("data", "workers"): -1, ("data", "cache_images_max_bytes"): 1 << 30,
         ("qure", "mining_method"): "auto", ("qure", "feature_store_dir"): "",
         ("qure", "feature_store_verify"): True, ("attention_impl",): "auto",
         ("scan_layers",): False, ("remat_policy",): "full", ("data", "pixel_store"): "auto",
         ("data", "pixel_store_dir"): "", ("progress_every_s",): 30.0, ("profile_steps",): "",
         ("wandb",): {"project": "", "entity": "", "name": "", "mode": "offline"}}
# Keys added since to some config files only, by file: key path -> value (the QuRe configs'
# input pipeline; the Q-Former's dropout rates, None: the checkpoint's).
_DROPOUT = (("model", "qformer", "hidden_dropout_prob"),
            ("model", "qformer", "attention_probs_dropout_prob"))
_PIPELINE = {("data", "pipeline"): "prefetch", ("data", "tfds_dir"): "", ("data", "grain_workers"): 2}
ADDED_BY_FILE = {"synthetic": {**_PIPELINE, **dict.fromkeys(_DROPOUT, 0.1)},
                 "qure_blip2_cirr": {**_PIPELINE, **dict.fromkeys(_DROPOUT, None)},
                 "qure_blip2_fashioniq": {**_PIPELINE, **dict.fromkeys(_DROPOUT, None)}}
# Values changed on purpose since, by config file: (key path, old value) -> new value. The
# pixel cache is off by default (bounded in bytes when on); the frozen-feature store keeps the
# reference's fp16 ViT precision instead of bf16.
CHANGED = {"synthetic": {(("data", "cache_images"), True): False},
           "qure_blip2_cirr": {(("qure", "feature_dtype"), "bfloat16"): "float16"},
           "qure_blip2_fashioniq": {(("qure", "feature_dtype"), "bfloat16"): "float16"}}

# The main job became QuRe's recipe from a warm start made in the same command: the fixture's
# default (InfoNCE over QuRe negatives from scratch) is today's `:infonce`, its `:pairwise`
# today's default; fixture spec -> today's spec.
RENAMED = {"synthetic:": "synthetic:infonce", "synthetic:pairwise": "synthetic:"}
_WARM = ["qure.loss=infonce", "qure.n_def=0", "qure.init_temp=0.0", "train.epochs=2",
         "train.lr=1e-3", "train.schedule=cosine_per_epoch"]
_RECIPE_ADDED = {("qure", "init_temp"): 0.07, ("train", "warmup_ratio"): 0.05,
                 ("warm_start",): {"overrides": _WARM}, ("eval_at_start",): True}
_RECIPE_CHANGED = {(("qure", "loss"), "infonce"): "pairwise", (("train", "lr"), 1e-3): 3e-5,
                   (("train", "schedule"), "cosine_per_epoch"): "warmup_cosine"}
ADDED_BY_SPEC = {**dict.fromkeys(("synthetic:", "synthetic:tiny", "synthetic:train_vit"),
                                 _RECIPE_ADDED),
                 "synthetic:infonce": {("qure", "init_temp"): 0.0, ("train", "warmup_ratio"): 0.05,
                                       ("warm_start",): {"overrides": []},
                                       ("eval_at_start",): True}}
CHANGED_BY_SPEC = dict.fromkeys(("synthetic:", "synthetic:tiny", "synthetic:train_vit"),
                                _RECIPE_CHANGED)

# model.require_init (added since, config_utils.model_init): True where a config trains real
# data from pretrained weights (an empty model.init refused), False in its smoke variants.
REQUIRE_INIT = {f"{name}:{variant}": variant == ""
                for name in ("qure_blip2_cirr", "qure_blip2_fashioniq", "instructcir_stage1")
                for variant in ("", "tiny", "real_width", "synthetic")}


def _as_json(config) -> dict:
  return json.loads(config.to_json())


def _with_added(d: dict, name: str = "", spec: str = "") -> dict:
  d = json.loads(json.dumps(d))
  for path, value in {**ADDED, **ADDED_BY_FILE.get(name, {}),
                      **ADDED_BY_SPEC.get(spec, {})}.items():
    node = d
    for k in path[:-1]:
      node = node.get(k)
      if node is None:
        break
    else:
      node[path[-1]] = value
  for (path, old), new in {**CHANGED.get(name, {}), **CHANGED_BY_SPEC.get(spec, {})}.items():
    node = d
    for k in path[:-1]:
      node = node[k]
    if node[path[-1]] == old:
      node[path[-1]] = new
  return d


@pytest.mark.parametrize("spec", sorted(BEFORE))
def test_every_config_and_variant_is_unchanged(spec, monkeypatch):
  monkeypatch.delenv("CIRJAX_DATA", raising=False)  # the fixture's data roots are the defaults
  now = RENAMED.get(spec, spec)
  name, variant = now.split(":")
  module = config_utils.load_module(str(REPO / "configs" / f"{name}.py"))
  got = module.get_config(variant or None)
  want = _with_added(BEFORE[spec], name, now)
  if spec in REQUIRE_INIT:
    want["model"]["require_init"] = REQUIRE_INIT[spec]
  assert _as_json(got) == want


def test_every_config_file_is_covered():
  files = {p.stem for p in (REPO / "configs").glob("*.py")}
  assert files == {spec.split(":")[0] for spec in BEFORE}


def test_arguments_and_overrides():
  path = str(REPO / "configs" / "qure_blip2_cirr.py")
  c = config_utils.load_config(path + ":tiny,batch_size=4,epochs=3", ["--config.train.lr=0.5"])
  tiny = config_utils.load_config(path + ":tiny")
  assert (c.train.batch_size, c.train.epochs, c.train.lr) == (4, 3, 0.5)
  assert c.model.vision == tiny.model.vision and tiny.train.batch_size == 8
  with pytest.raises(config_utils.ConfigError, match="unknown variant or argument 'nope'"):
    config_utils.load_config(path + ":tiny,nope=1")
  with pytest.raises(config_utils.ConfigError, match="batch_size.*needs a value"):
    config_utils.load_config(path + ":batch_size")
  with pytest.raises(config_utils.ConfigError, match="bad value for argument 'epochs'"):
    config_utils.load_config(path + ":epochs=two")
  arg = config_utils.parse_arg(" tiny , lr=1e-3,,mesh=4", tiny=False, lr=0.1, mesh=None)
  assert arg.tiny is True and arg.lr == 1e-3 and arg.mesh == 4
  assert config_utils.parse_arg(None, tiny=False).tiny is False
  ic = config_utils.load_config(str(REPO / "configs" / "instructcir_stage2.py") + ":synthetic",
                                ["--config.data.workers=0"])
  assert ic.train.epochs == 3 and ic.data.workers == 0 and ic.stage == 2
