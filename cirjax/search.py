"""Interactive composed image search: one (reference image, text) query over a corpus.

`search(...)` encodes the corpus (optionally reusing cached features), composes the query,
retrieves the top k on device and returns `SearchHit`s; `write_html(...)` renders the query
and result thumbnails (embedded, so the page is a single portable file), marking the
annotated target and the other known relevant images when the caller knows them.

A corpus is either a directory of images (searched recursively; an image's name is its path
relative to the directory without extension) or a dataset split (`corpus_from_split`).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cirjax.data import images as images_lib
from cirjax.data.records import DataError
from cirjax.eval import encode, retrieval
from cirjax.eval.model import RetrievalFns

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclasses.dataclass
class Corpus:
  names: list[str]
  paths: list[Path]


@dataclasses.dataclass
class SearchHit:
  rank: int
  name: str
  path: Path
  score: float
  relevant: bool = False
  target: bool = False


def corpus_from_dir(directory: str | os.PathLike) -> Corpus:
  """Every image file under `directory` (sorted), named by relative path without extension."""
  d = Path(directory)
  if not d.is_dir():
    raise DataError(f"corpus directory not found: {d}")
  files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
  if not files:
    raise DataError(f"corpus directory {d} holds no images ({', '.join(IMAGE_SUFFIXES)})")
  names = [str(p.relative_to(d).with_suffix("")) for p in files]
  seen: set[str] = set()
  for n, p in zip(names, files):
    if n in seen:
      raise DataError(f"corpus {d}: several files share the name {n!r} (e.g. {p}): same "
                      "stem, different extensions")
    seen.add(n)
  return Corpus(names, files)


def corpus_from_split(split) -> Corpus:
  """The evaluation corpus of a dataset split, in its order."""
  return Corpus(list(split.corpus), [split.images[n].path for n in split.corpus])


def encode_corpus(encoder: RetrievalFns, corpus: Corpus, transform: Callable,
                  batch_size: int = 64, mesh=None, cache: str | os.PathLike | None = None,
                  model_id: str = "", log: Callable[[str], None] | None = print) -> np.ndarray:
  """Corpus features [N, Q, D] (or [N, D]) by `encoder.image`; reused from `cache` (.npz)
  when it matches."""
  log = log or (lambda s: None)
  key = json.dumps({"model": model_id, "transform": [transform.name, transform.dim],
                    "names": corpus.names})
  if cache is not None and Path(cache).is_file():
    try:
      with np.load(cache, allow_pickle=False) as z:
        if str(z["key"]) == key:
          log(f"[search] corpus features from {cache}")
          return z["features"]
    except (OSError, ValueError, KeyError, EOFError) as e:  # not an .npz that cirjax wrote
      raise DataError(f"{cache}: not a corpus-features cache written by cirjax search "
                      f"({type(e).__name__}: {e}); delete it or pass another "
                      "--features-cache") from None
    log(f"[search] {cache} was computed for another model/corpus; re-encoding")

  def batches():
    for i in range(0, len(corpus.paths), batch_size):
      yield np.stack([transform(images_lib.open_rgb(p)) for p in corpus.paths[i:i + batch_size]])

  n = len(corpus.names)
  every = max(batch_size, (n // 5) // batch_size * batch_size)
  feats = encode.encode(
      encoder.image, encoder.params, batches(), mesh=mesh or retrieval.make_mesh(),
      batch_size=batch_size, progress=lambda done: log(f"[search] encoded {done}/{n} corpus images")
      if done % every < batch_size or done == n else None)
  if cache is not None:
    Path(cache).parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, key=np.array(key), features=feats)
    log(f"[search] cached corpus features in {cache}")
  return feats


def search(encoder: RetrievalFns, corpus: Corpus, corpus_feats: np.ndarray,
           reference: str | os.PathLike, text: str, transform: Callable,
           tokenize_fn: Callable, k: int = 10,
           exclude_reference: bool = True, relevant: Sequence[str] = (),
           target: str | None = None, mesh=None) -> list[SearchHit]:
  """The top k corpus images for (reference image, text) by `encoder.compose`, best first.

  When the reference image is itself in the corpus (same resolved path) it is left out, as
  CIRR's protocol does, unless `exclude_reference=False`.
  """
  ref_path = Path(reference)
  pix = transform(images_lib.open_rgb(ref_path))[None]
  ids, mask = tokenize_fn([text])
  q = encode.encode(encoder.compose, encoder.params, (pix, ids, mask),
                    mesh=mesh or retrieval.make_mesh())
  ex = -1
  if exclude_reference:
    resolved = ref_path.resolve()
    for i, p in enumerate(corpus.paths):
      if Path(p).resolve() == resolved:
        ex = i
        break
  scorer = retrieval.FeatureScorer(q, corpus_feats, mesh=mesh)
  n_cand = len(corpus.names) - (ex >= 0)
  k = min(k, n_cand)
  if k < 1:
    raise DataError("the corpus has no candidate images besides the reference")
  scores, idx = retrieval.top_k(scorer, k, np.array([ex]), mesh)
  rel = set(relevant) | ({target} if target else set())
  return [SearchHit(r + 1, corpus.names[j], Path(corpus.paths[j]), float(s),
                    corpus.names[j] in rel, corpus.names[j] == target)
          for r, (s, j) in enumerate(zip(scores[0], idx[0]))]


def _thumb(path: Path, size: int = 160) -> str:
  im = images_lib.open_rgb(path)
  im.thumbnail((size, size))
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def write_html(path: str | os.PathLike, reference: str | os.PathLike, text: str,
               hits: Sequence[SearchHit], title: str = "cirjax search",
               num_relevant: int | None = None) -> Path:
  """A self-contained page: the query, then the results (relevant ones framed green)."""
  path = Path(path)
  e = html.escape
  known = num_relevant is not None
  found = sum(h.relevant for h in hits)
  cells = []
  for h in hits:
    tag = "target" if h.target else ("relevant" if h.relevant else "")
    cls = "hit rel" if h.relevant else "hit"
    cells.append(f'<figure class="{cls}"><img src="{_thumb(h.path)}" alt="{e(h.name)}">'
                 f'<figcaption>#{h.rank} {e(h.name)}<br>score {h.score:.4f}'
                 f'{"<br><b>" + tag + "</b>" if tag else ""}</figcaption></figure>')
  summary = (f"<p>{found} of the {len(hits)} results are relevant "
             f"({num_relevant} relevant images known).</p>" if known else "")
  page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.query {{ display: flex; gap: 1.5em; align-items: center; margin-bottom: 1em; }}
.results {{ display: flex; flex-wrap: wrap; gap: 0.8em; }}
figure {{ margin: 0; padding: 4px; border: 4px solid #ddd; text-align: center; font-size: 12px; }}
figure.rel {{ border-color: #2a2; }}
img {{ display: block; margin: auto; max-width: 160px; max-height: 160px; }}
</style></head><body>
<h1>{e(title)}</h1>
<div class="query"><figure><img src="{_thumb(Path(reference))}" alt="reference">
<figcaption>reference<br>{e(Path(reference).name)}</figcaption></figure>
<div><h2>&ldquo;{e(text)}&rdquo;</h2></div></div>
{summary}
<div class="results">
{chr(10).join(cells)}
</div></body></html>
"""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(page, encoding="utf-8")
  return path


def format_hits(hits: Sequence[SearchHit]) -> str:
  lines = [f"  {'rank':>4}  {'score':>9}  name"]
  for h in hits:
    mark = "  [target]" if h.target else ("  [relevant]" if h.relevant else "")
    lines.append(f"  {h.rank:>4}  {h.score:9.4f}  {h.name}{mark}")
  return "\n".join(lines)


__all__ = ["Corpus", "SearchHit", "corpus_from_dir", "corpus_from_split", "encode_corpus",
           "search", "write_html", "format_hits"]
