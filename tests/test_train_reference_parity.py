"""QuRe's training step held to the reference training loop, and the Q-Former's dropout.

The reference loop (`train_qure.py` in the QuRe repository, docs/reference_semantics.md#qure-training)
is re-stated in PyTorch over HF's BLIP-2 Q-Former modules (`Blip2QFormerModel`,
`Blip2TextEmbeddings`, which carry BERT's dropout where LAVIS has it) with the reference
`Blip2QuRe` head: AdamW over every parameter left `requires_grad` (the Q-Former with its LM
head `cls.*`, `ln_vision`, query tokens, both projections, `itm_head`, `temp`), weight decay
0.05 on all of them, the learning rate set once per epoch by the cosine from lr to lr/100,
loss `kl_div(log_softmax([s_pos, s_neg]), [1, 0], 'batchmean')`, the model in `train()` mode.
The frozen ViT is not re-stated: both sides train on its cached output (cirjax's feature
store; the reference recomputes the same frozen features each step).

cirjax's side is what `cirjax train` runs: the `Trainer` over `configs/qure_blip2_cirr.py`'s
optimizer, schedule, freeze and loss settings (tiny widths), starting from a BLIP-2 directory
as a real fine-tuning run does, on the tiny synthetic set, across the epoch-0/1 boundary and
the mining of epoch 1. The torch loop replays the very batches the trainer drew.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip2_fixtures import TOL_LAYER, TOL_MODEL, rel_err
from cirjax.models import attention as attention_lib
from cirjax.convert import blip2_convert
from cirjax.models import blip2
from cirjax.models import qformer as qf
from cirjax.train import config_utils, sharding as shd
from cirjax.train.sharding import path_str

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH, EPOCHS = 6, 16, 2    # 64 tiny queries: 4 steps per epoch, 2 in epoch 1


# ----------------------------------------------------------------------------- cirjax side

def _start_model(tmp: Path, vocab_size: int, dropout: float) -> tuple[Path, blip2.Blip2Config]:
  """A BLIP-2 directory with every tensor random (biases and LayerNorms included), the
  starting point of a fine-tuning run."""
  from cirjax.convert import registry
  cfg = blip2.tiny_config(vision_variant="clip", cross_attention_frequency=2, num_layers=2)
  cfg = cfg.replace(qformer=qf.QFormerConfig(**{
      **cfg.qformer.to_dict(), "vocab_size": vocab_size, "max_position_embeddings": 32,
      "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}))
  params = jax.tree.map(np.asarray, blip2.init_blip2(jax.random.PRNGKey(0), cfg))
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x if path_str(p) == "temp" else
      (x + rng.standard_normal(x.shape).astype(np.float32) * (0.2 if x.ndim <= 1 else 0.02)),
      params)
  path = tmp / "start"
  registry.save(path, "blip2", cfg, params)
  return path, cfg


def _config(synth_root: Path, init: Path, dropout: float, *extra: str):
  return config_utils.load_config(
      str(REPO / "configs/qure_blip2_cirr.py") + ":tiny",
      [f"data.root={synth_root}", f"data.tokenizer={synth_root / 'vocab.txt'}",
       f"model.init={init}", f"train.batch_size={BATCH}", f"train.epochs={EPOCHS}",
       f"train.max_steps={STEPS}", "eval_every_epochs=0", "export=False",
       f"model.qformer.hidden_dropout_prob={dropout}",
       f"model.qformer.attention_probs_dropout_prob={dropout}", *extra])


def _trainer(config, workdir):
  from cirjax.train.trainer import Trainer
  mesh = shd.make_mesh(tuple(tuple(a) for a in config.mesh), jax.devices())
  return Trainer(config, str(workdir), mesh=mesh)


def _recording(trainer) -> dict:
  """Records every batch the trainer's task builds, by (epoch, index)."""
  seen, build = {}, trainer.task.batch

  def batch(epoch, index):
    out = build(epoch, index)
    seen[(epoch, index)] = {k: np.array(v) for k, v in out.items()}
    return out
  trainer.task.batch = batch
  return seen


def _vocab_size(synth_root: Path) -> int:
  from cirjax.data.tokenizer import load_tokenizer
  return len(load_tokenizer(str(synth_root / "vocab.txt"), "blip2"))


# ------------------------------------------------------------------------------ torch side

class ReferenceQuRe(torch.nn.Module):
  """`Blip2QuRe` (LAVIS, QuRe repository) on cached ViT output, over HF's Q-Former modules.
  Attribute names are HF `Blip2ForImageTextRetrieval` keys, so the converter's table maps
  them; `cls` is BERT's LM head (decoder tied to the word embeddings, as in LAVIS)."""

  def __init__(self, cfg: blip2.Blip2Config):
    super().__init__()
    from transformers.models.bert.modeling_bert import BertOnlyMLMHead
    from transformers.models.blip_2 import modeling_blip_2 as hf
    q = blip2_convert.config_to_hf(cfg.replace(vision=cfg.vision.__class__(
        **{**cfg.vision.to_dict(), "variant": "eva"})))["qformer_config"]
    qcfg = transformers.Blip2QFormerConfig(**q, attn_implementation="eager")
    qcfg._attn_implementation = "eager"  # pylint: disable=protected-access
    h = cfg.qformer.hidden_size
    self.vision_model = torch.nn.Module()
    self.vision_model.post_layernorm = torch.nn.LayerNorm(cfg.vision.hidden_size,
                                                          eps=cfg.ln_vision_eps)
    self.query_tokens = torch.nn.Parameter(torch.zeros(1, cfg.num_query_tokens, h))
    self.embeddings = hf.Blip2TextEmbeddings(qcfg)
    self.qformer = hf.Blip2QFormerModel(qcfg)
    self.vision_projection = torch.nn.Linear(h, cfg.embed_dim)
    self.text_projection = torch.nn.Linear(h, cfg.embed_dim)
    self.itm_head = torch.nn.Linear(h, 2)
    self.temp = torch.nn.Parameter(0.07 * torch.ones([]))
    self.cls = BertOnlyMLMHead(transformers.BertConfig(
        hidden_size=h, vocab_size=cfg.qformer.vocab_size, hidden_act="gelu",
        layer_norm_eps=cfg.qformer.layer_norm_eps))
    self.cls.predictions.decoder.weight = self.embeddings.word_embeddings.weight
    self.cls.predictions.decoder.bias = self.cls.predictions.bias  # tied in LAVIS's BERT

  def _targets(self, feats):
    img = self.vision_model.post_layernorm(feats)
    qt = self.query_tokens.expand(img.shape[0], -1, -1)
    h = self.qformer(query_embeds=qt, query_length=qt.shape[1], encoder_hidden_states=img,
                     encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long)
                     ).last_hidden_state
    return torch.nn.functional.normalize(self.vision_projection(h), dim=-1)

  def query(self, ref, ids, mask):
    img = self.vision_model.post_layernorm(ref)
    b = img.shape[0]
    qt = self.query_tokens.expand(b, -1, -1)
    nq = qt.shape[1]
    joint = torch.cat([torch.ones(b, nq, dtype=torch.long), mask], dim=1)
    h = self.qformer(query_embeds=self.embeddings(input_ids=ids, query_embeds=qt),
                     query_length=nq, attention_mask=joint, encoder_hidden_states=img,
                     encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long)
                     ).last_hidden_state
    return torch.nn.functional.normalize(self.text_projection(h[:, :nq]).mean(dim=1), dim=-1)

  def forward(self, ref, pos, neg, ids, mask):
    query = self.query(ref, ids, mask)
    s1 = torch.bmm(self._targets(pos), query.unsqueeze(-1)).max(dim=1).values / self.temp
    s2 = torch.bmm(self._targets(neg), query.unsqueeze(-1)).max(dim=1).values / self.temp
    return torch.stack([s1, s2], dim=1).squeeze(-1)


def _flat(tree) -> dict[str, np.ndarray]:
  return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _hf_to_cirjax(cfg) -> dict[str, str]:
  """HF key -> cirjax path, from the converter's table (plus `temp`)."""
  rows = blip2_convert.hf_table(cfg)
  out = {src: "/".join(dst) for dst, src, _ in rows if isinstance(src, str)}
  out["temp"] = "temp"
  return out


def _load_torch(model: ReferenceQuRe, params, cfg) -> None:
  state = blip2_convert.params_to_hf_state(params, cfg)
  own = dict(model.named_parameters())
  with torch.no_grad():
    for name, p in own.items():
      if name == "temp":
        p.copy_(torch.tensor(float(np.asarray(params["temp"]))))
      elif name.startswith("cls."):
        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
      else:
        p.copy_(torch.from_numpy(np.array(state[name])))


def _reference_loop(model, batches, lr, wd, epochs, steps_per_epoch, steps):
  """train_qure.py's loop over `batches[(epoch, index)]`: losses, lrs, and which trainable
  parameters ever received a gradient."""
  import torch.nn.functional as F
  model.train()
  opt = torch.optim.AdamW(filter(lambda p: p.requires_grad, model.parameters()), lr=lr,
                          weight_decay=wd)
  losses, lrs, got_grad = [], [], set()
  names = {id(p): n for n, p in model.named_parameters()}
  for step in range(steps):
    epoch, index = divmod(step, steps_per_epoch)
    if index == 0:  # cosine_lr_schedule(optimizer, epoch, max_epochs, init_lr, init_lr / 100)
      e_lr = (lr - lr / 100) * 0.5 * (1. + math.cos(math.pi * epoch / epochs)) + lr / 100
      for group in opt.param_groups:
        group["lr"] = e_lr
    b = batches[(epoch, index)]
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in b.items()}
    opt.zero_grad()
    scores = model(t["ref_feats"].float(), t["pos_feats"].float(), t["neg_feats"].float(),
                   t["input_ids"].long(), t["attention_mask"].long())
    target = torch.zeros_like(scores)
    target[:, 0] = 1.0
    loss = F.kl_div(F.log_softmax(scores, dim=1), target, reduction="batchmean")
    loss.backward()
    got_grad |= {names[id(p)] for g in opt.param_groups for p in g["params"]
                 if p.grad is not None}
    opt.step()
    losses.append(loss.item())
    lrs.append(opt.param_groups[0]["lr"])
  return losses, lrs, got_grad


# ------------------------------------------------------------------------------------ tests

@pytest.fixture(scope="module")
def run(synth_root, tmp_path_factory):
  """cirjax's trainer, dropout 0, for STEPS steps; its batches, start and end parameters."""
  torch.manual_seed(0)
  tmp = tmp_path_factory.mktemp("ref_parity")
  init, cfg = _start_model(tmp, _vocab_size(synth_root), dropout=0.0)
  config = _config(synth_root, init, 0.0)
  trainer = _trainer(config, tmp / "run")
  batches = _recording(trainer)
  start = jax.tree.map(np.array, jax.device_get(trainer.state.params))
  lrs = []
  trainer.add_hook(lambda info: lrs.append(float(info.metrics["lr"])))
  result = trainer.run()
  assert result["status"] == "done" and len(result["losses"]) == STEPS
  end = jax.tree.map(np.asarray, jax.device_get(result["state"].params))
  return dict(config=config, cfg=cfg, trainer=trainer, batches=batches, start=start, end=end,
              losses=result["losses"], lrs=lrs)


def test_training_steps_match_the_reference_loop(run):
  """Per-step loss, learning rate and every trained parameter (temp included) after 6 steps
  across an epoch boundary and a mining round, dropout 0 on both sides, fp32."""
  config, cfg = run["config"], run["cfg"]
  assert config.train.schedule == "cosine_per_epoch" and config.train.weight_decay == 0.05
  assert config.qure.loss == "pairwise" and run["trainer"].task.mine_every == 1
  model = ReferenceQuRe(cfg)
  _load_torch(model, run["start"], cfg)
  spe = run["trainer"].steps_per_epoch
  assert spe * 1 < STEPS < spe * EPOCHS  # the run crosses the epoch-0/1 boundary
  losses, lrs, _ = _reference_loop(model, run["batches"], float(config.train.lr),
                                   float(config.train.weight_decay), EPOCHS, spe, STEPS)
  np.testing.assert_allclose(run["lrs"], lrs, rtol=1e-6)
  assert lrs[spe - 1] != lrs[spe]
  for i, (got, want) in enumerate(zip(run["losses"], losses)):
    assert abs(got - want) <= TOL_MODEL * abs(want), (i, got, want)
  to_cirjax = _hf_to_cirjax(cfg)
  flat_end, flat_start, mask = _flat(run["end"]), _flat(run["start"]), _flat(run["trainer"].mask)
  hf_end = blip2_convert.params_to_hf_state(run["end"], cfg)  # the converter's transforms
  hf_end["temp"] = flat_end["temp"]
  compared = 0
  for name, p in model.named_parameters():
    if name.startswith("cls."):
      continue
    err = rel_err(np.asarray(hf_end[name]).reshape(p.shape), p.detach().numpy())
    assert err <= TOL_MODEL, (name, err)
    path = to_cirjax[name]
    assert mask[path] != np.array_equal(flat_end[path], flat_start[path]), path
    compared += 1
  assert compared == sum(not k.startswith("vision_model.") or "post_layernorm" in k
                         for k in to_cirjax)


def test_trainable_sets_are_the_reference_s(run):
  """The reference's AdamW holds every `requires_grad` parameter; the ones that ever get a
  gradient, mapped through the converter's table, are exactly cirjax's trained set. The
  two it holds without ever updating (`itm_head`, the LM head `cls.*`) cirjax freezes or
  does not have."""
  cfg = run["cfg"]
  model = ReferenceQuRe(cfg)
  _load_torch(model, run["start"], cfg)
  _, _, got_grad = _reference_loop(model, run["batches"], 1e-5, 0.05, EPOCHS,
                                   run["trainer"].steps_per_epoch, 2)
  trainable = {n for n, p in model.named_parameters() if p.requires_grad}
  never = trainable - got_grad
  assert never == {n for n in trainable if n.startswith(("itm_head.", "cls."))}
  to_cirjax = _hf_to_cirjax(cfg)
  ref_trained = {to_cirjax[n] for n in got_grad}
  mask = _flat(run["trainer"].mask)
  ours = {k for k, m in mask.items() if m}
  assert ours == ref_trained, (sorted(ours ^ ref_trained))
  assert "temp" in ours and not any(k.startswith(("vision/", "itm_head/")) for k in ours)
  assert all(not m for k, m in mask.items() if k.startswith("vision/"))
  # The reference's untouched parameters stay put (AdamW skips a parameter with no gradient,
  # weight decay included), as cirjax's frozen ones do.
  start, end = _flat(run["start"]), _flat(run["end"])
  for name in never & set(to_cirjax):
    np.testing.assert_array_equal(end[to_cirjax[name]], start[to_cirjax[name]])


# ------------------------------------------------------------------------- dropout itself

def _tiny(hidden=0.1, attn=0.2, **kw):
  cfg = blip2.tiny_config(cross_attention_frequency=2, num_layers=2, **kw)
  return cfg.replace(qformer=qf.QFormerConfig(**{
      **cfg.qformer.to_dict(), "hidden_dropout_prob": hidden,
      "attention_probs_dropout_prob": attn}))


def _inputs(cfg, batch=16, length=12):
  rng = np.random.default_rng(0)
  feats = rng.standard_normal((batch, cfg.vision.num_positions, cfg.vision.hidden_size))
  ids = rng.integers(1, cfg.qformer.vocab_size, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  mask[::2, length // 2:] = 0
  return jnp.asarray(feats, jnp.float32), jnp.asarray(ids), jnp.asarray(mask)


def _recorded_sites(monkeypatch, fn) -> list[tuple[float, np.ndarray, np.ndarray]]:
  """(rate, input, output) of every dropout call `fn` makes (run eagerly)."""
  calls, orig = [], attention_lib.dropout

  def rec(x, rate, rng):
    out = orig(x, rate, rng)
    if rng is not None and rate > 0:
      calls.append((rate, np.asarray(x), np.asarray(out)))
    return out
  monkeypatch.setattr(attention_lib, "dropout", rec)
  monkeypatch.setattr(qf, "dropout", rec)
  with jax.disable_jit():
    fn()
  return calls


def _hf_dropout_calls(monkeypatch, cfg, params, feats, ids, mask) -> list[float]:
  """The rates of every dropout HF's Q-Former runs in train mode over the same two passes."""
  calls, orig = [], torch.nn.functional.dropout

  def rec(x, p=0.5, training=True, inplace=False):
    if training and p > 0:
      calls.append(round(float(p), 6))
    return orig(x, p, training, inplace)
  model = ReferenceQuRe(cfg)
  _load_torch(model, params, cfg)
  model.train()
  monkeypatch.setattr(torch.nn.functional, "dropout", rec)
  f = torch.from_numpy(np.asarray(feats))
  model.query(f, torch.from_numpy(np.asarray(ids)).long(),
              torch.from_numpy(np.asarray(mask)).long())
  model._targets(f)  # pylint: disable=protected-access
  return calls


def test_dropout_runs_where_the_reference_has_it_at_its_rates(monkeypatch):
  """The sites (by rate, so hidden 0.1 and attention 0.2 tell apart) of the composed-query
  pass and a target pass equal the dropout calls of HF's Q-Former in train mode; at each
  site the dropped fraction is the rate (5 binomial standard errors) and the kept units are
  scaled by 1 / (1 - rate)."""
  cfg = _tiny(0.1, 0.2)
  params = blip2.init_blip2(jax.random.PRNGKey(0), cfg)
  feats, ids, mask = _inputs(cfg)
  model = blip2.Blip2(cfg)
  key = jax.random.PRNGKey(7)

  def both():
    model.apply({"params": params}, feats, ids, mask, key, method="compose_from_features")
    model.apply({"params": params}, feats, key, method="target_from_features")
  calls = _recorded_sites(monkeypatch, both)
  ours = sorted(round(r, 6) for r, _, _ in calls)
  theirs = sorted(_hf_dropout_calls(monkeypatch, cfg, jax.tree.map(np.asarray, params),
                                    feats, ids, mask))
  # Hidden (0.1): per pass the embeddings, each layer's self-attention output and query FFN,
  # layer 0's cross-attention output, and in the joint pass each layer's text FFN: 8 + 6.
  # Probabilities (0.2): each layer's self-attention, layer 0's cross-attention: 3 + 3.
  assert ours == theirs and ours.count(0.1) == 14 and ours.count(0.2) == 6
  for rate, x, out in calls:
    live = x != 0
    dropped = np.mean(out[live] == 0)
    assert abs(dropped - rate) <= 5 * math.sqrt(rate * (1 - rate) / live.sum()), (rate, dropped)
    kept = out != 0
    np.testing.assert_allclose(out[kept], x[kept] / (1 - rate), rtol=1e-6)


def test_dropout_acts_in_training_steps_and_never_in_encoding(synth_root, tmp_path):
  """The QuRe task's training loss changes with the step's key (and is reproducible for
  one key); without dropout it does not depend on the key; every encoder the task mines,
  evaluates and caches with is bit-identical with and without the dropout config."""
  from cirjax.train.qure import QuReTask
  init, _ = _start_model(tmp_path, _vocab_size(synth_root), dropout=0.1)
  mesh = shd.make_mesh((("data", -1), ("fsdp", 1)), jax.devices())
  tasks = {rate: QuReTask(_config(synth_root, init, rate), mesh, str(tmp_path / str(rate)))
           for rate in (0.1, 0.0)}
  assert tasks[0.1].cfg.qformer.hidden_dropout_prob == 0.1
  assert tasks[0.0].cfg.qformer.attention_probs_dropout_prob == 0.0
  params = tasks[0.1].initial_params(None)
  rng = np.random.default_rng(0)
  s = tasks[0.1].cfg.vision.num_positions
  batch = {k: jnp.asarray(rng.standard_normal((BATCH, s, 32)), jnp.float32)
           for k in ("ref_feats", "pos_feats", "neg_feats")}
  batch.update(input_ids=jnp.asarray(tasks[0.1].train_queries.ids[:BATCH]),
               attention_mask=jnp.asarray(tasks[0.1].train_queries.mask[:BATCH]))
  loss = {r: jax.jit(t.loss_fn) for r, t in tasks.items()}
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  a, b = float(loss[0.1](params, batch, k1)[0]), float(loss[0.1](params, batch, k2)[0])
  assert a != b and a == float(loss[0.1](params, batch, k1)[0])
  assert float(loss[0.0](params, batch, k1)[0]) == float(loss[0.0](params, batch, k2)[0])
  feats = batch["ref_feats"]
  for what in ("targets", "compose"):
    args = (feats,) if what == "targets" else (feats, batch["input_ids"],
                                               batch["attention_mask"])
    np.testing.assert_array_equal(tasks[0.1]._fns[what](params, *args),  # pylint: disable=protected-access
                                  tasks[0.0]._fns[what](params, *args))  # pylint: disable=protected-access


@pytest.mark.slow  # ~80 s on 2 cores: the gradient through a scanned, rematerialised stack
def test_dropout_is_the_same_with_scan_layers_and_remat():
  """Masks come from each layer's index in the whole stack: a scanned or rematerialised
  Q-Former drops the same units as the looped one (outputs and gradients at layer
  tolerance)."""
  base = _tiny(0.1, 0.1)
  params = blip2.init_blip2(jax.random.PRNGKey(0), base)
  feats, ids, mask = _inputs(base, batch=4)
  key = jax.random.PRNGKey(3)

  def run(cfg):
    p = blip2.stack_layers(params, cfg) if cfg.scan_layers else params
    f = lambda p: blip2.compose_from_features(p, cfg, feats, ids, mask, dropout_rng=key).sum() \
        + blip2.encode_target_from_features(p, cfg, feats, dropout_rng=key).sum()
    value, grad = jax.jit(jax.value_and_grad(f))(p)
    return value, (blip2.unstack_layers(grad, cfg) if cfg.scan_layers else grad)
  want_v, want_g = run(base)
  assert float(want_v) != float(blip2.compose_from_features(params, base, feats, ids, mask).sum()
                                + blip2.encode_target_from_features(params, base, feats).sum())
  # Both at once (each alone is a subset of the same code; one compile fewer each).
  got_v, got_g = run(base.replace(scan_layers=True, remat=True))
  assert abs(float(got_v) - float(want_v)) <= TOL_LAYER * abs(float(want_v))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=TOL_LAYER, atol=1e-7),
               got_g, want_g)


def test_hf_configs_carry_the_dropout_rates():
  cfg = _tiny(0.05, 0.15)
  hf = blip2_convert.config_to_hf(cfg)
  assert hf["qformer_config"]["hidden_dropout_prob"] == 0.05
  assert hf["qformer_config"]["attention_probs_dropout_prob"] == 0.15
  assert blip2_convert.config_from_hf(hf).qformer == cfg.qformer
  for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
    del hf["qformer_config"][key]
  back = blip2_convert.config_from_hf(hf).qformer  # HF's Blip2QFormerConfig defaults
  assert back.hidden_dropout_prob == back.attention_probs_dropout_prob == 0.1
  with pytest.raises(ValueError, match="hidden_dropout_prob"):
    qf.QFormerConfig(hidden_dropout_prob=1.0)
