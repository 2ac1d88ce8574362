"""QuRe training on BLIP-2 (paper appendix A, reference code): the `qure` task of the trainer.

Per epoch `e` of `E` (n_def = `config.qure.n_def`):
  * warm-up (`e < E // n_def`, or always without mining): each query's negative is a uniformly
    random entry of its mining corpus whose image differs from the target's;
  * at `e % (E // n_def) == 0, e != 0`: re-encode the training corpus and queries with the
    current parameters and re-mine every query's hard-negative set (`cirjax.mining`), logging
    the set-size statistics; from then on each query walks its set without replacement
    across epochs (`config.qure.sampling = "walk"`) or draws uniformly (`"uniform"`);
  * one negative per query per epoch (each query is in one batch per epoch), drawn by
    `cirjax.sampling.NegativeSampler` for the global batch on every process; its state is
    checkpointed, so a resumed run draws the same negatives.

Loss (`config.qure.loss`): `pairwise` (QuRe, Eqs. 2-3) or `infonce` (every positive and
negative of the global batch as columns), independent of the backbone.

With a frozen vision tower and no augmentation the tower's output (before `ln_vision`, which
QuRe trains) is computed once for every training and evaluation image and reused by every
step, mining and evaluation (`config.qure.cache_features`, on by default where valid).

Mining corpora (docs/reference_semantics.md): CIRR / synthetic — the training split's images;
FashionIQ — per category, the targets of that category's training triplets (one entry per
triplet, sets de-duplicated by image id).
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cirjax import mining
from cirjax import sampling as sampling_lib
from cirjax.convert import registry
from cirjax.data import images as images_lib
from cirjax.data.loader import ImageCache, default_text
from cirjax.data.records import CIRSplit, DataError
from cirjax.models import blip2
from cirjax.train import sharding as shd
from cirjax.train.task import Task

LOSSES = ("pairwise", "infonce")


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[cirjax] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ losses

def pairwise_loss(s_pos: jax.Array, s_neg: jax.Array) -> jax.Array:
  """QuRe's Bradley-Terry loss `-mean log sigmoid(s_pos - s_neg)` in fp32 (Eqs. 2-3)."""
  return -jnp.mean(jax.nn.log_sigmoid(s_pos.astype(jnp.float32) - s_neg.astype(jnp.float32)))


def infonce_loss(logits: jax.Array) -> jax.Array:
  """Cross-entropy with the positive in column i for row i (in-batch + extra negatives)."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  pos = jnp.take_along_axis(logits, jnp.arange(logits.shape[0])[:, None], axis=-1)[:, 0]
  return jnp.mean(lse - pos)


# ------------------------------------------------------------------------------ model config

def model_config(mc: ml_collections.ConfigDict, vocab_size: int) -> blip2.Blip2Config:
  """A Blip2Config from `config.model` (random init shapes; a pretrained model brings its own)."""
  from cirjax.models import qformer as qf  # pylint: disable=g-import-not-at-top
  from cirjax.models import vit as vit_lib  # pylint: disable=g-import-not-at-top
  v, q = mc.vision, mc.qformer
  clip = v.variant == "clip"
  vision = vit_lib.ViTConfig(
      image_size=int(v.image_size), patch_size=int(v.patch_size), hidden_size=int(v.hidden_size),
      intermediate_size=int(v.intermediate_size), num_layers=int(v.num_layers),
      num_heads=int(v.num_heads), layer_norm_eps=1e-5 if clip else 1e-6,
      hidden_act="quick_gelu" if clip else "gelu", variant=v.variant, post_layernorm=False)
  vs = int(q.get("vocab_size", 0) or 0) or vocab_size  # 0: the tokenizer's size
  if vocab_size > vs:
    raise ValueError(f"config.model.qformer.vocab_size={vs} is smaller than the "
                     f"tokenizer's {vocab_size} tokens")
  qformer = qf.QFormerConfig(
      hidden_size=int(q.hidden_size), num_layers=int(q.num_layers), num_heads=int(q.num_heads),
      intermediate_size=int(q.intermediate_size),
      cross_attention_frequency=int(q.cross_attention_frequency),
      encoder_hidden_size=int(v.hidden_size), vocab_size=vs,
      max_position_embeddings=int(q.get("max_position_embeddings", 512)))
  return blip2.Blip2Config(vision=vision, qformer=qformer,
                           num_query_tokens=int(mc.num_query_tokens), embed_dim=int(mc.embed_dim),
                           ln_vision_eps=1e-5 if clip else 1e-6)


# ------------------------------------------------------------------------------ data

def ensure_synthetic(root: str, synth_cfg: ml_collections.ConfigDict | None) -> None:
  """Generates the synthetic benchmark at `root` unless it is already there (process 0)."""
  from cirjax.data import synth  # pylint: disable=g-import-not-at-top
  if synth.is_synthetic(root):
    return
  if os.path.exists(root) and os.listdir(root):
    raise DataError(f"config.data.root={root} exists but is not a cirjax synthetic dataset "
                    "(no meta.json from cirjax.data.synth); point it elsewhere")
  if jax.process_index() == 0:
    kw = dict(synth_cfg or {})
    cfg = synth.SynthConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                               for k, v in kw.items()})
    _log(f"synthetic data missing: generating it in {root}")
    tmp = root.rstrip("/") + ".tmp"
    synth.generate(tmp, cfg, progress=lambda s: _log(s))
    os.replace(tmp, root)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("cirjax_synthetic_data")


def read_splits(dc: ml_collections.ConfigDict) -> tuple[list[CIRSplit], list[CIRSplit]]:
  """(training splits, evaluation splits); FashionIQ gives one per category."""
  root = os.path.expanduser(dc.root)
  ds = dc.dataset
  if ds == "synthetic":
    from cirjax.data import synth  # pylint: disable=g-import-not-at-top
    ensure_synthetic(root, dc.get("synth"))
    return ([synth.read_synthetic(root, dc.train_split)],
            [synth.read_synthetic(root, dc.eval_split)])
  if ds == "cirr":
    from cirjax.data import cirr  # pylint: disable=g-import-not-at-top
    return [cirr.read_cirr(root, dc.train_split)], [cirr.read_cirr(root, dc.eval_split)]
  if ds == "fashioniq":
    from cirjax.data import fashioniq  # pylint: disable=g-import-not-at-top
    cats = list(dc.categories)
    return ([fashioniq.read_fashioniq(root, c, dc.train_split) for c in cats],
            [fashioniq.read_fashioniq(root, c, dc.eval_split) for c in cats])
  raise DataError(f"config.data.dataset={ds!r}: QuRe trains on synthetic, cirr or fashioniq")


class _Group:
  """One mining corpus and the training queries mined against it."""

  def __init__(self, queries: np.ndarray, corpus: np.ndarray, query_target: np.ndarray):
    self.queries = queries              # global query indices
    self.corpus = corpus                # [N] global image indices (may repeat)
    self.target_pos = query_target      # [len(queries)] corpus position of each target


# ------------------------------------------------------------------------------ the task

class QuReTask(Task):
  """QuRe: frozen ViT, trained Q-Former, pairwise loss with re-mined hard negatives."""

  name = "qure"

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, workdir: str):
    super().__init__(config, mesh, workdir)
    qc = config.qure
    self.loss_kind = qc.get("loss", "pairwise")
    if self.loss_kind not in LOSSES:
      raise ValueError(f"config.qure.loss={self.loss_kind!r}: use one of {LOSSES}")
    self.seed = int(config.get("seed", 0))
    self.compute_dtype = jnp.dtype(config.get("compute_dtype", "float32"))
    t0 = time.perf_counter()
    self.train_splits, self.eval_splits = read_splits(config.data)
    from cirjax.data import text  # pylint: disable=g-import-not-at-top
    tok_src = config.data.get("tokenizer") or os.path.expanduser(config.data.root)
    self.tokenizer = text.load_bert_tokenizer(tok_src)
    self.max_len = int(config.data.get("max_text_length", 32))

    # Model: random (synthetic) or pretrained (an HF / LAVIS / cirjax BLIP-2 directory).
    self.pretrained = config.model.get("init") or ""
    if self.pretrained:
      loaded = registry.load(os.path.expanduser(self.pretrained), family="blip2")
      self.cfg, self._pretrained_params = loaded.config, loaded.params
      if len(self.tokenizer) > self.cfg.qformer.vocab_size:
        raise ValueError(f"{self.pretrained}: Q-Former vocabulary {self.cfg.qformer.vocab_size} "
                         f"< tokenizer's {len(self.tokenizer)}")
    else:
      self.cfg = model_config(config.model, len(self.tokenizer))
      self._pretrained_params = None
    self.image_size = self.cfg.vision.image_size
    self.transform = images_lib.make_transform(config.data.get("transform", "targetpad"),
                                               self.image_size)

    # Queries and the global image table (training images first, then evaluation-only ones).
    self.queries = [q for s in self.train_splits for q in s.queries]
    names: dict[str, int] = {}
    refs: dict[str, Any] = {}
    for s in self.train_splits:
      for n in list(s.corpus) + [x for q in s.queries for x in (q.reference, q.target)]:
        if n not in names:
          names[n] = len(names)
          refs[n] = s.images[n]
    self.n_train_images = len(names)
    for s in self.eval_splits:
      for n in list(s.corpus) + [q.reference for q in s.queries]:
        if n not in names:
          names[n] = len(names)
          refs[n] = s.images[n]
    self.image_names = list(names)
    self.image_index = names
    self._image_refs = refs
    self.q_ref = np.array([names[q.reference] for q in self.queries], np.int32)
    self.q_tgt = np.array([names[q.target] for q in self.queries], np.int32)
    ids, mask = text.tokenize(self.tokenizer, [default_text(q) for q in self.queries], self.max_len)
    self.q_ids, self.q_mask = ids, mask

    # Mining corpora.
    self.groups = []
    start = 0
    for s in self.train_splits:
      nq = len(s.queries)
      qidx = np.arange(start, start + nq)
      if config.data.dataset == "fashioniq":
        corpus = self.q_tgt[qidx].copy()        # one entry per triplet (reference code)
        tpos = np.arange(nq, dtype=np.int32)
      else:
        corpus = np.array([names[n] for n in s.corpus], np.int32)
        pos = {int(g): i for i, g in enumerate(corpus)}
        missing = [self.queries[i].target for i in qidx if int(self.q_tgt[i]) not in pos]
        if missing:
          raise DataError(f"{s.name}: target {missing[0]!r} is not in the training corpus")
        tpos = np.array([pos[int(self.q_tgt[i])] for i in qidx], np.int32)
      self.groups.append(_Group(qidx, corpus, tpos))
      start += nq

    tc = config.train
    self.global_batch = int(tc.batch_size)
    self.steps_per_epoch = len(self.queries) // self.global_batch
    if self.steps_per_epoch == 0:
      raise DataError(f"{len(self.queries)} training queries is fewer than one batch of "
                      f"{self.global_batch} (config.train.batch_size)")
    self.epochs = int(tc.epochs)
    n_def = int(qc.get("n_def", 6))
    self.mine_every = max(1, self.epochs // n_def) if n_def > 0 else 0
    self.strategy = qc.get("strategy", "qure")
    self.sampling = qc.get("sampling", "walk")
    self.samplers = [sampling_lib.NegativeSampler(
        mining.whole_corpus_sets(g.target_pos, image_ids=g.corpus), seed=self.seed,
        sampling=self.sampling) for g in self.groups]
    self.sampler_states = [smp.init() for smp in self.samplers]
    # query -> (group, row within the group)
    self.q_group = np.zeros(len(self.queries), np.int32)
    self.q_in_group = np.zeros(len(self.queries), np.int32)
    for gi, g in enumerate(self.groups):
      self.q_group[g.queries] = gi
      self.q_in_group[g.queries] = np.arange(len(g.queries))

    # The frozen-feature cache is valid only if every vision-tower parameter is frozen.
    from cirjax.train import state as st  # pylint: disable=g-import-not-at-top
    abstract = blip2.abstract_params(self.cfg)
    mask = st.trainable_mask(abstract, tuple(config.get("freeze", ())),
                             tuple(config.get("train_only", ())))
    frozen_vit = not any(jax.tree.leaves(mask["vision"]))
    self.cache = bool(qc.get("cache_features", True))
    if self.cache and not frozen_vit:
      raise ValueError("config.qure.cache_features=True needs a frozen vision tower "
                       "(config.freeze must include 'vision/.*'); set it False to train the ViT")
    run_cfg = self._run_cfg()
    self._fns = {
        "vision": functools.partial(_vision_features, cfg=run_cfg),
        "targets": functools.partial(_targets_from_feats if self.cache else _targets_from_pixels,
                                     cfg=run_cfg),
        "compose": functools.partial(_compose_from_feats if self.cache else _compose_from_pixels,
                                     cfg=run_cfg),
    }
    self._feats: np.ndarray | None = None
    self._images = ImageCache(_AllImages(self._image_refs), self.transform,
                              enabled=bool(config.data.get("cache_images", True)))

    self.mined_epoch = -1
    _log(f"qure data: {len(self.queries)} training queries, {self.n_train_images} training "
         f"images, {len(self.image_names) - self.n_train_images} more for evaluation "
         f"({time.perf_counter() - t0:.1f}s)")

  # ---------------------------------------------------------------- model
  def init_params(self, rng):
    return blip2.init_blip2(rng, self.cfg) if self._pretrained_params is None else \
        jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), self._pretrained_params)

  def initial_params(self, abstract_params):
    return self._pretrained_params

  def _run_cfg(self):
    """The model config the steps and encoders run: the compute dtype and remat of the run."""
    return self.cfg.replace(dtype=self.compute_dtype.name, vision_dtype=None,
                            remat=bool(self.config.get("remat", False)))

  def loss_fn(self, params, batch, rng):
    run_cfg = self._run_cfg()
    if self.cache:
      ref, pos, neg = batch["ref_feats"], batch["pos_feats"], batch["neg_feats"]
    else:
      b = batch["ref_pixels"].shape[0]
      pix = jnp.concatenate([batch["ref_pixels"], batch["pos_pixels"], batch["neg_pixels"]])
      feats = blip2.vision_features(params, run_cfg, pix)
      ref, pos, neg = feats[:b], feats[b:2 * b], feats[2 * b:]
    b = ref.shape[0]
    q = blip2.compose_from_features(params, run_cfg, ref, batch["input_ids"],
                                    batch["attention_mask"])
    t = blip2.encode_target_from_features(params, run_cfg, jnp.concatenate([pos, neg]))
    temp = params["temp"].astype(jnp.float32)
    if self.loss_kind == "pairwise":
      tp, tn = t[:b], t[b:]
      s_pos = jnp.einsum("bd,bkd->bk", q, tp).max(-1) / temp
      s_neg = jnp.einsum("bd,bkd->bk", q, tn).max(-1) / temp
      loss = pairwise_loss(s_pos, s_neg)
    else:  # every positive and negative of the global batch as columns
      logits = blip2.score(q, t) / temp
      loss = infonce_loss(logits)
      s_pos = jnp.diagonal(logits[:, :b])
      s_neg = jnp.einsum("bd,bkd->bk", q, t[b:]).max(-1) / temp
    acc = jnp.mean((s_pos > s_neg).astype(jnp.float32))
    return loss, {"pair_acc": acc, "temp": temp}

  def batch_spec(self):
    b, lng = self.global_batch, self.max_len
    spec = {"input_ids": jax.ShapeDtypeStruct((b, lng), jnp.int32),
            "attention_mask": jax.ShapeDtypeStruct((b, lng), jnp.int32)}
    if self.cache:
      s = (self.image_size // self.cfg.vision.patch_size) ** 2 + 1
      for k in ("ref_feats", "pos_feats", "neg_feats"):
        spec[k] = jax.ShapeDtypeStruct((b, s, self.cfg.vision.hidden_size), self._feat_dtype)
    else:
      for k in ("ref_pixels", "pos_pixels", "neg_pixels"):
        spec[k] = jax.ShapeDtypeStruct((b, self.image_size, self.image_size, 3), jnp.float32)
    return spec

  @property
  def _feat_dtype(self):
    return jnp.dtype(self.config.qure.get("feature_dtype", "float32"))

  # ---------------------------------------------------------------- device helpers
  def _params_sharding(self, params):
    return jax.tree.map(lambda x: x.sharding, params)

  def _encode(self, fn, params, arrays: list[np.ndarray], batch_size: int, what: str
              ) -> np.ndarray:
    """Runs `fn(params, *arrays_batch)` over the rows of `arrays`, data-parallel over the mesh;
    every process gets the full result on the host."""
    n = len(arrays[0])
    nd = jax.device_count()
    bs = max(nd, (batch_size // nd) * nd)
    rep = shd.replicated(self.mesh)
    key = (fn, tuple(a.shape[1:] for a in arrays), bs)
    cache = self.__dict__.setdefault("_jit_cache", {})
    if key not in cache:
      in_sh = (self._params_sharding(params),) + tuple(
          shd.batch_sharding(self.mesh, a.ndim) for a in arrays)
      cache[key] = jax.jit(fn, in_shardings=in_sh, out_shardings=rep)
    jfn = cache[key]
    outs = []
    t0 = time.perf_counter()
    for i in range(0, n, bs):
      chunk = [a[i:i + bs] for a in arrays]
      m = len(chunk[0])
      if m < bs:
        chunk = [np.concatenate([c, np.repeat(c[-1:], bs - m, axis=0)]) for c in chunk]
      dev = [jax.make_array_from_callback(c.shape, shd.batch_sharding(self.mesh, c.ndim),
                                          lambda idx, c=c: c[idx]) for c in chunk]
      outs.append(np.asarray(jax.device_get(jfn(params, *dev)))[:m])
    dt = time.perf_counter() - t0
    if n >= 256:
      _log(f"encoded {n} {what} in {dt:.1f}s ({n / max(dt, 1e-9):.0f}/s)")
    return np.concatenate(outs)

  def _pixels(self, idx: np.ndarray) -> np.ndarray:
    return np.stack([self._images(self.image_names[int(i)]) for i in idx])

  def _ensure_features(self, params) -> None:
    if not self.cache or self._feats is not None:
      return
    fn = self._fns["vision"]
    n = len(self.image_names)
    bs = int(self.config.qure.get("encode_batch_size", 256))
    _log(f"caching frozen vision features of {n} images (once per run)")
    out = []
    for i in range(0, n, 4 * bs):  # bounded host memory for decoded pixels
      idx = np.arange(i, min(n, i + 4 * bs))
      out.append(self._encode(fn, params, [self._pixels(idx)], bs, "images").astype(
          self._feat_dtype))
    self._feats = np.concatenate(out)
    _log(f"vision feature cache: {self._feats.shape} {self._feats.dtype}, "
         f"{self._feats.nbytes / 2**20:.0f} MiB")

  def _image_inputs(self, idx: np.ndarray) -> np.ndarray:
    return self._feats[idx] if self.cache else self._pixels(idx)

  def encode_targets(self, params, idx: np.ndarray) -> np.ndarray:
    """[len(idx), Q, D] target features of global images `idx` with the current params."""
    self._ensure_features(params)
    fn = self._fns["targets"]
    return self._encode(fn, params, [self._image_inputs(idx)],
                        int(self.config.qure.get("encode_batch_size", 256)), "target images")

  def encode_queries(self, params, ref_idx, ids, mask) -> np.ndarray:
    """[B, D] composed queries."""
    self._ensure_features(params)
    fn = self._fns["compose"]
    return self._encode(fn, params, [self._image_inputs(ref_idx), ids, mask],
                        int(self.config.qure.get("encode_batch_size", 256)), "queries")

  # ---------------------------------------------------------------- epochs, mining, sampling
  def is_mining_epoch(self, epoch: int) -> bool:
    return bool(self.mine_every) and epoch != 0 and epoch % self.mine_every == 0

  def begin_epoch(self, epoch, params, first_step_in_epoch=0):
    """Caches features on first use; re-mines at QuRe's mining epochs (not again when a run
    resumes inside an epoch whose mining is in the checkpoint)."""
    self._ensure_features(params)
    last_mining = (epoch // self.mine_every) * self.mine_every if self.mine_every else 0
    if last_mining > 0 and self.mined_epoch != last_mining:
      if first_step_in_epoch and self.mined_epoch < last_mining:
        raise RuntimeError(f"resuming mid-epoch {epoch} without the mining of epoch "
                           f"{last_mining} in the checkpoint")
      stats = self.mine(params)
      self.mined_epoch = last_mining
      return stats
    return None

  def mine(self, params) -> dict:
    """Re-encodes every group's corpus and queries and re-mines the hard-negative sets."""
    t0 = time.perf_counter()
    sets, stats_all = [], []
    for g in self.groups:
      uniq, inv = np.unique(g.corpus, return_inverse=True)
      tfeat = self.encode_targets(params, uniq)
      qfeat = self.encode_queries(params, self.q_ref[g.queries], self.q_ids[g.queries],
                                  self.q_mask[g.queries])
      tdev = jnp.asarray(tfeat[inv])
      score = jax.jit(lambda q, t: jnp.einsum("bd,nkd->bnk", q, t).max(-1))

      def block(a, b, qfeat=qfeat, tdev=tdev, score=score):
        return score(jnp.asarray(qfeat[a:b]), tdev)

      kw = {}
      if self.strategy != "qure":
        kw["k"] = int(self.config.qure.get("k", 100))
      hs, st = mining.hard_negative_sets(
          block, g.target_pos, strategy=self.strategy, image_ids=g.corpus,
          consecutive_threshold=int(self.config.qure.get("consecutive_threshold", 1)),
          strict_below=bool(self.config.qure.get("strict_below", False)),
          num_queries=len(g.queries), corpus_size=len(g.corpus), **kw)
      sets.append(hs)
      stats_all.append(st)
    self.sampler_states = [smp.set_mined(st_, hs) for smp, st_, hs
                           in zip(self.samplers, self.sampler_states, sets)]
    sizes = np.concatenate([s.set_size for s in stats_all])
    out = {"set_size_mean": float(sizes.mean()), "set_size_median": float(np.median(sizes)),
           "set_size_max": int(sizes.max()), "empty_fraction": float((sizes == 0).mean()),
           "mining_s": time.perf_counter() - t0}
    _log("mining: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()))
    return out

  def negatives(self, epoch: int, index: int, rows: np.ndarray) -> np.ndarray:
    """One negative image per query of the *global* batch (every process draws the same)."""
    neg = np.zeros(len(rows), np.int32)
    for gi, smp in enumerate(self.samplers):
      sel = self.q_group[rows] == gi
      if sel.any():
        neg[sel], self.sampler_states[gi] = smp.sample(
            self.sampler_states[gi], self.q_in_group[rows[sel]], epoch=epoch,
            step=index * len(self.samplers) + gi)
    return neg

  def batch(self, epoch, index):
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self.queries))
    rows = order[index * self.global_batch:(index + 1) * self.global_batch]
    neg = self.negatives(epoch, index, rows)
    mine = shd.process_rows(self.global_batch)
    rows, neg = rows[mine], neg[mine]
    out = {"input_ids": self.q_ids[rows], "attention_mask": self.q_mask[rows]}
    ref, pos = self.q_ref[rows], self.q_tgt[rows]
    if self.cache:
      out.update(ref_feats=self._feats[ref], pos_feats=self._feats[pos],
                 neg_feats=self._feats[neg])
    else:
      out.update(ref_pixels=self._pixels(ref), pos_pixels=self._pixels(pos),
                 neg_pixels=self._pixels(neg))
    return out

  # ---------------------------------------------------------------- checkpointed host state
  def host_state(self):
    arrays = {}
    for gi, st_ in enumerate(self.sampler_states):
      # "/" is a path separator to orbax: store sampler keys with "." instead.
      arrays.update({f"group{gi}." + k.replace("/", "."): v
                     for k, v in sampling_lib.state_to_arrays(st_).items()})
    return {"mined_epoch": self.mined_epoch, "num_groups": len(self.groups)}, arrays

  def load_host_state(self, host, arrays):
    if host.get("num_groups", len(self.groups)) != len(self.groups):
      raise ValueError("checkpoint mining state has a different number of corpora than the "
                       "config (different dataset/categories?)")
    self.mined_epoch = int(host.get("mined_epoch", -1))
    states = []
    for gi, smp in enumerate(self.samplers):
      pre = f"group{gi}."
      st_ = sampling_lib.state_from_arrays({k[len(pre):].replace(".", "/"): v
                                            for k, v in arrays.items() if k.startswith(pre)})
      smp.validate(st_)
      states.append(st_)
    self.sampler_states = states

  # ---------------------------------------------------------------- evaluation and export
  def evaluate(self, params):
    from cirjax.eval import evaluate as ev  # pylint: disable=g-import-not-at-top
    from cirjax.eval import retrieval  # pylint: disable=g-import-not-at-top
    from cirjax.data import text  # pylint: disable=g-import-not-at-top
    limit = int(self.config.get("eval_max_queries", 0) or 0)
    results = []
    mesh = retrieval.make_mesh(jax.local_devices())
    for s in self.eval_splits:
      qs = s.queries[:limit] if limit else s.queries
      s2 = s if len(qs) == len(s.queries) else _replace_queries(s, qs)
      cidx = np.array([self.image_index[n] for n in s2.corpus], np.int32)
      ridx = np.array([self.image_index[q.reference] for q in qs], np.int32)
      ids, mask = text.tokenize(self.tokenizer, [default_text(q) for q in qs], self.max_len)
      scorer = retrieval.FeatureScorer(self.encode_queries(params, ridx, ids, mask),
                                       self.encode_targets(params, cidx))
      results.append(ev.evaluate_split(s2, scorer, mesh=mesh))
    if self.config.data.dataset == "fashioniq":  # QuRe Table 2 averages over categories
      out = {}
      for c, r in zip(self.config.data.categories, results):
        out.update({f"{c}/{k}": float(v) for k, v in r.metrics.items() if k.startswith("R@")})
      out["R@10"] = float(np.mean([r.metrics["R@10"] for r in results]))
      out["R@50"] = float(np.mean([r.metrics["R@50"] for r in results]))
      out["avg"] = (out["R@10"] + out["R@50"]) / 2
      self._chance = {k: float(np.mean([r.chance[k] for r in results]))
                      for k in ("R@10", "R@50")}
      return out
    r, = results
    keep = self.config.get("eval_metrics", None)
    m = {k: float(v) for k, v in r.metrics.items() if not k.startswith("skipped/")
         and not k.startswith("n_")}
    if keep:
      m = {k: m[k] for k in keep if k in m}
    self._chance = {k: float(v) for k, v in r.chance.items()}
    return m

  def chance_metrics(self):
    return dict(getattr(self, "_chance", {}))

  def finish(self, params):
    """Exports the final model as a cirjax BLIP-2 directory `<workdir>/model` (loadable by
    `cirjax.load_blip2`, `cirjax eval`; `cirjax convert` turns it into HF format)."""
    if not self.config.get("export", True):
      return
    host = jax.device_get(jax.tree.map(
        lambda x: jax.jit(lambda y: y, out_shardings=shd.replicated(self.mesh))(x), params))
    if jax.process_index() == 0:
      path = Path(self.workdir) / "model"
      registry.save(path, "blip2", self.cfg, jax.tree.map(np.asarray, host),
                    overwrite=True, extra={"trained_by": "cirjax train",
                                                     "train_config": self.config.get("config_spec", "")})
      vocab = Path(self.workdir) / "model" / "vocab.txt"
      try:
        from cirjax.data import text  # pylint: disable=g-import-not-at-top
        src = self.config.data.get("tokenizer") or os.path.expanduser(self.config.data.root)
        vocab.write_text(text.find_vocab(src).read_text())
      except FileNotFoundError:
        pass
      _log(f"exported the trained model to {path}")


class _AllImages:
  """The `split` an ImageCache needs (`.images`, `.name`), over every split's images."""

  def __init__(self, refs):
    self.images = dict(refs)
    self.name = "qure training+evaluation images"


def _replace_queries(split: CIRSplit, queries) -> CIRSplit:
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(split, queries=list(queries))


# Pure encoders (module level so jit caches by identity).
def _vision_features(params, pixels, *, cfg):
  return blip2.vision_features(params, cfg, pixels)


def _targets_from_feats(params, feats, *, cfg):
  return blip2.encode_target_from_features(params, cfg, feats)


def _targets_from_pixels(params, pixels, *, cfg):
  return blip2.encode_image(params, cfg, pixels)


def _compose_from_feats(params, feats, ids, mask, *, cfg):
  return blip2.compose_from_features(params, cfg, feats, ids, mask)


def _compose_from_pixels(params, pixels, ids, mask, *, cfg):
  return blip2.compose(params, cfg, pixels, ids, mask)
