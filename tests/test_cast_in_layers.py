"""A bf16 `scan_layers` step leaves the frozen stacked layers fp32 for the model's scan to cast
one layer at a time (`make_train_step(cast_in_layers=...)`): the same bits as casting them up
front, without a bf16 copy of every frozen layer held through the step."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cirjax import lora as lora_lib
from cirjax.convert import llava_parity
from cirjax.models import blip2, llava
from cirjax.train import state as st
from cirjax.train.sharding import path_str
from cirjax.train.step import frozen_in_layers, make_train_step


def _steps(loss_fn, params, mask, stacks, n=1):
  """State and metrics after `n` bf16 steps, with the frozen runs cast in the scan or not."""
  tx = st.make_optimizer(_train_cfg(), mask, 10, 10)[0]
  out = []
  for cast_in in (stacks, ()):
    step = jax.jit(make_train_step(loss_fn, tx, mask, compute_dtype="bfloat16",
                                   cast_in_layers=cast_in))
    state = st.init_state(params, tx)
    for _ in range(n):
      state, metrics = step(state, {})
    out.append((state, metrics))
  return out


def _train_cfg():
  return ml_collections.ConfigDict({"lr": 1e-3, "weight_decay": 0.01})


def _assert_same_bits(a, b):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path_str(path))


def _top_level_casts(step_fn, *args) -> set:
  """Shapes of the bf16 casts the step makes outside any loop (scan bodies excluded)."""
  jaxpr = jax.make_jaxpr(step_fn)(*args)
  shapes = set()

  def walk(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name == "convert_element_type" and eqn.params["new_dtype"] == jnp.bfloat16:
        shapes.add(tuple(eqn.invars[0].aval.shape))
      if eqn.primitive.name in ("scan", "while"):
        continue
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jaxpr.jaxpr)
  return shapes


@pytest.mark.slow  # default-suite budget: CI runs it with -m slow
def test_frozen_vit_layers_cast_in_the_scan_same_bits():
  # The stacked ViT layers frozen, the patch embedding before them trained: the gradient
  # flows back through the layers cast in the scan.
  cfg = blip2.tiny_config(num_layers=2).replace(scan_layers=True, dtype="bfloat16")
  params = blip2.stack_layers(blip2.init_blip2(jax.random.PRNGKey(0), cfg), cfg)
  stacks = blip2.layer_stacks(cfg)
  px = jax.random.normal(jax.random.PRNGKey(1), (2, 28, 28, 3))

  def loss_fn(p, _, rng):
    f = blip2.vision_features(p, cfg, px)
    return jnp.mean(f[0] * f[1]), {}
  mask = st.trainable_mask(params, freeze=("vision/layers/.*",))
  uncast = frozen_in_layers(mask, stacks)
  names = [path_str(p) for p, u in jax.tree_util.tree_flatten_with_path(uncast)[0] if u]
  assert names and all(n.startswith("vision/layers/") for n in names)
  (a, ma), (b, mb) = _steps(loss_fn, params, mask, stacks)
  _assert_same_bits(a, b)
  _assert_same_bits(ma, mb)
  assert np.any(np.asarray(a.params["vision"]["patch_embedding"])
                != np.asarray(params["vision"]["patch_embedding"]))
  # The frozen stacked kernels are no longer cast whole outside the scan.
  tx = st.make_optimizer(_train_cfg(), mask, 10, 10)[0]
  state = st.init_state(params, tx)
  qkv = params["vision"]["layers"]["self_attn"]["qkv"]["kernel"].shape
  for cast_in, cast_whole in ((stacks, False), ((), True)):
    step = make_train_step(loss_fn, tx, mask, compute_dtype="bfloat16", cast_in_layers=cast_in)
    assert (tuple(qkv) in _top_level_casts(step, state, {})) == cast_whole


@pytest.mark.slow
def test_llava_frozen_base_cast_in_the_scan_same_bits():
  cfg = llava.tiny_config(dtype="bfloat16")
  base = llava.init_params(cfg, jax.random.PRNGKey(0))  # per-layer: what adapters are made on
  adapter = lora_lib.init_lora(base, lora_lib.LoraConfig(rank=4, init="random"),
                               jax.random.PRNGKey(3))
  cfg = cfg.replace(scan_layers=True)
  stacks = llava.layer_stacks(cfg)
  params = {"base": llava.stack_layers(base, cfg), "lora": llava.stack_layers(adapter.params, cfg)}
  all_stacks = ([s._replace(parent=("base",) + s.parent) for s in stacks]
                + [s._replace(parent=("lora",) + s.parent) for s in stacks])
  ids, mask_in, px = llava_parity.random_inputs(cfg, batch=2, text_len=6, seed=0)

  def loss_fn(p, _, rng):
    e = llava.embed(p["base"], cfg, ids, mask_in, px,
                    lora=lora_lib.Adapter(p["lora"], adapter.config)).astype(jnp.float32)
    return jnp.sum(e[0] * e[1]), {}
  mask = st.trainable_mask(params, train_only=("lora/.*",))
  assert any(jax.tree.leaves(frozen_in_layers(mask, all_stacks)))
  (a, ma), (b, mb) = _steps(loss_fn, params, mask, all_stacks)
  _assert_same_bits(a, b)
  _assert_same_bits(ma, mb)
