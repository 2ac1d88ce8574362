"""`scan_layers`: scanned and looped layers give the same outputs (fp32, layer tolerance), the
stacked and per-layer layouts convert exactly, and HF -> cirjax (stacked) -> HF is identical."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cirjax.convert import io, registry
from cirjax.convert import blip2_convert, llava_convert
from cirjax.models import blip2, layer_stack, llava
from cirjax.models import qformer as qf
from cirjax.models import vit
from tests.blip2_fixtures import TOL_LAYER, assert_close


def _same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# clip runs with -m slow (default-suite budget; CI runs both)
@pytest.mark.parametrize("variant", ["eva", pytest.param("clip", marks=pytest.mark.slow)])
def test_vit_scan_matches_loop(variant):
  cfg = vit.ViTConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                      num_layers=3, num_heads=4, variant=variant)
  params = vit.init_vit_params(cfg)
  stacked = layer_stack.stack(params, vit.layer_stacks(cfg))
  assert stacked["layers"]["fc1"]["kernel"].shape == (3, 32, 64) and "layers_0" not in stacked
  _same_tree(layer_stack.unstack(stacked, vit.layer_stacks(cfg)), params)
  init = vit.VisionTransformer(cfg, scan_layers=True).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 3)))["params"]
  assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, stacked)
  px = jax.random.normal(jax.random.PRNGKey(1), (2, 28, 28, 3))
  for n, remat in ((3, False), (2, True)):  # LLaVA reads a shallower layer
    want = vit.VisionTransformer(cfg).apply({"params": params}, px, output_hidden_states=True,
                                            num_layers=n)
    got = vit.VisionTransformer(cfg, remat=remat, scan_layers=True).apply(
        {"params": stacked}, px, output_hidden_states=True, num_layers=n)
    assert len(got.hidden_states) == n + 1
    for g, w in zip(got.hidden_states, want.hidden_states):
      assert_close(g, w, TOL_LAYER, f"{variant} hidden state")
    assert_close(got.pooled, want.pooled, TOL_LAYER, f"{variant} pooled")


def _qformer_inputs(num_layers: int):
  """(config, hidden states, mask with padding, encoder states, params) of a tiny Q-Former."""
  cfg = qf.QFormerConfig(hidden_size=32, num_layers=num_layers, num_heads=4,
                         intermediate_size=64, encoder_hidden_size=24, vocab_size=50)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 32))
  enc = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 24))
  mask = jnp.array([[1] * 7, [1] * 5 + [0] * 2])
  params = qf.QFormer(cfg).init(jax.random.PRNGKey(0), x, mask, enc, 3)["params"]
  return cfg, x, mask, enc, params


def test_qformer_scan_matches_loop():
  cfg, x, mask, enc, params = _qformer_inputs(4)
  stacked = layer_stack.stack(params, qf.layer_stacks(cfg))
  # two scan steps of (cross-attending layer, self-only layer)
  groups = stacked["layer_groups"]
  assert "crossattention" in groups["layer_0"] and "crossattention" not in groups["layer_1"]
  assert groups["layer_0"]["ffn"]["output"]["kernel"].shape == (2, 64, 32)
  _same_tree(layer_stack.unstack(stacked, qf.layer_stacks(cfg)), params)
  # text only, queries + text (rematerialised), queries only
  for query_length, remat in ((0, False), (3, True), (7, False)):
    want = qf.QFormer(cfg).apply({"params": params}, x, mask, enc, query_length)
    got = qf.QFormer(cfg, remat=remat, scan_layers=True).apply(
        {"params": stacked}, x, mask, enc, query_length)
    assert_close(got, want, TOL_LAYER, f"Q-Former, {query_length} queries")
  with pytest.raises(ValueError, match="multiple of cross_attention_frequency"):
    blip2.tiny_config(num_layers=3, scan_layers=True)


def test_qformer_groups_of_one_layer_stack_like_the_scan():
  """cross_attention_frequency=1 (every layer cross-attends): a scan step is a group module
  holding one layer, `layer_groups/layer_0`, which the stacked layout must name too."""
  cfg = qf.QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                         encoder_hidden_size=24, vocab_size=50, cross_attention_frequency=1)
  x = jnp.zeros((1, 3, 32))
  enc = jnp.zeros((1, 5, 24))
  args = (x, None, enc, 3)
  params = jax.eval_shape(lambda: qf.QFormer(cfg).init(jax.random.PRNGKey(0), *args)["params"])
  scanned = jax.eval_shape(lambda: qf.QFormer(cfg, scan_layers=True).init(
      jax.random.PRNGKey(0), *args)["params"])
  stacked = layer_stack.stack(params, qf.layer_stacks(cfg))
  assert jax.tree.map(lambda a: a.shape, stacked) == jax.tree.map(lambda a: a.shape, scanned)
  _same_tree(jax.tree.map(lambda a: a.shape, layer_stack.unstack(stacked, qf.layer_stacks(cfg))),
             jax.tree.map(lambda a: a.shape, params))


def _blip2_case():
  cfg = blip2.tiny_config(num_layers=2)
  params = blip2.init_blip2(jax.random.PRNGKey(0), cfg)
  scfg = cfg.replace(scan_layers=True)
  px = jax.random.normal(jax.random.PRNGKey(1), (2, 28, 28, 3))
  ids = jnp.array([[1, 5, 7, 0], [1, 9, 0, 0]])
  return cfg, scfg, params, blip2.stack_layers(params, scfg), px, ids, (ids > 0).astype(jnp.int32)


def test_blip2_scan_either_layout():
  cfg, scfg, params, stacked, px, ids, mask = _blip2_case()
  assert "layers" in stacked["vision"] and "layer_groups" in stacked["qformer"]
  want = blip2.compose(params, cfg, px, ids, mask)
  for p, c in ((stacked, scfg), (params, scfg)):  # stacked, and per-layer stacked in-program
    assert_close(blip2.compose(p, c, px, ids, mask), want, TOL_LAYER, "BLIP-2 composed query")


@pytest.mark.slow
def test_blip2_scan_grads_match_loop():
  cfg, scfg, params, stacked, px, ids, mask = _blip2_case()
  assert_close(blip2.compose(stacked, cfg, px, ids, mask),  # a looped config unstacks
               blip2.compose(params, cfg, px, ids, mask), TOL_LAYER, "BLIP-2 unstacked")
  loss = lambda p, c: jnp.sum(blip2.compose(p, c, px, ids, mask) ** 2)
  g_loop = blip2.stack_layers(jax.grad(loss)(params, cfg), scfg)
  g_scan = jax.grad(loss)(stacked, scfg.replace(remat=True))
  for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_loop)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_blip2_hf_round_trip_through_stacked_layout(tmp_path):
  from tests.blip2_fixtures import hf_retrieval_model
  m = hf_retrieval_model(seed=21)
  m.save_pretrained(str(tmp_path / "hf"))
  state = {k: v.numpy() for k, v in m.state_dict().items()}
  cfg, params = blip2_convert.from_hf(tmp_path / "hf")
  scfg = cfg.replace(scan_layers=True)
  stacked = blip2.stack_layers(params, scfg)
  out = registry.export_hf(tmp_path / "out", "blip2", scfg, stacked)
  back = io.read_state_dict(out)
  assert set(back) == set(state)
  for k, v in state.items():
    np.testing.assert_array_equal(np.asarray(back[k]), v, err_msg=k)


@pytest.mark.slow  # default-suite budget: CI runs it with -m slow
def test_llava_scan_with_lora_and_round_trip(tmp_path):
  from cirjax import lora as lora_lib
  from cirjax.convert import llava_parity
  from tests import llava_fixtures as fx
  model = fx.llava_model(fx.phi3_config(num_key_value_heads=2), seed=11)
  model.save_pretrained(str(tmp_path / "hf"))
  config, params = llava_convert.from_hf(tmp_path / "hf")
  scfg = config.replace(scan_layers=True)
  stacked = llava.stack_layers(params, scfg)
  assert "layers" in stacked["vision_tower"] and "layers" in stacked["language_model"]
  adapter = lora_lib.init_lora(params, lora_lib.LoraConfig(rank=4, init="random"),
                               jax.random.PRNGKey(3))
  ids, mask, pix = llava_parity.random_inputs(config, batch=2, text_len=9, seed=0)
  want = llava.embed(params, config, ids, mask, pix, lora=adapter)
  got = llava.embed(stacked, scfg, ids, mask, pix, lora=adapter)
  assert_close(got, want, TOL_LAYER, "LLaVA embedding with LoRA, scanned")
  hs_want = llava.hidden_states(params, config, ids, mask, pix)
  hs_got = llava.hidden_states(stacked, scfg, ids, mask, pix)
  assert len(hs_got) == len(hs_want)
  for g, w in zip(hs_got, hs_want):
    assert_close(g, w, TOL_LAYER, "LLaVA hidden state, scanned")
  # HF -> cirjax (stacked) -> HF: the same files as the per-layer export (which
  # test_llava_convert checks against the HF model), and the same params read back.
  out = registry.export_hf(tmp_path / "out", "llava", scfg, stacked)
  ref_out = registry.export_hf(tmp_path / "ref", "llava", config, params)
  back, ref = io.read_state_dict(out), io.read_state_dict(ref_out)
  assert set(back) == set(ref)
  for k, v in ref.items():
    np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(v), err_msg=k)
  config2, params2 = llava_convert.from_hf(out)
  assert config2 == config
  _same_tree(params2, params)


# ---------------------------------------------------------------- remat policies
def _vit_case():
  cfg = vit.ViTConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, variant="clip")
  px = jax.random.normal(jax.random.PRNGKey(1), (2, 28, 28, 3))

  def loss(p, **kw):
    return jnp.sum(vit.VisionTransformer(cfg, **kw).apply({"params": p}, px).pooled ** 2)
  return vit.init_vit_params(cfg), vit.layer_stacks(cfg), loss


def _qformer_case():
  cfg, x, mask, enc, params = _qformer_inputs(2)

  def loss(p, **kw):
    return jnp.sum(qf.QFormer(cfg, **kw).apply({"params": p}, x, mask, enc, 3) ** 2)
  return params, qf.layer_stacks(cfg), loss


def _phi3_case():
  from cirjax.models import phi3
  cfg = phi3.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=64)
  ids = jnp.array([[3, 5, 7, 9, 11], [0, 0, 4, 6, 8]])
  mask = (ids > 0).astype(jnp.int32)
  run = lambda m, i, a: m(m.embed(i), a)[0]
  params = phi3.Phi3Decoder(cfg).init(jax.random.PRNGKey(0), ids, mask, method=run)["params"]

  def loss(p, **kw):
    return jnp.sum(phi3.Phi3Decoder(cfg, **kw).apply({"params": p}, ids, mask, method=run) ** 2)
  return params, phi3.layer_stacks(cfg), loss


_CASES = {"vit": _vit_case, "qformer": _qformer_case, "phi3": _phi3_case}


# The default suite runs one case per tower, together covering every policy and both stacks;
# the other combinations are slow.
# One case in the default suite (a non-trivial policy under scan); the default suite's time
# budget leaves the others to `-m slow`.
_DEFAULT_REMAT_CASES = {("vit", "dots_with_no_batch_dims_saveable", True)}


def _remat_case(name, policy, scan):
  marks = () if (name, policy, scan) in _DEFAULT_REMAT_CASES else (pytest.mark.slow,)
  return pytest.param(name, policy, scan, marks=marks,
                      id=f"{name}-{policy}-{'scan' if scan else 'loop'}")


@pytest.mark.parametrize("name,policy,scan", [
    _remat_case(n, p, s) for n in _CASES
    for p in ("full", "dots_saveable", "dots_with_no_batch_dims_saveable") for s in (False, True)])
def test_remat_policies_keep_the_gradients(name, policy, scan):
  """A policy in the looped or the scanned stack of a tower: the gradients of the same stack
  without remat (fp32; the parity measure, max |diff| / max |gradient|, at layer tolerance)."""
  params, stacks, loss = _CASES[name]()
  p = layer_stack.stack(params, stacks) if scan else params
  want = jax.grad(lambda p: loss(p, scan_layers=scan))(p)
  got = jax.grad(lambda p: loss(p, scan_layers=scan, remat=True, remat_policy=policy))(p)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  flat = lambda t: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(t)])
  assert_close(flat(got), flat(want), TOL_LAYER, f"{name} gradients, remat_policy={policy}")


def test_remat_policy_is_checked_by_the_model_configs():
  from cirjax.models import remat
  assert set(remat.REMAT_POLICIES) == {"full", "dots_saveable",
                                       "dots_with_no_batch_dims_saveable"}
  with pytest.raises(ValueError, match=r"Blip2Config.remat_policy must be one of"):
    blip2.tiny_config(remat_policy="everything")
  cfg = blip2.tiny_config(remat=True, remat_policy="dots_saveable")
  assert blip2.Blip2Config.from_dict(cfg.to_dict()) == cfg
