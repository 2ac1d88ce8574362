"""QuRe training on BLIP-2 (paper appendix A, reference code): the `qure` task of the trainer.

Per epoch `e` of `E` (n_def = `config.qure.n_def`):
  * warm-up (`e < E // n_def`, or always without mining): each query's negative is a uniformly
    random entry of its mining corpus whose image differs from the target's;
  * at `e % (E // n_def) == 0, e != 0`: re-encode the training corpus and queries with the
    current parameters and re-mine every query's hard-negative set (`cirjax.mining`), logging
    the set-size statistics; from then on each query walks its set without replacement
    across epochs (`config.qure.sampling = "walk"`) or draws uniformly (`"uniform"`);
  * one negative per query per epoch (each query is in one batch per epoch), drawn by
    `cirjax.sampling.NegativeSampler` for the global batch on every process. The sampler
    state is the one at the start of the epoch (`begin_epoch` applies the previous epochs'
    draws), so `batch(epoch, index)` is a pure function of its arguments and that state, and
    the checkpointed state makes a resumed run draw the same negatives.

Loss (`config.qure.loss`): `pairwise` (QuRe, Eqs. 2-3), `infonce` (every positive and
negative of the global batch as columns) or `infonce_inbatch` (the positives only),
independent of the backbone.

With a frozen vision tower and no augmentation the tower's output (before `ln_vision`, which
QuRe trains) is computed once for every training and evaluation image and reused by every
step, mining and evaluation (`config.qure.cache_features`, on by default where valid).

Mining corpora (docs/reference_semantics.md): CIRR / synthetic — the training split's images;
FashionIQ — per category, the targets of that category's training triplets (one entry per
triplet, sets de-duplicated by image id).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cirjax import console
from cirjax import losses
from cirjax import mining
from cirjax import mining_audit
from cirjax import sampling as sampling_lib
from cirjax.convert import hub, registry
from cirjax.data import images as images_lib
from cirjax.data import text
from cirjax.data import pixel_store
from cirjax.data import row_store
from cirjax.data.loader import (Pixels, Prefetcher, default_text, default_workers,
                                file_image_source)
from cirjax.data.records import CIRSplit, DataError
from cirjax.data import training_splits
from cirjax.eval import encode as encode_lib
from cirjax.eval import evaluate as ev
from cirjax.eval import retrieval
from cirjax.models import blip2
from cirjax.models.scoring import max_over_tokens
from cirjax.train import config_utils, feature_store
from cirjax.train import sharding as shd
from cirjax.train import state as st
from cirjax.train.task import Task, run_options

LOSSES = ("pairwise", "infonce", "infonce_inbatch")
# The QuRe study's oracle: top-k with every true false negative removed (needs a dataset
# that knows every relevant image, mining_audit.FULL_RELEVANT_DATASETS).
ORACLE_STRATEGY = "topk_oracle"


_log = console.log


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
      max_position_embeddings=int(q.get("max_position_embeddings", 512)),
      **dropout_rates(q))
  return blip2.Blip2Config(vision=vision, qformer=qformer,
                           num_query_tokens=int(mc.num_query_tokens), embed_dim=int(mc.embed_dim),
                           ln_vision_eps=1e-5 if clip else 1e-6)


DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob")


def dropout_rates(q: ml_collections.ConfigDict) -> dict:
  """The Q-Former dropout rates `config.model.qformer` sets (absent: the model's own)."""
  return {k: float(q[k]) for k in DROPOUT_KEYS if q.get(k) is not None}


class _Group:
  """One mining corpus and the training queries mined against it."""

  def __init__(self, queries: np.ndarray, corpus: np.ndarray, query_target: np.ndarray):
    self.queries = queries              # global query indices
    self.corpus = corpus                # [N] global image indices (may repeat)
    self.target_pos = query_target      # [len(queries)] corpus position of each target


def _image_table(train_splits: list[CIRSplit], eval_splits: list[CIRSplit]
                 ) -> tuple[dict[str, int], dict[str, Any], int]:
  """Every image of the run by name: (name -> global index, name -> image reference, number
  of training images). Training images come first, then evaluation-only ones."""
  names: dict[str, int] = {}
  refs: dict[str, Any] = {}

  def add(split, image_names):
    for n in image_names:
      if n not in names:
        names[n] = len(names)
        refs[n] = split.images[n]

  for s in train_splits:
    add(s, list(s.corpus) + [x for q in s.queries for x in (q.reference, q.target)])
  n_train = len(names)
  for s in eval_splits:
    add(s, list(s.corpus) + [q.reference for q in s.queries])
  return names, refs, n_train


TARGET_POSITIONS = ("first", "slot")


def _mining_groups(train_splits: list[CIRSplit], names: dict[str, int], q_tgt: np.ndarray,
                   per_triplet: bool, target_position: str = "first") -> list[_Group]:
  """One mining corpus per training split: its images, or (`per_triplet`, FashionIQ) the
  targets of its triplets, one entry per triplet as the reference code builds it.

  In a per-triplet corpus a target image repeats when several triplets share it. The
  reference takes as the query's target position the FIRST entry of its target image
  (`list.index`): `target_position="first"` (default). `"slot"` uses the query's own entry
  instead; copies score identically, so the two differ whenever the query is not the first
  copy of its target (docs/reference_semantics.md#mining).
  """
  if target_position not in TARGET_POSITIONS:
    raise ValueError(f"config.qure.target_position={target_position!r}: use one of "
                     f"{TARGET_POSITIONS}")
  groups, start = [], 0
  for s in train_splits:
    nq = len(s.queries)
    qidx = np.arange(start, start + nq)
    if per_triplet:
      corpus = q_tgt[qidx].copy()
      tpos = (mining.first_positions(corpus, corpus) if target_position == "first"
              else np.arange(nq, dtype=np.int32))
    else:
      corpus = np.array([names[n] for n in s.corpus], np.int32)
      pos = {int(g): i for i, g in enumerate(corpus)}
      missing = [s.queries[i - start].target for i in qidx if int(q_tgt[i]) not in pos]
      if missing:
        raise DataError(f"{s.name}: target {missing[0]!r} is not in the training corpus")
      tpos = np.array([pos[int(q_tgt[i])] for i in qidx], np.int32)
    groups.append(_Group(qidx, corpus, tpos))
    start += nq
  return groups


class GroupSampler:
  """QuRe's negatives for queries spread over mining groups: one `NegativeSampler` per
  group, holding each group's state at the start of epoch `epoch`."""

  def __init__(self, groups: list[_Group], num_queries: int, seed: int, sampling: str):
    self.samplers = [sampling_lib.NegativeSampler(
        mining.whole_corpus_sets(g.target_pos, image_ids=g.corpus), seed=seed,
        sampling=sampling) for g in groups]
    self.states = [smp.init() for smp in self.samplers]
    self.epoch: int | None = 0   # None: restored from a checkpoint that stored every draw
    self.q_group = np.zeros(num_queries, np.int32)     # query -> its group
    self.q_in_group = np.zeros(num_queries, np.int32)  # query -> its row in the group
    for gi, g in enumerate(groups):
      self.q_group[g.queries] = gi
      self.q_in_group[g.queries] = np.arange(len(g.queries))

  def advance(self, epoch: int, epoch_rows: Callable[[int], np.ndarray],
              first_step_in_epoch: int) -> None:
    """Applies the draws of the epochs from `self.epoch` up to `epoch` (`epoch_rows(e)`: the
    queries drawn in epoch e; each is drawn at most once per epoch, so an epoch's draws
    never depend on each other)."""
    if self.epoch is None:
      if first_step_in_epoch:
        raise RuntimeError("this checkpoint's sampler state predates per-epoch sampler "
                           "states and cannot resume mid-epoch; resume from an epoch's end")
      self.epoch = epoch
    if epoch < self.epoch:
      raise RuntimeError(f"begin_epoch({epoch}) after epoch {self.epoch}")
    for e in range(self.epoch, epoch):
      rows = epoch_rows(e)
      self.states = [smp.advance(state, self.q_in_group[rows[self.q_group[rows] == gi]])
                     for gi, (smp, state) in enumerate(zip(self.samplers, self.states))]
    self.epoch = epoch

  def set_mined(self, sets: list[mining.HardNegativeSets]) -> None:
    self.states = [smp.set_mined(state, hs)
                   for smp, state, hs in zip(self.samplers, self.states, sets)]

  def sample(self, epoch: int, index: int, rows: np.ndarray) -> np.ndarray:
    """One negative image per query of the *global* batch `index` of `epoch` (every
    process draws the same), from the state at the start of `epoch`."""
    if self.epoch != epoch:
      raise RuntimeError(f"batch of epoch {epoch} asked before begin_epoch({epoch})")
    neg = np.zeros(len(rows), np.int32)
    for gi, (smp, state) in enumerate(zip(self.samplers, self.states)):
      sel = self.q_group[rows] == gi
      if sel.any():
        neg[sel], _ = smp.sample(state, self.q_in_group[rows[sel]], epoch=epoch,
                                 step=index * len(self.samplers) + gi)
    return neg

  def to_arrays(self) -> dict[str, np.ndarray]:
    arrays = {}
    for gi, state in enumerate(self.states):
      # "/" is a path separator to orbax: store sampler keys with "." instead.
      arrays.update({f"group{gi}." + k.replace("/", "."): v
                     for k, v in sampling_lib.state_to_arrays(state).items()})
    return arrays

  def load(self, epoch: int | None, arrays: dict[str, np.ndarray]) -> None:
    states = []
    for gi, smp in enumerate(self.samplers):
      pre = f"group{gi}."
      state = sampling_lib.state_from_arrays({k[len(pre):].replace(".", "/"): v
                                              for k, v in arrays.items() if k.startswith(pre)})
      smp.validate(state)
      states.append(state)
    self.states, self.epoch = states, epoch


# ------------------------------------------------------------------------------ the task

class QuReTask(Task):
  """QuRe: frozen ViT, trained Q-Former, pairwise loss with re-mined hard negatives."""

  name = "qure"
  # batch(epoch, i) reads the sampler state set at the epoch's start: workers build ahead.
  stateful_batches = False

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, workdir: str):
    super().__init__(config, mesh, workdir)
    qc = config.qure
    self.loss_kind = qc.get("loss", "pairwise")
    if self.loss_kind not in LOSSES:
      raise ValueError(f"config.qure.loss={self.loss_kind!r}: use one of {LOSSES}")
    self.seed = int(config.get("seed", 0))
    self.compute_dtype = jnp.dtype(config.get("compute_dtype", "float32"))
    t0 = time.perf_counter()
    self.pipeline = training_splits.pipeline(config.data)
    self.stateful_batches = self.pipeline == "grain"  # grain's iterator: taken in step order
    self.train_splits, self.eval_splits, image_source = training_splits.read_training_data(
        config.data)
    tok_src = tokenizer_source(config)
    self.tokenizer = text.load_bert_tokenizer(tok_src)
    self.max_len = int(config.data.get("max_text_length", 32))
    self._init_model(config)
    self.transform = images_lib.make_transform(config.data.get("transform", "targetpad"),
                                               self.image_size)

    self.queries = [q for s in self.train_splits for q in s.queries]
    self.image_index, refs, self.n_train_images = _image_table(self.train_splits,
                                                               self.eval_splits)
    self.image_names = list(self.image_index)
    self.q_ref = np.array([self.image_index[q.reference] for q in self.queries], np.int32)
    self.q_tgt = np.array([self.image_index[q.target] for q in self.queries], np.int32)
    q_texts = [default_text(q) for q in self.queries]
    self.q_ids, self.q_mask = text.tokenize(self.tokenizer, q_texts, self.max_len)
    text.check_tokenizer_coverage(self.tokenizer, q_texts, str(tok_src),
                                  f"the {config.data.dataset} training queries", warn=_log)
    self.groups = _mining_groups(self.train_splits, self.image_index, self.q_tgt,
                                 target_position=config.qure.get("target_position", "first"),
                                 per_triplet=config.data.dataset == "fashioniq")

    tc = config.train
    self.global_batch = int(tc.batch_size)
    self.steps_per_epoch = len(self.queries) // self.global_batch
    if self.steps_per_epoch == 0:
      raise DataError(f"{len(self.queries)} training queries is fewer than one batch of "
                      f"{self.global_batch} (config.train.batch_size)")
    self.epochs = int(tc.epochs)
    self._epoch_rows = functools.partial(  # epoch -> its global query rows in batch order
        training_splits.epoch_rows, self.seed, num_queries=len(self.queries),
        steps_per_epoch=self.steps_per_epoch, global_batch=self.global_batch)
    n_def = int(qc.get("n_def", 6))
    self.mine_every = max(1, self.epochs // n_def) if n_def > 0 else 0
    self.strategy = _check_strategy(qc.get("strategy", "qure"), config.data.dataset)
    if qc.get("mining_method", "auto") not in mining.METHODS:  # fail now, not at epoch 8
      raise ValueError(f"config.qure.mining_method={qc.get('mining_method')!r}; expected "
                       f"one of {mining.METHODS}")
    self.sampler = GroupSampler(self.groups, len(self.queries), self.seed,
                                qc.get("sampling", "walk"))

    self._setup_encoders(config)
    self._refs = refs
    self._images = Pixels(self.transform, image_source or file_image_source(_AllImages(refs)))
    self.feed = _grain_feed(self, config) if self.pipeline == "grain" else None
    self.pixel_store_stats: dict | None = None  # None: not asked yet
    self.mined_epoch = -1
    _log(f"qure data: {len(self.queries)} training queries, {self.n_train_images} training "
         f"images, {len(self.image_names) - self.n_train_images} more for evaluation "
         f"({time.perf_counter() - t0:.1f}s)")

  def _init_model(self, config) -> None:
    """Random (synthetic) or pretrained (an HF / LAVIS / cirjax BLIP-2 directory) model."""
    self.pretrained = config_utils.model_init(config)
    if self.pretrained:
      loaded = registry.load(self.pretrained, family="blip2")  # a path or a hub id
      self.cfg, self._pretrained_params = loaded.config, loaded.params
      # The checkpoint's dropout rates (HF config.json; LAVIS: bert-base's 0.1) unless the
      # run config sets them.
      rates = dropout_rates(config.model.get("qformer") or ml_collections.ConfigDict())
      self.cfg = self.cfg.replace(qformer=dataclasses.replace(self.cfg.qformer, **rates))
      if len(self.tokenizer) > self.cfg.qformer.vocab_size:
        raise ValueError(f"{self.pretrained}: Q-Former vocabulary {self.cfg.qformer.vocab_size} "
                         f"< tokenizer's {len(self.tokenizer)}")
    else:
      self.cfg = model_config(config.model, len(self.tokenizer))
      self._pretrained_params = None
    self.image_size = self.cfg.vision.image_size

  def _setup_encoders(self, config) -> None:
    """The pure encoders, and the frozen-feature cache, valid only if every vision-tower
    parameter is frozen."""
    mask = st.trainable_mask(blip2.abstract_params(self.cfg), tuple(config.get("freeze", ())),
                             tuple(config.get("train_only", ())))
    frozen_vit = not any(jax.tree.leaves(mask["vision"]))
    self.cache = bool(config.qure.get("cache_features", True))
    if self.cache:
      feature_store.storage_dtype(config.qure.get("feature_dtype", "float16"))
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
    nd = self.mesh.devices.size
    self.encode_batch = max(nd, int(config.qure.get("encode_batch_size", 256)) // nd * nd)
    self._feats: feature_store.FeatureStore | None = None
    self.store_stats: dict = {}

  # ---------------------------------------------------------------- model
  def init_params(self, rng):
    return blip2.init_blip2(rng, self.cfg) if self._pretrained_params is None else \
        jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), self._pretrained_params)

  def initial_params(self, abstract_params):
    # Host copies: loaded device arrays may be committed to one device, which the trainer's
    # jit onto a multi-device mesh refuses.
    p = self._pretrained_params
    return None if p is None else _with_init_temp(jax.tree.map(np.asarray, p), self.config)

  def layer_stacks(self):
    return blip2.layer_stacks(self.cfg)

  def _run_cfg(self):
    """The model config the steps and encoders run: the compute dtype and the run options
    (`cirjax.train.task.run_options`: remat, attention kernel, layer loop)."""
    return self.cfg.replace(dtype=self.compute_dtype.name, vision_dtype=None,
                            **run_options(self.config))

  def loss_fn(self, params, batch, rng):
    """The training step's loss. `rng` (the step's key) drives the Q-Former's dropout in both
    passes, as the reference trains in `model.train()` mode; nothing else here is random."""
    run_cfg = self._run_cfg()
    rng_query, rng_target = jax.random.split(rng)
    if self.cache:
      ref, pos, neg = batch["ref_feats"], batch["pos_feats"], batch["neg_feats"]
    else:
      b = batch["ref_pixels"].shape[0]
      pix = jnp.concatenate([batch["ref_pixels"], batch["pos_pixels"], batch["neg_pixels"]])
      feats = blip2.vision_features(params, run_cfg, pix)
      ref, pos, neg = feats[:b], feats[b:2 * b], feats[2 * b:]
    q = blip2.compose_from_features(params, run_cfg, ref, batch["input_ids"],
                                    batch["attention_mask"], dropout_rng=rng_query)
    t = blip2.encode_target_from_features(params, run_cfg, jnp.concatenate([pos, neg]),
                                          dropout_rng=rng_target)
    temp = params["temp"].astype(jnp.float32)
    loss, s_pos, s_neg = _loss_and_scores(self.loss_kind, q, t, temp)
    acc = jnp.mean((s_pos > s_neg).astype(jnp.float32))
    return loss, {"pair_acc": acc, "temp": temp}

  def batch_spec(self):
    b, lng = self.global_batch, self.max_len
    spec = {"input_ids": jax.ShapeDtypeStruct((b, lng), jnp.int32),
            "attention_mask": jax.ShapeDtypeStruct((b, lng), jnp.int32)}
    if self.cache:
      s = (self.image_size // self.cfg.vision.patch_size) ** 2 + 1
      dtype = feature_store.storage_dtype(self.config.qure.get("feature_dtype", "float16"))
      for k in ("ref_feats", "pos_feats", "neg_feats"):
        spec[k] = jax.ShapeDtypeStruct((b, s, self.cfg.vision.hidden_size), dtype)
    else:
      for k in ("ref_pixels", "pos_pixels", "neg_pixels"):
        spec[k] = jax.ShapeDtypeStruct((b, self.image_size, self.image_size, 3), jnp.float32)
    return spec

  # ---------------------------------------------------------------- encoding
  def _pixels(self, idx: np.ndarray) -> np.ndarray:
    return self._images([self.image_names[int(i)] for i in idx])

  def _inputs(self, idx: np.ndarray, *extra: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
    """Encoder input batches for global images `idx` (cached features or decoded pixels, one
    batch at a time) with the rows of `extra` arrays (token ids, masks) beside them."""
    for i in range(0, len(idx), self.encode_batch):
      j = idx[i:i + self.encode_batch]
      yield (self._feats[j] if self.cache else self._pixels(j),) + tuple(
          a[i:i + self.encode_batch] for a in extra)

  def _encode(self, fn, params, inputs, n: int, what: str, sharded: bool = False):
    t0 = time.perf_counter()
    out = encode_lib.encode(fn, params, inputs, mesh=self.mesh, batch_size=self.encode_batch,
                            sharded=sharded)
    dt = time.perf_counter() - t0
    if n >= 256:
      _log(f"encoded {n} {what} in {dt:.1f}s ({n / max(dt, 1e-9):.0f}/s)")
    return out

  def _ensure_features(self, params) -> None:
    if self.pixel_store_stats is None:
      self.pixel_store_stats = _open_pixel_store(self)
    if not self.cache or self._feats is not None:
      return
    self._feats = _open_store(self, params)
    _log(self._feats.describe())

  def encode_targets(self, params, idx: np.ndarray, sharded: bool = False):
    """[len(idx), Q, D] target features of global images `idx` with the current params:
    host numpy, or (`sharded`) a jax.Array that stays on the mesh."""
    self._ensure_features(params)
    return self._encode(self._fns["targets"], params, self._inputs(idx), len(idx),
                        "target images", sharded)

  def encode_queries(self, params, ref_idx, ids, mask, sharded: bool = False):
    """[B, D] composed queries (host numpy, or a jax.Array on the mesh with `sharded`)."""
    self._ensure_features(params)
    return self._encode(self._fns["compose"], params, self._inputs(ref_idx, ids, mask),
                        len(ref_idx), "queries", sharded)

  # ---------------------------------------------------------------- epochs, mining, sampling
  def begin_epoch(self, epoch, params, first_step_in_epoch=0):
    """Caches features (or pixels) on first use; brings the sampler state to the start of
    `epoch`; re-mines at QuRe's mining epochs (not again when a run resumes inside an epoch
    whose mining is in the checkpoint); draws the first batch's negatives once (discarded:
    draws are pure) so that the jitted draws compile here (and grain's workers start), not
    while the first step waits for its batch."""
    self._ensure_features(params)
    self.sampler.advance(epoch, self._epoch_rows, first_step_in_epoch)
    last_mining = (epoch // self.mine_every) * self.mine_every if self.mine_every else 0
    stats = None
    if last_mining > 0 and self.mined_epoch != last_mining:
      if first_step_in_epoch and self.mined_epoch < last_mining:
        raise RuntimeError(f"resuming mid-epoch {epoch} without the mining of epoch "
                           f"{last_mining} in the checkpoint")
      stats = self.mine(params)
      self.mined_epoch = last_mining
    b, i = self.global_batch, first_step_in_epoch
    self.sampler.sample(epoch, i, self._epoch_rows(epoch)[i * b:(i + 1) * b])
    _start_feed(self, epoch * self.steps_per_epoch + i)
    return stats

  def mine(self, params) -> dict:
    """Re-encodes every group's corpus and queries and re-mines the hard-negative sets.

    The features stay on this process's devices (rows split over them) and each block of
    query x corpus scores is computed there; the XLA mining kernels (accelerators) mine it
    there too, so only the ragged sets and their statistics reach the host (the NumPy
    method, CPU backends, takes each block to the host it runs on)."""
    t0 = time.perf_counter()
    sets, stats_all, audits = [], [], []
    qc = self.config.qure
    oracle = self.strategy == ORACLE_STRATEGY
    strategy = "topk" if oracle else self.strategy
    kw = {} if strategy == "qure" else {"k": int(qc.get("k", 100))}
    temp = float(np.asarray(params["temp"]))
    pairs = []
    mesh = retrieval.make_mesh(jax.local_devices())
    times = {"encode_s": 0.0, "score_s": 0.0}
    for g in self.groups:
      t1 = time.perf_counter()
      uniq, inv = np.unique(g.corpus, return_inverse=True)
      tfeat = _on_local_mesh(self.encode_targets(params, uniq, sharded=True), mesh)
      qfeat = _on_local_mesh(self.encode_queries(
          params, self.q_ref[g.queries], self.q_ids[g.queries], self.q_mask[g.queries],
          sharded=True), mesh)
      tdev = _expand_corpus(tfeat, _on_local_mesh(inv.astype(np.int32), mesh))
      times["encode_s"] += time.perf_counter() - t1

      def block(a, b, qfeat=qfeat, tdev=tdev):
        t2 = time.perf_counter()
        s = _block_scores(qfeat, tdev, a, size=b - a).block_until_ready()
        times["score_s"] += time.perf_counter() - t2
        return s

      hs, stats = mining.hard_negative_sets(
          block, g.target_pos, strategy=strategy, image_ids=g.corpus,
          consecutive_threshold=int(qc.get("consecutive_threshold", 1)),
          strict_below=bool(qc.get("strict_below", False)), mesh=mesh,
          method=str(qc.get("mining_method", "auto")),
          num_queries=len(g.queries), corpus_size=len(g.corpus), **kw)
      if oracle:
        hs = _without_relevant(self, g, hs)
      pairs.append((_pair_stats(block, g, hs, temp), len(g.queries)))
      sets.append(hs)
      stats_all.append(stats)
      if self.config.data.dataset in mining_audit.FULL_RELEVANT_DATASETS:
        audits.append(_audit_group(block, g, hs, self, qc))
    self.sampler.set_mined(sets)
    out = _mining_summary(stats_all, times, time.perf_counter() - t0)
    out.update(_merge_pair_stats(pairs))
    if audits:
      out.update(mining_audit.audit_metrics(mining_audit.merge(audits)))
    _log("mining: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()))
    return out

  def batch(self, epoch, index):
    rows = self._epoch_rows(epoch)[index * self.global_batch:(index + 1) * self.global_batch]
    neg = self.sampler.sample(epoch, index, rows)
    mine = shd.process_rows(self.global_batch)
    rows, neg = rows[mine], neg[mine]
    out, ref, pos = _queries(self, epoch * self.steps_per_epoch + index, rows)
    if self.cache:
      out.update(ref_feats=self._feats[ref], pos_feats=self._feats[pos],
                 neg_feats=self._feats[neg])
    else:
      out.update(ref_pixels=self._pixels(ref), pos_pixels=self._pixels(pos),
                 neg_pixels=self._pixels(neg))
    return out

  # ---------------------------------------------------------------- checkpointed host state
  def host_state(self):
    feed = {} if self.feed is None else {"grain": self.feed.state()}
    return {"mined_epoch": self.mined_epoch, "num_groups": len(self.groups),
            "sampler_epoch": self.sampler.epoch, **feed}, self.sampler.to_arrays()

  def load_host_state(self, host, arrays):
    if host.get("num_groups", len(self.groups)) != len(self.groups):
      raise ValueError("checkpoint mining state has a different number of corpora than the "
                       "config (different dataset/categories?)")
    self.mined_epoch = int(host.get("mined_epoch", -1))
    epoch = host.get("sampler_epoch")
    self.sampler.load(None if epoch is None else int(epoch), arrays)
    if self.feed is not None:
      self.feed.load_state(host.get("grain"))

  def close(self):
    if self.feed is not None:
      self.feed.close()

  # ---------------------------------------------------------------- evaluation and export
  def evaluate(self, params):
    self._ensure_features(params)
    limit = int(self.config.get("eval_max_queries", 0) or 0)
    results = []
    for s in self.eval_splits:
      if limit and len(s.queries) > limit:
        s = dataclasses.replace(s, queries=list(s.queries[:limit]))
      cidx = np.array([self.image_index[n] for n in s.corpus], np.int32)
      ridx = np.array([self.image_index[q.reference] for q in s.queries], np.int32)
      ids, mask = text.tokenize(self.tokenizer, [default_text(q) for q in s.queries],
                                self.max_len)
      results.append(ev.evaluate_encoded(
          s, params, self._fns["targets"], self._fns["compose"], self._inputs(cidx),
          self._inputs(ridx, ids, mask), mesh=self.mesh, batch_size=self.encode_batch))
    if self.config.data.dataset == "fashioniq":  # QuRe Table 2 averages over categories
      m, self._chance = ev.fashioniq_headline(dict(zip(self.config.data.categories, results)))
      return m
    m, self._chance = ev.headline_metrics(results[0], self.config.get("eval_metrics", None))
    return m

  def chance_metrics(self):
    return dict(getattr(self, "_chance", {}))

  def finish(self, params):
    """Exports the final model as a cirjax BLIP-2 directory `<workdir>/model` (loadable by
    `cirjax.load_blip2`, `cirjax eval`; `cirjax convert` turns it into HF format)."""
    if self.config.get("export", True):
      export_model(Path(self.workdir) / "model", self.config, self.cfg, params, self.mesh)


def _loss_and_scores(loss_kind: str, q, t, temp):
  """The step's loss and each query's positive / negative scores, `t` = [positives;
  negatives] of the batch: QuRe's pairwise loss, or InfoNCE with every positive and (but for
  infonce_inbatch) negative of the global batch as columns."""
  b = q.shape[0]
  if loss_kind == "pairwise":
    s_pos = losses.qure_scores(q, t[:b], temp)
    s_neg = losses.qure_scores(q, t[b:], temp)
    return losses.pairwise_sigmoid_loss(s_pos, s_neg), s_pos, s_neg
  logits = losses.qure_logits(q, t if loss_kind == "infonce" else t[:b], temp)
  return (losses.info_nce_from_logits(logits), jnp.diagonal(logits[:, :b]),
          losses.qure_scores(q, t[b:], temp))


def _mining_summary(stats_all, times: dict, total: float) -> dict:
  """A mining round's set-size statistics and where its seconds went."""
  sizes = np.concatenate([s.set_size for s in stats_all])
  return {"set_size_mean": float(sizes.mean()), "set_size_median": float(np.median(sizes)),
          "set_size_max": int(sizes.max()), "empty_fraction": float((sizes == 0).mean()),
          "mining_s": total, "mining_encode_s": times["encode_s"],
          "mining_score_s": times["score_s"],
          "mining_sets_s": total - times["encode_s"] - times["score_s"]}


def tokenizer_source(config: ml_collections.ConfigDict) -> str:
  """The run's BERT tokenizer: `data.tokenizer` (a path or hub id); else the one beside
  `model.init` (its directory, or a LAVIS file's, when it holds vocab.txt / tokenizer.json /
  tokenizer_config.json); else `data.root` (the synthetic set's vocab.txt)."""
  named = config.data.get("tokenizer") or ""
  if named:
    return str(hub.resolve(named, weights=False))
  init = config_utils.model_init(config, check=False)
  beside = registry.tokenizer_dir(init) if init else None
  if beside is not None:
    return str(beside)
  return os.path.expanduser(config.data.get("root") or "")


def export_model(path: Path, config: ml_collections.ConfigDict, cfg: blip2.Blip2Config, params,
                 mesh: jax.sharding.Mesh) -> None:
  """Writes the trained model as a cirjax BLIP-2 directory at `path`, with the run's vocab."""
  host = jax.device_get(jax.jit(lambda p: p, out_shardings=shd.replicated(mesh))(params))
  if jax.process_index() != 0:
    return
  host = blip2.unstack_layers(jax.tree.map(np.asarray, host), cfg)  # the converters' layout
  registry.save(path, "blip2", cfg.replace(scan_layers=False), host, overwrite=True,
                extra={"trained_by": "cirjax train", "train_config": config.get("config_spec", "")})
  try:
    (path / "vocab.txt").write_text(text.find_vocab(tokenizer_source(config)).read_text())
  except FileNotFoundError:
    pass
  _log(f"exported the trained model to {path}")


def _open_store(task: QuReTask, params) -> feature_store.FeatureStore:
  """The frozen-feature store of this run's images: reused when the workdir has a valid
  one for these vision parameters, images and preprocessing, else encoded (each process
  its share of the images) into `config.qure.feature_store_dir` (default
  `<workdir>/feature_store`)."""
  qc, n = task.config.qure, len(task.image_names)
  vcfg = task.cfg.vision
  shape = (n, (task.image_size // vcfg.patch_size) ** 2 + 1, vcfg.hidden_size)
  dtype = str(qc.get("feature_dtype", "float16"))
  # Keyed by the per-layer tree: a run that changes scan_layers reuses the store.
  vision = blip2.unstack_layers({"vision": _host_tree(params["vision"])}, task.cfg)["vision"]
  spec = {"vision": repr(vcfg), "compute_dtype": task.compute_dtype.name, "dtype": dtype,
          "transform": str(task.config.data.get("transform", "targetpad")),
          "images": [pixel_store.image_identity(k, task._refs[k]) for k in task.image_names]}
  key = feature_store.store_key(vision, spec)
  directory = qc.get("feature_store_dir", "") or os.path.join(task.workdir, "feature_store")
  t0 = time.perf_counter()
  built = {"images": n}  # the sidecar records it, with this process's encoding speed

  def fill(rows, lo, hi):
    _log(f"encoding frozen vision features of {hi - lo} images into the store "
         f"(this process's share of {n})")
    t1 = time.perf_counter()
    # Each process encodes its rows on its own devices, with its own copy of the params.
    single = jax.process_count() == 1
    mesh = task.mesh if single else retrieval.make_mesh(jax.local_devices())
    enc_params = params if single else _host_tree(params)
    workers = task.config.data.get("workers", -1)
    workers = default_workers() if workers is None or workers < 0 else int(workers)

    def sink(start, y):
      rows[lo + start:lo + start + len(y)] = y

    # Decoding is most of a shallow ViT's encoding time: worker threads decode ahead.
    with Prefetcher(lambda i: (task._pixels(np.arange(i, min(hi, i + task.encode_batch))),),
                    range(lo, hi, task.encode_batch), workers=workers,
                    name="feature-store") as pixels:
      encode_lib.encode(task._fns["vision"], enc_params, pixels, mesh=mesh,
                        batch_size=task.encode_batch, dtype=rows.dtype, sink=sink,
                        progress=row_store.BuildProgress("feature store", hi - lo, _log))
    built["encode_s"] = time.perf_counter() - t1
    built["images_per_s"] = (hi - lo) / max(built["encode_s"], 1e-9)

  store = feature_store.open_or_build(
      os.path.expanduser(directory), key, shape, dtype, fill,
      verify=bool(qc.get("feature_store_verify", True)), extra=built, log=_log)
  task.store_stats = {"store_path": str(store.path), "store_bytes": store.nbytes,
                      "store_shape": list(store.shape), "store_dtype": store.dtype.name,
                      "store_built": "encode_s" in built,
                      "store_open_s": time.perf_counter() - t0,
                      **{f"store_{k}": v for k, v in built.items()}}
  return store


def _queries(task: QuReTask, step: int, rows: np.ndarray):
  """(token ids and mask, reference and target image indices) of this process's `rows` of
  `step`: as read from the ArrayRecords by grain (checked to be those rows), or from the
  task's tables."""
  if task.feed is None:
    return ({"input_ids": task.q_ids[rows], "attention_mask": task.q_mask[rows]},
            task.q_ref[rows], task.q_tgt[rows])
  ex = task.feed.next(step)
  if not np.array_equal(ex["row"], rows):
    raise RuntimeError(f"grain fed rows {ex['row'][:4]}... for step {step}, whose rows are "
                       f"{rows[:4]}...")
  return ({"input_ids": ex["input_ids"], "attention_mask": ex["attention_mask"]},
          ex["reference"], ex["target"])


def _start_feed(task: QuReTask, step: int) -> None:
  """The grain pipeline's workers start, and read `step`'s batch, at the epoch's start."""
  if task.feed is not None:
    task.feed.start(step)


def _grain_feed(task: QuReTask, config):
  """The training queries through grain from `config.data.tfds_dir` (docs/data.md#grain)."""
  from cirjax.data import grain_pipeline  # pylint: disable=g-import-not-at-top
  train, _ = training_splits.train_split_names(config.data)
  return grain_pipeline.GrainFeed(
      os.path.expanduser(config.data.tfds_dir), config.data.dataset, train,
      tokenizer=task.tokenizer, max_length=task.max_len, image_index=task.image_index,
      seed=task.seed, epochs=task.epochs, steps_per_epoch=task.steps_per_epoch,
      global_batch=task.global_batch, workers=int(config.data.get("grain_workers", 0) or 0))


def _open_pixel_store(task: QuReTask) -> dict:
  """Opens the pixel store of every image of the run (`config.data.pixel_store`), on every
  process; its facts ({} when the run decodes). Without the feature cache every step, mining
  round and evaluation reads pixels; with it each image is read once, for the feature store."""
  return task._images.open_store(  # pylint: disable=protected-access
      task.config.data, task.workdir, task.image_names, task._refs,  # pylint: disable=protected-access
      reads_per_image=1.0 if task.cache else float("inf"), log=_log)


def _host_tree(tree):
  """A host copy of a tree of (possibly sharded, possibly multi-process) global arrays."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


class _AllImages:
  """The `split` `file_image_source` needs (`.images`, `.name`), over every split's images."""

  def __init__(self, refs):
    self.images = dict(refs)
    self.name = "qure training+evaluation images"


def _on_local_mesh(x: jax.Array, mesh: jax.sharding.Mesh) -> jax.Array:
  """`x` on this process's devices, rows split over them when they divide evenly (else
  replicated). Several processes each need every row for their mining: they gather them
  once through the host."""
  spec = P("data") if x.shape[0] % mesh.devices.size == 0 else P()
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = _host_tree(x)
  return jax.device_put(x, NamedSharding(mesh, spec))


def _audit_group(block, g: _Group, hs, task, qc) -> dict:
  """Every strategy's pools from this mining's scores, audited against the full relevant
  sets (docs/mining.md#false-negatives); the trained strategy's sets are reused, and the
  oracle's own pools are audited too (`fn_share/topk_oracle`: 0 unless the filter failed)."""
  rel = mining_audit.relevant_ids([task.queries[i] for i in g.queries], task.image_index.get)
  out = mining_audit.audit_strategies(
      block, g.target_pos, rel, image_ids=g.corpus, k=int(qc.get("k", 100)),
      consecutive_threshold=int(qc.get("consecutive_threshold", 1)),
      strict_below=bool(qc.get("strict_below", False)), num_queries=len(g.queries),
      corpus_size=len(g.corpus), mined={task.strategy: hs})
  if task.strategy == ORACLE_STRATEGY:
    out[ORACLE_STRATEGY] = mining_audit.audit_pools(hs, rel, target_ids=g.corpus[g.target_pos])
  return out


def _with_init_temp(params: dict, config) -> dict:
  """The study resets a warm start's learned temperature (`qure.init_temp` > 0, e.g. QuRe's
  initial 0.07)."""
  temp = float(config.qure.get("init_temp", 0.0) or 0.0)
  return {**params, "temp": np.asarray(temp, np.float32)} if temp > 0 else params


def _without_relevant(task: QuReTask, g: _Group, hs):
  """The oracle top-k: `hs` minus every image relevant to its query."""
  return mining_audit.without_relevant(hs, mining_audit.relevant_ids(
      [task.queries[i] for i in g.queries], task.image_index.get))


def _check_strategy(strategy: str, dataset: str) -> str:
  if strategy == ORACLE_STRATEGY and dataset not in mining_audit.FULL_RELEVANT_DATASETS:
    raise ValueError(f"config.qure.strategy={ORACLE_STRATEGY!r} needs every relevant image: "
                     f"use one of {mining_audit.FULL_RELEVANT_DATASETS}, not {dataset!r}")
  return strategy


def _pair_stats(block, g: _Group, hs, temp: float) -> dict:
  """QuRe's loss and pair accuracy on one group's freshly mined negatives."""
  positions = np.zeros(int(g.corpus.max()) + 1, np.int64)
  positions[g.corpus] = np.arange(len(g.corpus))   # copies of an image score alike
  # The mining's own block rows: the block function is compiled per block shape.
  rows = min(mining.block_rows_for_budget(len(g.corpus), mining.DEFAULT_MEMORY_BUDGET),
             max(len(g.queries), 1))
  return mining_audit.pair_stats(block, g.target_pos, hs, positions, temp, block_rows=rows)


def _merge_pair_stats(pairs) -> dict:
  """What the next epochs' pairs look like (`mined_pair_loss`, `mined_pair_acc`): the
  groups' numbers weighted by their query counts."""
  out = {}
  for key in ("pair_loss", "pair_acc"):
    w = np.array([n for p, n in pairs if np.isfinite(p[key])], np.float64)
    v = np.array([p[key] for p, _ in pairs if np.isfinite(p[key])], np.float64)
    out[f"mined_{key}"] = float((w * v).sum() / w.sum()) if w.size else float("nan")
  return out


@jax.jit
def _expand_corpus(t, inv):
  """The corpus in mining order ([N, Q, D]) from its unique images' features."""
  return jnp.take(t, inv, axis=0)


@functools.partial(jax.jit, static_argnames=("size",))
def _block_scores(q, t, start, *, size):
  """[size, N] max-over-tokens scores of queries start:start+size against the corpus."""
  qb = jax.lax.dynamic_slice_in_dim(q, start, size)
  return max_over_tokens(qb, t)


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
