"""Loading `ml_collections` config files: `configs/x.py:arg` plus `--config.key=value`.

A config file defines `get_config(arg=None)`; the text after the last colon of the spec is
passed as `arg` (big_vision style, e.g. `configs/synthetic.py:tiny` or
`configs/qure_blip2_cirr.py:tiny,batch_size=8`), which the file reads with `parse_arg`.
Overrides name an existing key (dotted path) and are parsed to that key's type, so a typo
fails loudly with the key and the file named instead of silently adding a new field.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from typing import Iterable, Sequence

import ml_collections

# ConfigError lives in cirjax.errors (every layer raises it); its name here is public too.
from cirjax.errors import ConfigError  # noqa: F401


# `--config.model.init=random`: train from random weights where a config asks for a
# checkpoint (`model.require_init`, the real-data configs).
RANDOM_INIT = "random"


def model_init(config: ml_collections.ConfigDict, *, check: bool = True) -> str:
  """`config.model.init` (a path or hub id), or '' for random weights.

  A config that sets `model.require_init` (QuRe on CIRR / FashionIQ, InstructCIR stage 1 on
  real data) refuses an empty `model.init` with a ConfigError unless it is `random`: a run
  of many epochs from a random ViT is almost never what was meant. `check=False` reads a
  finished run's config without refusing."""
  model = config.get("model") or {}
  init = str(model.get("init", "") or "")
  if init == RANDOM_INIT:
    return ""
  if not init and check and model.get("require_init", False):
    raise ConfigError(
        "config.model.init is empty: this config trains from pretrained weights (a BLIP-2 / "
        "LLaVA checkpoint path or Hugging Face hub id, see docs/weights.md), e.g. "
        "--config.model.init=Salesforce/blip2-itm-vit-g; to train from random weights on "
        f"purpose pass --config.model.init={RANDOM_INIT}")
  return init


def _split_spec(spec: str) -> tuple[str, str | None]:
  # A Windows-free world: the variant is whatever follows the last colon after `.py`.
  if ".py:" in spec:
    path, arg = spec.rsplit(".py:", 1)
    return path + ".py", arg
  return spec, None


def load_module(path: str):
  """Imports a Python file as a fresh module (the file need not be on sys.path)."""
  if not os.path.exists(path):
    raise ConfigError(f"config file not found: {path}")
  name = "cirjax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:  # the config file is Python: name the file and line
    raise ConfigError(f"{e.filename}:{e.lineno}: the config file is not valid Python "
                      f"({e.msg})") from e
  return module


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` and applies `key=value` overrides (with or without `--config.`).

  Raises ConfigError naming the file, the variant or the key at fault.
  """
  path, arg = _split_spec(spec)
  module = load_module(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config()")
  try:
    config = module.get_config(arg) if arg is not None else module.get_config()
  except TypeError:
    if arg is None:
      config = module.get_config(None)
    else:
      raise
  except KeyError as e:
    raise ConfigError(f"{path}: unknown variant {arg!r} ({e})") from e
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from e
  config = ml_collections.ConfigDict(config)
  apply_overrides(config, overrides, source=path)
  # Remember where the config came from (written into the workdir for reproducibility).
  with config.unlocked():
    config.config_spec = spec
  return config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """A config file's argument, big_vision style: `"tiny,batch_size=8"` -> ConfigDict.

  `defaults` names every argument the file takes with its default; a bare name sets a
  boolean argument to True, `name=value` parses `value` to the default's type. An unknown
  name is a ConfigError listing the known ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in (arg or "").split(","):
    name, eq, value = (x.strip() for x in item.partition("="))
    if not name:
      continue
    if name not in defaults:
      raise ConfigError(f"unknown variant or argument {name!r} in {arg!r} (this config takes "
                        f"{', '.join(sorted(defaults))})")
    if not eq and not isinstance(defaults[name], bool):
      raise ConfigError(f"argument {name!r} needs a value ({name}=...)")
    try:
      parsed = parse_value(value, defaults[name]) if eq else True
    except (ValueError, SyntaxError) as e:
      raise ConfigError(f"bad value for argument {name!r}: {value!r} ({e})") from e
    with out.ignore_type():
      out[name] = parsed
  return out


def parse_value(text: str, current):
  """Parses `text` to the type of `current` (the key's existing value)."""
  if isinstance(current, bool):
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
      return True
    if low in ("0", "false", "no", "off"):
      return False
    raise ConfigError(f"expected a boolean, got {text!r}")
  if isinstance(current, int) and not isinstance(current, bool):
    try:
      return int(text)
    except ValueError:
      # Allow `1e3`-style integers.
      f = float(text)
      if f != int(f):
        raise ConfigError(f"expected an integer, got {text!r}") from None
      return int(f)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str):
    return text
  if current is None:
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  if isinstance(current, (tuple, list)):
    value = ast.literal_eval(text)
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return type(current)(value)
  return ast.literal_eval(text)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str],
                    source: str = "config") -> ml_collections.ConfigDict:
  """Applies `[--config.]a.b=value` strings in place."""
  for item in overrides:
    text = item[len("--config."):] if item.startswith("--config.") else item
    if "=" not in text:
      raise ConfigError(f"override {item!r} is not of the form --config.key=value")
    key, value = text.split("=", 1)
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
      if part not in node:
        raise ConfigError(f"{source}: no key {'.'.join(parts[:i + 1])!r} (override {item!r})")
      node = node[part]
    leaf = parts[-1]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ConfigError(f"{source}: no key {key!r} (override {item!r}); "
                        f"known keys here: {sorted(node.keys()) if hasattr(node, 'keys') else '-'}")
    try:
      parsed = parse_value(value, node[leaf])
    except (ValueError, SyntaxError, ConfigError) as e:
      raise ConfigError(f"{source}: bad value for {key!r}: {value!r} ({e})") from e
    with node.ignore_type():
      node[leaf] = parsed
  return config


def split_config_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.x=y` (also `--config.x y`) items from the other arguments."""
  rest, overrides = [], []
  i = 0
  argv = list(argv)
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config."):
      if "=" in a:
        overrides.append(a)
      elif i + 1 < len(argv):
        overrides.append(a + "=" + argv[i + 1])
        i += 1
      else:
        raise ConfigError(f"override {a!r} has no value")
    else:
      rest.append(a)
    i += 1
  return rest, overrides
