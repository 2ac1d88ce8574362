"""InstructCIR training on tiny data in the real formats: stage 1 writes a checkpoint and a
PEFT adapter, stage 2 starts exactly from stage 1's final parameters, only LoRA parameters
change, a killed run resumes exactly, the hard-negative columns count, and 1 device gives the
loss of 4."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from cirjax.train import config_utils, sharding as shd

REPO = Path(__file__).resolve().parents[1]
STEPS = 3  # 60 pairs / batch 16


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  """The runs here compile the same steps again (resume, evaluation): a persistent
  compilation cache for this module only keeps the default tests fast."""
  from jax._src import compilation_cache as cc
  old = (jax.config.jax_compilation_cache_dir,
         jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  cc.reset_cache()
  yield
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
  cc.reset_cache()


def _config(stage, root, *overrides):
  return config_utils.load_config(
      str(REPO / f"configs/instructcir_stage{stage}.py") + ":tiny",
      [f"data.root={root}", "eval_max=16", "eval_cir=False", "model.text.num_layers=1",
       *overrides])


def _mesh(n):
  return shd.make_mesh((("data", -1), ("fsdp", 1)), jax.devices()[:n])


def _train(config, workdir, n=4):
  from cirjax.train.trainer import train
  return train(config, str(workdir), mesh=_mesh(n))


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def stage1(synth_root, tmp_path_factory):
  wd = tmp_path_factory.mktemp("stage1")
  r = _train(_config(1, synth_root), wd)
  return wd, r


def test_stage1_trains_checkpoints_and_exports(stage1):
  wd, r = stage1
  assert r["status"] == "done" and len(r["losses"]) == STEPS
  assert np.isfinite(r["losses"]).all()
  assert (wd / "checkpoints" / str(STEPS)).is_dir()
  recs = [json.loads(l) for l in Path(wd / "metrics.jsonl").read_text().splitlines() if l]
  assert {"i2t/R@1", "i2t/R@10"} <= set(recs[-1]) and recs[-1]["kind"] == "eval"
  assert all("batch_acc" in x for x in recs if x["kind"] == "train")
  # The PEFT adapter holds exactly the trained LoRA weights, and the merged model loads.
  from cirjax import lora
  params = _host(r["state"].params)
  ad = lora.load_peft(wd / "adapter", params["base"])
  assert ad.config.rank == 8 and ad.config.alpha == 16.0
  jax.tree.map(np.testing.assert_array_equal, ad.params, params["lora"])
  cfg = json.loads((wd / "adapter" / "adapter_config.json").read_text())
  assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
  import cirjax
  model = cirjax.load_llava(wd / "model")
  merged = lora.merge(params["base"], lora.Adapter(params["lora"], ad.config))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=0),
               model.params["language_model"], _host(merged["language_model"]))
  assert model.tokenizer is not None and (wd / "model_hf" / "config.json").is_file()


@pytest.mark.slow  # default-suite budget: CI runs it with -m slow
def test_trained_adapter_loads_with_peft(stage1, tmp_path):
  """Train (tiny) -> export -> load with transformers + PEFT -> cirjax's embedding: the
  trained adapter on the HF export of the run's base gives the merged model's embedding, and
  the adapter directory carries the run's tokenizer (docs/train.md)."""
  import peft
  import torch
  import torch.nn.functional as F
  import transformers
  import cirjax
  from cirjax.convert import registry
  from cirjax.convert import llava_parity
  from cirjax.models import llava
  wd, r = stage1
  params = _host(r["state"].params)
  model = cirjax.load_llava(wd / "model")
  registry.export_hf(tmp_path / "base", "llava", model.config, params["base"],
                     tokenizer_dir=wd / "tokenizer")
  cfg = json.loads((wd / "adapter" / "adapter_config.json").read_text())
  assert cfg["base_model_name_or_path"] is None  # a random base: nothing to name
  tok = transformers.AutoTokenizer.from_pretrained(str(wd / "adapter"))
  assert tok.get_vocab() == model.tokenizer.get_vocab()
  base = transformers.LlavaForConditionalGeneration.from_pretrained(
      str(tmp_path / "base"), dtype=torch.float32, attn_implementation="eager")
  pm = peft.PeftModel.from_pretrained(base, str(wd / "adapter")).eval()
  ids, mask, pixels = llava_parity.random_inputs(model.config, batch=2, text_len=8, seed=0)
  with torch.no_grad():
    out = pm(input_ids=torch.from_numpy(ids.astype(np.int64)),
             attention_mask=torch.from_numpy(mask.astype(np.int64)),
             pixel_values=torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))),
             output_hidden_states=True)
  got = F.normalize(out.hidden_states[-1][:, -1], dim=-1).numpy()
  want = np.asarray(llava.embed(model.params, model.config, ids, mask, pixels))
  err = np.abs(got - want).max() / np.abs(want).max()
  assert err <= 1e-4, err  # the fp32 model tolerance


def test_only_lora_changes(stage1, synth_root, tmp_path):
  from cirjax.train.instructcir import InstructCIRTask
  wd, r = stage1
  cfg = _config(1, synth_root)
  task = InstructCIRTask(cfg, _mesh(1), str(tmp_path))
  init = _host(jax.jit(task.init_params)(jax.random.PRNGKey(int(cfg.seed))))
  final = _host(r["state"].params)
  # Tower, projector and language model bitwise unchanged; every adapter moved.
  jax.tree.map(np.testing.assert_array_equal, final["base"], init["base"])
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), final["lora"], init["lora"])
  assert all(jax.tree.leaves(changed))
  assert set(final["base"]) == {"vision_tower", "multi_modal_projector", "language_model"}


@pytest.mark.slow  # default-suite budget: CI runs it with -m slow
def test_stage2_starts_from_stage1(stage1, synth_root, tmp_path):
  from cirjax.train.instructcir import InstructCIRTask
  wd, r1 = stage1
  cfg = _config(2, synth_root, f"init_from={wd}", "train.max_steps=2", "export_hf=False")
  task = InstructCIRTask(cfg, _mesh(4), str(tmp_path / "probe"))
  assert task.tokenizer_dir == str(wd / "tokenizer")
  # Stage 1 saw only captions, yet stage 2's instructions must not read as <unk>.
  unk = task.tokenizer.convert_tokens_to_ids("<unk>")
  for e in task.train[:20]:
    ids = task.tokenizer(e.instruction, add_special_tokens=False)["input_ids"]
    assert ids and unk not in ids, e.instruction
  start = _host(task.initial_params(jax.eval_shape(task.init_params, jax.random.PRNGKey(0))))
  jax.tree.map(np.testing.assert_array_equal, start, _host(r1["state"].params))
  r2 = _train(cfg, tmp_path / "stage2")
  assert r2["status"] == "done" and len(r2["losses"]) == 2 and np.isfinite(r2["losses"]).all()
  p1, p2 = _host(r1["state"].params), _host(r2["state"].params)
  jax.tree.map(np.testing.assert_array_equal, p2["base"], p1["base"])
  assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)),
                                          p2["lora"], p1["lora"])))
  final = json.loads(Path(tmp_path / "stage2" / "final_metrics.json").read_text())
  assert {"q2t/R@1", "q2t/beats_original"} <= set(final["final_metrics"])
  assert (tmp_path / "stage2" / "adapter" / "adapter_model.safetensors").is_file()


def test_stage2_needs_init_from(synth_root, tmp_path):
  from cirjax.train.instructcir import InstructCIRTask
  with pytest.raises(ValueError, match="init_from"):
    InstructCIRTask(_config(2, synth_root), _mesh(1), str(tmp_path))


def test_resume_is_exact(stage1, synth_root, tmp_path, monkeypatch):
  _, full = stage1
  cfg = _config(1, synth_root, "checkpoint.every_steps=1", "evaluate=False", "export=False")
  monkeypatch.setenv("CIRJAX_STOP_AFTER_STEP", "1")
  r = _train(cfg, tmp_path / "run")
  assert r["status"] == "stopped" and r["step"] == 1
  monkeypatch.delenv("CIRJAX_STOP_AFTER_STEP")
  r2 = _train(cfg, tmp_path / "run")
  assert r2["status"] == "done" and r2["step"] == STEPS
  assert r["losses"] + r2["losses"] == full["losses"]
  jax.tree.map(np.testing.assert_array_equal, _host(r2["state"].params),
               _host(full["state"].params))


def _stage2_task(synth_root, tmp_path, mesh, *overrides):
  from cirjax.train.instructcir import InstructCIRTask
  cfg = _config(2, synth_root, "allow_scratch_stage2=True", "lora.init=random", *overrides)
  return InstructCIRTask(cfg, mesh, str(tmp_path))


@pytest.mark.slow  # default-suite budget: CI runs it with -m slow
def test_hard_negative_columns_and_device_count(synth_root, tmp_path):
  """The stage-2 loss is `info_nce_loss` with the original captions as extra columns (larger
  than without them: more terms in every row's logsumexp); 1 device and 4 give the same loss
  and embeddings (LoRA dropout included)."""
  from cirjax.losses import info_nce_loss
  task = _stage2_task(synth_root, tmp_path, _mesh(1))
  params = _host(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
  local = task.batch(0, 0)
  rng = jax.random.PRNGKey(3)

  def loss_and_embeddings(p, b):
    return task.loss_fn(p, b, rng)[0], task.embeddings(p, b, rng)

  results = {}
  for n in (1, 4):
    mesh = _mesh(n)
    task.mesh = mesh
    results[n] = _host(jax.jit(loss_and_embeddings)(params, shd.global_batch(local, mesh)))
  loss, (q, t, h) = results[1]
  np.testing.assert_allclose(loss, float(info_nce_loss(q, t, temperature=0.05, hard_negatives=h)),
                             rtol=1e-5)
  assert loss > float(info_nce_loss(q, t, temperature=0.05)) + 1e-3
  np.testing.assert_allclose(results[4][0], loss, rtol=1e-5)
  for a, b in zip(results[4][1], results[1][1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_stage2_templates_are_sampled_reproducibly(synth_root, tmp_path):
  task = _stage2_task(synth_root, tmp_path, _mesh(1))
  rows = np.arange(16)
  a = task.prompts_for(0, 1, rows)
  assert a == task.prompts_for(0, 1, rows)           # a function of (seed, epoch, step)
  b = task.prompts_for(0, 2, rows)
  assert a != b
  # Several image and caption templates are in use; target and negative share a template.
  assert len({p[0].split("\n")[2][:20] for p in a + b}) > 3
  for q, t, n in a:
    assert "<image>" in q and t.endswith("<|endoftext|>") and n.endswith("<|endoftext|>")
  fixed = _stage2_task(synth_root, tmp_path / "f", _mesh(1), "fixed_templates=True")
  assert len({p[0].split("\n")[2][:20] for p in fixed.prompts_for(0, 1, rows)}) == 1


def _jsonl_data(root: Path):
  rng = np.random.default_rng(0)
  (root / "img").mkdir(parents=True)
  pairs, trips = [], []
  objs = ["dog", "cat", "car", "tree", "boat", "house"]
  for i in range(24):
    Image.new("RGB", (40 + i, 30), tuple(int(x) for x in rng.integers(0, 255, 3))).save(
        root / "img" / f"{i}.jpg")
    a, b = objs[i % 6], objs[(i + 1) % 6]
    pairs.append({"image": f"{i}.jpg", "caption": f"a {a} in the park number {i}"})
    trips.append({"image": f"{i}.jpg", "instruction": f"replace the {a} with a {b}",
                  "modified_caption": f"a {b} in the park number {i}",
                  "original_caption": f"a {a} in the park number {i}"})
  pairs.append({"image": "missing.jpg", "caption": "gone"})
  for name, recs in (("pairs", pairs), ("triplets", trips)):
    with open(root / f"{name}.jsonl", "w") as f:
      f.write("\n".join(json.dumps(r) for r in recs) + "\n")


def test_jsonl_data_batches(tmp_path):
  """The real JSON-lines format: batches are left-padded to the fixed lengths, end in EOS,
  images are CLIP-preprocessed, missing images are skipped."""
  from cirjax.train.instructcir import InstructCIRTask
  _jsonl_data(tmp_path / "d")
  for stage, name in ((1, "pairs"), (2, "triplets")):
    cfg = config_utils.load_config(
        str(REPO / f"configs/instructcir_stage{stage}.py") + ":tiny",
        ["data.source=jsonl", f"data.train_file={tmp_path / 'd' / name}.jsonl",
         f"data.image_root={tmp_path / 'd' / 'img'}", "train.batch_size=8",
         "allow_scratch_stage2=True"])
    task = InstructCIRTask(cfg, _mesh(1), str(tmp_path / f"w{stage}"))
    assert len(task.train) == 24 and task.steps_per_epoch == 3
    b = task.batch(0, 2)
    spec = task.batch_spec()
    assert set(b) == set(spec)
    for k, v in b.items():
      assert v.shape == spec[k].shape, k
    eos = task.tokenizer.eos_token_id
    assert (b["q_ids"][:, -1] == eos).all() and (b["t_ids"][:, -1] == eos).all()
    assert (b["q_mask"][:, -1] == 1).all() and (b["q_mask"][:, 0] == 0).any()
    n_img = (b["q_ids"] == task.cfg.image_token_id).sum(1)
    assert (n_img == task.n_img).all()
    assert b["pixels"].shape[1:] == (28, 28, 3) and abs(b["pixels"].mean()) < 3
    if stage == 2:
      assert not np.array_equal(b["t_ids"], b["n_ids"])


@pytest.mark.slow
def test_one_device_equals_four(stage1, synth_root, tmp_path):
  """The whole stage-1 run (LoRA dropout, AdamW, warm-up cosine) on 1 device ends where the
  4-device run ends, to float tolerance."""
  _, four = stage1
  one = _train(_config(1, synth_root, "evaluate=False", "export=False"), tmp_path / "one", n=1)
  np.testing.assert_allclose(one["losses"], four["losses"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               _host(one["state"].params["lora"]), _host(four["state"].params["lora"]))


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


@pytest.mark.slow
def test_scan_layers_trains_on_the_stacked_state_and_exports_per_layer(synth_root, tmp_path):
  """Stage 1 with scan_layers: the state holds base and adapter stacked, the losses and
  parameters are the looped run's (fp32, 1e-5; LoRA dropout off: a scan draws its layers'
  dropout masks from another stream than the loop), the exports have the per-layer files of
  the looped run and hold the state's values, and stage 2 starts from the stacked checkpoint."""
  from cirjax import lora
  from cirjax.convert import io
  from cirjax.models import llava
  # eps 1e-6 as in test_train_qure: no parameter moves by float noise / eps.
  over = ("lora.dropout=0.0", "evaluate=False", "train.eps=1e-6")
  r = _train(_config(1, synth_root, *over), tmp_path / "loop")
  rs = _train(_config(1, synth_root, *over, "scan_layers=True"), tmp_path / "scan")
  wd, sd = tmp_path / "loop", tmp_path / "scan"
  params = _host(rs["state"].params)
  assert "layers" in params["base"]["language_model"] and "layers" in params["lora"]["language_model"]
  np.testing.assert_allclose(rs["losses"], r["losses"], rtol=1e-5)
  cfg = llava.LlavaConfig.from_dict(json.loads((sd / "llava_config.json").read_text()))
  unstacked = {k: llava.unstack_layers(v, cfg) for k, v in params.items()}
  _close(unstacked, _host(r["state"].params))
  for d in ("adapter", "model", "model_hf"):
    assert sorted(p.name for p in (sd / d).iterdir()) == sorted(p.name for p in (wd / d).iterdir())
  for f in ("adapter/adapter_model.safetensors", "model_hf"):
    assert set(io.read_state_dict(sd / f)) == set(io.read_state_dict(wd / f)), f
  ad = lora.load_peft(sd / "adapter", unstacked["base"])
  jax.tree.map(np.testing.assert_array_equal, ad.params, unstacked["lora"])
  # Stage 2 reads a stacked stage-1 checkpoint as the per-layer start it needs.
  from cirjax.train.instructcir import InstructCIRTask
  task = InstructCIRTask(_config(2, synth_root, f"init_from={sd}"), _mesh(1), str(tmp_path / "s2"))
  start = task.initial_params(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
  jax.tree.map(np.testing.assert_array_equal, _host(start), unstacked)
