"""LoRA adapters for the LLaVA-Phi embedder, numerically identical to PEFT.

An adapter is a separate pytree beside the frozen base params, mirroring the base tree at
each adapted linear layer:

    adapter.params['language_model']['layers_0']['self_attn']['qkv_proj'] =
        {'lora_a': [in, r], 'lora_b': [r, out]}

and the forward computes `y = x W + dropout(x) A B * scale` with `scale = alpha / r`
(`alpha / sqrt(r)` with rsLoRA), PEFT's order of operations. The model reads adapters from the
`lora` variable collection (see `cirjax.models.phi3.Linear`); pass `lora=adapter` to
`cirjax.models.llava.forward/embed`. Only `adapter.params` reaches the optimizer, so the base
stays frozen without any masking; `trainable_mask` covers the case of one combined tree.

Targets are chosen like PEFT's `target_modules`, on the HF module names PEFT sees
(`model.language_model.layers.3.self_attn.qkv_proj`):
  * a string is a regex that must match the whole name (`re.fullmatch`, as PEFT); the cirjax
    path (`language_model/layers_3/self_attn/qkv_proj`) and the transformers 4.x name
    (`language_model.model.layers.3...`) are tried too;
  * a list/tuple of names matches a module whose name equals an entry or ends in `.entry`.
Only the language model's and the projector's linear layers can carry adapters; the CLIP tower
never does (InstructCIR freezes it). A target that matches nothing is an error.

PEFT format: `save_peft` writes `adapter_config.json` + `adapter_model.safetensors` that
`peft.PeftModel.from_pretrained(LlavaForConditionalGeneration...)` loads, with
`target_modules` written as a regex matching exactly the adapted modules (so PEFT adapts the
same layers); `load_peft` reads PEFT's files (safetensors or `.bin`) back, checking every
key and shape against the base params.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from cirjax.convert import engine
from cirjax.convert import io as weight_io
from cirjax.errors import CirjaxError
from cirjax.convert.llava_convert import KEY_FORMATS, hf_module_name, module_path_from_hf

# All attention and MLP projections of the LLM, in both layouts (Phi-3 fused, Llama split).
LLM_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj",
                   "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
DEFAULT_TARGET_MODULES = r".*language_model\..*\.(" + "|".join(LLM_PROJECTIONS) + ")"
ADAPTABLE_COMPONENTS = ("language_model", "multi_modal_projector")
INITS = ("kaiming", "gaussian", "random")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class LoraError(CirjaxError, ValueError):
  """A LoRA target, adapter file or adapter shape that does not fit the base model."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyper-parameters (hashable: a static part of an `Adapter` pytree).

  Attributes:
    rank: r, the adapter's inner dimension (InstructCIR: 64).
    alpha: lora_alpha; the update is scaled by alpha / r (InstructCIR: 16 -> 0.25).
    dropout: dropout on the adapter's input during training (InstructCIR: 0.05).
    target_modules: regex (full match) or tuple of module names, PEFT semantics.
    use_rslora: scale by alpha / sqrt(r) instead (PEFT `use_rslora`).
    init: 'kaiming' (PEFT default: A ~ kaiming-uniform(a=sqrt 5), B = 0), 'gaussian'
      (A ~ N(0, 1/r), B = 0), or 'random' (B random too, PEFT `init_lora_weights=False`;
      for tests: the adapter then changes the output from the start).
  """
  rank: int = 64
  alpha: float = 16.0
  dropout: float = 0.05
  target_modules: str | tuple[str, ...] = DEFAULT_TARGET_MODULES
  use_rslora: bool = False
  init: str = "kaiming"

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank <= 0:
      raise LoraError(f"LoRA rank must be a positive int, got {self.rank!r}")
    if not 0.0 <= self.dropout < 1.0:
      raise LoraError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
    if self.init not in INITS:
      raise LoraError(f"LoRA init must be one of {INITS}, got {self.init!r}")
    if isinstance(self.target_modules, (list, tuple)):
      object.__setattr__(self, "target_modules", tuple(self.target_modules))
      if not self.target_modules:
        raise LoraError("target_modules is empty")
    elif isinstance(self.target_modules, str):
      try:
        re.compile(self.target_modules)
      except re.error as e:
        raise LoraError(f"target_modules {self.target_modules!r} is not a valid regex: {e}") \
            from e
    else:
      raise LoraError(f"target_modules must be a regex string or a list of names, got "
                      f"{type(self.target_modules).__name__}")

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def config_from(lc: Any) -> LoraConfig:
  """A LoraConfig from a training config's `lora` block (rank, alpha, dropout, optional
  target_modules, use_rslora, init)."""
  targets = lc.get("target_modules") or DEFAULT_TARGET_MODULES
  return LoraConfig(rank=int(lc.rank), alpha=float(lc.alpha), dropout=float(lc.dropout),
                    target_modules=tuple(targets) if isinstance(targets, list) else targets,
                    use_rslora=bool(lc.get("use_rslora", False)), init=lc.get("init", "kaiming"))


@struct.dataclass
class Adapter:
  """LoRA weights (a pytree: `params` are leaves, `config` is static)."""
  params: dict
  config: LoraConfig = struct.field(pytree_node=False)

  @property
  def modules(self) -> list[tuple[str, ...]]:
    """cirjax paths of the adapted linear layers, sorted."""
    return sorted(_adapter_paths(self.params))

  def num_params(self) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(self.params)))

  def replace_params(self, params: dict) -> "Adapter":
    return Adapter(params, self.config)


# ----------------------------------------------------------------------------- targets


def _adapter_paths(tree: Mapping, prefix: tuple = ()) -> list[tuple[str, ...]]:
  out = []
  for k, v in tree.items():
    if isinstance(v, Mapping):
      if "lora_a" in v:
        out.append(prefix + (k,))
      else:
        out += _adapter_paths(v, prefix + (k,))
  return out


def linear_modules(params: Mapping) -> list[tuple[str, ...]]:
  """cirjax paths of every linear layer that can carry an adapter (2-D `kernel`, in the
  language model or the projector)."""
  out = []

  def walk(t, path):
    if "kernel" in t and np.ndim(t["kernel"]) == 2:
      out.append(path)
    for k, v in t.items():
      if isinstance(v, Mapping):
        walk(v, path + (k,))
  for comp in ADAPTABLE_COMPONENTS:
    if comp in params:
      walk(params[comp], (comp,))
  if not out:
    raise LoraError(f"no adaptable linear layers found: expected a LLaVA param tree with "
                    f"{' / '.join(ADAPTABLE_COMPONENTS)} (got top-level keys {sorted(params)})")
  return sorted(out)


def _names(path: tuple[str, ...]) -> list[str]:
  return [hf_module_name(path, "hf5"), hf_module_name(path, "hf4"), "/".join(path)]


def matches(path: tuple[str, ...], target_modules: str | Sequence[str]) -> bool:
  """Whether a module is targeted (PEFT semantics, see module docstring)."""
  if isinstance(target_modules, str):
    return any(re.fullmatch(target_modules, n) for n in _names(path))
  hf = _names(path)[:2]
  return any(n == t or n.endswith("." + t) for n in hf for t in target_modules)


def target_paths(params: Mapping, target_modules: str | Sequence[str]) -> list[tuple[str, ...]]:
  """The linear layers `target_modules` selects; an error naming candidates if none."""
  candidates = linear_modules(params)
  chosen = [p for p in candidates if matches(p, target_modules)]
  if not chosen:
    examples = ", ".join(hf_module_name(p) for p in candidates[:4])
    raise LoraError(f"LoRA target_modules {target_modules!r} matches no linear layer of the "
                    f"language model or projector; module names look like: {examples} "
                    f"(a string is a full-match regex, a list matches name suffixes)")
  return chosen


# ----------------------------------------------------------------------------- init / merge


# The conversion engine's nested-dict path helpers (one implementation).
_get, _set = engine.get_path, engine.set_path


def init_lora(params: Mapping, config: LoraConfig, rng: jax.Array | None = None, *,
              dtype: Any = jnp.float32) -> Adapter:
  """Creates adapters on the targeted layers of `params` (the base tree is not touched).

  A is initialised as PEFT does (`kaiming_uniform_(a=sqrt(5))` on the `[r, in]` weight, i.e.
  U(-1/sqrt(in), 1/sqrt(in))) and B is zero, so the adapted model starts equal to the base.
  Adapters are fp32 by default even over a bf16 base (the optimizer updates them).
  """
  rng = jax.random.PRNGKey(0) if rng is None else rng
  tree: dict = {}
  for i, path in enumerate(target_paths(params, config.target_modules)):
    d_in, d_out = np.shape(_get(params, path)["kernel"])
    ka, kb = jax.random.split(jax.random.fold_in(rng, i))
    if config.init == "gaussian":
      a = jax.random.normal(ka, (d_in, config.rank), dtype) / config.rank
    else:
      bound = 1.0 / math.sqrt(d_in)
      a = jax.random.uniform(ka, (d_in, config.rank), dtype, -bound, bound)
    if config.init == "random":  # nn.Linear's default init of the [out, r] weight
      bound = 1.0 / math.sqrt(config.rank)
      b = jax.random.uniform(kb, (config.rank, d_out), dtype, -bound, bound)
    else:
      b = jnp.zeros((config.rank, d_out), dtype)
    _set(tree, path, {"lora_a": a, "lora_b": b})
  return Adapter(tree, config)


apply_lora = init_lora


def check_adapter(params: Mapping, adapter: Adapter, source: str = "adapter") -> None:
  """Raises LoraError naming each adapter whose module is missing or whose shapes don't fit."""
  problems = []
  for path in adapter.modules:
    name = "/".join(path)
    try:
      kernel = _get(params, path)["kernel"]
    except (KeyError, TypeError):
      problems.append(f"{name}: no such linear layer in the base model")
      continue
    d_in, d_out = np.shape(kernel)
    ab = _get(adapter.params, path)
    a, b = np.shape(ab["lora_a"]), np.shape(ab["lora_b"])
    r = adapter.config.rank
    if a != (d_in, r) or b != (r, d_out):
      problems.append(f"{name}: lora_a {a} / lora_b {b} do not fit the base kernel "
                      f"[in={d_in}, out={d_out}] at rank {r} (expected {(d_in, r)} / {(r, d_out)})")
  if problems:
    raise LoraError(f"{source} does not fit the base model:\n  " + "\n  ".join(problems))


def merge(params: Mapping, adapter: Adapter) -> dict:
  """Base params with `kernel += scale * A @ B` at every adapted layer (PEFT's merge),
  in the base kernel's dtype. The result runs without `lora=` and gives the same outputs."""
  check_adapter(params, adapter)
  out = jax.tree.map(lambda x: x, dict(params))  # fresh containers, shared leaves
  for path in adapter.modules:
    layer = dict(_get(out, path))
    ab = _get(adapter.params, path)
    k = layer["kernel"]
    delta = jnp.matmul(jnp.asarray(ab["lora_a"], jnp.float32), jnp.asarray(ab["lora_b"], jnp.float32),
                       precision=jax.lax.Precision.HIGHEST) * adapter.config.scale
    layer["kernel"] = (jnp.asarray(k, jnp.float32) + delta).astype(jnp.asarray(k).dtype)
    _set(out, path, layer)
  return out


def trainable_mask(tree: Any) -> Any:
  """Bool pytree: True on LoRA leaves (`lora_a`/`lora_b`, or anything under a top-level
  'lora' key), False on base params, for one combined tree. Note `optax.masked` passes the
  raw gradient through on False leaves; use `freeze_base` to get zero updates there."""
  def is_lora(path, _):
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return bool(keys) and (keys[0] == "lora" or keys[-1] in ("lora_a", "lora_b"))
  return jax.tree_util.tree_map_with_path(is_lora, tree)


def freeze_base(tx: Any, tree: Any) -> Any:
  """`tx` on the LoRA leaves of a combined tree and zero updates on everything else."""
  labels = jax.tree.map(lambda m: "lora" if m else "frozen", trainable_mask(tree))
  return optax.multi_transform({"lora": tx, "frozen": optax.set_to_zero()}, labels)


# ----------------------------------------------------------------------------- PEFT format


def _module_regex(paths: Iterable[tuple[str, ...]], key_format: str) -> str:
  """A regex matching exactly these modules' HF names (layers collapsed to \\d+ when a
  module is adapted in every layer that has it)."""
  groups: dict[str, set[str]] = {}
  for p in paths:
    name = hf_module_name(p, key_format)
    m = re.search(r"\.layers\.(\d+)\.", name)
    if m:
      generic = name[:m.start()] + ".layers.\0." + name[m.end():]
      groups.setdefault(generic, set()).add(m.group(1))
    else:
      groups.setdefault(name, set())
  pats = []
  for generic, idx in sorted(groups.items()):
    if "\0" not in generic:
      pats.append(re.escape(generic))
      continue
    head, tail = generic.split("\0")
    alt = "|".join(sorted(idx, key=int))
    pats.append(re.escape(head) + f"(?:{alt})" + re.escape(tail))
  return "(?:" + "|".join(pats) + ")"


def peft_state_dict(adapter: Adapter, key_format: str = "hf5") -> dict[str, np.ndarray]:
  """PEFT's saved keys: `base_model.model.<module>.lora_A.weight` [r, in] / `lora_B` [out, r]."""
  out = {}
  for path in adapter.modules:
    ab = _get(adapter.params, path)
    name = _PEFT_PREFIX + hf_module_name(path, key_format)
    out[name + ".lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["lora_a"], np.float32).T)
    out[name + ".lora_B.weight"] = np.ascontiguousarray(np.asarray(ab["lora_b"], np.float32).T)
  return out


def save_peft(adapter: Adapter, out_dir: str | os.PathLike, *, key_format: str = "hf5",
              base_model_name_or_path: str | None = None,
              extra_files: Mapping[str, str | os.PathLike] | None = None) -> Path:
  """Writes PEFT's adapter format (adapter_config.json + adapter_model.safetensors) that
  `peft.PeftModel.from_pretrained(base, out_dir)` loads.

  `key_format` picks the module names of the base model the adapter will be loaded into:
  'hf5' (`model.language_model.*`, transformers >= 4.52 and 5.x) or 'hf4'
  (`language_model.model.*`, older 4.x). `base_model_name_or_path` is recorded for PEFT's
  `AutoPeftModel*` (None when unknown, e.g. a random base); `extra_files` ({name: source
  file}, e.g. the tokenizer's) are copied in.
  """
  if key_format not in KEY_FORMATS:
    raise LoraError(f"key_format must be one of {KEY_FORMATS}, got {key_format!r}")
  c = adapter.config
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  cfg = {
      "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
      "r": c.rank, "lora_alpha": c.alpha, "lora_dropout": c.dropout,
      "target_modules": _module_regex(adapter.modules, key_format),
      "use_rslora": c.use_rslora, "use_dora": False, "bias": "none", "fan_in_fan_out": False,
      "init_lora_weights": {"kaiming": True, "gaussian": "gaussian", "random": False}[c.init],
      "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
      "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
  }
  weight_io.write_safetensors(peft_state_dict(adapter, key_format), out / WEIGHTS_NAME)
  (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
  for name, src in (extra_files or {}).items():
    shutil.copyfile(src, out / name)
  return out


def _read_adapter_weights(d: Path) -> tuple[dict[str, np.ndarray], Path]:
  for name in (WEIGHTS_NAME, "adapter_model.bin"):
    f = d / name
    if f.exists():
      state = (weight_io.read_safetensors(f) if f.suffix == ".safetensors"
               else weight_io.read_torch_pickle(f))
      return state, f
  raise FileNotFoundError(f"{d}: no {WEIGHTS_NAME} (or adapter_model.bin)")


def load_peft(path: str | os.PathLike, params: Mapping | None = None, *,
              dropout: float | None = None, dtype: Any = jnp.float32) -> Adapter:
  """Reads a PEFT LoRA adapter directory into an `Adapter`.

  With `params` (the base tree) every adapter is checked against its layer's shape. Errors
  name the file and key at fault (non-LoRA PEFT types, DoRA, biases, modules_to_save, per-
  module ranks, adapters on the vision tower, unpaired A/B, shapes that don't fit).
  `dropout` overrides the saved lora_dropout (e.g. to continue training differently).
  """
  d = Path(path)
  cfg_file = d / CONFIG_NAME
  if not cfg_file.exists():
    raise FileNotFoundError(f"{d}: no {CONFIG_NAME}; not a PEFT adapter directory")
  cfg = json.loads(cfg_file.read_text())
  where = str(cfg_file)
  if cfg.get("peft_type", "LORA") != "LORA":
    raise LoraError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only)")
  for key, ok in (("use_dora", lambda v: not v), ("bias", lambda v: v in (None, "none")),
                  ("modules_to_save", lambda v: not v), ("rank_pattern", lambda v: not v),
                  ("alpha_pattern", lambda v: not v), ("fan_in_fan_out", lambda v: not v),
                  ("lora_bias", lambda v: not v)):
    if key in cfg and not ok(cfg[key]):
      raise LoraError(f"{where}: {key}={cfg[key]!r} is not supported by cirjax.lora "
                      f"(plain LoRA on linear layers with one rank and alpha)")
  targets = cfg.get("target_modules") or DEFAULT_TARGET_MODULES
  if isinstance(targets, list):
    targets = tuple(targets)
  init = cfg.get("init_lora_weights", True)
  config = LoraConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                      dropout=float(cfg.get("lora_dropout", 0.0) if dropout is None else dropout),
                      target_modules=targets, use_rslora=bool(cfg.get("use_rslora", False)),
                      init="gaussian" if init == "gaussian" else
                      ("random" if init is False else "kaiming"))
  state, wfile = _read_adapter_weights(d)
  pat = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
  pairs: dict[str, dict[str, np.ndarray]] = {}
  for key, w in state.items():
    m = pat.match(key)
    if not m:
      raise LoraError(f"{wfile}: unsupported adapter tensor {key!r} (cirjax loads lora_A/lora_B "
                      f"of linear layers only)")
    pairs.setdefault(m.group(1), {})[m.group(2)] = np.asarray(w, np.float32)
  if not pairs:
    raise LoraError(f"{wfile}: no LoRA tensors")
  tree: dict = {}
  for name, ab in sorted(pairs.items()):
    if set(ab) != {"A", "B"}:
      raise LoraError(f"{wfile}: module {name!r} has lora_{''.join(ab)} but not its partner")
    try:
      mpath = module_path_from_hf(name)
    except ValueError as e:
      raise LoraError(f"{wfile}: adapter on {name!r}: {e}; cirjax adapts only the language "
                      f"model and the projector") from e
    a, b = ab["A"], ab["B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != config.rank or b.shape[1] != config.rank:
      raise LoraError(f"{wfile}: {name}: lora_A {a.shape} / lora_B {b.shape} do not have "
                      f"rank r={config.rank} from {CONFIG_NAME}")
    _set(tree, mpath, {"lora_a": jnp.asarray(a.T, dtype), "lora_b": jnp.asarray(b.T, dtype)})
  adapter = Adapter(tree, config)
  if params is not None:
    check_adapter(params, adapter, source=str(d))
  return adapter
