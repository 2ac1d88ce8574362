"""`cirjax convert` and `cirjax parity` end to end on random checkpoints saved like real ones."""

import json

import jax
import numpy as np
import pytest
import torch

from cirjax import cli
from cirjax.convert import io
from tests.blip2_fixtures import hf_retrieval_model, lavis_model, save_runner_checkpoint


@pytest.fixture(scope="module")
def hf_model():
  return hf_retrieval_model(seed=11)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hf_model):
  d = tmp_path_factory.mktemp("hf") / "blip2"
  hf_model.save_pretrained(d)
  (d / "vocab.txt").write_text("[PAD]\n[CLS]\n")
  return d


@pytest.fixture(scope="module")
def converted(tmp_path_factory, hf_dir):
  dst = tmp_path_factory.mktemp("cj") / "blip2"
  assert cli.main(["convert", str(hf_dir), str(dst)]) == 0
  return dst


def test_help(capsys):
  for cmd in ("convert", "parity"):
    with pytest.raises(SystemExit) as e:
      cli.main([cmd, "--help"])
    assert e.value.code == 0
    assert "Examples:" in capsys.readouterr().out


def test_convert_writes_cirjax_dir(converted):
  meta = json.loads((converted / "cirjax_config.json").read_text())
  assert meta["model_type"] == "blip2" and meta["source_format"] == "hf"
  assert (converted / "vocab.txt").read_text().startswith("[PAD]")


def test_parity_passes_then_fails_on_one_perturbed_tensor(hf_dir, converted, tmp_path, capsys):
  out = tmp_path / "rows.json"
  assert cli.main(["parity", str(hf_dir), "--converted", str(converted), "--json",
                   str(out)]) == 0
  text = capsys.readouterr().out
  assert "composed query" in text and "PASS: 7/7" in text
  rows = json.loads(out.read_text())
  assert all(r["ok"] and r["max_rel_err"] <= 1e-4 for r in rows)
  # one tensor of the conversion perturbed -> non-zero exit
  model_type, config, params = io.load_model_dir(converted)
  params = {k: v for k, v in params.items()}
  w = np.array(params["qformer"]["layer_1"]["ffn_query"]["output"]["kernel"])
  w[0, 0] += 0.5
  params["qformer"]["layer_1"]["ffn_query"]["output"]["kernel"] = w
  bad = tmp_path / "bad"
  io.save_model_dir(bad, params, config, model_type)
  assert cli.main(["parity", str(hf_dir), "--converted", str(bad)]) == 1
  text = capsys.readouterr().out
  assert "FAIL" in text and "NO" in text


def test_round_trip_to_hf_from_pretrained(hf_model, converted, tmp_path):
  import transformers
  dst = tmp_path / "hf2"
  assert cli.main(["convert", str(converted), str(dst)]) == 0
  back = transformers.Blip2ForImageTextRetrieval.from_pretrained(dst)
  want = hf_model.state_dict()
  got = back.state_dict()
  assert set(got) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k].numpy(), v.numpy(), err_msg=k)
  assert json.loads((dst / "config.json").read_text())["cirjax_temp"] == pytest.approx(0.07)
  assert (dst / "vocab.txt").is_file()


def test_lavis_convert_and_parity(tmp_path, capsys):
  state, _ = lavis_model("clip")
  path = tmp_path / "model.pth"
  torch.save({"model": {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}}, path)
  dst = tmp_path / "cj"
  assert cli.main(["convert", str(path), str(dst)]) == 1  # 32-wide: heads not inferable
  assert "--vision-heads" in capsys.readouterr().err and not dst.exists()
  assert cli.main(["convert", str(path), str(dst), "--vision-heads", "4",
                   "--qformer-heads", "4"]) == 0
  meta = json.loads((dst / "cirjax_config.json").read_text())
  assert meta["config"]["vision"]["variant"] == "clip"
  assert meta["source_format"] == "lavis"
  # a CLIP-tower BLIP-2 has no HF class to export to: a clear refusal, nothing written
  assert cli.main(["convert", str(dst), str(tmp_path / "hf")]) == 1
  assert "EVA vision tower" in capsys.readouterr().err and not (tmp_path / "hf").exists()
  # parity against the torch reference built from the LAVIS keys
  from cirjax.convert import blip2_parity
  rows = blip2_parity.run_parity(path, converted=dst)
  assert all(r.ok for r in rows), blip2_parity.format_table(rows)


def test_lavis_runner_checkpoint_with_base_converts_like_the_full_state_dict(tmp_path, capsys):
  """A runner checkpoint (trained tensors only) + --base (the pretrained state dict: every
  tensor, the trained ones at their values before training) gives exactly the conversion of
  the full trained state dict, and parity with the PyTorch reference of it."""
  state, _ = lavis_model("clip")
  heads = ["--vision-heads", "4", "--qformer-heads", "4"]
  full = tmp_path / "full.pth"
  torch.save({"model": {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}}, full)
  runner = tmp_path / "checkpoint_best.pth"
  trained = save_runner_checkpoint(runner, state)
  assert trained and not any(k.startswith("visual_encoder.") for k in trained)
  rng = np.random.default_rng(7)  # the base: the trained tensors before training
  base_state = {k: np.asarray(np.asarray(v) + rng.standard_normal(np.shape(v)).astype(
      np.asarray(v).dtype) if k in trained and np.issubdtype(np.asarray(v).dtype, np.floating)
      else v) for k, v in state.items()}
  base = tmp_path / "blip2_pretrained.pth"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in base_state.items()}}, base)
  # without --base: the missing groups and what to pass; nothing written
  dst = tmp_path / "cj_runner"
  assert cli.main(["convert", str(runner), str(dst)] + heads) == 1
  err = capsys.readouterr().err
  assert "visual_encoder.* (the ViT)" in err and "--base PRETRAINED.pth" in err
  assert "ln_vision.*" not in err and not dst.exists()  # trained: in the checkpoint
  assert cli.main(["convert", str(runner), str(dst), "--base", str(base)] + heads) == 0
  assert "taken from --base" in capsys.readouterr().err
  assert cli.main(["convert", str(full), str(tmp_path / "cj_full")] + heads) == 0
  got, want = io.load_model_dir(dst)[2], io.load_model_dir(tmp_path / "cj_full")[2]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got),
               jax.tree.map(np.asarray, want))
  assert json.loads((dst / "cirjax_config.json").read_text())["base"] == str(base)
  from cirjax.convert import blip2_parity
  rows = blip2_parity.run_parity(full, converted=dst)
  assert all(r.ok for r in rows), blip2_parity.format_table(rows)


def test_convert_errors_leave_nothing_behind(hf_dir, converted, tmp_path, capsys):
  # existing destination: refused, untouched
  before = (converted / "cirjax_config.json").read_text()
  assert cli.main(["convert", str(hf_dir), str(converted)]) == 1
  assert "already exists" in capsys.readouterr().err
  assert (converted / "cirjax_config.json").read_text() == before
  # corrupt weights: an error naming the file, no output, no temp dirs
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "config.json").write_text((hf_dir / "config.json").read_text())
  raw = (hf_dir / "model.safetensors").read_bytes()
  (broken / "model.safetensors").write_bytes(raw[: len(raw) // 2])
  out = tmp_path / "out"
  assert cli.main(["convert", str(broken), str(out)]) == 1
  err = capsys.readouterr().err
  assert "model.safetensors" in err and "truncated" in err
  assert not out.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]
  # missing config.json / unknown model type
  (tmp_path / "empty").mkdir()
  assert cli.main(["convert", str(tmp_path / "empty"), str(out)]) == 1
  assert "config.json" in capsys.readouterr().err
  (broken / "config.json").write_text(json.dumps({"model_type": "bert"}))
  assert cli.main(["convert", str(broken), str(out)]) == 1
  assert "unknown model_type 'bert'" in capsys.readouterr().err
  assert cli.main(["parity", str(broken)]) == 2
  assert "unknown model_type 'bert'" in capsys.readouterr().err
  assert cli.main(["parity", str(converted)]) == 2
  assert "--converted" in capsys.readouterr().err
  # a config.json that is not a JSON object; a text file named like a LAVIS checkpoint
  (broken / "config.json").write_text("[1, 2]")
  assert cli.main(["convert", str(broken), str(out)]) == 1
  err = capsys.readouterr().err
  assert "config.json" in err and "JSON object, got a list" in err and "Traceback" not in err
  (tmp_path / "x.pth").write_text("hello\n")
  assert cli.main(["convert", str(tmp_path / "x.pth"), str(out)]) == 1
  err = capsys.readouterr().err
  assert "x.pth" in err and "corrupt or truncated PyTorch file" in err
  assert not out.exists()


def test_llava_dispatch(tmp_path, capsys):
  import importlib.util
  import transformers
  from tests.llava_fixtures import llava_model, phi3_config
  m = llava_model(phi3_config(), seed=4)
  src = tmp_path / "llava"
  m.save_pretrained(src)
  dst = tmp_path / "cj"
  assert cli.main(["convert", str(src), str(dst)]) == 0
  assert json.loads((dst / "cirjax_config.json").read_text())["model_type"] == "llava"
  back_dir = tmp_path / "hf"
  assert cli.main(["convert", str(dst), str(back_dir)]) == 0
  back = transformers.LlavaForConditionalGeneration.from_pretrained(back_dir)
  want = m.state_dict()
  got = back.state_dict()
  assert len([k for k in want if k in got]) >= len(want) - 1  # all but perhaps lm_head
  for k, v in got.items():
    if k in want and "lm_head" not in k:
      np.testing.assert_array_equal(v.numpy(), want[k].numpy(), err_msg=k)
  if importlib.util.find_spec("cirjax.convert.llava_parity") is None:
    assert cli.main(["parity", str(src)]) == 2
    assert "llava_parity" in capsys.readouterr().err
