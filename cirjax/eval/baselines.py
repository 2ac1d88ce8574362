"""Baseline scorers for chance and ceiling rows of a metrics table (`cirjax eval --baseline`):
`RandomScorer` scores every (query, image) pair uniformly at random, `OracleScorer` knows the
answers. Both are host `retrieval.Scorer`s, ranked by `retrieval.top_k` like a model."""

from __future__ import annotations

import numpy as np

from cirjax.eval.retrieval import Scorer


def _hash_uniform(seed: int, q: np.ndarray, c: np.ndarray) -> np.ndarray:
  """Deterministic uniform [0, 1) per (seed, query, corpus item): splitmix64 of the triple."""
  with np.errstate(over="ignore"):
    x = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
         + q.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
         + c.astype(np.uint64) * np.uint64(0x94D049BB133111EB))
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
  return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class RandomScorer(Scorer):
  """A model that scores every (query, image) pair uniformly at random (chance level)."""

  def __init__(self, num_queries: int, num_corpus: int, seed: int = 0):
    self.num_queries, self.num_corpus, self.seed = num_queries, num_corpus, seed

  def block(self, q0, q1, c0, c1):
    q, c = np.meshgrid(np.arange(q0, q1), np.arange(c0, c1), indexing="ij")
    return _hash_uniform(self.seed, q, c)

  def pairs(self, query_idx, corpus_idx):
    q = np.broadcast_to(np.asarray(query_idx)[:, None], np.shape(corpus_idx))
    return _hash_uniform(self.seed, q, np.asarray(corpus_idx))


class OracleScorer(RandomScorer):
  """Knows the answers: target 3 + u, other relevant images 2 + u, the rest u (u in [0, 1))."""

  def __init__(self, targets: np.ndarray, relevant: list[np.ndarray], num_corpus: int,
               seed: int = 0):
    super().__init__(len(targets), num_corpus, seed)
    self.targets = np.asarray(targets)
    self.relevant = [np.asarray(r) for r in relevant]

  def _bonus(self, q: np.ndarray, c: np.ndarray) -> np.ndarray:
    out = np.zeros(q.shape)
    for i in np.unique(q):
      m = q == i
      out[m] = np.where(c[m] == self.targets[i], 3.0,
                        np.where(np.isin(c[m], self.relevant[i]), 2.0, 0.0))
    return out

  def block(self, q0, q1, c0, c1):
    q, c = np.meshgrid(np.arange(q0, q1), np.arange(c0, c1), indexing="ij")
    return _hash_uniform(self.seed, q, c) + self._bonus(q, c)

  def pairs(self, query_idx, corpus_idx):
    q = np.broadcast_to(np.asarray(query_idx)[:, None], np.shape(corpus_idx))
    c = np.asarray(corpus_idx)
    return _hash_uniform(self.seed, q, c) + self._bonus(q, c)
