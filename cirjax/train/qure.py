"""QuRe training on BLIP-2 (paper appendix A, reference code): the `qure` task of the trainer.

Per epoch `e` of `E` (n_def = `config.qure.n_def`):
  * warm-up (`e < E // n_def`, or always without mining): each query's negative is a uniformly
    random entry of its mining corpus whose image differs from the target's;
  * at `e % (E // n_def) == 0, e != 0`: re-encode the training corpus and queries with the
    current parameters and re-mine every query's hard-negative set (`cirjax.mining.rounds`),
    logging the set-size statistics; from then on each query walks its set without replacement
    across epochs (`config.qure.sampling = "walk"`) or draws uniformly (`"uniform"`);
  * one negative per query per epoch (each query is in one batch per epoch), drawn by
    `cirjax.mining.sampling.GroupSampler` for the global batch on every process. The sampler
    state is the one at the start of the epoch (`begin_epoch` applies the previous epochs'
    draws), so `batch(epoch, index)` is a pure function of its arguments and that state, and
    the checkpointed state makes a resumed run draw the same negatives.

Loss (`config.qure.loss`): `pairwise` (QuRe, Eqs. 2-3), `infonce` (every positive and
negative of the global batch as columns) or `infonce_inbatch` (the positives only),
independent of the backbone.

With a frozen vision tower and no augmentation the tower's output (before `ln_vision`, which
QuRe trains) is computed once for every training and evaluation image and reused by every
step, mining and evaluation (`config.qure.cache_features`, on by default where valid;
`cirjax.train.feature_store.FeatureCache`).

Mining corpora (docs/reference_semantics.md, `cirjax.mining.groups`): CIRR / synthetic — the
training split's images; FashionIQ — per category, the targets of that category's training
triplets (one entry per triplet, sets de-duplicated by image id).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cirjax.errors import ConfigError
from cirjax import console
from cirjax import losses
from cirjax.convert import registry
from cirjax.data import text, training_splits
from cirjax.data.loader import default_text
from cirjax.data.records import DataError
from cirjax.data.tokenizer import load_tokenizer
from cirjax.data.training_queries import TrainingQueries
from cirjax.eval import encode as encode_lib
from cirjax.eval import evaluate as ev
from cirjax.eval import model as model_lib
from cirjax.mining import audit as mining_audit
from cirjax.mining import groups as groups_lib
from cirjax.mining import rounds, sampling
from cirjax.models import blip2
from cirjax.train import blip2_run, config_utils, feature_store
from cirjax.train import sharding as shd
from cirjax.train import state as st
from cirjax.train.image_inputs import ImageInputs
from cirjax.train.task import Task, run_options

LOSSES = ("pairwise", "infonce", "infonce_inbatch")


_log = console.log


# ------------------------------------------------------------------------------ the task

class QuReTask(Task):
  """QuRe: frozen ViT, trained Q-Former, pairwise loss with re-mined hard negatives."""

  name = "qure"
  # batch(epoch, i) reads the sampler state set at the epoch's start: workers build ahead.
  stateful_batches = False

  @staticmethod
  def model_from_params(run, params, source: str):
    """`cirjax.load` of a run's checkpoint: BLIP-2 with `model.init`'s config (random init:
    `model_config`, the vocabulary read off the embeddings) and the run's tokenizer (None
    when gone since: the encoder's --tokenizer or the dataset's vocab then)."""
    init = config_utils.model_init(run.config, check=False)
    cfg = registry.load(init, family="blip2").config if init else blip2.model_config(
        run.config.model, params["embeddings"]["word_embeddings"].shape[0])
    params = blip2.unstack_layers(params, cfg)  # a scan_layers run's state is stacked
    tok = load_tokenizer(blip2_run.tokenizer_source(run.config), "blip2", required=False)
    return model_lib.make_model("blip2", cfg, params, tok, source)

  @classmethod
  def check_config(cls, config) -> None:
    loss = (config.get("qure") or {}).get("loss", "pairwise")
    if loss not in LOSSES:
      raise ConfigError(f"config.qure.loss={loss!r}: use one of {LOSSES}")

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, workdir: str):
    super().__init__(config, mesh, workdir)
    self.check_config(config)
    qc = config.qure
    self.loss_kind = qc.get("loss", "pairwise")
    self.seed = int(config.get("seed", 0))
    self.compute_dtype = jnp.dtype(config.get("compute_dtype", "float32"))
    t0 = time.perf_counter()
    self.pipeline = training_splits.pipeline(config.data)
    self.stateful_batches = self.pipeline == "grain"  # grain's iterator: taken in step order
    self.train_splits, self.eval_splits, image_source = training_splits.read_training_data(
        config.data)
    tok_src = blip2_run.tokenizer_source(config)
    self.tokenizer = load_tokenizer(tok_src, "blip2")
    self.max_len = int(config.data.get("max_text_length", 32))
    self._init_model(config)

    self.image_index, refs, self.n_train_images = training_splits.image_table(
        self.train_splits, self.eval_splits)
    self.image_names = list(self.image_index)
    self.train_queries = TrainingQueries(
        self.train_splits, self.image_index, self.tokenizer, self.max_len,
        tokenizer_source=str(tok_src), dataset=config.data.dataset, warn=_log)
    n = len(self.train_queries)
    self.groups = groups_lib.mining_groups(
        self.train_splits, self.image_index, self.train_queries.tgt,
        target_position=config.qure.get("target_position", "first"),
        per_triplet=config.data.dataset == "fashioniq")

    tc = config.train
    self.global_batch = int(tc.batch_size)
    self.steps_per_epoch = n // self.global_batch
    if self.steps_per_epoch == 0:
      raise DataError(f"{n} training queries is fewer than one batch of "
                      f"{self.global_batch} (config.train.batch_size)")
    self.epochs = int(tc.epochs)
    self._epoch_rows = functools.partial(  # epoch -> its global query rows in batch order
        training_splits.epoch_rows, self.seed, num_queries=n,
        steps_per_epoch=self.steps_per_epoch, global_batch=self.global_batch)
    n_def = int(qc.get("n_def", 6))
    self.mine_every = max(1, self.epochs // n_def) if n_def > 0 else 0
    self.mining_options = rounds.RoundOptions.from_config(qc, config.data.dataset)
    self.sampler = sampling.GroupSampler(self.groups, n, self.seed, qc.get("sampling", "walk"))

    self._setup_encoders(config, refs, image_source)
    if self.pipeline == "grain":
      self.train_queries.read_with_grain(
          config.data, seed=self.seed, epochs=self.epochs,
          steps_per_epoch=self.steps_per_epoch, global_batch=self.global_batch)
    self.mined_epoch = -1
    _log(f"qure data: {n} training queries, {self.n_train_images} training "
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
      rates = blip2.dropout_rates(config.model.get("qformer") or ml_collections.ConfigDict())
      self.cfg = self.cfg.replace(qformer=dataclasses.replace(self.cfg.qformer, **rates))
      if len(self.tokenizer) > self.cfg.qformer.vocab_size:
        raise ValueError(f"{self.pretrained}: Q-Former vocabulary {self.cfg.qformer.vocab_size} "
                         f"< tokenizer's {len(self.tokenizer)}")
    else:
      self.cfg = blip2.model_config(config.model, len(self.tokenizer))
      self._pretrained_params = None
    self.image_size = self.cfg.vision.image_size

  def _setup_encoders(self, config, refs, image_source) -> None:
    """The pure encoders and their image inputs: pixels, or the frozen-feature cache, valid
    only if every vision-tower parameter is frozen."""
    mask = st.trainable_mask(blip2.abstract_params(self.cfg), tuple(config.get("freeze", ())),
                             tuple(config.get("train_only", ())))
    frozen_vit = not any(jax.tree.leaves(mask["vision"]))
    self.cache = bool(config.qure.get("cache_features", True))
    if self.cache:
      feature_store.storage_dtype(config.qure.get("feature_dtype", "float16"))
    if self.cache and not frozen_vit:
      raise ConfigError("config.qure.cache_features=True needs a frozen vision tower "
                        "(config.freeze must include 'vision/.*'); set it False to train the ViT")
    nd = self.mesh.devices.size
    self.encode_batch = max(nd, int(config.qure.get("encode_batch_size", 256)) // nd * nd)
    self.images = ImageInputs(
        config, self.workdir, self.cfg, self._run_cfg(), image_names=self.image_names,
        refs=refs, image_source=image_source, cache=self.cache, mesh=self.mesh,
        batch_size=self.encode_batch, log=_log)
    self._fns = self.images.encoders

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
  def _encode(self, fn, params, inputs, n: int, what: str, sharded: bool = False):
    t0 = time.perf_counter()
    out = encode_lib.encode(fn, params, inputs, mesh=self.mesh, batch_size=self.encode_batch,
                            sharded=sharded)
    dt = time.perf_counter() - t0
    if n >= 256:
      _log(f"encoded {n} {what} in {dt:.1f}s ({n / max(dt, 1e-9):.0f}/s)")
    return out

  def encode_targets(self, params, idx: np.ndarray, sharded: bool = False):
    """[len(idx), Q, D] target features of global images `idx` with the current params:
    host numpy, or (`sharded`) a jax.Array that stays on the mesh."""
    self.images.open(params)
    return self._encode(self._fns["targets"], params, self.images.batches(idx), len(idx),
                        "target images", sharded)

  def encode_queries(self, params, ref_idx, ids, mask, sharded: bool = False):
    """[B, D] composed queries (host numpy, or a jax.Array on the mesh with `sharded`)."""
    self.images.open(params)
    return self._encode(self._fns["compose"], params, self.images.batches(ref_idx, ids, mask),
                        len(ref_idx), "queries", sharded)

  # ---------------------------------------------------------------- epochs, mining, sampling
  def begin_epoch(self, epoch, params, first_step_in_epoch=0):
    """Caches features (or pixels) on first use; brings the sampler state to the start of
    `epoch`; re-mines at QuRe's mining epochs (not again when a run resumes inside an epoch
    whose mining is in the checkpoint); draws the first batch's negatives once (discarded:
    draws are pure) so that the jitted draws compile here (and grain's workers start), not
    while the first step waits for its batch."""
    self.images.open(params)
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
    self.train_queries.start(epoch * self.steps_per_epoch + i)
    return stats

  def mine(self, params) -> dict:
    """Re-encodes every group's corpus and queries with `params`, re-mines the hard-negative
    sets (`cirjax.mining.rounds`) and hands them to the sampler; returns the round's numbers."""
    tq = self.train_queries

    def queries(q):
      return self.encode_queries(params, tq.ref[q], tq.ids[q], tq.mask[q], sharded=True)

    def relevant(g):
      return mining_audit.relevant_ids([tq.queries[i] for i in g.queries], self.image_index.get)

    sets, out = rounds.mine_round(
        self.groups, lambda idx: self.encode_targets(params, idx, sharded=True), queries,
        relevant, self.mining_options, float(np.asarray(params["temp"])))
    self.sampler.set_mined(sets)
    _log("mining: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()))
    return out

  def batch(self, epoch, index):
    rows = self._epoch_rows(epoch)[index * self.global_batch:(index + 1) * self.global_batch]
    neg = self.sampler.sample(epoch, index, rows)
    mine = shd.process_rows(self.global_batch)
    rows, neg = rows[mine], neg[mine]
    out, ref, pos = self.train_queries.rows(epoch * self.steps_per_epoch + index, rows)
    kind = "feats" if self.cache else "pixels"
    out.update({f"ref_{kind}": self.images[ref], f"pos_{kind}": self.images[pos],
                f"neg_{kind}": self.images[neg]})
    return out

  # ---------------------------------------------------------------- checkpointed host state
  def host_state(self):
    return {"mined_epoch": self.mined_epoch, "num_groups": len(self.groups),
            "sampler_epoch": self.sampler.epoch, **self.train_queries.state()
            }, self.sampler.to_arrays()

  def load_host_state(self, host, arrays):
    if host.get("num_groups", len(self.groups)) != len(self.groups):
      raise ValueError("checkpoint mining state has a different number of corpora than the "
                       "config (different dataset/categories?)")
    self.mined_epoch = int(host.get("mined_epoch", -1))
    epoch = host.get("sampler_epoch")
    self.sampler.load(None if epoch is None else int(epoch), arrays)
    self.train_queries.load_state(host)

  def close(self):
    self.train_queries.close()

  # ---------------------------------------------------------------- evaluation and export
  def evaluate(self, params):
    self.images.open(params)
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
          s, params, self._fns["targets"], self._fns["compose"], self.images.batches(cidx),
          self.images.batches(ridx, ids, mask), mesh=self.mesh, batch_size=self.encode_batch))
    if self.config.data.dataset == "fashioniq":  # QuRe Table 2 averages over categories
      m, self._chance = ev.fashioniq_headline(dict(zip(self.config.data.categories, results)))
      return m
    m, self._chance = ev.headline_metrics(results[0], self.config.get("eval_metrics", None))
    return m

  def chance_metrics(self):
    return dict(getattr(self, "_chance", {}))

  def finish(self, params):
    """Exports the final model as a cirjax BLIP-2 directory `<workdir>/model` (`cirjax.load`)."""
    if self.config.get("export", True):
      blip2_run.export_model(Path(self.workdir) / "model", self.config, self.cfg, params,
                             self.mesh)


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


def _with_init_temp(params: dict, config) -> dict:
  """The study resets a warm start's learned temperature (`qure.init_temp` > 0, e.g. QuRe's
  initial 0.07)."""
  temp = float(config.qure.get("init_temp", 0.0) or 0.0)
  return {**params, "temp": np.asarray(temp, np.float32)} if temp > 0 else params
