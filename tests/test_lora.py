"""LoRA: target selection, PEFT-identical forward (merged and unmerged), PEFT format both ways,
an adapter trained a few steps in cirjax giving the same embeddings in PyTorch + PEFT."""

import copy
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import torch.nn.functional as F

from cirjax import lora
from cirjax.convert import llava_convert
from cirjax.models import llava
from tests import llava_fixtures as fx

_embed = jax.jit(llava.embed, static_argnames=("config", "deterministic"))


@functools.lru_cache(maxsize=None)
def _setup(text="phi3", seed=0):
  """One model per layout for the whole module (shared so jitted calls hit the cache); callers
  must not mutate what it returns (PEFT wraps a deep copy)."""
  tc = fx.phi3_config(num_key_value_heads=2) if text == "phi3" else fx.llama_config()
  model = fx.llava_model(tc, seed=seed)
  config = llava_convert.llava_config_from_hf(model.config.to_dict())
  params = llava_convert.convert_state_dict(fx.state_numpy(model), config)
  ids, mask = fx.left_padded_ids([10, 7, 6], 10, tc.vocab_size, image_tokens=4, seed=seed)
  pix_t, pix_np = fx.pixels(3, 28, seed=seed)
  return model, config, params, (ids, mask, pix_t, pix_np)


def _hf_embed(model, ids, mask, pix_t):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                pixel_values=pix_t, output_hidden_states=True)
  return F.normalize(out.hidden_states[-1][:, -1], dim=-1).numpy()


def _jax_embed(params, config, inputs, adapter=None):
  ids, mask, _, pix = inputs
  return np.asarray(_embed(params, config, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pix),
                           lora=adapter))


def test_default_targets_both_layouts():
  for text, names in (("phi3", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
                      ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"})):
    _, config, params, _ = _setup(text)
    paths = lora.target_paths(params, lora.DEFAULT_TARGET_MODULES)
    assert {p[-1] for p in paths} == names
    assert all(p[0] == "language_model" for p in paths)
    assert len(paths) == len(names) * config.text.num_layers


def test_target_forms_and_errors():
  _, _, params, _ = _setup("llama")
  # PEFT list semantics: suffix match; the CLIP q_proj is never a candidate.
  assert {p[-1] for p in lora.target_paths(params, ["q_proj", "v_proj"])} == {"q_proj", "v_proj"}
  assert lora.target_paths(params, ["linear_1"]) == [("multi_modal_projector", "linear_1")]
  # regex on the HF name, the 4.x name or the cirjax path
  assert lora.target_paths(params, r"model\.language_model\.layers\.1\.mlp\.down_proj") == [
      ("language_model", "layers_1", "mlp", "down_proj")]
  assert len(lora.target_paths(params, r"language_model/layers_0/self_attn/.*")) == 4
  with pytest.raises(lora.LoraError, match="matches no linear layer"):
    lora.init_lora(params, lora.LoraConfig(rank=2, target_modules=r".*qkv_proj"))
  with pytest.raises(lora.LoraError, match="matches no linear layer"):
    lora.init_lora(params, lora.LoraConfig(rank=2, target_modules=r".*vision_tower.*"))
  with pytest.raises(lora.LoraError, match="not a valid regex"):
    lora.LoraConfig(target_modules="(")


def test_init_like_peft_and_identity_at_start():
  _, config, params, inputs = _setup("phi3")
  cfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0)
  ad = lora.init_lora(params, cfg, jax.random.PRNGKey(1))
  assert cfg.scale == 2.0
  a = np.asarray(ad.params["language_model"]["layers_0"]["self_attn"]["qkv_proj"]["lora_a"])
  assert a.shape == (32, 4) and np.abs(a).max() <= 1 / np.sqrt(32) and a.std() > 0
  assert all(not np.any(np.asarray(l["lora_b"])) for l in
             [ad.params["language_model"][f"layers_{i}"]["mlp"]["down_proj"] for i in range(2)])
  np.testing.assert_array_equal(_jax_embed(params, config, inputs, ad),
                                _jax_embed(params, config, inputs))
  assert lora.LoraConfig(rank=16, alpha=16, use_rslora=True).scale == 4.0


@pytest.mark.parametrize("text", ["phi3", "llama"])
def test_export_to_peft_matches_unmerged_and_merged(text, tmp_path):
  model, config, params, inputs = _setup(text)
  ids, mask, pix_t, _ = inputs
  cfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0, init="random")
  ad = lora.init_lora(params, cfg, jax.random.PRNGKey(2))
  got = _jax_embed(params, config, inputs, ad)
  base = _jax_embed(params, config, inputs)
  assert fx.rel_err(got, base) > 1e-2  # the adapter really changes the embedding
  lora.save_peft(ad, tmp_path / "adapter")
  saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert saved["r"] == 4 and saved["lora_alpha"] == 8.0
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "adapter")).eval()
  n_lora = sum(1 for n, _ in pm.named_modules() if n.endswith("lora_A"))
  assert n_lora == len(ad.modules)  # PEFT adapted exactly the same layers
  fx.assert_close(got, _hf_embed(pm, ids, mask, pix_t), fx.TOL_MODEL, "unmerged vs PEFT")
  merged_hf = _hf_embed(pm.merge_and_unload(), ids, mask, pix_t)
  merged = lora.merge(params, ad)
  fx.assert_close(_jax_embed(merged, config, inputs), merged_hf, fx.TOL_MODEL, "merged vs PEFT")
  fx.assert_close(_jax_embed(merged, config, inputs), got, fx.TOL_MODEL, "merged vs unmerged")


def test_import_peft_adapter(tmp_path):
  model, config, params, inputs = _setup("phi3")
  ids, mask, pix_t, _ = inputs
  pcfg = peft.LoraConfig(r=3, lora_alpha=6, lora_dropout=0.0, init_lora_weights=False,
                         target_modules=["qkv_proj", "down_proj", "linear_2"])
  torch.manual_seed(3)
  pm = peft.get_peft_model(copy.deepcopy(model), pcfg).eval()
  pm.save_pretrained(str(tmp_path / "peft"))
  ad = lora.load_peft(tmp_path / "peft", params)
  assert ad.config.rank == 3 and ad.config.scale == 2.0
  assert {p[-1] for p in ad.modules} == {"qkv_proj", "down_proj", "linear_2"}
  fx.assert_close(_jax_embed(params, config, inputs, ad), _hf_embed(pm, ids, mask, pix_t),
                  fx.TOL_MODEL, "PEFT adapter loaded into cirjax")


@pytest.mark.slow  # default-suite budget: CI runs it with -m slow
def test_trained_adapter_exports_to_peft(tmp_path):
  """A few AdamW steps on an InfoNCE loss in cirjax; PyTorch+PEFT then gives the same
  embeddings. Only the adapter is optimised: the base params come out untouched."""
  model, config, params, inputs = _setup("phi3")
  ids, mask, pix_t, pix = inputs
  text_ids, text_mask = fx.left_padded_ids([9, 6, 8], 9, config.text.vocab_size, seed=9)
  ad = lora.init_lora(params, lora.LoraConfig(rank=4, alpha=16.0, dropout=0.05),
                      jax.random.PRNGKey(0))
  tx = optax.adamw(1e-2, weight_decay=0.0)
  opt = tx.init(ad.params)

  def loss_fn(ap, rng, base, batch):
    a = ad.replace_params(ap)
    r1, r2 = jax.random.split(rng)
    q = llava.embed(base, config, batch[0], batch[1], batch[2], lora=a, rng=r1,
                    deterministic=False)
    t = llava.embed(base, config, batch[3], batch[4], None, lora=a, rng=r2, deterministic=False)
    logits = q @ t.T / 0.05
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(3)).mean()

  @jax.jit
  def step(ap, opt, rng, base, batch):
    loss, g = jax.value_and_grad(loss_fn)(ap, rng, base, batch)
    upd, opt = tx.update(g, opt, ap)
    return optax.apply_updates(ap, upd), opt, loss

  batch = tuple(jnp.asarray(x) for x in (ids, mask, pix, text_ids, text_mask))
  ap, losses = ad.params, []
  for i in range(4):
    ap, opt, loss = step(ap, opt, jax.random.PRNGKey(i), params, batch)
    losses.append(float(loss))
  assert losses[-1] < losses[0], losses
  trained = ad.replace_params(ap)
  assert all(np.any(np.asarray(_l["lora_b"])) for _l in
             [ap["language_model"]["layers_0"]["self_attn"]["qkv_proj"]])
  lora.save_peft(trained, tmp_path / "trained")
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "trained")).eval()
  fx.assert_close(_jax_embed(params, config, inputs, trained), _hf_embed(pm, ids, mask, pix_t),
                  fx.TOL_MODEL, "trained adapter in PEFT")
  again = lora.load_peft(tmp_path / "trained", params)
  for x, y in zip(jax.tree.leaves(again.params), jax.tree.leaves(trained.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_dropout_only_in_training():
  _, config, params, inputs = _setup("phi3")
  ids, mask, _, pix = inputs
  ad = lora.init_lora(params, lora.LoraConfig(rank=4, dropout=0.5, init="random"))
  det = llava.embed(params, config, ids, mask, pix, lora=ad)
  drop = llava.embed(params, config, ids, mask, pix, lora=ad, rng=jax.random.PRNGKey(0),
                     deterministic=False)
  assert fx.rel_err(drop, det) > 1e-3
  with pytest.raises(ValueError, match="needs rng="):
    llava.embed(params, config, ids, mask, pix, lora=ad, deterministic=False)


def test_trainable_mask_and_shapes_errors(tmp_path):
  _, config, params, _ = _setup("phi3")
  ad = lora.init_lora(params, lora.LoraConfig(rank=4))
  mask = lora.trainable_mask({"params": params, "lora": ad.params})
  assert not any(jax.tree.leaves(mask["params"]))
  assert all(jax.tree.leaves(mask["lora"]))
  # one combined tree: freeze_base leaves the base untouched
  tx = lora.freeze_base(optax.sgd(1.0), {"params": params, "lora": ad.params})
  tree = {"params": params, "lora": ad.params}
  upd, _ = tx.update(jax.tree.map(jnp.ones_like, tree), tx.init(tree), tree)
  new = optax.apply_updates(tree, upd)
  np.testing.assert_array_equal(new["params"]["language_model"]["norm"]["weight"],
                                params["language_model"]["norm"]["weight"])
  np.testing.assert_allclose(new["lora"]["language_model"]["layers_0"]["mlp"]["down_proj"]
                             ["lora_b"], -1.0)
  # adapter from a wider base
  lora.save_peft(ad, tmp_path / "a")
  other_tc = fx.phi3_config(hidden_size=48, num_key_value_heads=2)
  other = fx.llava_model(other_tc)
  ocfg = llava_convert.llava_config_from_hf(other.config.to_dict())
  oparams = llava_convert.convert_state_dict(fx.state_numpy(other), ocfg)
  with pytest.raises(lora.LoraError, match="do not fit the base kernel"):
    lora.load_peft(tmp_path / "a", oparams)
  cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
  (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(cfg, use_dora=True)))
  with pytest.raises(lora.LoraError, match="use_dora=True is not supported"):
    lora.load_peft(tmp_path / "a")


def test_hf4_names():
  _, _, params, _ = _setup("phi3")
  ad = lora.init_lora(params, lora.LoraConfig(rank=2))
  keys = lora.peft_state_dict(ad, "hf4")
  assert "base_model.model.language_model.model.layers.0.self_attn.qkv_proj.lora_A.weight" in keys
  regex = lora._module_regex(ad.modules, "hf5")  # pylint: disable=protected-access
  assert re.fullmatch(regex, "model.language_model.layers.1.mlp.gate_up_proj")
  assert not re.fullmatch(regex, "model.language_model.layers.1.mlp")

