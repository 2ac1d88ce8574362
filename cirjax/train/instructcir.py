"""InstructCIR training on LLaVA-Phi (paper §2.3, appendix D and F): the `instructcir` task.

Both stages train LoRA adapters of the language model only (tower and projector frozen,
`config.train_only = ("lora/.*",)`); the parameters are one tree `{"base": LLaVA params,
"lora": adapter params}`, so the generic trainer's regex freezing, sharding, checkpoints and
resume apply unchanged. Embeddings are `cirjax.models.llava.embed` (the final-norm state of
the last token of a left-padded prompt ending in EOS, L2-normalised).

  * Stage 1 (`config.stage = 1`), image-caption pairs: the image under "Summarize the image in
    one word:" vs its caption under "Summarize the caption in one word:"; InfoNCE over the
    global batch (cosine / `loss.temperature` = 0.05, one direction).
  * Stage 2 (`config.stage = 2`), CC3M-Instruct triplets: the reference image + instruction
    under an image template drawn from table 9's first set vs the modified caption under a
    caption template drawn from the second set, with the ORIGINAL caption (same caption
    template) as a hard negative: extra InfoNCE columns (`loss.hard_negative_scope`:
    `batch` = every hard negative of the global batch, `own` = the row's own).
    Templates are drawn by a generator seeded with (seed, epoch, step), one draw per row of the
    global batch, so every process and a resumed run draws the same ones.
    `init_from` names where stage 2 starts: a stage-1 workdir (its latest checkpoint: base and
    adapter exactly as stage 1 ended, tokenizer and model widths too), a PEFT adapter
    directory (on the `model.init` base) or a merged LLaVA directory (a fresh adapter).

Data (`config.data.source`): `jsonl`, the InstructCIR JSON lines of `cirjax.data.instructcir`
(`train_file`, `image_root`, optional held-out `eval_file`), or `synthetic`, pairs and
triplets built from the synthetic CIR benchmark (cirjax/data/synth.py, generated on first
use): every image's caption is its attribute description, a triplet is a training query's
reference image, its modification text, the target's caption and the reference's caption.

Evaluation (held-out data, every epoch or `eval_every_steps`): stage 1, image -> caption
Recall@K over the held-out captions (`i2t/R@K`); stage 2, composed query -> modified caption
Recall@K over the held-out modified and original captions (`q2t/R@K`) and how often the
modified caption outscores the original (`q2t/beats_original`); on synthetic data also the
composed image retrieval protocol of `cirjax eval` with InstructCIR's zero-shot prompts
(`cir/R@K`, `cir/mAP@K` against full relevant sets).

At the end (`finish`): the adapter in PEFT format (`<workdir>/adapter`), the merged model as
a cirjax LLaVA directory (`<workdir>/model`, for `cirjax eval` / `cirjax.load_llava`) and, with
`export_hf`, an HF LLaVA directory (`<workdir>/model_hf`); the tokenizer goes with each.

Tokenizer: the `model.init` directory's, `data.tokenizer`, a stage-1 workdir's, or (random
init) a word-level tokenizer built from the training texts and the prompt templates with
LLaVA-Phi's special tokens and Phi-3's chat template, saved to `<workdir>/tokenizer`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from cirjax import console
from cirjax import lora as lora_lib
from cirjax import prompts
from cirjax.convert import hub, registry
from cirjax.data import images as images_lib
from cirjax.data import synth
from cirjax.data.instructcir_examples import Example, jsonl_examples, synthetic_examples
from cirjax.data.loader import Pixels
from cirjax.data.records import CIRSplit, DataError
from cirjax.data.training_splits import ensure_synthetic
from cirjax.data.word_tokenizer import build_word_tokenizer, load_tokenizer
from cirjax.eval import encode as encode_lib
from cirjax.eval import evaluate as ev
from cirjax.eval import metrics
from cirjax.losses import info_nce_loss, info_nce_logits
from cirjax.models import layer_stack, llava
from cirjax.models.phi3 import Phi3Config
from cirjax.models.vit import ViTConfig
from cirjax.train import config_utils
from cirjax.train import sharding as shd
from cirjax.train.checkpointing import Checkpointer
from cirjax.train.task import Task, run_options

HARD_NEGATIVE_SCOPES = ("batch", "own")
LLAVA_CONFIG_FILE = "llava_config.json"
TOKENIZER_DIR = "tokenizer"
_RECALL_KS = (1, 5, 10)
_CIR_METRICS = ("R@1", "R@10", "R@50", "mAP@10", "Rrel@10")


_log = console.log


# ------------------------------------------------------------------------------ model config

def model_config(mc: ml_collections.ConfigDict, vocab_size: int, image_token_id: int,
                 compute_dtype: str) -> llava.LlavaConfig:
  """A LlavaConfig from `config.model` widths (random init; a checkpoint brings its own)."""
  v, t = mc.vision, mc.text
  vs = int(t.get("vocab_size", 0) or 0)
  if vs == 0:  # the tokenizer's size, rounded up as checkpoints pad their embeddings
    vs = -(-vocab_size // 64) * 64
  if vocab_size > vs:
    raise ValueError(f"config.model.text.vocab_size={vs} is smaller than the tokenizer's "
                     f"{vocab_size} tokens")
  vision = ViTConfig(image_size=int(v.image_size), patch_size=int(v.patch_size),
                     hidden_size=int(v.hidden_size), intermediate_size=int(v.intermediate_size),
                     num_layers=int(v.num_layers), num_heads=int(v.num_heads),
                     layer_norm_eps=1e-5, hidden_act="quick_gelu", variant="clip",
                     post_layernorm=True)
  text = Phi3Config(vocab_size=vs, hidden_size=int(t.hidden_size),
                    intermediate_size=int(t.intermediate_size), num_layers=int(t.num_layers),
                    num_heads=int(t.num_heads), num_kv_heads=int(t.num_kv_heads),
                    max_position_embeddings=int(t.get("max_position_embeddings", 4096)),
                    layout=t.get("layout", "fused"), rope_theta=float(t.get("rope_theta", 1e4)))
  return llava.LlavaConfig(vision=vision, text=text, image_token_id=image_token_id,
                           vision_feature_layer=int(mc.get("vision_feature_layer", -2)),
                           dtype=compute_dtype)


def random_llava_params(config: llava.LlavaConfig, rng: jax.Array) -> dict:
  """Random LLaVA parameters with the tree of `llava.init_params`, drawn as one normal
  vector sliced per leaf (compiles in a fraction of the time of the per-module Flax init):
  biases 0, norm scales 1, kernels N(0, 1/fan_in), embeddings N(0, 0.02^2)."""
  abstract = llava.abstract_params(config)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  sizes = [int(np.prod(l.shape)) for _, l in leaves]
  flat = jax.random.normal(rng, (sum(sizes),), jnp.float32)
  out, off = [], 0
  for (path, leaf), n in zip(leaves, sizes):
    names = [str(getattr(k, "key", k)) for k in path]
    name, parent = names[-1], names[-2] if len(names) > 1 else ""
    if name == "bias":
      x = jnp.zeros(leaf.shape, leaf.dtype)
    elif name in ("scale", "weight") and ("norm" in parent or "layrnorm" in parent):
      x = jnp.ones(leaf.shape, leaf.dtype)
    else:
      fan_in = int(np.prod(leaf.shape[:-1])) if name == "kernel" or leaf.ndim == 4 else 0
      std = 1.0 / np.sqrt(fan_in) if fan_in else 0.02
      x = (flat[off:off + n].reshape(leaf.shape) * std).astype(leaf.dtype)
    off += n
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def lora_config(lc: ml_collections.ConfigDict) -> lora_lib.LoraConfig:
  targets = lc.get("target_modules") or lora_lib.DEFAULT_TARGET_MODULES
  if isinstance(targets, (list, tuple)):
    targets = tuple(targets)
  return lora_lib.LoraConfig(rank=int(lc.rank), alpha=float(lc.alpha), dropout=float(lc.dropout),
                             target_modules=targets, use_rslora=bool(lc.get("use_rslora", False)),
                             init=lc.get("init", "kaiming"))


# ------------------------------------------------------------------------------ data

def read_examples(dc: ml_collections.ConfigDict, stage: int
                  ) -> tuple[list[Example], list[Example], CIRSplit | None, str | None]:
  """(training records, held-out records, the synthetic evaluation split or None, the
  synthetic data root or None) of `config.data`."""
  source = dc.get("source", "jsonl")
  if source == "synthetic":
    root = os.path.expanduser(dc.root)
    ensure_synthetic(root, dc.get("synth"))
    train, _ = synthetic_examples(root, dc.get("train_split", "train"), stage)
    ev_examples, split = synthetic_examples(root, dc.get("eval_split", "val"), stage)
    return train, ev_examples, split, root
  if source != "jsonl":
    raise DataError(f"config.data.source={source!r}: use 'jsonl' or 'synthetic'")
  if not dc.get("train_file"):
    raise DataError("config.data.train_file is empty: give the InstructCIR JSON lines "
                    f"({'image-caption pairs' if stage == 1 else 'CC3M-Instruct triplets'})"
                    " and config.data.image_root")
  on_missing = dc.get("on_missing", "skip")
  train = jsonl_examples(os.path.expanduser(dc.train_file),
                         os.path.expanduser(dc.get("image_root", "")), stage, on_missing)
  held_out = []
  if dc.get("eval_file"):
    held_out = jsonl_examples(
        os.path.expanduser(dc.eval_file),
        os.path.expanduser(dc.get("eval_image_root") or dc.get("image_root", "")), stage,
        on_missing)
  return train, held_out, None, None


def tokenizer_texts(examples: Sequence[Example], eval_split: CIRSplit | None,
                    synthetic: bool) -> list[str]:
  """Every text a built word-level tokenizer must cover."""
  out = []
  for e in examples:
    out += [e.caption, e.instruction, e.original]
  if eval_split is not None:
    out += [q.text for q in eval_split.queries]
  if synthetic:
    # Stage 1 sees only captions; the words of stage 2's instructions must still have ids
    # when stage 2 inherits this tokenizer, or they all read as <unk>.
    out += [w for w in synth.vocabulary() if w not in synth.SPECIAL_TOKENS]
  return out


def prompt_lengths(tok, stage: int, examples: Sequence[Example], n_img: int,
                   max_length: int, max_positions: int) -> tuple[int, int]:
  """Fixed (query, caption) prompt lengths (one compiled step): the longest template overhead
  plus the longest field, with a small margin, rounded up to 8; at most `max_length`."""

  def overhead(template, field, image):
    fields = {field: "x"} if field else {}
    enc = prompts.encode(tok, template, [fields], num_image_tokens=n_img, image=image)
    return int(enc["attention_mask"].sum()) - (1 if field else 0)

  def longest(texts):
    texts = sorted(set(t for t in texts if t))
    if not texts:
      return 0
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    return max(len(x) for x in enc)

  def round8(n):
    return -(-(n + 4) // 8) * 8

  caps = [e.caption for e in examples] + [e.original for e in examples]
  if stage == 1:
    q_len = round8(overhead(prompts.STAGE1_IMAGE, None, True))
    t_len = round8(overhead(prompts.STAGE1_CAPTION, "caption", False) + longest(caps))
  else:
    q_len = round8(max(overhead(t, "modifier", True) for t in prompts.STAGE2_IMAGE_TEMPLATES)
                   + longest([e.instruction for e in examples]))
    t_len = round8(max(overhead(t, "caption", False) for t in prompts.STAGE2_CAPTION_TEMPLATES)
                   + longest(caps))
  for name, n in (("query", q_len), ("caption", t_len)):
    if n > max_length:
      raise DataError(f"the longest {name} prompt needs {n} tokens > config.data.max_length="
                      f"{max_length}; shorten the texts or raise it")
    if n > max_positions:
      raise DataError(f"{name} prompts of {n} tokens exceed the model's {max_positions} "
                      "positions")
  return q_len, t_len


# ------------------------------------------------------------------------------ model source

@dataclasses.dataclass
class ModelSource:
  """Where a run's model comes from (see the module docstring)."""
  cfg: llava.LlavaConfig
  tokenizer: Any
  tokenizer_dir: str
  base_params: dict | None = None    # pretrained LLaVA weights (host, fp32)
  ckpt_dir: str | None = None        # a stage-1 workdir's checkpoints: base and adapter
  adapter_dir: str | None = None     # a PEFT adapter to continue


def _load_llava(path: str):
  if not Path(path).is_dir():
    raise FileNotFoundError(f"LLaVA model directory not found: {path}")
  loaded = registry.load(path, family="llava")
  # Training never reads the LM head; export_model puts it back from the source.
  return loaded.config, {k: v for k, v in loaded.params.items() if k != "lm_head"}


def model_source(config: ml_collections.ConfigDict, init_from: str, workdir: str,
                 texts: Sequence[str]) -> ModelSource:
  """Model config, tokenizer and the parameters to start from: a stage-1 workdir, a PEFT
  adapter on `model.init`, a merged LLaVA directory, `model.init`, or a random model with a
  word-level tokenizer built over `texts` (saved in `<workdir>/tokenizer`)."""
  mc = config.model
  compute_dtype = str(config.get("compute_dtype", "float32"))
  # Paths or hub ids (`hub.resolve`: a local path wins, an id is its HF-cache snapshot).
  init = config_utils.model_init(config)
  init = str(hub.resolve(init)) if init else ""
  tok_dir = config.data.get("tokenizer", "") or ""
  tok_dir = str(hub.resolve(tok_dir, weights=False)) if tok_dir else ""
  src = str(hub.resolve(init_from)) if init_from else ""
  cfg = base_params = ckpt_dir = adapter_dir = None
  if src and (Path(src) / "checkpoints").is_dir():
    # A stage-1 workdir: its model config, tokenizer and latest checkpoint.
    ckpt_dir = str(Path(src) / "checkpoints")
    cfg_file = Path(src) / LLAVA_CONFIG_FILE
    if not cfg_file.is_file():
      raise FileNotFoundError(f"config.init_from={src}: no {LLAVA_CONFIG_FILE} (not a "
                              "cirjax InstructCIR workdir?)")
    cfg = llava.LlavaConfig.from_dict(json.loads(cfg_file.read_text()))
    if not tok_dir and (Path(src) / TOKENIZER_DIR).is_dir():
      tok_dir = str(Path(src) / TOKENIZER_DIR)
    if not tok_dir and init:
      tok_dir = init
    if init:
      _log(f"config.model.init={init} is not read: the base comes from {src}'s checkpoint")
  elif src and (Path(src) / lora_lib.CONFIG_NAME).is_file():
    if not init:
      raise ValueError(f"config.init_from={src} is a PEFT adapter: config.model.init must "
                       "name the base LLaVA it was trained on")
    cfg, base_params = _load_llava(init)
    adapter_dir = src
  elif src:
    cfg, base_params = _load_llava(src)  # a merged stage-1 model: fresh adapter
    tok_dir = tok_dir or src
  elif init:
    cfg, base_params = _load_llava(init)
  if not tok_dir and (init or src) and llava.load_tokenizer(init or src) is not None:
    tok_dir = init or src
  if tok_dir:
    tokenizer = load_tokenizer(tok_dir)
  else:
    tok_dir = str(Path(workdir) / TOKENIZER_DIR)
    if jax.process_index() == 0:
      build_word_tokenizer(texts, tok_dir)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("cirjax_instructcir_tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    _log(f"built a word-level tokenizer ({len(tokenizer)} tokens) in {tok_dir}")
  image_id = prompts.image_token_id(tokenizer)
  if cfg is None:
    cfg = model_config(mc, len(tokenizer), image_id, compute_dtype)
  else:
    cfg = cfg.replace(dtype=compute_dtype, param_dtype="float32")
    if cfg.image_token_id != image_id:
      raise ValueError(f"the model's image_token_id {cfg.image_token_id} differs from the "
                       f"tokenizer's <image> id {image_id} ({tok_dir})")
    if len(tokenizer) > cfg.text.vocab_size:
      raise ValueError(f"tokenizer {tok_dir} has {len(tokenizer)} tokens, the "
                       f"model's vocabulary only {cfg.text.vocab_size}")
  if base_params is not None:
    base_params = jax.tree.map(lambda x: np.asarray(x, np.float32), base_params)
  return ModelSource(cfg, tokenizer, tok_dir, base_params, ckpt_dir, adapter_dir)


def stage1_params(ckpt_dir: str, abstract_params, init_from: str, cfg: llava.LlavaConfig):
  """The latest checkpoint of a stage-1 workdir (base and adapter), on the host."""
  ck = Checkpointer(ckpt_dir, keep=1000, async_save=False)
  step = ck.latest_step()
  if step is None:
    raise FileNotFoundError(f"config.init_from: no checkpoint in {ckpt_dir}")
  params = jax.tree.map(np.asarray, jax.device_get(ck.restore_params(step)))
  ck.close()
  # A stage-1 run with scan_layers saved its layers stacked: per-layer, as initial_params gives.
  params = {k: llava.unstack_layers(v, cfg) for k, v in params.items()}
  if jax.tree.structure(params) != jax.tree.structure(abstract_params):
    raise ValueError(f"config.init_from={init_from}: checkpoint {ckpt_dir}/{step}: parameter "
                     "tree differs from the model's; stage 2 needs the same model and LoRA "
                     "settings (lora.rank, lora.target_modules) as stage 1")
  _log(f"stage 2 starts from {ckpt_dir}/{step} (base and adapter)")
  return params  # host: the trainer shards it


# ------------------------------------------------------------------------------ the task

class InstructCIRTask(Task):
  """InstructCIR stage 1 or 2: LoRA on LLaVA-Phi's language model, InfoNCE."""

  name = "instructcir"
  stateful_batches = False  # batch(epoch, i): seeded by (seed, epoch, i); workers build ahead

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, workdir: str):
    super().__init__(config, mesh, workdir)
    t0 = time.perf_counter()
    self.stage = int(config.stage)
    if self.stage not in (1, 2):
      raise ValueError(f"config.stage={self.stage}: InstructCIR has stages 1 and 2")
    self.seed = int(config.get("seed", 0))
    lc = config.loss
    self.temperature = float(lc.temperature)
    self.use_hard_negatives = self.stage == 2 and bool(lc.get("hard_negatives", True))
    self.hn_scope = lc.get("hard_negative_scope", "batch")
    if self.hn_scope not in HARD_NEGATIVE_SCOPES:
      raise ValueError(f"config.loss.hard_negative_scope={self.hn_scope!r}: use one of "
                       f"{HARD_NEGATIVE_SCOPES}")
    self.fixed_templates = bool(config.get("fixed_templates", False))
    self.remat = bool(config.get("remat", False))
    self.run_kw = run_options(config)
    self.lora_cfg = lora_config(config.lora)

    dc = config.data
    self.train, self.eval_examples, self.eval_split, data_root = read_examples(dc, self.stage)
    self.init_from = os.path.expanduser(config.get("init_from", "") or "")
    if self.stage == 1 and self.init_from:
      raise ValueError("config.init_from is for stage 2 (the stage-1 result to start from)")
    if self.stage == 2 and not self.init_from and not config.get("allow_scratch_stage2", False):
      raise ValueError("config.init_from is empty: stage 2 starts from stage 1 (its workdir, "
                       "a PEFT adapter directory or a merged model directory); set "
                       "allow_scratch_stage2=True to run stage 2 alone (the paper's ablation)")
    self.source = model_source(config, self.init_from, workdir, tokenizer_texts(
        self.train + self.eval_examples, self.eval_split, data_root is not None))
    self.cfg, self.tokenizer = self.source.cfg, self.source.tokenizer
    self._tokenizer_lock = threading.Lock()
    self.tokenizer_dir = self.source.tokenizer_dir
    self._images = Pixels(images_lib.make_transform(dc.get("transform", "clip"),
                                                   self.cfg.vision.image_size), _open_image)
    self.pixel_store_stats: dict | None = None  # None: not asked yet
    self.n_img = self.cfg.num_image_tokens
    self.q_len, self.t_len = prompt_lengths(
        self.tokenizer, self.stage, self.train + self.eval_examples, self.n_img,
        int(dc.get("max_length", 512)), self.cfg.text.max_position_embeddings)
    kw = dict(cfg=self.cfg.replace(**self.run_kw), lora_cfg=self.lora_cfg)
    self._embed_fns = {True: functools.partial(_embed_with_images, **kw),
                       False: functools.partial(_embed_texts, **kw)}
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
      base = random_llava_params(self.cfg, kb)
    else:
      base = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), self.source.base_params)
    adapter = lora_lib.init_lora(base, self.lora_cfg, kl)
    return {"base": base, "lora": adapter.params}

  def initial_params(self, abstract_params):
    src = self.source
    if src.ckpt_dir is not None:
      return stage1_params(src.ckpt_dir, abstract_params, self.init_from, self.cfg)
    if src.base_params is None:
      return None
    out = {"base": src.base_params}
    if src.adapter_dir:
      ad = lora_lib.load_peft(src.adapter_dir, src.base_params, dropout=self.lora_cfg.dropout)
      want = jax.tree.structure(abstract_params["lora"])
      if jax.tree.structure(ad.params) != want or ad.config.rank != self.lora_cfg.rank:
        raise ValueError(f"config.init_from={src.adapter_dir}: adapter (r={ad.config.rank}, "
                         f"{len(ad.modules)} modules) differs from config.lora (r="
                         f"{self.lora_cfg.rank}); set config.lora to the adapter's settings")
      out["lora"] = jax.tree.map(lambda x: np.asarray(x, np.float32), ad.params)
      _log(f"stage 2 continues the adapter {src.adapter_dir} on {self.config.model.init}")
    else:
      base_abs = abstract_params["base"]
      out["lora"] = jax.device_get(jax.jit(
          lambda r: lora_lib.init_lora(base_abs, self.lora_cfg, r).params)(
              jax.random.split(jax.random.PRNGKey(self.seed))[1]))
    return out

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
      names, reads = _run_images(self)
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
    tok = self.tokenizer
    if self.stage == 1:
      q = prompts.render(prompts.STAGE1_IMAGE, tok, image=True)
      return [(q, prompts.render(prompts.STAGE1_CAPTION, tok, image=False,
                                 caption=self.train[r].caption), "") for r in rows]
    seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
    rng = random.Random(seed)
    out = []
    for r in rows:
      e = self.train[r]
      out.append(prompts.stage2_prompts(rng, e.instruction, e.caption, e.original, tok,
                                        fixed=self.fixed_templates))
    return out

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
      raise ValueError(f"the checkpoint in {self.workdir} is of stage {host.get('stage')} with "
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
    tok = self.tokenizer
    if self.stage == 1:
      corpus = sorted(set(e.caption for e in exs))
      kind, qt, ct = "i2t", prompts.STAGE1_IMAGE, prompts.STAGE1_CAPTION
      qp = [prompts.render(qt, tok, image=True)] * len(exs)
    else:
      corpus = sorted(set(e.caption for e in exs) | set(e.original for e in exs))
      kind = "q2t"
      qt, ct = prompts.STAGE2_IMAGE_TEMPLATES[0], prompts.STAGE2_CAPTION_TEMPLATES[0]
      qp = [prompts.render(qt, tok, image=True, modifier=e.instruction) for e in exs]
    pos = {c: i for i, c in enumerate(corpus)}
    target = np.array([pos[e.caption] for e in exs])
    cp = [prompts.render(ct, tok, image=False, caption=c) for c in corpus]
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
    if self.config.get("export", True):
      export_model(Path(self.workdir), self.config, self.cfg, self.lora_cfg, params, self.mesh,
                   self.tokenizer_dir, f"cirjax train instructcir stage {self.stage}")


def export_model(workdir: Path, config: ml_collections.ConfigDict, cfg: llava.LlavaConfig,
                 lora_cfg: lora_lib.LoraConfig, params, mesh: jax.sharding.Mesh,
                 tokenizer_dir: str, source: str) -> None:
  """The adapter (PEFT, with the tokenizer and the base's path), the merged model (cirjax
  LLaVA directory) and, with `export_hf`, an HF LLaVA directory, under `workdir`. The LM head,
  which training leaves out (LoRA never touches it), comes back from the base model's
  directory (or a stage-1 workdir's exported model) so generation works from the exports."""
  host = jax.device_get(jax.jit(lambda p: p, out_shardings=shd.replicated(mesh))(params))
  if jax.process_index() != 0:
    return
  # PEFT names, the converters and LoRA merging read the per-layer layout.
  host = {k: llava.unstack_layers(jax.tree.map(np.asarray, v), cfg) for k, v in host.items()}
  adapter = lora_lib.Adapter(host["lora"], lora_cfg)
  init_from = os.path.expanduser(config.get("init_from", "") or "")
  merged_src = init_from and not (Path(init_from) / "checkpoints").is_dir() and not (
      Path(init_from) / lora_lib.CONFIG_NAME).is_file()  # a merged model: the adapter's base
  # A hub id stays one: PEFT's base_model_name_or_path names the base as the hub does.
  base = init_from if merged_src else config_utils.model_init(config, check=False)
  lora_lib.save_peft(adapter, workdir / "adapter", base_model_name_or_path=base or None,
                     extra_files=registry.tokenizer_files(tokenizer_dir))
  merged = jax.tree.map(np.asarray, lora_lib.merge(host["base"], adapter))
  want = (cfg.text.hidden_size, cfg.text.vocab_size)
  for src in (base, init_from and str(Path(init_from) / "model")):
    head = registry.lm_head(src) if src else None
    if head is not None and tuple(np.shape(head)) == want:
      merged["lm_head"] = {"kernel": np.asarray(head, np.float32)}
      break
  cfg = cfg.replace(dtype="float32")
  registry.save(workdir / "model", "llava", cfg, merged, overwrite=True,
                extra={"source": source}, tokenizer_dir=tokenizer_dir)
  written = ["adapter", "model"]
  if config.get("export_hf", True):
    registry.export_hf(workdir / "model_hf", "llava", cfg, merged, overwrite=True,
                       tokenizer_dir=tokenizer_dir)
    written.append("model_hf")
  _log(f"exported {', '.join(str(workdir / w) for w in written)}")


def _run_images(task: InstructCIRTask) -> tuple[list[str], float]:
  """(every image path the run reads: training, then evaluation; how many times training
  reads each training image on average)."""
  train = list(dict.fromkeys(str(e.image) for e in task.train))
  tc = task.config.train
  steps = int(tc.epochs) * task.steps_per_epoch
  if int(tc.get("max_steps", -1) or -1) > 0:
    steps = min(steps, int(tc.max_steps))
  limit = int(task.config.get("eval_max", 0) or 0) or None
  evals = [str(e.image) for e in task.eval_examples[:limit]]
  if task.eval_split is not None:
    s = task.eval_split
    evals += [str(s.images[n].path) for n in s.corpus]
    evals += [str(s.images[q.reference].path) for q in s.queries[:limit]]
  names = list(dict.fromkeys(train + (evals if task.config.get("evaluate", True) else [])))
  return names, steps * task.global_batch / max(1, len(train))


def _open_image(path: str):
  try:
    return images_lib.load_image(path)
  except OSError as e:
    raise DataError(f"cannot read image {path}: {e}") from e


# Pure encoders (module level so their compilations are reused).
def _embed_texts(params, ids, mask, *, cfg, lora_cfg):
  return llava.embed(params["base"], cfg, ids, mask, None, lora=lora_lib.Adapter(
      params["lora"], lora_cfg), rng=None, deterministic=True)


def _embed_with_images(params, pixels, ids, mask, *, cfg, lora_cfg):
  return llava.embed(params["base"], cfg, ids, mask, pixels, lora=lora_lib.Adapter(
      params["lora"], lora_cfg), rng=None, deterministic=True)
