"""LLaVA conversion: HF directory round trips (4.x/5.x keys, sharded, fp16, .bin), strict key
accounting, cirjax directories, `run_parity`, and the full-size tree checked by shape only."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import cirjax
from cirjax.convert import engine, io, registry
from cirjax.convert import llava_convert, llava_parity
from cirjax.models import llava
from tests import llava_fixtures as fx


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny Phi-3 LLaVA saved with save_pretrained, plus the test tokenizer."""
  d = tmp_path_factory.mktemp("hf_llava")
  model = fx.llava_model(fx.phi3_config(num_key_value_heads=2), seed=11)
  model.save_pretrained(str(d))
  fx.make_tokenizer(d)
  return d, model


def _inputs(config, seed=0):
  return llava_parity.random_inputs(config, batch=3, text_len=9, seed=seed)


def _emb(params, config, inputs):
  ids, mask, pix = inputs
  return np.asarray(llava.embed(params, config, ids, mask, pix))


def test_from_hf_dir_and_run_parity(hf_dir):
  d, _ = hf_dir
  report = {}
  config, params = llava_convert.from_hf(d, report=report)
  # the LM head is kept (generation and export need it), nothing is skipped
  assert report["skipped"] == [] and report["lm_head"] == "language_model.lm_head.weight"
  assert params["lm_head"]["kernel"].shape == (config.text.hidden_size, config.text.vocab_size)
  rows = llava_parity.run_parity(d, batch=3, text_len=9)
  names = [r.name for r in rows]
  assert names[:3] == ["vision features", "projector output", "input embeddings"]
  assert "decoder layer 1" in names and names[-1] == "embedding"
  assert all(r.ok for r in rows), llava_parity.format_table(rows)
  assert all(r.tolerance == 1e-4 for r in rows)
  text_rows = llava_parity.run_parity(d, images=False, batch=2, text_len=7)
  assert all(r.ok for r in text_rows) and "vision features" not in [r.name for r in text_rows]


def test_parity_catches_a_wrong_weight(hf_dir, tmp_path):
  d, _ = hf_dir
  config, params = llava_convert.from_hf(d)
  bad = jax.tree.map(lambda x: x, params)
  w = np.array(bad["language_model"]["layers_1"]["mlp"]["down_proj"]["kernel"])
  bad["language_model"]["layers_1"]["mlp"]["down_proj"]["kernel"] = w * 1.01
  registry.save(tmp_path / "bad", "llava", config, bad)
  rows = {r.name: r for r in llava_parity.run_parity(d, converted=tmp_path / "bad")}
  assert rows["decoder layer 1"].ok and not rows["decoder layer 2 + final norm"].ok
  assert not rows["embedding"].ok


@pytest.mark.parametrize("key_format", ["hf4", "hf5"])
def test_export_round_trip(hf_dir, tmp_path, key_format):
  d, model = hf_dir
  config, params = llava_convert.from_hf(d)
  out = registry.export_hf(tmp_path / key_format, "llava", config, params,
                           key_format=key_format, tokenizer_dir=d)
  keys = io.read_state_dict(out)
  prefix = "language_model.model." if key_format == "hf4" else "model.language_model."
  assert any(k.startswith(prefix) for k in keys)
  back = transformers.LlavaForConditionalGeneration.from_pretrained(
      str(out), dtype=torch.float32, attn_implementation="eager")
  # every weight loaded, the LM head included
  ref = model.state_dict()
  got = back.state_dict()
  assert set(got) == set(ref)
  for k, v in ref.items():
    np.testing.assert_array_equal(got[k].numpy(), v.numpy(), err_msg=k)
  config2, params2 = llava_convert.from_hf(out)
  assert config2 == config
  for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  assert (out / "tokenizer.json").exists()


def test_sharded_fp16_and_bin(hf_dir, tmp_path):
  d, model = hf_dir
  config, params = llava_convert.from_hf(d)
  state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
  # sharded safetensors + index, fp16
  sh = tmp_path / "sharded"
  io.write_safetensors_sharded({k: v.numpy() for k, v in state.items()}, sh,
                                    max_shard_bytes=20_000)
  (sh / "config.json").write_text((d / "config.json").read_text())
  assert (sh / "model.safetensors.index.json").exists()
  _, p16 = llava_convert.from_hf(sh)
  # .bin shards (torch.save), read through torch.load(weights_only=True)
  bn = tmp_path / "bin"
  bn.mkdir()
  keys = sorted(state)
  half = len(keys) // 2
  index = {}
  for i, part in enumerate((keys[:half], keys[half:])):
    name = f"pytorch_model-0000{i + 1}-of-00002.bin"
    torch.save({k: state[k] for k in part}, bn / name)
    index.update({k: name for k in part})
  (bn / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": index}))
  (bn / "config.json").write_text((d / "config.json").read_text())
  _, pbin = llava_convert.from_hf(bn)
  for a, b, c in zip(jax.tree.leaves(p16), jax.tree.leaves(pbin), jax.tree.leaves(params)):
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, np.asarray(c).astype(np.float16).astype(np.float32))


def test_key_formats_equivalent(hf_dir):
  d, _ = hf_dir
  state = io.read_state_dict(d)
  config, params = llava_convert.from_hf(d)
  hf5 = {}
  for k, v in state.items():
    # save_pretrained writes the CLIP tower as `vision_tower.vision_model.*` with transformers
    # 5.0.0 (constraints/oldest.txt) and as `vision_tower.*` with 5.24 (constraints/tested.txt).
    for old, new in (("language_model.model.", "model.language_model."),
                     ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.vision_model.", "model.vision_tower.vision_model."),
                     ("vision_tower.", "model.vision_tower.vision_model."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
      if k.startswith(old):
        k = new + k[len(old):]
        break
    hf5[k] = v
  rep = {}
  p5 = llava_convert.convert_state_dict(hf5, config, report=rep)
  assert rep["key_format"] == "hf5"
  for a, b in zip(jax.tree.leaves(p5), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_strict_key_accounting(hf_dir):
  d, _ = hf_dir
  state = io.read_state_dict(d)
  config, _ = llava_convert.from_hf(d)
  s = dict(state)
  del s["language_model.model.layers.1.mlp.down_proj.weight"]
  s["language_model.model.layers.1.mlp.extra.weight"] = np.zeros(3, np.float32)
  s["multi_modal_projector.linear_1.bias"] = np.zeros(7, np.float32)
  with pytest.raises(engine.KeyAccountingError) as e:
    llava_convert.convert_state_dict(s, config, source="broken")
  msg = str(e.value)
  for k in ("layers.1.mlp.down_proj.weight", "layers.1.mlp.extra.weight",
            "multi_modal_projector.linear_1.bias"):
    assert k in msg
  with pytest.raises(ValueError, match="cannot find the language model"):
    llava_convert.convert_state_dict({"foo": np.zeros(1)}, config)


def test_load_llava_hf_and_cirjax_dirs(hf_dir, tmp_path):
  d, model = hf_dir
  m = cirjax.load_llava(d)
  assert m.family == "llava" and "lm_head" not in m.params  # never read by an embedder
  assert m.tokenizer is not None and m.tokenizer.padding_side == "left"
  inputs = _inputs(m.config)
  e1 = _emb(m.params, m.config, inputs)
  config, params = llava_convert.from_hf(d)
  registry.save(tmp_path / "cj", "llava", config, params, tokenizer_dir=d,
                extra={"source": str(d)})
  m2 = cirjax.load_llava(tmp_path / "cj")
  assert m2.tokenizer is not None and m2.config == m.config
  np.testing.assert_array_equal(_emb(m2.params, m2.config, inputs), e1)
  hs = llava.hidden_states(m2.params, m2.config, *inputs)
  assert len(hs) == config.text.num_layers + 1
  # against HF on the same inputs
  want = llava_parity.torch_stages(model, config, *inputs)["embedding"]
  fx.assert_close(e1, want, fx.TOL_MODEL, "load_llava embedding")
  # bf16 compute option
  m16 = cirjax.load_llava(tmp_path / "cj", dtype="bfloat16", param_dtype="bfloat16")
  assert m16.config.dtype == "bfloat16"
  assert np.all(np.sum(_emb(m16.params, m16.config, inputs) * e1, -1) > 0.99)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="none of the checkpoints cirjax reads"):
    cirjax.load_llava(tmp_path / "empty")


def test_verbs_end_to_end(hf_dir):
  """The loaded model's verbs: templates -> chat template -> tokens -> embedding, against HF
  on the same token ids (query: CIRR's zero-shot prompt; text: stage 1's caption prompt;
  image: CIRR's image prompt); `score` is the dot product of the unit vectors."""
  from cirjax import prompts
  d, model = hf_dir
  m = cirjax.load_llava(d)
  tok, n = m.tokenizer, m.config.num_image_tokens
  pix_t, pix = fx.pixels(2, 28, seed=3)
  q = m.query(pix, ["make the dog red", "a cat instead"])
  enc = prompts.encode(tok, prompts.inference_template("cirr", "query"),
                       [{"modifier": "make the dog red"}, {"modifier": "a cat instead"}],
                       num_image_tokens=n, image=True, pad_to_multiple_of=16)
  want = llava_parity.torch_stages(model, m.config, enc["input_ids"], enc["attention_mask"],
                                   pix)["embedding"]
  fx.assert_close(np.asarray(q), want, fx.TOL_MODEL, "query verb")
  t = m.text(["a red dog"])
  enc = prompts.encode(tok, prompts.STAGE1_CAPTION, [{"caption": "a red dog"}],
                       num_image_tokens=n, image=False, pad_to_multiple_of=16)
  want = llava_parity.torch_stages(model, m.config, enc["input_ids"], enc["attention_mask"],
                                   None)["embedding"]
  fx.assert_close(np.asarray(t), want, fx.TOL_MODEL, "text verb")
  img = m.image(pix)
  enc = prompts.encode(tok, prompts.inference_template("cirr", "image"), [{}, {}],
                       num_image_tokens=n, image=True)
  want = llava_parity.torch_stages(model, m.config, enc["input_ids"], enc["attention_mask"],
                                   pix)["embedding"]
  fx.assert_close(np.asarray(img), want, fx.TOL_MODEL, "image verb")
  np.testing.assert_allclose(m.score(q, img), np.asarray(q) @ np.asarray(img).T, rtol=1e-6)
  with pytest.raises(ValueError, match=r"pixels must be float \[B, 28, 28, 3\]"):
    m.image(pix[:, :14])


def test_full_size_tree_by_shape_only():
  """Phi-3.5-mini + CLIP-L/14 at 224 px: the HF tree (built on the meta device) converts to
  exactly cirjax's abstract tree, ~4.1 B parameters, nothing allocated."""
  short, long = fx.longrope_factors(48)
  tc = transformers.Phi3Config(
      vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072,
      original_max_position_embeddings=4096, pad_token_id=32000,
      rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long})
  vc = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                     num_hidden_layers=24, num_attention_heads=16,
                                     image_size=224, patch_size=14, projection_dim=768)
  hf_cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_index=32044)
  with torch.device("meta"):
    model = transformers.LlavaForConditionalGeneration(hf_cfg)
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  config = llava_convert.llava_config_from_hf(hf_cfg.to_dict())
  assert config.num_image_tokens == 256
  got = llava_convert.convert_abstract(shapes, config)
  want = llava.abstract_params(config)
  flat = lambda t: {jax.tree_util.keystr(p): tuple(l.shape)
                    for p, l in jax.tree_util.tree_flatten_with_path(t)[0]}
  # the model's tree plus the LM head, kept beside it for generation and export
  assert flat(got) == {**flat(want), "['lm_head']['kernel']": (3072, 32064)}
  n = sum(int(np.prod(s)) for s in flat(want).values())
  n_head = 32064 * 3072
  assert 4.0e9 < n + n_head < 4.2e9, n
  qkv = want["language_model"]["layers_0"]["self_attn"]["qkv_proj"]["kernel"]
  assert qkv.shape == (3072, 9216)


def test_cli_convert_and_parity(hf_dir, tmp_path, capsys):
  """`cirjax convert` both ways and `cirjax parity` on a LLaVA checkpoint (the commands call
  llava_convert / llava_parity)."""
  from cirjax import cli
  d, _ = hf_dir
  assert cli.main(["convert", str(d), str(tmp_path / "cj")]) == 0
  m = cirjax.load_llava(tmp_path / "cj")
  assert m.tokenizer is not None
  assert cli.main(["convert", str(tmp_path / "cj"), str(tmp_path / "hf")]) == 0
  config, params = llava_convert.from_hf(d)
  config2, params2 = llava_convert.from_hf(tmp_path / "hf")
  assert config2 == config
  for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  capsys.readouterr()
  assert cli.main(["parity", str(d), "--converted", str(tmp_path / "cj")]) == 0
  out = capsys.readouterr().out
  assert "PASS" in out and "decoder layer 1" in out and "projector output" in out
