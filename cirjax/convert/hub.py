"""Models by name: a Hugging Face hub id (`ORG/NAME`, optionally `ORG/NAME@REVISION`) as a
local directory.

`resolve(path_or_id)` is the one place cirjax turns what a user passed for a model into a
path: every command and config key that takes a model (`cirjax convert` / `parity`,
`--checkpoint` of eval / search / mine, `model.init`, `init_from`, `data.tokenizer`) calls it.

* A path that exists on this machine is always taken as the path, even if it also reads as a
  hub id (a directory `Salesforce/blip2-itm-vit-g` beside you wins over the hub).
* A string that does not exist and reads as a hub id (exactly one `/`, hub repo-name rules,
  no file suffix such as `.pth` or `.txt`) is fetched with `huggingface_hub.snapshot_download`
  into the HF cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`)
  and the snapshot directory (`models--ORG--NAME/snapshots/<commit>`) is returned.
  `HF_HUB_OFFLINE=1` (or `TRANSFORMERS_OFFLINE=1`) reads the cache only; both variables are
  read at call time.
  Only configs, tokenizer files and safetensors weights are fetched (`.bin` / `.pth` only when
  the repository has no safetensors), never both copies of the weights; for a tokenizer
  (`weights=False`: `data.tokenizer`, `--tokenizer`) no weights at all.
* Anything else comes back unchanged, for the caller to report as a missing path.

A hub id that cannot be resolved (offline and not in the cache, no such repository or
revision, a gated repository, no network) is a `HubError` naming the id, the cache directory
and what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cirjax.errors import CirjaxError

# What cirjax reads from a model repository: configs, tokenizers and processors, weights.
META_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja")
WEIGHT_PATTERNS = ("*.safetensors",)
PICKLE_PATTERNS = ("*.bin", "*.pth", "*.pt")
# A name ending like a file is a missing local file, not a repository (`ckpt/model.pth`,
# `tok/vocab.txt`): the error is then the caller's "no such file".
_FILE_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".txt", ".json", ".jsonl")

# The hub's repo-name rules (huggingface_hub.utils.validate_repo_id): letters, digits, '-',
# '_', '.'; no '--' or '..'; not starting or ending with '-' or '.'; at most 96 characters.
_NAME = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[\w./-]+))?$")


class HubError(CirjaxError, FileNotFoundError):
  """A hub id that is not a local path and could not be resolved; the message names it."""


def _true(value: str | None) -> bool:
  return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def offline() -> bool:
  """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set, read now (huggingface_hub reads it once,
  at import)."""
  return _true(os.environ.get("HF_HUB_OFFLINE")) or _true(os.environ.get("TRANSFORMERS_OFFLINE"))


def cache_dir() -> Path:
  """The HF hub cache, by huggingface_hub's precedence, read now: HF_HUB_CACHE,
  HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub,
  ~/.cache/huggingface/hub."""
  env = os.environ
  home = env.get("HF_HOME") or os.path.join(
      env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
  hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
  return Path(os.path.expandvars(os.path.expanduser(hub)))


def parse(text: str) -> tuple[str, str | None] | None:
  """(repo id, revision or None) if `text` reads as a hub id, else None."""
  m = _HUB_ID.match(text)
  if m is None or "--" in m["repo"] or ".." in m["repo"]:
    return None
  if m["repo"].lower().endswith(_FILE_SUFFIXES):
    return None
  return m["repo"], m["rev"]


def repo_folder(repo_id: str) -> Path:
  """Where the cache keeps a model repository: `<cache>/models--ORG--NAME`."""
  return cache_dir() / ("models--" + repo_id.replace("/", "--"))


def resolve(path_or_id: str | os.PathLike, *, weights: bool = True) -> Path:
  """A local path for a path or a hub id (see the module docstring); `weights=False` fetches
  a repository's configs and tokenizer files only."""
  text = os.fspath(path_or_id)
  local = Path(text).expanduser()
  if local.exists():
    return local
  hub_id = parse(text)
  if hub_id is None:
    return local
  return _snapshot(text, *hub_id, weights=weights)


def _download(repo_id: str, revision: str | None, patterns) -> Path:
  # huggingface_hub is a dependency of transformers; imported on use (it is slow to import).
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  return Path(huggingface_hub.snapshot_download(
      repo_id, revision=revision, cache_dir=cache_dir(), local_files_only=offline(),
      allow_patterns=list(patterns)))


def _has_weights(d: Path, suffixes) -> bool:
  return any(f.suffix in suffixes for f in d.rglob("*") if f.is_file())


def _snapshot(text: str, repo_id: str, revision: str | None, *, weights: bool = True) -> Path:
  from huggingface_hub import errors as hf_errors  # pylint: disable=g-import-not-at-top
  where = repo_folder(repo_id)
  try:
    d = _download(repo_id, revision, META_PATTERNS + (WEIGHT_PATTERNS if weights else ()))
    if weights and not _has_weights(d, (".safetensors",)) and not offline():
      d = _download(repo_id, revision, META_PATTERNS + PICKLE_PATTERNS)
  except hf_errors.LocalEntryNotFoundError as e:
    if type(e).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 1.x
      why = (f"the HF cache holds an incomplete snapshot of it ({str(e).splitlines()[0]})")
    elif offline():
      why = (f"HF_HUB_OFFLINE is set and the HF cache holds no snapshot of it (looked in "
             f"{where}, revision {revision or 'main'})")
    else:
      why = (f"the hub could not be reached and the HF cache holds no snapshot of it (looked "
             f"in {where})")
    raise HubError(
        f"{text}: not a local file or directory, and {why}; download it where there is "
        f"network (`hf download {repo_id}{f' --revision {revision}' if revision else ''}`) into "
        f"this cache, or set HF_HUB_CACHE / HF_HOME to the cache that holds it") from None
  except hf_errors.RevisionNotFoundError:
    raise HubError(f"{text}: not a local file or directory; the hub repository {repo_id} has "
                   f"no revision {revision!r}") from None
  except hf_errors.GatedRepoError:
    raise HubError(f"{text}: not a local file or directory; the hub repository {repo_id} is "
                   "gated: accept its terms on huggingface.co and log in (`hf auth login`)"
                   ) from None
  except hf_errors.RepositoryNotFoundError:
    raise HubError(f"{text}: no such local file or directory, and no hub repository "
                   f"{repo_id} (or it is private: log in with `hf auth login`)") from None
  except (hf_errors.HfHubHTTPError, OSError, ValueError) as e:
    raise HubError(f"{text}: not a local file or directory, and fetching the hub repository "
                   f"{repo_id} into {cache_dir()} failed ({type(e).__name__}: "
                   f"{str(e).splitlines()[0] if str(e) else ''})") from None
  return d


def revision_of(path: str | os.PathLike) -> str | None:
  """The commit of a hub-cache snapshot directory (`.../snapshots/<commit>`), else None."""
  p = Path(path)
  return p.name if p.parent.name == "snapshots" and p.parent.parent.name.startswith(
      "models--") else None
