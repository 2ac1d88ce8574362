"""A Hugging Face hub cache written by hand, in the layout huggingface_hub itself writes
(`huggingface_hub.file_download`, `scan_cache_dir`), so that tests resolve hub ids offline:

    <cache>/models--ORG--NAME/blobs/<content hash>          the files' bytes
    <cache>/models--ORG--NAME/snapshots/<commit>/<path>     relative symlinks to ../../blobs/..
    <cache>/models--ORG--NAME/refs/<branch or tag>          the commit hash, no newline
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def populate(cache: Path, repo_id: str, src: Path, *, commit: str = "a" * 40,
             refs: tuple[str, ...] = ("main",)) -> Path:
  """Puts every file under `src` into `cache` as snapshot `commit` of model `repo_id`, with
  each of `refs` pointing at it; returns the snapshot directory."""
  repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
  blobs, snap = repo / "blobs", repo / "snapshots" / commit
  blobs.mkdir(parents=True, exist_ok=True)
  for f in sorted(p for p in Path(src).rglob("*") if p.is_file()):
    digest = hashlib.sha256(f.read_bytes()).hexdigest()  # an LFS file's etag is its sha256
    blob = blobs / digest
    if not blob.exists():
      shutil.copyfile(f, blob)
    link = snap / f.relative_to(src)
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(blob, link.parent), link)
  (repo / "refs").mkdir(exist_ok=True)
  for ref in refs:
    (repo / "refs" / ref).write_text(commit)
  return snap
