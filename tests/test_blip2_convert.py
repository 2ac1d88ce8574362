"""Weight files, key accounting, cirjax model dirs, and BLIP-2 conversion (HF and LAVIS)."""

import json
import os
import pickle
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from cirjax.convert import io
from cirjax.convert.engine import KeyAccountingError, StateDictReader
from cirjax.convert.io import WeightFileError


# ------------------------------------------------------------------------- weight files

def _state():
  rng = np.random.default_rng(0)
  return {
      "a.weight": rng.standard_normal((3, 4)).astype(np.float32),
      "a.bias": rng.standard_normal((3,)).astype(np.float16),
      "b": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16),
      "ids": np.arange(5, dtype=np.int64),
  }


def test_safetensors_round_trip_and_torch_compatible(tmp_path):
  state = _state()
  io.write_safetensors(state, tmp_path / "model.safetensors")
  back = io.read_state_dict(tmp_path)
  assert set(back) == set(state)
  for k in state:
    assert back[k].dtype == state[k].dtype, k
    np.testing.assert_array_equal(back[k].astype(np.float32), state[k].astype(np.float32))
  # the official reader (used by transformers) agrees, bf16 included
  from safetensors.torch import load_file
  ref = load_file(tmp_path / "model.safetensors")
  assert ref["b"].dtype == torch.bfloat16
  np.testing.assert_array_equal(ref["b"].float().numpy(), state["b"].astype(np.float32))


def test_scalar_and_transposed_tensors_keep_their_shapes(tmp_path):
  """A 0-d tensor stays 0-d through the writer, the reader and the conversion engine both
  ways (np.ascontiguousarray would make it (1,)); a transposed view is written C-ordered."""
  from cirjax.convert import engine
  state = {"temp": np.asarray(0.07, np.float32),
           "w": np.arange(6, dtype=np.float32).reshape(2, 3).T}
  io.write_safetensors(state, tmp_path / "model.safetensors")
  back = io.read_state_dict(tmp_path)
  assert back["temp"].shape == () and back["w"].shape == (3, 2)
  np.testing.assert_array_equal(back["w"], state["w"])
  from safetensors.numpy import load_file
  assert load_file(tmp_path / "model.safetensors")["temp"].shape == ()
  rows = [(("temp",), "temp", "id")]
  params = engine.convert({"temp": back["temp"]}, rows, {"temp": np.zeros((), np.float32)})
  assert np.shape(params["temp"]) == () and float(params["temp"]) == np.float32(0.07)
  assert engine.export(params, rows)["temp"].shape == ()


def test_reads_official_safetensors_bf16(tmp_path):
  from safetensors.torch import save_file
  t = {"x": torch.randn(3, 5).to(torch.bfloat16), "y": torch.randn(2)}
  save_file(t, tmp_path / "w.safetensors")
  back = io.read_state_dict(tmp_path / "w.safetensors")
  assert back["x"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(back["x"].astype(np.float32), t["x"].float().numpy())
  np.testing.assert_array_equal(back["y"], t["y"].numpy())


def test_sharded_safetensors(tmp_path):
  state = {f"w{i}": np.full((64,), i, np.float32) for i in range(6)}
  names = io.write_safetensors_sharded(state, tmp_path, max_shard_bytes=600)
  assert "model.safetensors.index.json" in names and len(names) > 2
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"]) == set(state)
  back = io.read_state_dict(tmp_path)
  for k in state:
    np.testing.assert_array_equal(back[k], state[k])


def test_torch_bin_and_sharded_bin_and_wrapped_pth(tmp_path):
  t = {"x": torch.randn(2, 3), "h": torch.randn(4).to(torch.bfloat16)}
  torch.save(t, tmp_path / "pytorch_model.bin")
  back = io.read_state_dict(tmp_path)
  np.testing.assert_array_equal(back["x"], t["x"].numpy())
  assert back["h"].dtype == ml_dtypes.bfloat16
  shard_dir = tmp_path / "sharded"
  shard_dir.mkdir()
  torch.save({"x": t["x"]}, shard_dir / "pytorch_model-00001-of-00002.bin")
  torch.save({"y": torch.ones(1)}, shard_dir / "pytorch_model-00002-of-00002.bin")
  (shard_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
      "x": "pytorch_model-00001-of-00002.bin", "y": "pytorch_model-00002-of-00002.bin"}}))
  assert set(io.read_state_dict(shard_dir)) == {"x", "y"}
  torch.save({"model": t, "epoch": 3}, tmp_path / "model.pth")
  assert set(io.read_state_dict(tmp_path / "model.pth")) == {"x", "h"}


class _Evil:
  marker = ""

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


# torch warns that the hand-made pickle uses protocol 4: expected of this input, not of cirjax.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_malicious_pickle_refused_never_executed(tmp_path):
  marker = tmp_path / "PWNED"
  evil = _Evil()
  evil.marker = str(marker)
  with open(tmp_path / "pytorch_model.bin", "wb") as f:
    pickle.dump({"x": evil}, f)  # torch.load reads legacy plain pickles too
  torch.save({"w": torch.ones(2), "x": evil}, tmp_path / "evil.pt")
  for path in (tmp_path / "pytorch_model.bin", tmp_path / "evil.pt"):
    with pytest.raises(WeightFileError, match=rf"{path.name}.*refused"):
      io.read_state_dict(path)
  assert not marker.exists()


def test_truncated_and_corrupt_safetensors(tmp_path):
  io.write_safetensors(_state(), tmp_path / "model.safetensors")
  raw = (tmp_path / "model.safetensors").read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(raw[:-7])
  with pytest.raises(WeightFileError, match=r"cut\.safetensors.*truncated"):
    io.read_state_dict(tmp_path / "cut.safetensors")
  (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}")
  with pytest.raises(WeightFileError, match=r"junk\.safetensors.*corrupt"):
    io.read_state_dict(tmp_path / "junk.safetensors")
  (tmp_path / "tiny.safetensors").write_bytes(b"abc")
  with pytest.raises(WeightFileError, match=r"tiny\.safetensors"):
    io.read_state_dict(tmp_path / "tiny.safetensors")
  (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 10 ** 12) + b"{}")
  with pytest.raises(WeightFileError, match=r"huge\.safetensors.*header length"):
    io.read_state_dict(tmp_path / "huge.safetensors")
  (tmp_path / "cut.bin").write_bytes(b"PK\x03\x04garbage")
  with pytest.raises(WeightFileError, match=r"cut\.bin"):
    io.read_state_dict(tmp_path / "cut.bin")


def test_missing_weights_and_shards(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    io.read_state_dict(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(WeightFileError, match="no weights found"):
    io.read_state_dict(tmp_path / "empty")
  d = tmp_path / "broken"
  d.mkdir()
  (d / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
  with pytest.raises(WeightFileError, match="model-00001-of-00002.safetensors"):
    io.read_state_dict(d)


def test_state_dict_reader_accounting():
  state = {"a": np.zeros((2, 3)), "b": np.zeros(4), "c": np.zeros(1),
           "Qformer.cls.predictions.bias": np.zeros(7)}
  r = StateDictReader(state, source="ckpt.pth", ignore=[r"^Qformer\.cls\."])
  assert r.take("a", (2, 3)).shape == (2, 3)
  assert r.take("b", (5,)).shape == (5,)  # recorded as mismatch, placeholder returned
  assert r.take("zzz", (1,)).shape == (1,)  # recorded as missing
  with pytest.raises(KeyAccountingError) as e:
    r.finish()
  msg = str(e.value)
  assert "ckpt.pth" in msg and "missing key(s): zzz" in msg
  assert "unexpected key(s) (not used by any parameter): c" in msg
  assert "b has shape (4,), expected (5,)" in msg
  assert "Qformer.cls" not in msg and r.ignored == ["Qformer.cls.predictions.bias"]
  with pytest.raises(ValueError, match="taken twice"):
    r.take("a")
  ok = StateDictReader({"a": np.ones(2)})
  ok.take("a", (2,))
  ok.finish()


# ---------------------------------------------------------------------------- model dirs

def _params():
  return {"enc": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)},
          "temp": np.asarray(0.07, np.float32)}


def test_model_dir_round_trip(tmp_path):
  dst = tmp_path / "m"
  io.save_model_dir(dst, _params(), {"hidden": 3}, "blip2")
  assert io.is_cirjax_dir(dst) and not io.is_cirjax_dir(tmp_path)
  model_type, config, params = io.load_model_dir(dst)
  assert model_type == "blip2" and config == {"hidden": 3}
  np.testing.assert_array_equal(params["enc"]["kernel"], _params()["enc"]["kernel"])
  assert float(params["temp"]) == pytest.approx(0.07)
  assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dirs left behind


def test_model_dir_restore_into_sharded_target(tmp_path):
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  dst = tmp_path / "m"
  params = {"w": np.arange(32, dtype=np.float32).reshape(4, 8)}
  io.save_model_dir(dst, params, {}, "blip2")
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices())
  target = {"w": jax.ShapeDtypeStruct((4, 8), np.float32,
                                      sharding=NamedSharding(mesh, P("data")))}
  _, _, back = io.load_model_dir(dst, target=target)
  assert back["w"].sharding.spec == P("data")
  np.testing.assert_array_equal(np.asarray(back["w"]), params["w"])


def test_model_dir_refuses_overwrite_and_survives_failure(tmp_path):
  dst = tmp_path / "m"
  io.save_model_dir(dst, _params(), {"v": 1}, "blip2")
  with pytest.raises(FileExistsError, match="overwrite"):
    io.save_model_dir(dst, _params(), {"v": 2}, "blip2")
  # a config that cannot be serialised fails before anything is written
  with pytest.raises(TypeError):
    io.save_model_dir(dst, _params(), {"v": object()}, "blip2", overwrite=True)

  # a failure mid-write leaves the old directory intact and no temp dirs
  class Boom(Exception):
    pass

  orig = io.write_params

  def failing(directory, params):
    orig(directory, params)
    raise Boom("disk full")

  io.write_params = failing
  try:
    with pytest.raises(Boom):
      io.save_model_dir(dst, _params(), {"v": 3}, "blip2", overwrite=True)
  finally:
    io.write_params = orig
  assert io.load_model_dir(dst)[1] == {"v": 1}
  assert [p.name for p in tmp_path.iterdir()] == ["m"]
  io.save_model_dir(dst, _params(), {"v": 4}, "blip2", overwrite=True)
  assert io.load_model_dir(dst)[1] == {"v": 4}
  assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_load_model_dir_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="cirjax_config.json"):
    io.load_model_dir(tmp_path)
  (tmp_path / "cirjax_config.json").write_text("{oops")
  with pytest.raises(ValueError, match="cirjax_config.json.*JSON"):
    io.load_model_dir(tmp_path)
  (tmp_path / "cirjax_config.json").write_text(json.dumps({"model_type": "blip2"}))
  with pytest.raises(ValueError, match="'config'"):
    io.load_model_dir(tmp_path)


# ------------------------------------------------------------------------ BLIP-2 conversion

def _hf_state_and_config():
  from tests.blip2_fixtures import hf_retrieval_model
  m = hf_retrieval_model(seed=21)
  return m, {k: v.numpy() for k, v in m.state_dict().items()}, m.config.to_dict()


def test_blip2_hf_key_accounting_names_every_problem():
  from cirjax.convert import blip2_convert
  _, state, hf = _hf_state_and_config()
  cfg = blip2_convert.config_from_hf(hf)
  bad = dict(state)
  del bad["qformer.encoder.layer.1.output_query.dense.bias"]
  bad["qformer.encoder.layer.0.extra.weight"] = np.zeros(3, np.float32)
  bad["text_projection.weight"] = np.zeros((5, 32), np.float32)
  with pytest.raises(KeyAccountingError) as e:
    blip2_convert.params_from_hf_state(bad, cfg, source="ckpt-dir")
  msg = str(e.value)
  assert "ckpt-dir" in msg
  assert "missing key(s): qformer.encoder.layer.1.output_query.dense.bias" in msg
  assert "qformer.encoder.layer.0.extra.weight" in msg
  assert "text_projection.weight has shape (5, 32), expected (16, 32)" in msg


def test_blip2_hf_export_is_exact_inverse():
  from cirjax.convert import blip2_convert
  _, state, hf = _hf_state_and_config()
  cfg = blip2_convert.config_from_hf(hf)
  back = blip2_convert.params_to_hf_state(blip2_convert.params_from_hf_state(state, cfg), cfg)
  assert set(back) == set(state)
  for k, v in state.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_blip2_text_input_flag_spellings(tmp_path, capsys):
  from cirjax.convert import blip2_convert
  m, _, hf = _hf_state_and_config()
  q = dict(hf["qformer_config"])
  q.pop("use_qformer_text_input")
  old = {**hf, "qformer_config": {**q, "qformer_text_input": True}}
  assert blip2_convert.config_from_hf(old).qformer.use_text_input
  off = {**hf, "qformer_config": {**q, "qformer_text_input": False}}
  assert not blip2_convert.config_from_hf(off).qformer.use_text_input
  clash = {**hf, "qformer_config": {**q, "qformer_text_input": False,
                                    "use_qformer_text_input": True}}
  with pytest.raises(blip2_convert.ConfigError, match="qformer_text_input"):
    blip2_convert.config_from_hf(clash)
  # a hub config with only the old spelling (which transformers 5 ignores) still converts
  # with the text FFNs, in .bin form, sharded
  d = tmp_path / "old"
  m.save_pretrained(d, safe_serialization=True, max_shard_size="20KB")
  assert (d / "model.safetensors.index.json").exists()
  (d / "config.json").write_text(json.dumps(old))
  cfg, params = blip2_convert.from_hf(d)
  assert cfg.qformer.use_text_input and "ffn" in params["qformer"]["layer_0"]
  bind = tmp_path / "bin"
  bind.mkdir()
  torch.save(m.state_dict(), bind / "pytorch_model.bin")
  (bind / "config.json").write_text(json.dumps(off))  # misstated: the tensors win, with a note
  cfg2, _ = blip2_convert.from_hf(bind)
  assert cfg2.qformer.use_text_input
  assert "using use_qformer_text_input=True" in capsys.readouterr().err


def test_blip2_config_errors(tmp_path):
  from cirjax.convert import blip2_convert
  _, _, hf = _hf_state_and_config()
  with pytest.raises(blip2_convert.ConfigError, match="model_type is 'llava'"):
    blip2_convert.config_from_hf({**hf, "model_type": "llava"})
  with pytest.raises(blip2_convert.ConfigError, match="missing 'qformer_config'"):
    blip2_convert.config_from_hf({k: v for k, v in hf.items() if k != "qformer_config"})
  with pytest.raises(FileNotFoundError, match="no config.json"):
    blip2_convert.from_hf(tmp_path)
  (tmp_path / "config.json").write_text("{nope")
  with pytest.raises(blip2_convert.ConfigError, match="config.json: not valid JSON"):
    blip2_convert.from_hf(tmp_path)


def test_lavis_key_accounting_and_lm_head_skip(capsys):
  from cirjax.convert import blip2_convert
  from tests.blip2_fixtures import lavis_model
  state, _ = lavis_model("eva", qformer_kw={"freq": 1})
  kw = dict(vision_heads=4, qformer_heads=4)
  cfg = blip2_convert.config_from_lavis(state, **kw)
  assert (cfg.vision.variant, cfg.vision.num_layers, cfg.qformer.cross_attention_frequency,
          cfg.num_query_tokens, cfg.embed_dim) == ("eva", 2, 1, 8, 16)
  params = blip2_convert.params_from_lavis_state(state, cfg)
  assert "skipped 3 tensor(s)" in capsys.readouterr().err  # Qformer.cls.* only
  np.testing.assert_array_equal(
      params["vision"]["layers_0"]["self_attn"]["qkv"]["bias"][32:64], 0)
  bad = dict(state)
  del bad["visual_encoder.blocks.1.attn.v_bias"]
  bad["visual_encoder.blocks.0.attn.relative_position_bias_table"] = np.zeros(4, np.float32)
  bad["ln_vision.bias"] = np.zeros(7, np.float32)
  with pytest.raises(KeyAccountingError) as e:
    blip2_convert.params_from_lavis_state(bad, cfg, source="model.pth")
  msg = str(e.value)
  assert "visual_encoder.blocks.1.attn.v_bias" in msg
  assert "relative_position_bias_table" in msg
  assert "ln_vision.bias has shape (7,), expected (32,)" in msg
  assert "Qformer.cls" not in msg
  shifted = {**state, "Qformer.bert.embeddings.position_ids": np.arange(1, 41)[None]}
  with pytest.raises(blip2_convert.ConfigError, match="position_ids"):
    blip2_convert.params_from_lavis_state(shifted, cfg)
  with pytest.raises(blip2_convert.ConfigError, match="not a LAVIS BLIP-2 state dict"):
    blip2_convert.config_from_lavis({"a.weight": np.zeros(2)})


def test_lavis_depth_read_from_checkpoint():
  # LAVIS versions kept 21, 22 or 23 CLIP-L blocks: the count comes from the keys
  from cirjax.convert import blip2_convert
  from tests.blip2_fixtures import lavis_model
  state, _ = lavis_model("clip", vision_kw={"layers": 3})
  assert blip2_convert.config_from_lavis(state, vision_heads=4,
                                         qformer_heads=4).vision.num_layers == 3
  gap = {k: v for k, v in state.items() if ".resblocks.1." not in k}
  with pytest.raises(blip2_convert.ConfigError, match="not contiguous"):
    blip2_convert.config_from_lavis(gap, vision_heads=4, qformer_heads=4)
