"""Dataset evaluators: encode (or take a baseline scorer), retrieve on device, score.

`evaluate_split(split, scorer)` dispatches on `split.dataset`:

* cirr / synthetic — the reference image is excluded from the candidates; R@{1,5,10,50},
  Recall_subset@{1,2,3} over `img_set` members, avg = (R@5 + Rsubset@1)/2. The synthetic set
  adds mAP@{5,10,25,50} against the full relevant sets (CIRCO formula, same reference-free
  ranking), the share of relevant images in the top 5 (`rel@5`) and the recall of *any*
  relevant image (`Rrel@K`, what a false-negative-free benchmark would count).
* circo — no exclusion (official code); mAP@{5,10,25,50} and the target's R@{5,10,25,50}.
* fashioniq — one category: R@10, R@50 (no exclusion, as the reference code);
  `evaluate_fashioniq` combines categories with the averages of QuRe Table 2.
* genecis — each query ranks [target] + its gallery: R@{1,2,3}.
* hpfashioniq — preference rate (QuRe Eq. 9, conditioned on set 1 scoring higher) and its
  symmetric variant, from the mean scores of the two sets (Eq. 8).

Splits without targets (CIRR test1, CIRCO test) only produce rankings for submissions.
Any count of skipped queries/images is returned with the metrics (`skipped/...`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from cirjax.data import loader
from cirjax.data.records import CIRSplit, DataError, Query
from cirjax.eval import baselines, encode, metrics, retrieval


@dataclasses.dataclass
class EvalResult:
  split: CIRSplit
  metrics: dict[str, float]
  ranking: np.ndarray | None = None          # [Nq, K] corpus indices, best first
  scores: np.ndarray | None = None           # [Nq, K]
  subset_ranking: np.ndarray | None = None   # CIRR: [Nq, S]
  chance: dict[str, float] = dataclasses.field(default_factory=dict)
  timings: dict[str, float] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- scorers

def baseline_scorer(kind: str, split: CIRSplit, seed: int = 0) -> retrieval.Scorer:
  """'random' (chance) or 'oracle' (ranks the target first, then the other relevant images)."""
  idx = split.corpus_index()
  nq, nc = len(split.queries), len(split.corpus)
  if kind == "random":
    return baselines.RandomScorer(nq, nc, seed)
  if kind == "oracle":
    if not split.has_targets:
      raise DataError(f"{split.name}: the oracle needs ground truth, this split has none")
    targets = np.array([idx[q.target] for q in split.queries])
    relevant = [np.array([idx[n] for n in q.relevant if n in idx]) for q in split.queries]
    return baselines.OracleScorer(targets, relevant, nc, seed)
  raise ValueError(f"unknown baseline {kind!r}: use 'random' or 'oracle'")


def encode_split(encoder: Any, split: CIRSplit, transform: Callable, tokenize_fn: Callable,
                 batch_size: int = 64, text_fn: Callable[[Query], str] | None = None,
                 mesh=None, num_threads: int = 4, log: Callable[[str], None] | None = print,
                 image_source: Callable | None = None
                 ) -> tuple[retrieval.FeatureScorer, dict[str, float]]:
  """Encodes the corpus (`encoder.image`) and the queries (`encoder.compose`).

  `encoder` is a `cirjax.eval.model.RetrievalFns` (`model.retrieval_fns(model, split)`):
  `image(params, pixels NHWC)` -> [B, Q, D] (or [B, D]) and `compose(params, pixels,
  input_ids, attention_mask)` -> [B, D], both L2-normalised and jittable. Returns the scorer
  (its features stay on `mesh`, rows split over the devices) and timings (images/s,
  queries/s). `image_source` (name -> PIL image) replaces reading the
  split's image files (TFDS builds).
  """
  mesh = mesh or retrieval.make_mesh()
  text_fn = text_fn or loader.default_text
  log = log or (lambda s: None)
  n_img, n_q = len(split.corpus), len(split.queries)
  step = max(1, (n_img // batch_size) // 5) * batch_size

  def prog(what, total):
    def f(done):
      if done % step < batch_size or done == total:
        log(f"[eval] {split.name}: encoded {done}/{total} {what}")
    return f

  t0 = time.perf_counter()
  corpus, nc = encode_on_mesh(
      encoder.image, encoder.params,
      loader.image_batches(split, split.corpus, transform, batch_size, num_threads, image_source),
      mesh, batch_size, prog("corpus images", n_img))
  t1 = time.perf_counter()
  queries, nq = encode_on_mesh(
      encoder.compose, encoder.params,
      loader.query_batches(split, transform, tokenize_fn, batch_size, text_fn, num_threads,
                           image_source),
      mesh, batch_size, prog("queries", n_q))
  t2 = time.perf_counter()
  timings = {"corpus_images_per_s": n_img / (t1 - t0), "queries_encoded_per_s": n_q / (t2 - t1)}
  return retrieval.FeatureScorer(queries, corpus, num_queries=nq, num_corpus=nc), timings


def encode_on_mesh(fn: Callable, params: Any, data: Any, mesh, batch_size: int,
                   progress: Callable[[int], None] | None = None) -> tuple[jax.Array, int]:
  """(features, rows): `fn` over `data` (`cirjax.eval.encode.encode`), the result left on
  `mesh` with its rows split over the devices (zero rows appended up to a multiple of the
  device count), as `retrieval.FeatureScorer` ranks it; `rows` is the real row count."""
  done = [0]

  def count(n):
    done[0] = n
    if progress is not None:
      progress(n)

  out = encode.encode(fn, params, data, mesh=mesh, batch_size=batch_size, sharded=True,
                      pad_rows=True, progress=count)
  return jax.block_until_ready(out), done[0]


# ----------------------------------------------------------------------------- evaluation

def evaluate_encoded(split: CIRSplit, params: Any, image_fn: Callable, compose_fn: Callable,
                     corpus: Any, queries: Any, *, mesh, batch_size: int) -> EvalResult:
  """Evaluates a model given as pure functions, as training does after each epoch.

  `image_fn(params, *corpus_batch)` encodes `corpus` (rows or batches in `split.corpus`
  order, see `cirjax.eval.encode.encode`) and `compose_fn(params, *query_batch)` encodes
  `queries` (in `split.queries` order), data-parallel over `mesh` with the parameters as they
  are sharded there. The features stay on `mesh` (each process holds its devices' rows), the
  ranking runs there too, and only the top-k lists (and the few pair scores a protocol needs)
  reach the host, where the split's protocol scores them (`evaluate_split`).
  """
  corpus_feats, nc = encode_on_mesh(image_fn, params, corpus, mesh, batch_size)
  query_feats, nq = encode_on_mesh(compose_fn, params, queries, mesh, batch_size)
  return evaluate_split(split, retrieval.FeatureScorer(query_feats, corpus_feats,
                                                       num_queries=nq, num_corpus=nc))


def headline_metrics(result: EvalResult, keep: Sequence[str] | None = None, prefix: str = ""
                     ) -> tuple[dict[str, float], dict[str, float]]:
  """(metrics, chance levels) of one split as training logs them: no counts or skips,
  only the names in `keep` (in that order) when given, each name prefixed by `prefix`."""
  m = {k: float(v) for k, v in result.metrics.items()
       if not k.startswith("skipped/") and not k.startswith("n_")}
  if keep:
    m = {k: m[k] for k in keep if k in m}
  return ({prefix + k: v for k, v in m.items()},
          {prefix + k: float(v) for k, v in result.chance.items()})


def fashioniq_headline(results: dict[str, EvalResult]
                       ) -> tuple[dict[str, float], dict[str, float]]:
  """(metrics, chance levels) over FashionIQ categories as QuRe's Table 2 reports them, under
  the names `cirjax eval` uses (`metrics.fashioniq_metrics`): `{cat}/R@K`, the category means
  `avg/R@10`, `avg/R@50` and their mean `avg`."""
  out = {}
  for c, r in results.items():
    out.update({f"{c}/{k}": float(v) for k, v in r.metrics.items() if k.startswith("R@")})
  out.update(metrics.fashioniq_average({c: r.metrics for c, r in results.items()}))
  chance = metrics.fashioniq_average({c: r.chance for c, r in results.items()})
  del chance["avg"]  # the chance of the two R@K averages only, as before
  return out, chance



def _indices(split: CIRSplit, names: Sequence[str], what: str) -> np.ndarray:
  idx = split.corpus_index()
  try:
    return np.array([idx[n] for n in names], np.int64)
  except KeyError as e:
    raise DataError(f"{split.name}: {what} {e} is not in the corpus") from None


def evaluate_split(split: CIRSplit, scorer: retrieval.Scorer, mesh=None, k: int = 50,
                   log: Callable[[str], None] | None = None) -> EvalResult:
  """Ranks and scores one split (see the module docstring for each dataset's protocol)."""
  nq, nc = len(split.queries), len(split.corpus)
  if (scorer.num_queries, scorer.num_corpus) != (nq, nc):
    raise ValueError(f"scorer covers {scorer.num_queries} queries x {scorer.num_corpus} images, "
                     f"split {split.name} has {nq} x {nc}")
  ds = split.dataset
  skipped = {f"skipped/{k_}": float(v) for k_, v in split.skipped.items()}
  t0 = time.perf_counter()
  if ds in ("genecis", "hpfashioniq"):
    res = _evaluate_pairs(split, scorer)
    res.metrics.update(skipped)
    res.timings["rank_s"] = time.perf_counter() - t0
    return res
  exclude = None
  if ds in ("cirr", "synthetic"):
    exclude = _indices(split, [q.reference for q in split.queries], "reference")
  n_cand = nc - (1 if exclude is not None else 0)
  if n_cand < 50:
    raise DataError(f"{split.name}: only {n_cand} candidate images per query, but the {ds} "
                    "protocol reports ranks up to 50; use a larger corpus (e.g. more "
                    "--num-val-images for the synthetic set)")
  k = min(max(k, 50), n_cand)
  scores, ranking = retrieval.top_k(scorer, k, exclude, mesh)
  t_rank = time.perf_counter() - t0
  res = EvalResult(split, {}, ranking, scores, timings={"rank_s": t_rank,
                                                         "queries_ranked_per_s": nq / t_rank})
  if ds in ("cirr", "synthetic"):
    members = [list(q.subset) for q in split.queries]
    if any(members):
      if not all(members):
        raise DataError(f"{split.name}: {sum(not m for m in members)} queries have no img_set "
                        "members; Recall_subset would be computed on a shrunken set")
      res.subset_ranking = _rank_ragged_subsets(split, scorer, members)
  if not split.has_targets:
    res.metrics.update(skipped)
    return res  # test split: rankings for the submission files only
  targets = _indices(split, [q.target for q in split.queries], "target")
  n_cand = nc - (1 if exclude is not None else 0)
  if ds in ("cirr", "synthetic"):
    res.metrics.update(metrics.cirr_metrics(ranking, targets, res.subset_ranking))
    res.chance = metrics.chance_recall(n_cand, metrics.CIRR_KS)
    if res.subset_ranking is not None:
      sizes = (res.subset_ranking >= 0).sum(axis=1)
      res.chance.update({f"Rsubset@{k_}": float(np.mean(np.minimum(k_, sizes) / sizes) * 100.0)
                         for k_ in metrics.CIRR_SUBSET_KS})
      res.chance["avg"] = (res.chance["R@5"] + res.chance["Rsubset@1"]) / 2.0
    if ds == "synthetic":
      rel = [_indices(split, q.relevant, "relevant image") for q in split.queries]
      res.metrics.update(metrics.map_at_k(ranking, rel, metrics.CIRCO_KS))
      res.metrics["rel@5"] = metrics.relevant_share_at_k(ranking, rel, 5)
      for k_ in metrics.CIRR_KS:
        res.metrics[f"Rrel@{k_}"] = float(np.mean(
            [np.isin(ranking[i, :k_], r).any() for i, r in enumerate(rel)]) * 100.0)
      mean_rel = float(np.mean([len(r) for r in rel]))
      res.chance["rel@5"] = 100.0 * mean_rel / n_cand
      sizes = np.array([len(r) for r in rel])
      res.chance.update(metrics.chance_map(n_cand, sizes, metrics.CIRCO_KS))
      for k_ in metrics.CIRR_KS:  # P(a random top-K misses all r relevant) = prod (n-r-j)/(n-j)
        j = np.arange(k_)[None, :]
        miss = np.clip((n_cand - sizes[:, None] - j) / (n_cand - j), 0.0, 1.0).prod(axis=1)
        res.chance[f"Rrel@{k_}"] = float((1.0 - miss).mean() * 100.0)
  elif ds == "circo":
    rel = [_indices(split, q.relevant, "ground truth") for q in split.queries]
    res.metrics.update(metrics.map_at_k(ranking, rel, metrics.CIRCO_KS))
    res.metrics.update(metrics.recall_at_k(ranking, targets, metrics.CIRCO_KS))
    res.chance = metrics.chance_recall(n_cand, metrics.CIRCO_KS)
    res.chance.update(metrics.chance_map(n_cand, [len(r) for r in rel], metrics.CIRCO_KS))
  elif ds == "fashioniq":
    res.metrics.update(metrics.recall_at_k(ranking, targets, metrics.FASHIONIQ_KS))
    res.chance = metrics.chance_recall(n_cand, metrics.FASHIONIQ_KS)
  else:
    raise ValueError(f"no evaluation protocol for dataset {ds!r}")
  res.metrics.update(skipped)
  res.metrics["n_queries"] = float(nq)
  res.metrics["n_corpus"] = float(nc)
  return res


def _rank_ragged_subsets(split: CIRSplit, scorer: retrieval.Scorer,
                         members: list[list[str]]) -> np.ndarray:
  """Subset rankings, [Nq, S] with -1 padding when sets differ in size (grouped by size)."""
  nq = len(members)
  width = max(len(m) for m in members)
  out = np.full((nq, width), -1, np.int64)
  sizes = np.array([len(m) for m in members])
  for size in np.unique(sizes):
    rows = np.flatnonzero(sizes == size)
    idx = np.stack([_indices(split, members[i], "img_set member") for i in rows])
    out[rows, :size] = retrieval.rank_subsets(scorer, rows, idx)
  return out


def _evaluate_pairs(split: CIRSplit, scorer: retrieval.Scorer) -> EvalResult:
  nq = len(split.queries)
  qidx = np.arange(nq)
  if split.dataset == "genecis":
    tgt = _indices(split, [q.target for q in split.queries], "target")
    ts = scorer.pairs(qidx, tgt[:, None])[:, 0]
    gal: list[np.ndarray] = [None] * nq  # type: ignore[list-item]
    sizes = np.array([len(q.gallery) for q in split.queries])
    for size in np.unique(sizes):  # one batched call per gallery size
      rows = np.flatnonzero(sizes == size)
      idx = np.stack([_indices(split, split.queries[i].gallery, "gallery image") for i in rows])
      for i, g in zip(rows, scorer.pairs(rows, idx)):
        gal[i] = g
    m = metrics.genecis_recall(ts, gal)
    sizes = np.array([len(q.gallery) + 1 for q in split.queries])
    chance = {f"R@{k}": float(np.mean(np.minimum(k, sizes) / sizes) * 100)
              for k in metrics.GENECIS_KS}
    return EvalResult(split, {**m, "n_queries": float(nq)}, chance=chance)
  s1 = scorer.pairs(qidx, np.stack([_indices(split, q.extra["set1"], "set1 image")
                                    for q in split.queries]))
  s2 = scorer.pairs(qidx, np.stack([_indices(split, q.extra["set2"], "set2 image")
                                    for q in split.queries]))
  pref = np.array([q.extra["preferred"] for q in split.queries])
  m = {**metrics.preference_rate(s1, s2, pref), **metrics.preference_agreement(s1, s2, pref)}
  # A scorer that ignores the query picks set 1 at random, so Eq. 9's chance level is the
  # share of queries where people preferred set 1; the symmetric agreement's is 50 %.
  chance = {"preference_rate": float(np.mean(pref == 1) * 100.0), "preference_agreement": 50.0}
  return EvalResult(split, {k: float(v) for k, v in m.items()}, chance=chance)


def evaluate_fashioniq(results: dict[str, EvalResult]) -> dict[str, float]:
  """Combines per-category FashionIQ results (keys: dress, shirt, toptee)."""
  per = {}
  for cat, r in results.items():
    targets = _indices(r.split, [q.target for q in r.split.queries], "target")
    per[cat] = (r.ranking, targets)
  return metrics.fashioniq_metrics(per)


def format_table(result: EvalResult, title: str | None = None) -> str:
  """A plain-text metrics table with the chance level beside each metric where known."""
  lines = [title or f"{result.split.name}: {len(result.split.queries)} queries, "
           f"{len(result.split.corpus)} corpus images"]
  w = max([len(k) for k in result.metrics] + [6])
  lines.append(f"  {'metric':<{w}}  {'value':>8}  {'chance':>8}")
  for k, v in result.metrics.items():
    if k in ("n_queries", "n_corpus"):
      continue
    c = result.chance.get(k)
    cs = f"{c:8.2f}" if c is not None else f"{'':>8}"
    vs = f"{v:8.2f}" if not k.startswith(("skipped/", "n_")) else f"{int(v):8d}"
    lines.append(f"  {k:<{w}}  {vs}  {cs}")
  return "\n".join(lines)
