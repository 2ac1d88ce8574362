"""InstructCIR training on LLaVA-Phi (paper §2.3, appendix D and F): the `instructcir` task.

Both stages train LoRA adapters of the language model only (tower and projector frozen,
`config.train_only = ("lora/.*",)`); the parameters are one tree `{"base": LLaVA params,
"lora": adapter params}`, so the generic trainer's regex freezing, sharding, checkpoints and
resume apply unchanged. Embeddings: `cirjax.models.llava.embed` (a left-padded prompt's
last, EOS, token's final-norm state, L2-normalised).

  * Stage 1 (`config.stage = 1`), image-caption pairs: the image under "Summarize the image in
    one word:" vs its caption under "Summarize the caption in one word:"; InfoNCE over the
    global batch (cosine / `loss.temperature` = 0.05, one direction).
  * Stage 2 (`config.stage = 2`), CC3M-Instruct triplets: the reference image + instruction
    under an image template drawn from table 9's first set vs the modified caption under a
    caption template drawn from the second set, with the ORIGINAL caption (same caption
    template) as a hard negative: extra InfoNCE columns (`loss.hard_negative_scope`:
    `batch` = every hard negative of the global batch, `own` = the row's own).
    Templates: one draw per row of the global batch, seeded with (seed, epoch, step), so
    every process and a resumed run draw the same. Stage 2 starts from `init_from`: a
    stage-1 workdir (base and adapter as stage 1 ended), a PEFT adapter (on `model.init`)
    or a merged LLaVA directory (a fresh adapter).

Records (`config.data.source`: `jsonl` | `synthetic`): `cirjax.data.instructcir_examples`;
where the model starts and what `finish` exports: `cirjax.convert.llava_run`
(docs/train.md#instructcir). Evaluation (held-out data): stage 1 `i2t/R@K` (image ->
caption); stage 2 `q2t/R@K` over the modified and original captions and
`q2t/beats_original`; on synthetic data also `cirjax eval`'s CIR protocol with InstructCIR's
zero-shot prompts (`cir/R@K`, `cir/mAP@K` against full relevant sets).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import threading
import time
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cirjax.errors import ConfigError
from cirjax import console
from cirjax import lora as lora_lib
from cirjax import prompts
from cirjax.convert import llava_run
from cirjax.convert.llava_run import LLAVA_CONFIG_FILE
from cirjax.data import images as images_lib
from cirjax.data.instructcir_examples import (open_image, read_examples, run_images,
                                              tokenizer_texts)
from cirjax.data.loader import Pixels
from cirjax.data.records import DataError
from cirjax.eval import encode as encode_lib
from cirjax.eval import evaluate as ev
from cirjax.eval import model as model_lib
from cirjax.eval import metrics
from cirjax.losses import info_nce_loss, info_nce_logits
from cirjax.models import layer_stack, llava, llava_init
from cirjax.train import config_utils
from cirjax.train import sharding as shd
from cirjax.train import workdir as workdir_lib
from cirjax.train.task import Task, run_options

HARD_NEGATIVE_SCOPES = ("batch", "own")
_RECALL_KS = (1, 5, 10)
_CIR_METRICS = ("R@1", "R@10", "R@50", "mAP@10", "Rrel@10")


_log = console.log


def stage1_params(ckpt_dir: str, abstract_params, init_from: str, cfg: llava.LlavaConfig):
  """The latest restorable checkpoint of a stage-1 workdir (base and adapter), on the host."""
  found = workdir_lib.Run(Path(ckpt_dir).parent).latest_params()
  if found is None:
    raise FileNotFoundError(f"config.init_from: no checkpoint in {ckpt_dir}")
  step_dir, params = found
  params = llava_run.per_layer_params(params, abstract_params, cfg,
                                      f"config.init_from={init_from}: checkpoint {step_dir}")
  _log(f"stage 2 starts from {step_dir} (base and adapter)")
  return params  # host: the trainer shards it


# ------------------------------------------------------------------------------ the task

class InstructCIRTask(Task):
  """InstructCIR stage 1 or 2: LoRA on LLaVA-Phi's language model, InfoNCE."""

  name = "instructcir"
  stateful_batches = False  # batch(epoch, i): seeded by (seed, epoch, i); workers build ahead

  @staticmethod
  def model_from_params(run, params, source: str):
    """`cirjax.load` of a run's checkpoint: its merged LLaVA as the export would write it."""
    cfg, merged, tokenizer = llava_run.run_model(
        run.path, params, lora_lib.config_from(run.config.lora),
        tokenizer=run.config.data.get("tokenizer"),
        init=config_utils.model_init(run.config, check=False))
    return model_lib.make_model("llava", cfg, merged, tokenizer, source)

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, workdir: str):
    super().__init__(config, mesh, workdir)
    t0 = time.perf_counter()
    self.stage = int(config.stage)
    if self.stage not in (1, 2):
      raise ConfigError(f"config.stage={self.stage}: InstructCIR has stages 1 and 2")
    self.seed = int(config.get("seed", 0))
    lc = config.loss
    self.temperature = float(lc.temperature)
    self.use_hard_negatives = self.stage == 2 and bool(lc.get("hard_negatives", True))
    self.hn_scope = lc.get("hard_negative_scope", "batch")
    if self.hn_scope not in HARD_NEGATIVE_SCOPES:
      raise ConfigError(f"config.loss.hard_negative_scope={self.hn_scope!r}: use one of "
                        f"{HARD_NEGATIVE_SCOPES}")
    self.fixed_templates = bool(config.get("fixed_templates", False))
    self.remat = bool(config.get("remat", False))
    self.run_kw = run_options(config)
    self.lora_cfg = lora_lib.config_from(config.lora)

    dc = config.data
    self.train, self.eval_examples, self.eval_split, data_root = read_examples(dc, self.stage)
    self.init_from = os.path.expanduser(config.get("init_from", "") or "")
    if self.stage == 1 and self.init_from:
      raise ConfigError("config.init_from is for stage 2 (the stage-1 result to start from)")
    if self.stage == 2 and not self.init_from and not config.get("allow_scratch_stage2", False):
      raise ConfigError("config.init_from is empty: stage 2 starts from stage 1 (its workdir, "
                        "a PEFT adapter directory or a merged model directory); set "
                        "allow_scratch_stage2=True to run stage 2 alone (the paper's ablation)")
    self.source = llava_run.model_source(
        config, config_utils.model_init(config), self.init_from, workdir, tokenizer_texts(
            self.train + self.eval_examples, self.eval_split, data_root is not None), _log)
    self.cfg, self.tokenizer = self.source.cfg, self.source.tokenizer
    self._tokenizer_lock = threading.Lock()
    self.tokenizer_dir = self.source.tokenizer_dir
    self._images = Pixels(images_lib.make_transform(dc.get("transform", "clip"),
                                                   self.cfg.vision.image_size), open_image)
    self.pixel_store_stats: dict | None = None  # None: not asked yet
    self.n_img = self.cfg.num_image_tokens
    examples = self.train + self.eval_examples
    self.q_len, self.t_len = prompts.prompt_lengths(
        self.tokenizer, self.stage, [e.caption for e in examples] + [e.original for e in examples],
        [e.instruction for e in examples], self.n_img, int(dc.get("max_length", 512)),
        self.cfg.text.max_position_embeddings)
    kw = dict(cfg=self.cfg.replace(**self.run_kw), lora_cfg=self.lora_cfg)
    self._embed_fns = {True: functools.partial(llava_run.embed_with_images, **kw),
                       False: functools.partial(llava_run.embed_texts, **kw)}
    nd = mesh.devices.size
    self.encode_batch = max(nd, int(config.get("eval_batch_size", 32)) // nd * nd)

    self.global_batch = int(config.train.batch_size)
    self.steps_per_epoch = len(self.train) // self.global_batch
    if self.steps_per_epoch == 0:
      raise DataError(f"{len(self.train)} training records is fewer than one batch of "
                      f"{self.global_batch} (config.train.batch_size)")
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      (Path(workdir) / LLAVA_CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=2))
    _log(f"instructcir stage {self.stage}: {len(self.train)} training "
         f"{'pairs' if self.stage == 1 else 'triplets'}, {len(self.eval_examples)} held out; "
         f"prompt lengths query {self.q_len}, caption {self.t_len} tokens "
         f"({self.n_img} image tokens); LoRA r={self.lora_cfg.rank} alpha={self.lora_cfg.alpha} "
         f"({time.perf_counter() - t0:.1f}s)")

  # ---------------------------------------------------------------- model
  def init_params(self, rng):
    kb, kl = jax.random.split(rng)
    if self.source.base_params is None:
      base = llava_init.random_params(self.cfg, kb)
    else:
      base = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), self.source.base_params)
    adapter = lora_lib.init_lora(base, self.lora_cfg, kl)
    return {"base": base, "lora": adapter.params}

  def initial_params(self, abstract_params):
    if self.source.ckpt_dir is not None:
      return stage1_params(self.source.ckpt_dir, abstract_params, self.init_from, self.cfg)
    return llava_run.initial_params(self.source, abstract_params, self.lora_cfg, self.seed, _log)

  def layer_stacks(self):
    stacks = llava.layer_stacks(self.cfg)  # the adapter tree mirrors the base's paths
    return layer_stack.prefixed(stacks, ("base",)) + layer_stack.prefixed(stacks, ("lora",))

  def adapter(self, params) -> lora_lib.Adapter:
    return lora_lib.Adapter(params["lora"], self.lora_cfg)

  def _embed(self, params, ids, mask, pixels=None, rng=None):
    train = rng is not None and self.lora_cfg.dropout > 0
    return llava.embed(params["base"], self.cfg.replace(**self.run_kw), ids, mask, pixels,
                       lora=self.adapter(params), rng=rng if train else None,
                       deterministic=not train)

  def embeddings(self, params, batch, rng=None):
    """(query, target, hard negative or None) embeddings of a batch, [B, H] fp32."""
    r1 = r2 = None
    if rng is not None:
      r1, r2 = jax.random.split(rng)
    q = self._embed(params, batch["q_ids"], batch["q_mask"], batch["pixels"], r1)
    if "n_ids" in batch:
      b = batch["t_ids"].shape[0]
      both = self._embed(params, jnp.concatenate([batch["t_ids"], batch["n_ids"]]),
                         jnp.concatenate([batch["t_mask"], batch["n_mask"]]), None, r2)
      return q, both[:b], both[b:]
    return q, self._embed(params, batch["t_ids"], batch["t_mask"], None, r2), None

  def loss_fn(self, params, batch, rng, *, hard_negatives: bool | None = None):
    use_hn = self.use_hard_negatives if hard_negatives is None else hard_negatives
    q, t, n = self.embeddings(params, batch, rng)
    hn = n if use_hn else None
    loss = info_nce_loss(q, t, temperature=self.temperature, hard_negatives=hn,
                         hard_negative_scope=self.hn_scope)
    logits = info_nce_logits(q, t, temperature=self.temperature)
    b = logits.shape[0]
    acc = jnp.mean((jnp.argmax(logits, axis=1) == jnp.arange(b)).astype(jnp.float32))
    aux = {"batch_acc": acc}
    if n is not None:
      aux["beats_original"] = jnp.mean((jnp.sum(q * t, -1) > jnp.sum(q * n, -1)).astype(jnp.float32))
    return loss, aux

  # ---------------------------------------------------------------- data
  def batch_spec(self):
    b, s = self.global_batch, self.cfg.vision.image_size
    spec = {"pixels": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32),
            "q_ids": jax.ShapeDtypeStruct((b, self.q_len), jnp.int32),
            "q_mask": jax.ShapeDtypeStruct((b, self.q_len), jnp.int32),
            "t_ids": jax.ShapeDtypeStruct((b, self.t_len), jnp.int32),
            "t_mask": jax.ShapeDtypeStruct((b, self.t_len), jnp.int32)}
    if self.stage == 2:
      spec["n_ids"] = jax.ShapeDtypeStruct((b, self.t_len), jnp.int32)
      spec["n_mask"] = jax.ShapeDtypeStruct((b, self.t_len), jnp.int32)
    return spec

  def _pixels(self, paths) -> np.ndarray:
    return self._images([str(p) for p in paths])

  def _ensure_pixels(self) -> None:
    """Opens the pixel store (`config.data.pixel_store`) once per run, on every process:
    with 'auto' when training reads its images at least twice on average (several epochs,
    or images shared by records); it holds the evaluation's images too."""
    if self.pixel_store_stats is None:
      tc, limit = self.config.train, int(self.config.get("eval_max", 0) or 0) or None
      steps = int(tc.epochs) * self.steps_per_epoch
      if int(tc.get("max_steps", -1) or -1) > 0:
        steps = min(steps, int(tc.max_steps))
      names, reads = run_images(self.train, self.eval_examples, self.eval_split, limit,
                                bool(self.config.get("evaluate", True)), steps * self.global_batch)
      self.pixel_store_stats = self._images.open_store(
          self.config.data, self.workdir, names, {n: n for n in names}, reads, log=_log)

  def begin_epoch(self, epoch, params, first_step_in_epoch=0):
    self._ensure_pixels()
    return None

  def _tokenize(self, rendered: list[str], **kw) -> dict[str, np.ndarray]:
    # HF fast tokenizers set padding state on their Rust object per call: calls from the
    # trainer's batch threads and from evaluation must not overlap.
    with self._tokenizer_lock:
      return prompts.batch_encode(self.tokenizer, rendered, num_image_tokens=self.n_img, **kw)

  def _encode(self, rendered: list[str], width: int, what: str) -> dict[str, np.ndarray]:
    try:
      return self._tokenize(rendered, pad_to=width)
    except prompts.PromptError as e:
      raise DataError(f"{what} prompts: {e} (prompt lengths are fixed at setup from the data; "
                      "raise config.data.max_length or check the texts)") from e

  def prompts_for(self, epoch: int, index: int, rows: np.ndarray) -> list[tuple[str, str, str]]:
    """(query, target, hard negative) prompt strings of global rows `rows` of batch
    (epoch, index); stage-2 templates drawn from a generator seeded by (seed, epoch, index)."""
    seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
    records = [(self.train[r].instruction, self.train[r].caption, self.train[r].original)
               for r in rows]
    return prompts.training_prompts(self.tokenizer, self.stage, records, seed,
                                    self.fixed_templates)

  def batch(self, epoch, index):
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self.train))
    rows = order[index * self.global_batch:(index + 1) * self.global_batch]
    texts = self.prompts_for(epoch, index, rows)  # every row: same draws on every process
    mine = shd.process_rows(self.global_batch)
    rows, texts = rows[mine], texts[mine]
    q = self._encode([t[0] for t in texts], self.q_len, "query")
    t = self._encode([t[1] for t in texts], self.t_len, "caption")
    out = {"pixels": self._pixels([self.train[r].image for r in rows]),
           "q_ids": q["input_ids"], "q_mask": q["attention_mask"],
           "t_ids": t["input_ids"], "t_mask": t["attention_mask"]}
    if self.stage == 2:
      n = self._encode([x[2] for x in texts], self.t_len, "original caption")
      out.update(n_ids=n["input_ids"], n_mask=n["attention_mask"])
    return out

  def host_state(self):
    # Batches are a pure function of (seed, epoch, index): only a consistency check is needed.
    return {"stage": self.stage, "num_train": len(self.train)}, {}

  def load_host_state(self, host, arrays):
    if host.get("num_train", len(self.train)) != len(self.train) or \
        host.get("stage", self.stage) != self.stage:
      raise ConfigError(f"the checkpoint in {self.workdir} is of stage {host.get('stage')} with "
                        f"{host.get('num_train')} training records; this config has stage "
                        f"{self.stage} with {len(self.train)}: use another workdir")

  # ---------------------------------------------------------------- evaluation
  def _prompt_batches(self, rendered: list[str], image_paths=None
                      ) -> Iterator[tuple[np.ndarray, ...]]:
    """Encoder input batches of rendered prompts (with their images when `image_paths`),
    each padded to a multiple of 16 tokens (few compiled shapes)."""
    bs = self.encode_batch
    for i in range(0, len(rendered), bs):
      chunk = rendered[i:i + bs]
      enc = self._tokenize(chunk + [chunk[-1]] * (bs - len(chunk)), pad_to_multiple_of=16)
      arrays = (enc["input_ids"][:len(chunk)], enc["attention_mask"][:len(chunk)])
      if image_paths is not None:
        arrays = (self._pixels(image_paths[i:i + bs]),) + arrays
      yield arrays

  def encode(self, params, rendered: list[str], image_paths=None, what: str = "prompts"
             ) -> np.ndarray:
    """[N, H] embeddings of rendered prompts (with images when `image_paths`), data-parallel
    over the mesh in batches of `eval_batch_size`; every process gets the full result."""
    t0 = time.perf_counter()
    out = encode_lib.encode(self._embed_fns[image_paths is not None], params,
                            self._prompt_batches(rendered, image_paths), mesh=self.mesh,
                            batch_size=self.encode_batch)
    if len(rendered) >= 256:
      dt = time.perf_counter() - t0
      _log(f"embedded {len(rendered)} {what} in {dt:.1f}s ({len(rendered) / max(dt, 1e-9):.0f}/s)")
    return out

  def evaluate(self, params):
    if not self.config.get("evaluate", True):
      return None
    self._ensure_pixels()
    exs = self.eval_examples
    limit = int(self.config.get("eval_max", 0) or 0)
    if limit:
      exs = exs[:limit]
    if not exs:
      return None
    kind = "i2t" if self.stage == 1 else "q2t"
    corpus = sorted(set(e.caption for e in exs) | (
        set(e.original for e in exs) if self.stage == 2 else set()))
    pos = {c: i for i, c in enumerate(corpus)}
    target = np.array([pos[e.caption] for e in exs])
    qp, cp = prompts.held_out_prompts(self.tokenizer, self.stage,
                                      [e.instruction for e in exs], corpus)
    q = self.encode(params, qp, [e.image for e in exs],
                    "images" if self.stage == 1 else "composed queries")
    s = q @ self.encode(params, cp, None, "captions").T
    recalls = metrics.recall_at_k_of_scores(s, target, _RECALL_KS)
    out = {f"{kind}/{k}": v for k, v in recalls.items()}
    self._chance = {f"{kind}/R@{k}": 100.0 * min(k, len(corpus)) / len(corpus) for k in _RECALL_KS}
    if self.stage == 2:
      rows, orig = np.arange(len(exs)), np.array([pos[e.original] for e in exs])
      out["q2t/beats_original"] = float(np.mean(s[rows, target] > s[rows, orig]) * 100.0)
      self._chance["q2t/beats_original"] = 50.0
    if self.eval_split is not None and bool(self.config.get("eval_cir", True)):
      out.update(self._evaluate_cir(params))
    return out

  def _evaluate_cir(self, params) -> dict[str, float]:
    """Composed image retrieval on the synthetic split with the zero-shot (appendix D.2)
    prompts, scored by `cirjax.eval` (reference excluded, full relevant sets)."""
    s = self.eval_split
    limit = int(self.config.get("eval_max", 0) or 0)
    if limit:
      s = dataclasses.replace(s, queries=s.queries[:limit])
    tok = self.tokenizer
    it, qt = prompts.inference_template("cirr", "image"), prompts.inference_template("cirr", "query")
    cp = [prompts.render(it, tok, image=True)] * len(s.corpus)
    qp = [prompts.render(qt, tok, image=True, modifier=q.text) for q in s.queries]
    fn = self._embed_fns[True]
    r = ev.evaluate_encoded(
        s, params, fn, fn, self._prompt_batches(cp, [s.images[n].path for n in s.corpus]),
        self._prompt_batches(qp, [s.images[q.reference].path for q in s.queries]),
        mesh=self.mesh, batch_size=self.encode_batch)
    m, chance = ev.headline_metrics(r, _CIR_METRICS, prefix="cir/")
    self._cir_chance = {k: v for k, v in chance.items() if k[len("cir/"):] in _CIR_METRICS}
    return m

  def chance_metrics(self):
    return {**getattr(self, "_chance", {}), **getattr(self, "_cir_chance", {})}

  # ---------------------------------------------------------------- export
  def finish(self, params):
    """Writes `<workdir>/adapter` (PEFT), `<workdir>/model` (merged, cirjax LLaVA dir) and with
    `export_hf` `<workdir>/model_hf` (merged, HF LLaVA dir), each with the tokenizer."""
    if not self.config.get("export", True):
      return
    host = jax.device_get(jax.jit(lambda p: p, out_shardings=shd.replicated(self.mesh))(params))
    if jax.process_index() == 0:
      llava_run.export(Path(self.workdir), host, self.cfg, self.lora_cfg, self.tokenizer_dir,
                       f"cirjax train instructcir stage {self.stage}",
                       init=config_utils.model_init(self.config, check=False),
                       init_from=self.config.get("init_from", "") or "",
                       export_hf=bool(self.config.get("export_hf", True)), log=_log)
