"""The conversion engine's abstract mode and the registry's detection of every source kind."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from cirjax.convert import engine, io, registry
from cirjax.convert import blip2_convert
from cirjax.models import blip2


# ----------------------------------------------------------------------------- detection

def _tiny_dir(path, family):
  io.save_model_dir(path, {"w": np.zeros(2, np.float32)}, {}, family)
  return path


def test_detect_every_source_kind(tmp_path):
  hf_blip2 = tmp_path / "blip2-hf"
  hf_blip2.mkdir()
  (hf_blip2 / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
  hf_llava = tmp_path / "llava-hf"
  hf_llava.mkdir()
  (hf_llava / "config.json").write_text(json.dumps({"model_type": "llava"}))
  lavis = tmp_path / "model.pth"
  torch.save({"query_tokens": torch.zeros(1, 2, 3)}, lavis)
  cases = {hf_blip2: ("blip2", "hf"), hf_llava: ("llava", "hf"), lavis: ("blip2", "lavis"),
           _tiny_dir(tmp_path / "cj-blip2", "blip2"): ("blip2", "cirjax"),
           _tiny_dir(tmp_path / "cj-llava", "llava"): ("llava", "cirjax")}
  for path, want in cases.items():
    assert registry.sniff(path) == want, path
    assert registry.detect(path) == want[0]


def test_detect_refuses_unknown_sources_by_name(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="empty: no config.json.*cirjax_config.json"):
    registry.detect(tmp_path / "empty")
  (tmp_path / "bert").mkdir()
  (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match="unknown model_type 'bert'"):
    registry.detect(tmp_path / "bert")
  _tiny_dir(tmp_path / "vq", "vqgan")
  with pytest.raises(ValueError, match="a 'vqgan' checkpoint"):
    registry.detect(tmp_path / "vq")
  (tmp_path / "notes.txt").write_text("hi")
  with pytest.raises(ValueError, match="unknown checkpoint type"):
    registry.detect(tmp_path / "notes.txt")
  with pytest.raises(FileNotFoundError, match="no such file"):
    registry.detect(tmp_path / "missing")
  with pytest.raises(ValueError, match="unknown model family 'vqgan'"):
    registry.family("vqgan")


def test_save_load_export_round_trip(tmp_path):
  cfg = blip2.tiny_config()
  params = jax.tree.map(np.asarray, registry.family("blip2").init(cfg))
  registry.save(tmp_path / "cj", "blip2", cfg, params)
  with pytest.raises(FileExistsError):
    registry.save(tmp_path / "cj", "blip2", cfg, params)
  loaded = registry.load(tmp_path / "cj")
  assert (loaded.family, loaded.kind, loaded.config) == ("blip2", "cirjax", cfg)
  with pytest.raises(ValueError, match="'blip2' model, not 'llava'"):
    registry.load(tmp_path / "cj", family="llava")
  registry.export_hf(tmp_path / "hf", "blip2", cfg, loaded.params)
  back = registry.load(tmp_path / "hf")
  assert (back.family, back.kind, back.config) == ("blip2", "hf", cfg)
  for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  # A trained model's learned temperature (not the config's 0.07) survives the HF round trip.
  trained = {**params, "temp": np.asarray(0.0287, np.float32)}
  registry.export_hf(tmp_path / "hf-trained", "blip2", cfg, trained)
  again = registry.load(tmp_path / "hf-trained")
  assert again.params["temp"] == np.float32(0.0287) and again.config == cfg
  # an unexportable model (CLIP tower) is refused before anything is written
  clip = blip2.tiny_config(vision_variant="clip")
  with pytest.raises(blip2_convert.ConfigError, match="EVA vision tower"):
    registry.export_hf(tmp_path / "clip-hf", "blip2", clip, None)
  assert not (tmp_path / "clip-hf").exists()


# ----------------------------------------------------------------------------- abstract mode

def test_abstract_mode_checks_shapes_without_materialising():
  # 4 TB of fp32 if anything were allocated: only shapes can pass through.
  big = (1_000_000, 1_000_000)
  rows = [(("w", "kernel"), "w.weight", "linear"), (("w", "bias"), "w.bias", "id")]
  target = {"w": {"kernel": jax.ShapeDtypeStruct(big, np.float32),
                  "bias": jax.ShapeDtypeStruct(big[1:], np.float32)}}
  ok = engine.convert(engine.abstract_state({"w.weight": big, "w.bias": big[1:]}), rows, target)
  assert engine.flat_shapes(ok) == engine.flat_shapes(target)
  assert all(engine.is_abstract(x) for x in jax.tree.leaves(ok))
  bad = engine.abstract_state({"w.weight": (1_000_000, 999_999), "w.bias": big[1:]})
  want = r"w.weight has shape \(1000000, 999999\), expected \(1000000, 1000000\)"
  with pytest.raises(engine.KeyAccountingError, match=want):
    engine.convert(bad, rows, target)


def test_abstract_mode_on_a_real_width_blip2():
  """HF's tree (built on the meta device, EVA-g and BERT-base widths, 2 ViT layers) converts
  by shape alone; one wrong-shaped tensor is named."""
  hf = transformers.Blip2Config(vision_config={"num_hidden_layers": 2},
                                qformer_config={"use_qformer_text_input": True,
                                                "num_hidden_layers": 2})
  with torch.device("meta"):
    model = transformers.Blip2ForImageTextRetrieval(hf)
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  cfg = blip2_convert.config_from_hf(hf.to_dict())
  got = blip2_convert.params_from_hf_state(engine.abstract_state(shapes), cfg)
  want = blip2.abstract_params(cfg)
  assert engine.flat_shapes(got) == engine.flat_shapes(want)
  assert got["vision"]["layers_1"]["self_attn"]["qkv"]["kernel"].shape == (1408, 3 * 1408)
  shapes["vision_model.encoder.layers.1.self_attn.qkv.weight"] = (3 * 1408, 1407)
  with pytest.raises(engine.KeyAccountingError,
                     match=r"layers.1.self_attn.qkv.weight has shape \(4224, 1407\), "
                     r"expected \(4224, 1408\)"):
    blip2_convert.params_from_hf_state(engine.abstract_state(shapes), cfg)
