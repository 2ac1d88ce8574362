"""A LLaVA training run's model in and out: where it starts (`model_source`: a stage-1
workdir, a PEFT adapter on a base, a merged model, a base, or random weights with a built
word-level tokenizer; `initial_params`) and what it leaves (`export`: the PEFT adapter,
the merged cirjax model, the HF directory). InstructCIR's task (`cirjax.train.instructcir`)
calls these; they read and write weights only through the registry, LoRA and the tokenizer
loader, so the task keeps its method.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from cirjax import lora as lora_lib
from cirjax import prompts
from cirjax.convert import hub, registry
from cirjax.data.records import DataError
from cirjax.data.tokenizer import build_word_tokenizer, has_hf_tokenizer, load_tokenizer
from cirjax.errors import CirjaxError, ConfigError
from cirjax.models import llava, llava_init

LLAVA_CONFIG_FILE = "llava_config.json"  # a run's model config, beside its checkpoints
TOKENIZER_DIR = "tokenizer"              # a random-init run's built tokenizer


@dataclasses.dataclass
class ModelSource:
  """Where a run's model comes from (see `model_source`)."""
  cfg: llava.LlavaConfig
  tokenizer: Any
  tokenizer_dir: str
  base_params: dict | None = None    # pretrained LLaVA weights (host, fp32)
  ckpt_dir: str | None = None        # a stage-1 workdir's checkpoints: base and adapter
  adapter_dir: str | None = None     # a PEFT adapter to continue
  init: str = ""                     # the base's directory (`model.init` resolved)


def load_base(path: str) -> tuple[llava.LlavaConfig, dict]:
  """A LLaVA directory's config and params, less the LM head (training never reads it;
  `export` puts it back from the source)."""
  if not Path(path).is_dir():
    raise FileNotFoundError(f"LLaVA model directory not found: {path}")
  loaded = registry.load(path, family="llava")
  return loaded.config, {k: v for k, v in loaded.params.items() if k != "lm_head"}


def model_source(config: Any, init: str, init_from: str, workdir: str, texts: Sequence[str],
                 log: Callable[[str], None] = print) -> ModelSource:
  """Model config, tokenizer and the parameters to start from: a stage-1 workdir
  (`init_from`), a PEFT adapter (`init_from`) on `init` (the run's `model.init`), a merged
  LLaVA directory (`init_from`), `init`, or a random model (`config.model` widths) with a
  word-level tokenizer built over `texts` (saved in `<workdir>/tokenizer`). The tokenizer
  is `config.data.tokenizer`'s when set."""
  mc = config.model
  compute_dtype = str(config.get("compute_dtype", "float32"))
  # Paths or hub ids (`hub.resolve`: a local path wins, an id is its HF-cache snapshot).
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
      log(f"config.model.init={init} is not read: the base comes from {src}'s checkpoint")
  elif src and (Path(src) / lora_lib.CONFIG_NAME).is_file():
    if not init:
      raise ConfigError(f"config.init_from={src} is a PEFT adapter: config.model.init must "
                        "name the base LLaVA it was trained on")
    cfg, base_params = load_base(init)
    adapter_dir = src
  elif src:
    cfg, base_params = load_base(src)  # a merged stage-1 model: fresh adapter
    tok_dir = tok_dir or src
  elif init:
    cfg, base_params = load_base(init)
  if not tok_dir and (init or src) and has_hf_tokenizer(init or src):
    tok_dir = init or src
  if tok_dir:
    tokenizer = load_tokenizer(tok_dir, "llava")
  else:
    tok_dir = str(Path(workdir) / TOKENIZER_DIR)
    if jax.process_index() == 0:
      build_word_tokenizer(texts, tok_dir)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("cirjax_instructcir_tokenizer")
    tokenizer = load_tokenizer(tok_dir, "llava")
    log(f"built a word-level tokenizer ({len(tokenizer)} tokens) in {tok_dir}")
  image_id = prompts.image_token_id(tokenizer)
  if cfg is None:
    cfg = llava_init.config_from_widths(mc, len(tokenizer), image_id, compute_dtype)
  else:
    cfg = cfg.replace(dtype=compute_dtype, param_dtype="float32")
    if cfg.image_token_id != image_id:
      raise DataError(f"the model's image_token_id {cfg.image_token_id} differs from the "
                      f"tokenizer's <image> id {image_id} ({tok_dir})")
    if len(tokenizer) > cfg.text.vocab_size:
      raise DataError(f"tokenizer {tok_dir} has {len(tokenizer)} tokens, the "
                      f"model's vocabulary only {cfg.text.vocab_size}")
  if base_params is not None:
    base_params = jax.tree.map(lambda x: np.asarray(x, np.float32), base_params)
  return ModelSource(cfg, tokenizer, tok_dir, base_params, ckpt_dir, adapter_dir, init)


def per_layer_params(params: dict, abstract_params: dict, cfg: llava.LlavaConfig,
                     where: str) -> dict:
  """A stage-1 checkpoint's host params `{"base", "lora"}` in the per-layer layout (a run with
  `scan_layers` saved its layers stacked), as `initial_params` gives them; refused (naming
  `where`) when the tree is not the model's."""
  params = {k: llava.unstack_layers(v, cfg) for k, v in params.items()}
  if jax.tree.structure(params) != jax.tree.structure(abstract_params):
    raise ConfigError(f"{where}: parameter tree differs from the model's; stage 2 needs the "
                      "same model and LoRA settings (lora.rank, lora.target_modules) as stage 1")
  return params


def initial_params(source: ModelSource, abstract_params: dict, lora_cfg: lora_lib.LoraConfig,
                    seed: int, log: Callable[[str], None] = print) -> dict | None:
  """The host params a run starts from when they come from weights (None: random init):
  `{"base": the source's base, "lora": the PEFT adapter it continues, or a fresh one drawn
  from `seed`}`; an adapter whose tree or rank differs from `lora_cfg` is refused."""
  if source.base_params is None:
    return None
  out = {"base": source.base_params}
  if source.adapter_dir:
    ad = lora_lib.load_peft(source.adapter_dir, source.base_params, dropout=lora_cfg.dropout)
    want = jax.tree.structure(abstract_params["lora"])
    if jax.tree.structure(ad.params) != want or ad.config.rank != lora_cfg.rank:
      raise ConfigError(f"config.init_from={source.adapter_dir}: adapter (r={ad.config.rank}, "
                        f"{len(ad.modules)} modules) differs from config.lora (r="
                        f"{lora_cfg.rank}); set config.lora to the adapter's settings")
    out["lora"] = jax.tree.map(lambda x: np.asarray(x, np.float32), ad.params)
    log(f"stage 2 continues the adapter {source.adapter_dir} on {source.init}")
  else:
    base_abs = abstract_params["base"]
    out["lora"] = jax.device_get(jax.jit(
        lambda r: lora_lib.init_lora(base_abs, lora_cfg, r).params)(
            jax.random.split(jax.random.PRNGKey(seed))[1]))
  return out


def export(workdir: Path, params: dict, cfg: llava.LlavaConfig, lora_cfg: lora_lib.LoraConfig,
           tokenizer_dir: str, source: str, *, init: str, init_from: str, export_hf: bool,
           log: Callable[[str], None] = print) -> None:
  """The adapter (PEFT, with the tokenizer and the base's path), the merged model (cirjax
  LLaVA directory) and, with `export_hf`, an HF LLaVA directory, under `workdir`, from a
  run's host params `{"base", "lora"}` (either layer layout). The LM head, which training
  leaves out (LoRA never touches it), comes back from the base model's directory (`init`,
  the run's `model.init`, or a merged `init_from`) or a stage-1 workdir's exported model, so
  generation works from the exports."""
  # PEFT names, the converters and LoRA merging read the per-layer layout.
  host = {k: llava.unstack_layers(jax.tree.map(np.asarray, v), cfg) for k, v in params.items()}
  adapter = lora_lib.Adapter(host["lora"], lora_cfg)
  init_from = os.path.expanduser(init_from or "")
  merged_src = init_from and not (Path(init_from) / "checkpoints").is_dir() and not (
      Path(init_from) / lora_lib.CONFIG_NAME).is_file()  # a merged model: the adapter's base
  # A hub id stays one: PEFT's base_model_name_or_path names the base as the hub does.
  base = init_from if merged_src else init
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
  if export_hf:
    registry.export_hf(workdir / "model_hf", "llava", cfg, merged, overwrite=True,
                       tokenizer_dir=tokenizer_dir)
    written.append("model_hf")
  log(f"exported {', '.join(str(workdir / w) for w in written)}")


def run_model(run_dir: str | os.PathLike, params: dict, lora_cfg: lora_lib.LoraConfig, *,
              tokenizer: str | None, init: str) -> tuple[llava.LlavaConfig, dict, Any]:
  """(config, merged host params, tokenizer) of a training run's `{"base", "lora"}` params
  (either layer layout), as `export` would write them: the run's `llava_config.json`, and
  the first tokenizer found in the run's own `tokenizer/`, its `data.tokenizer`
  (`tokenizer`) or its `model.init` (`init`); paths or hub ids (of `tokenizer` only the
  tokenizer files are fetched)."""
  run_dir = Path(run_dir)
  cfg_file = run_dir / LLAVA_CONFIG_FILE
  if not cfg_file.is_file():
    raise CirjaxError(f"{run_dir}: an InstructCIR workdir without {LLAVA_CONFIG_FILE}; "
                      "export the model from the run")
  cfg = llava.LlavaConfig.from_dict(json.loads(cfg_file.read_text())).replace(dtype="float32")
  dirs = [(str(run_dir / TOKENIZER_DIR), False), (tokenizer, False), (init, True)]
  found = [hub.resolve(d, weights=w) for d, w in dirs if d]
  tok_dir = next((os.path.expanduser(str(d)) for d in found if Path(d).is_dir()), None)
  if tok_dir is None:
    raise CirjaxError(f"{run_dir}: no tokenizer (looked in {', '.join(d for d, _ in dirs if d)})")
  host = {k: llava.unstack_layers(jax.tree.map(np.asarray, v), cfg) for k, v in params.items()}
  merged = jax.tree.map(np.asarray, lora_lib.merge(host["base"],
                                                   lora_lib.Adapter(host["lora"], lora_cfg)))
  return cfg, merged, load_tokenizer(tok_dir, "llava")


# Pure encoders of a run's params `{"base", "lora"}` (module level, so that a task's
# `functools.partial` of them keeps one compilation per shape).
def embed_texts(params, ids, mask, *, cfg, lora_cfg):
  return llava.embed(params["base"], cfg, ids, mask, None, lora=lora_lib.Adapter(
      params["lora"], lora_cfg), rng=None, deterministic=True)


def embed_with_images(params, pixels, ids, mask, *, cfg, lora_cfg):
  return llava.embed(params["base"], cfg, ids, mask, pixels, lora=lora_lib.Adapter(
      params["lora"], lora_cfg), rng=None, deterministic=True)
