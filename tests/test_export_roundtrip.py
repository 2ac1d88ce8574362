"""Exports load everywhere a user loads models, and come back unchanged.

For each export: cirjax params -> export -> load with transformers' Auto classes / PEFT ->
the same features, scores and embeddings as cirjax (fp32, the 1e-4 model tolerance) ->
convert back -> bitwise the same parameters.

* BLIP-2: `AutoTokenizer` gives cirjax's BERT ids (not GPT-2's), `AutoImageProcessor` /
  `AutoProcessor` give cirjax's pixels, `Blip2ForImageTextRetrieval` loads every weight and
  reproduces cirjax's features and scores; the learned temperature survives.
* LLaVA: `LlavaForConditionalGeneration` loads with no missing weight (the LM head included:
  logits equal the source model's), text_config carries the tokenizer's bos/eos/pad ids.
* PEFT: InstructCIR's adapter directory (written by the trainer's export) loads with
  `peft.PeftModel.from_pretrained` on the base and gives the LoRA-merged model's embedding; it
  carries the tokenizer and `base_model_name_or_path`.
"""

import json

import jax
import numpy as np
import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

from cirjax import cli, lora
from cirjax.convert import io, registry
from cirjax.data import images, text
from cirjax.data.tokenizer import load_tokenizer
from cirjax.convert import llava_convert, llava_parity
from cirjax.models import blip2, llava
from tests import llava_fixtures as fx
from tests.blip2_fixtures import TOL_MODEL, assert_close, random_pixels

TEXTS = ["make it red", "A Dog with the blue cat", "unseenword it"]
LEARNED_TEMP = 0.0287


def _same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


# ----------------------------------------------------------------------------- BLIP-2

@pytest.fixture(scope="module")
def blip2_export(tmp_path_factory):
  """A tiny random BLIP-2 with a learned temperature and a BERT vocab, saved as a cirjax
  directory and exported to HF with `cirjax convert`."""
  d = tmp_path_factory.mktemp("blip2")
  cfg = blip2.tiny_config()
  params = jax.tree.map(np.asarray, registry.family("blip2").init(cfg, jax.random.PRNGKey(7)))
  params["temp"] = np.asarray(LEARNED_TEMP, np.float32)
  words = list(text.SPECIAL_TOKENS) + [f"w{i}" for i in range(80)] + (
      "make it red blue a dog with the cat ##s".split())
  vocab = d / "vocab" / "vocab.txt"
  vocab.parent.mkdir()
  vocab.write_text("\n".join(words) + "\n")
  registry.save(d / "cj", "blip2", cfg, params, tokenizer_dir=vocab.parent)
  assert cli.main(["convert", str(d / "cj"), str(d / "hf")]) == 0
  return cfg, params, vocab, d / "hf"


def test_blip2_tokenizer_and_processor_load_with_auto_classes(blip2_export):
  cfg, _, vocab, hf = blip2_export
  ours = load_tokenizer(vocab, "blip2")
  tok = transformers.AutoTokenizer.from_pretrained(str(hf))
  assert "GPT2" not in type(tok).__name__ and len(tok) == len(ours) <= cfg.qformer.vocab_size
  want_ids, want_mask = text.tokenize(ours, TEXTS)
  got = tok(TEXTS, padding="max_length", truncation=True, max_length=text.BLIP2_MAX_LENGTH,
            return_tensors="np")
  np.testing.assert_array_equal(got["input_ids"], want_ids)
  np.testing.assert_array_equal(got["attention_mask"], want_mask)
  assert tok("make it red")["input_ids"][1:-1] == ours.convert_tokens_to_ids(["make", "it", "red"])
  # cirjax's own loader reads the export's tokenizer back to the same ids
  np.testing.assert_array_equal(text.tokenize(load_tokenizer(hf, "blip2"), TEXTS)[0], want_ids)

  s = cfg.vision.image_size
  rng = np.random.default_rng(0)
  square = Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8))
  bigger = Image.fromarray(rng.integers(0, 256, (2 * s, 2 * s, 3), dtype=np.uint8))
  ip = transformers.AutoImageProcessor.from_pretrained(str(hf))
  assert type(ip).__name__.startswith("BlipImageProcessor")
  proc = transformers.AutoProcessor.from_pretrained(str(hf))
  assert isinstance(proc, transformers.Blip2Processor)
  assert tok.model_max_length == text.BLIP2_MAX_LENGTH
  out = proc(images=[square, bigger], text=TEXTS[:2], padding="max_length", truncation=True,
             return_tensors="np")
  # no query placeholders in front of the text: the retrieval model reads the ids as they are
  np.testing.assert_array_equal(out["input_ids"], want_ids[:2])
  transform = images.make_transform("targetpad", s)
  for got_px, im in zip(out["pixel_values"], (square, bigger)):
    np.testing.assert_allclose(got_px.transpose(1, 2, 0), transform(im), rtol=0, atol=1e-6)


def test_blip2_hf_model_gives_cirjax_features_and_converts_back(blip2_export):
  cfg, params, vocab, hf = blip2_export
  model, info = transformers.Blip2ForImageTextRetrieval.from_pretrained(
      str(hf), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  model.eval()
  pixels = random_pixels(3, cfg.vision.image_size, seed=1)
  ids, mask = text.tokenize(load_tokenizer(vocab, "blip2"), TEXTS)
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long())
  targets = blip2.encode_image(params, cfg, pixels)
  texts = blip2.encode_text(params, cfg, ids, mask)
  assert_close(targets, out.image_embeds.numpy(), TOL_MODEL, "image features")
  assert_close(texts, out.text_embeds.numpy(), TOL_MODEL, "text features")
  assert_close(blip2.score(texts, targets).T, out.logits_per_image.numpy(), TOL_MODEL,
               "ITC scores")
  # back: the same parameters, the learned temperature included
  hf_cfg = json.loads((hf / "config.json").read_text())
  assert hf_cfg["cirjax_temp"] == pytest.approx(LEARNED_TEMP)
  back = registry.load(hf)
  assert back.config == cfg and float(back.params["temp"]) == np.float32(LEARNED_TEMP)
  _same_tree(back.params, params)
  assert cli.main(["convert", str(hf), str(hf.parent / "cj-again")]) == 0
  _same_tree(registry.load(hf.parent / "cj-again").params, params)


def test_blip2_export_without_tokenizer_says_so(blip2_export, tmp_path, capsys):
  cfg, params, _, _ = blip2_export
  registry.save(tmp_path / "cj", "blip2", cfg, params)  # no vocab.txt
  registry.export_hf(tmp_path / "hf", "blip2", cfg, params, tokenizer_dir=tmp_path / "cj")
  err = capsys.readouterr().err
  assert "warning:" in err and "no tokenizer" in err and "GPT-2" in err and "vocab.txt" in err
  assert (tmp_path / "hf" / "preprocessor_config.json").is_file()
  assert not (tmp_path / "hf" / "tokenizer_config.json").exists()
  # a vocab that is no BERT vocab: the weights are exported, the tokenizer is refused by name
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "vocab.txt").write_text("[PAD]\n[CLS]\n")
  registry.export_hf(tmp_path / "hf-bad", "blip2", cfg, params, tokenizer_dir=tmp_path / "bad")
  err = capsys.readouterr().err
  assert "warning:" in err and str(tmp_path / "bad" / "vocab.txt") in err and "[UNK]" in err
  assert not (tmp_path / "hf-bad" / "tokenizer_config.json").exists()
  _same_tree(registry.load(tmp_path / "hf-bad").params, params)


# ----------------------------------------------------------------------------- LLaVA

@pytest.fixture(scope="module")
def llava_src(tmp_path_factory):
  """A tiny perturbed HF Phi-3 LLaVA (LM head included) with the test tokenizer."""
  d = tmp_path_factory.mktemp("llava_hf")
  model = fx.llava_model(fx.phi3_config(num_key_value_heads=2), seed=11)
  model.save_pretrained(str(d))
  tok = fx.make_tokenizer(d)
  return d, model, tok


def _torch_embedding(model, ids, mask, pixels):
  with torch.no_grad():
    res = model(input_ids=torch.from_numpy(np.asarray(ids, np.int64)),
                attention_mask=torch.from_numpy(np.asarray(mask, np.int64)),
                pixel_values=torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))),
                output_hidden_states=True)
  return F.normalize(res.hidden_states[-1][:, -1], dim=-1).numpy(), res.logits.numpy()


def test_llava_export_keeps_lm_head_and_token_ids(llava_src, tmp_path):
  src, ref, tok = llava_src
  assert cli.main(["convert", str(src), str(tmp_path / "cj")]) == 0
  loaded = registry.load(tmp_path / "cj")
  np.testing.assert_array_equal(loaded.params["lm_head"]["kernel"],
                                ref.lm_head.weight.detach().numpy().T)
  assert cli.main(["convert", str(tmp_path / "cj"), str(tmp_path / "hf")]) == 0
  model, info = transformers.LlavaForConditionalGeneration.from_pretrained(
      str(tmp_path / "hf"), dtype=torch.float32, attn_implementation="eager",
      output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  model.eval()
  text_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]
  assert (text_cfg["bos_token_id"], text_cfg["eos_token_id"], text_cfg["pad_token_id"]) == (
      tok.bos_token_id, tok.eos_token_id, ref.config.text_config.pad_token_id)
  assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf")).get_vocab() == \
      tok.get_vocab()
  config, params = loaded.config, loaded.params
  ids, mask, pixels = llava_parity.random_inputs(config, batch=3, text_len=9, seed=0)
  got_emb, got_logits = _torch_embedding(model, ids, mask, pixels)
  want_emb, want_logits = _torch_embedding(ref, ids, mask, pixels)
  np.testing.assert_array_equal(got_logits, want_logits)  # the same LM head, not a random one
  assert_close(llava.embed(params, config, ids, mask, pixels), got_emb, TOL_MODEL, "embedding")
  np.testing.assert_array_equal(got_emb, want_emb)
  back = registry.load(tmp_path / "hf")
  assert back.config == config
  _same_tree(back.params, params)


def test_llava_export_without_lm_head_warns(llava_src, tmp_path, capsys):
  src, _, _ = llava_src
  config, params = llava_convert.from_hf(src)
  del params["lm_head"]
  registry.export_hf(tmp_path / "hf", "llava", config, params, tokenizer_dir=src)
  err = capsys.readouterr().err
  assert "warning:" in err and "no LM head" in err and "randomly" in err
  assert "lm_head.weight" not in io.read_state_dict(tmp_path / "hf")


def test_llava_tied_source_keeps_its_head(tmp_path):
  model = fx.llava_model(fx.llama_config(tie_word_embeddings=True), seed=2,
                         tie_word_embeddings=True)
  model.save_pretrained(str(tmp_path / "src"))
  _, params = llava_convert.from_hf(tmp_path / "src")
  emb = params["language_model"]["embed_tokens"]["embedding"]
  np.testing.assert_array_equal(params["lm_head"]["kernel"], emb.T)


# ----------------------------------------------------------------------------- PEFT

def test_instructcir_adapter_loads_with_peft(llava_src, tmp_path):
  """InstructCIR's export (`llava_run.export`, the task's end of run) on a LoRA'd base loaded
  from `model.init`: the adapter loads with PEFT on the HF base and embeds as cirjax's merged
  model; the merged exports keep the base's LM head."""
  from cirjax.convert import llava_run
  src, ref, tok = llava_src
  config, base = llava_convert.from_hf(src)
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0, init="random")
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32), base)
  adapter = lora.Adapter(jax.device_get(jax.jit(  # one compile: faster than op by op
      lambda r: lora.init_lora(shapes, lcfg, r).params)(jax.random.PRNGKey(3))), lcfg)
  train_base = {k: v for k, v in base.items() if k != "lm_head"}  # as training holds it
  llava_run.export(tmp_path, {"base": train_base, "lora": adapter.params}, config, lcfg,
                   str(src), "test", init=str(src), init_from="", export_hf=True)
  ad_dir = tmp_path / "adapter"
  ad_cfg = json.loads((ad_dir / lora.CONFIG_NAME).read_text())
  assert ad_cfg["base_model_name_or_path"] == str(src)
  assert transformers.AutoTokenizer.from_pretrained(str(ad_dir)).get_vocab() == tok.get_vocab()

  pm = peft.PeftModel.from_pretrained(
      transformers.LlavaForConditionalGeneration.from_pretrained(
          str(src), dtype=torch.float32, attn_implementation="eager"), str(ad_dir)).eval()
  ids, mask, pixels = llava_parity.random_inputs(config, batch=3, text_len=9, seed=1)
  got, _ = _torch_embedding(pm, ids, mask, pixels)
  merged = lora.merge(train_base, adapter)
  want = np.asarray(llava.embed(merged, config, ids, mask, pixels))
  assert_close(want, got, TOL_MODEL, "PEFT embedding vs cirjax merged")
  # the adapter changes the embedding (so the comparison above is not vacuous)
  assert fx.rel_err(np.asarray(llava.embed(base, config, ids, mask, pixels)), got) > 1e-3

  _same_tree(lora.load_peft(ad_dir, base).params, adapter.params)
  cj = registry.load(tmp_path / "model")
  _same_tree(cj.params, {**jax.tree.map(np.asarray, merged), "lm_head": base["lm_head"]})
  hf_model, info = transformers.LlavaForConditionalGeneration.from_pretrained(
      str(tmp_path / "model_hf"), dtype=torch.float32, attn_implementation="eager",
      output_loading_info=True)
  assert not info["missing_keys"], info
  emb, _ = _torch_embedding(hf_model.eval(), ids, mask, pixels)
  assert_close(want, emb, TOL_MODEL, "merged HF export embedding")
  _same_tree(registry.load(tmp_path / "model_hf").params, cj.params)
