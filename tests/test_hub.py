"""Models by hub id (`cirjax.convert.hub.resolve`), offline, against a hub cache in
huggingface_hub's own layout (tests/hub_fixtures.py); the tokenizer beside `model.init`; the
real-data configs' refusal of a random ViT. No network: every test sets HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from cirjax import cli
from cirjax.convert import hub, io, registry
from cirjax.train import config_utils
from tests import hub_fixtures
from tests.blip2_fixtures import hf_qformer_config, hf_eva_config, hf_retrieval_model

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_ID = "cirjax-test/tiny-blip2"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
  cache = tmp_path / "hf_cache"
  cache.mkdir()
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  return cache


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, synth_root):
  """A tiny HF BLIP-2 ITM directory holding a vocab (the synthetic one plus one word, so
  that a test can tell it from the dataset's) sized to the Q-Former's vocabulary."""
  from cirjax.data.tokenizer import load_tokenizer
  d = tmp_path_factory.mktemp("tiny_hf") / "model"
  words = (synth_root / "vocab.txt").read_text().splitlines() + ["hubword"]
  vocab = tmp_path_factory.mktemp("v") / "vocab.txt"
  vocab.write_text("\n".join(words) + "\n")
  n = len(load_tokenizer(vocab, "blip2"))
  vision = hf_eva_config(image=28, patch=14)
  hf_retrieval_model(seed=4, vision=vision,
                     qformer=hf_qformer_config(enc=vision.hidden_size, vocab=n)
                     ).save_pretrained(d)
  (d / "vocab.txt").write_text(vocab.read_text())
  return d


def test_cache_layout_is_huggingface_hubs(tmp_path, tiny_hf):
  import huggingface_hub
  snap = hub_fixtures.populate(tmp_path / "c", REPO_ID, tiny_hf, commit=COMMIT,
                               refs=("main", "v1"))
  got = huggingface_hub.snapshot_download(REPO_ID, cache_dir=tmp_path / "c",
                                          local_files_only=True)
  assert Path(got) == snap
  info = huggingface_hub.scan_cache_dir(tmp_path / "c")
  assert not info.warnings, info.warnings
  (repo,) = info.repos
  assert repo.repo_id == REPO_ID and repo.repo_type == "model"
  (rev,) = repo.revisions
  assert rev.commit_hash == COMMIT and rev.refs == frozenset({"main", "v1"})
  assert {f.file_name for f in rev.files} == {p.name for p in tiny_hf.iterdir()}


@pytest.mark.parametrize("text,want", [
    ("Salesforce/blip2-itm-vit-g", ("Salesforce/blip2-itm-vit-g", None)),
    ("xtuner/llava-phi-3-mini-hf@main", ("xtuner/llava-phi-3-mini-hf", "main")),
    (f"org/name@{COMMIT}", ("org/name", COMMIT)),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ("/abs/org/name", None), ("./org/name", None), ("~/org", None), ("a/b/c", None),
    ("runs/model.pth", None), ("tok/vocab.txt", None), ("name", None), ("org--x/name", None),
    ("org/na..me", None),
    ("-org/name", None), ("org/name-", None), ("org/", None),
])
def test_what_reads_as_a_hub_id(text, want):
  assert hub.parse(text) == want


def test_resolve_offline(tmp_path, offline_cache, tiny_hf, monkeypatch):
  snap = hub_fixtures.populate(offline_cache, REPO_ID, tiny_hf, commit=COMMIT,
                               refs=("main", "v1"))
  assert hub.resolve(REPO_ID) == snap
  assert hub.resolve(f"{REPO_ID}@v1") == snap
  assert hub.resolve(f"{REPO_ID}@{COMMIT}") == snap
  assert hub.revision_of(snap) == COMMIT and hub.revision_of(tiny_hf) is None
  # a local path of the same name wins; a string that is no hub id comes back unchanged
  monkeypatch.chdir(tmp_path)
  (tmp_path / REPO_ID).mkdir(parents=True)
  assert hub.resolve(REPO_ID) == Path(REPO_ID)
  assert hub.resolve("no/such/dir") == Path("no/such/dir")
  # not in the cache: one error naming the id, the cache and what to do
  for missing, culprit in (("cirjax-test/absent", "cirjax-test/absent"),
                           (f"{REPO_ID}@v2", "revision v2")):
    with pytest.raises(hub.HubError) as e:
      hub.resolve(missing)
    msg = str(e.value)
    assert culprit in msg and "HF_HUB_OFFLINE" in msg and str(offline_cache) in msg, msg
    assert "hf download" in msg


def test_cache_directory_from_hf_home(tmp_path, tiny_hf, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
  snap = hub_fixtures.populate(tmp_path / "home" / "hub", REPO_ID, tiny_hf, commit=COMMIT)
  assert hub.cache_dir() == tmp_path / "home" / "hub"
  assert registry.sniff(REPO_ID) == ("blip2", "hf")
  assert registry.load(REPO_ID).source == str(snap)


def test_convert_eval_and_parity_take_a_hub_id(tmp_path, offline_cache, tiny_hf, capsys):
  from cirjax.train import workdir
  hub_fixtures.populate(offline_cache, REPO_ID, tiny_hf, commit=COMMIT)
  dst = tmp_path / "cj"
  assert cli.main(["convert", REPO_ID, str(dst)]) == 0
  meta = json.loads((dst / io.CONFIG_NAME).read_text())
  assert meta["source"] == f"{REPO_ID}@{COMMIT}" and meta["source_format"] == "hf"
  assert (dst / "vocab.txt").read_text() == (tiny_hf / "vocab.txt").read_text()
  want = registry.load(tiny_hf).params
  got = io.load_model_dir(dst)[2]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got), want)
  # eval / search / mine --checkpoint
  model = workdir.load_model(REPO_ID)
  assert model.family == "blip2" and hub.revision_of(Path(model.source)) == COMMIT
  # parity: the PyTorch reference reads the snapshot too
  capsys.readouterr()
  assert cli.main(["parity", REPO_ID]) == 0
  assert "PASS" in capsys.readouterr().out


def test_qure_task_takes_a_hub_id_and_the_tokenizer_beside_it(tmp_path, offline_cache, tiny_hf,
                                                               synth_root):
  """What a run reads from `model.init` (fast: the task is set up, nothing is compiled);
  `cirjax train` end to end is the slow test below."""
  from cirjax.commands.train import check_run
  from cirjax.train import qure, sharding as shd
  hub_fixtures.populate(offline_cache, REPO_ID, tiny_hf, commit=COMMIT)
  cfg = config_utils.load_config(str(REPO / "configs/qure_blip2_cirr.py") + ":tiny",
                                 [f"data.root={synth_root}", f"model.init={REPO_ID}"])
  check_run(cfg, str(tmp_path / "run"))
  mesh = shd.make_mesh(tuple(tuple(a) for a in cfg.mesh), jax.devices())
  task = qure.QuReTask(cfg, mesh, str(tmp_path / "run"))
  assert task.cfg.vision.image_size == 28 and task._pretrained_params is not None
  want = registry.load(tiny_hf).params["qformer"]
  jax.tree.map(np.testing.assert_array_equal, task._pretrained_params["qformer"], want)
  assert "hubword" in task.tokenizer.get_vocab()  # beside model.init, not the dataset's
  cfg.model.init = "cirjax-test/absent"
  with pytest.raises(hub.HubError, match="cirjax-test/absent"):
    check_run(cfg, str(tmp_path / "run"))


@pytest.mark.slow
def test_train_model_init_hub_id_takes_its_tokenizer(tmp_path, offline_cache, tiny_hf,
                                                     synth_root, capsys):
  hub_fixtures.populate(offline_cache, REPO_ID, tiny_hf, commit=COMMIT)
  wd = tmp_path / "run"
  assert cli.main(["train", "--config", str(REPO / "configs/qure_blip2_cirr.py") + ":tiny",
                   "--workdir", str(wd), f"--config.data.root={synth_root}",
                   f"--config.model.init={REPO_ID}", "--config.train.max_steps=1",
                   "--config.train.epochs=1", "--config.eval_every_epochs=0",
                   "--config.eval_max_queries=8"]) == 0
  # the run records the id (portable across caches) and trained the hub model's shapes
  assert json.loads((wd / "config.json").read_text())["model"]["init"] == REPO_ID
  loaded = registry.load(wd / "model")
  assert loaded.config.vision.image_size == 28
  # no data.tokenizer: the one beside model.init (with its extra word), not the dataset's
  assert (wd / "model" / "vocab.txt").read_text() == (tiny_hf / "vocab.txt").read_text()


def test_tokenizer_source(tmp_path, synth_root, tiny_hf):
  from cirjax.train import blip2_run
  cfg = config_utils.load_config(str(REPO / "configs/qure_blip2_cirr.py") + ":tiny",
                                 [f"data.root={synth_root}"])
  assert blip2_run.tokenizer_source(cfg) == str(synth_root)  # no init: the dataset's vocab
  cfg.model.init = str(tiny_hf)
  assert blip2_run.tokenizer_source(cfg) == str(tiny_hf)
  (tmp_path / "m.pth").write_bytes(b"")  # a LAVIS file: its directory, if it has a tokenizer
  cfg.model.init = str(tmp_path / "m.pth")
  assert blip2_run.tokenizer_source(cfg) == str(synth_root)
  (tmp_path / "vocab.txt").write_text("[PAD]\n")
  assert blip2_run.tokenizer_source(cfg) == str(tmp_path)
  cfg.data.tokenizer = str(synth_root / "vocab.txt")  # named: always wins
  assert blip2_run.tokenizer_source(cfg) == str(synth_root / "vocab.txt")


@pytest.mark.parametrize("spec", ["configs/qure_blip2_cirr.py", "configs/qure_blip2_fashioniq.py",
                                  "configs/instructcir_stage1.py"])
def test_real_data_configs_refuse_a_random_vit(spec):
  cfg = config_utils.load_config(str(REPO / spec))
  with pytest.raises(config_utils.ConfigError, match="model.init=random"):
    config_utils.model_init(cfg)
  assert config_utils.model_init(cfg, check=False) == ""
  cfg.model.init = config_utils.RANDOM_INIT  # asked for explicitly
  assert config_utils.model_init(cfg) == ""
  cfg.model.init = REPO_ID
  assert config_utils.model_init(cfg) == REPO_ID
  for variant in ("tiny", "real_width"):  # the smoke variants stay random
    assert config_utils.model_init(config_utils.load_config(str(REPO / spec) + ":" + variant)) == ""


def test_what_an_online_resolve_fetches(tmp_path, monkeypatch):
  """Online (HF_HUB_OFFLINE unset), `snapshot_download` is asked for configs, tokenizer files
  and one copy of the weights: safetensors, or the pickles when a repository has none; a
  tokenizer gets no weights. A fake hub stands in for the network."""
  import fnmatch
  import huggingface_hub
  from huggingface_hub import errors as hf_errors

  class NotFound(hf_errors.RepositoryNotFoundError):
    def __init__(self, message):  # without an HTTP response object of whichever client
      Exception.__init__(self, message)  # pylint: disable=non-parent-init-called

  remote = {"org/st": ["config.json", "vocab.txt", "model.safetensors", "pytorch_model.bin",
                       "README.md", "tokenizer.model"],
            "org/bin": ["config.json", "tokenizer.json", "pytorch_model.bin"]}
  calls = []

  def fake(repo_id, *, revision=None, cache_dir=None, local_files_only=False,
           allow_patterns=None, **kw):
    calls.append((repo_id, local_files_only, tuple(allow_patterns)))
    if repo_id not in remote:
      raise NotFound(f"404 {repo_id}")
    d = Path(cache_dir) / repo_id / "snapshots" / COMMIT
    d.mkdir(parents=True, exist_ok=True)
    for name in remote[repo_id]:
      if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
        (d / name).write_text("x")
    return str(d)

  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
  files = lambda d: sorted(p.name for p in d.iterdir())
  assert files(hub.resolve("org/st")) == ["config.json", "model.safetensors", "tokenizer.model",
                                          "vocab.txt"]
  assert len(calls) == 1 and calls[0][1] is False
  assert files(hub.resolve("org/bin")) == ["config.json", "pytorch_model.bin", "tokenizer.json"]
  assert len(calls) == 3  # safetensors first, then the pickles
  calls.clear()
  tok = tmp_path / "c" / "org/st" / "snapshots" / COMMIT
  for f in tok.iterdir():
    f.unlink()
  assert files(hub.resolve("org/st", weights=False)) == ["config.json", "tokenizer.model",
                                                        "vocab.txt"]
  assert len(calls) == 1
  with pytest.raises(hub.HubError, match="no hub repository org/absent"):
    hub.resolve("org/absent")


def test_instructcir_model_init_hub_id(tmp_path, offline_cache):
  """InstructCIR's `model.init` as a hub id: the LLaVA base and its tokenizer come from the
  snapshot (nothing compiled)."""
  from cirjax.convert import llava_run
  from tests import llava_fixtures as fx
  src = tmp_path / "llava_hf"
  fx.llava_model(fx.phi3_config(num_key_value_heads=2), seed=11).save_pretrained(str(src))
  fx.make_tokenizer(src)
  hub_fixtures.populate(offline_cache, "cirjax-test/tiny-llava", src, commit=COMMIT)
  cfg = config_utils.load_config(str(REPO / "configs/instructcir_stage1.py") + ":tiny",
                                 ["model.init=cirjax-test/tiny-llava"])
  got = llava_run.model_source(cfg, config_utils.model_init(cfg), "", str(tmp_path / "run"),
                               ["a red dog"])
  assert got.tokenizer_dir == str(offline_cache / "models--cirjax-test--tiny-llava" /
                                  "snapshots" / COMMIT)
  want = registry.load(src, family="llava")
  assert got.cfg.text.hidden_size == want.config.text.hidden_size
  want = {k: v for k, v in want.params.items() if k != "lm_head"}  # training leaves it out
  jax.tree.map(np.testing.assert_array_equal, got.base_params,
               jax.tree.map(lambda x: np.asarray(x, np.float32), want))


def test_a_run_from_before_require_init_resumes(tmp_path):
  """`model.require_init` only guards a new run: a workdir whose config.json predates it
  resumes under the config that has it."""
  from cirjax.train import workdir
  cfg = config_utils.load_config(str(REPO / "configs/qure_blip2_cirr.py"),
                                 [f"model.init={REPO_ID}"])
  stored = json.loads(cfg.to_json_best_effort())
  del stored["model"]["require_init"]
  (tmp_path / "checkpoints" / "5").mkdir(parents=True)
  (tmp_path / workdir.CONFIG_NAME).write_text(json.dumps(stored))
  assert workdir.check_resume(cfg, str(tmp_path)) == [("model.require_init", "<absent>", True)]
