"""Retrieval from features that stay on device: the same rankings as from host (NumPy)
features and as a brute-force ranking (exact ties included), for several block sizes, on the
4-device mesh and on a (data, fsdp) training mesh; only top-k-sized results reach the host;
two processes rank as one (slow)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cirjax.data.records import CIRSplit, ImageRef, Query
from cirjax.eval import encode, evaluate, placement, retrieval

REPO = Path(__file__).resolve().parents[1]


def _problem(seed, nq, nc, tokens, d=6):
  """Small-integer features: every dot product is exact in fp32 whatever the summation
  order, so ties are exact and a float64 brute force is the reference bit for bit. No zero
  entries (a -0.0 score would order differently in `lax.top_k` and in a stable sort)."""
  rng = np.random.default_rng(seed)
  vals = np.array([-2, -1, 1, 2], np.float32)
  q = rng.choice(vals, (nq, d))
  c = rng.choice(vals, (nc, tokens, d))
  c[10:14] = c[3]  # repeated images: exact ties at several scores
  exclude = rng.integers(-1, nc, nq).astype(np.int32)
  return q, c, exclude


def _brute(q, c, exclude, k):
  s = np.einsum("qd,ntd->qnt", q.astype(np.float64), c.astype(np.float64)).max(-1)
  s[np.arange(len(q))[exclude >= 0], exclude[exclude >= 0]] = -np.inf
  order = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s, order, 1), order


def _on_mesh(x, mesh):
  """Features as evaluation leaves them: encoded on `mesh`, rows split, padded."""
  return encode.encode(lambda a: a, None, x, mesh=mesh, batch_size=8, sharded=True,
                       pad_rows=True)


@pytest.mark.parametrize("tokens,query_block,corpus_block", [
    (1, 256, None), (1, 5, 7), (3, 256, None), (3, 8, 1), (3, 64, 50)])
def test_device_features_rank_as_host_features_and_brute_force(tokens, query_block,
                                                               corpus_block):
  mesh = retrieval.make_mesh()
  nq, nc, k = 19, 61, 12  # nothing divides the 4 devices: padded queries and corpus
  q, c, exclude = _problem(tokens, nq, nc, tokens)
  feats = c if tokens > 1 else c[:, 0]
  host = retrieval.FeatureScorer(q, feats)
  dev = retrieval.FeatureScorer(_on_mesh(q, mesh), _on_mesh(feats, mesh), num_queries=nq,
                                num_corpus=nc)
  assert dev.corpus_rows.shape[0] == 64 and len(dev.corpus_rows.sharding.device_set) == 4
  kw = dict(query_block=query_block, corpus_block=corpus_block)
  hs, hi = retrieval.top_k(host, k, exclude, **kw)
  ds, di = retrieval.top_k(dev, k, exclude, **kw)
  bs, bi = _brute(q, c, exclude, k)
  np.testing.assert_array_equal(hi, bi)
  np.testing.assert_array_equal(hs, bs.astype(np.float32))
  np.testing.assert_array_equal(di, hi)
  np.testing.assert_array_equal(ds, hs)


def test_training_mesh_and_half_precision_features():
  """The trainer's (data, fsdp) mesh; fp16 features stay fp16 on device and rank as their
  fp32 values."""
  mesh = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  q, c, exclude = _problem(7, 23, 45, 2)
  dev = retrieval.FeatureScorer(_on_mesh(q.astype(np.float16), mesh),
                                _on_mesh(c.astype(np.float16), mesh), num_queries=23,
                                num_corpus=45)
  assert dev.mesh is mesh and dev.corpus_rows.dtype == jnp.float16
  s, i = retrieval.top_k(dev, 9, exclude, query_block=10, corpus_block=4)
  bs, bi = _brute(q, c, exclude, 9)
  np.testing.assert_array_equal(i, bi)
  np.testing.assert_array_equal(s, bs.astype(np.float32))
  qi, ci = np.arange(23), np.random.default_rng(0).integers(0, 45, (23, 4))
  np.testing.assert_array_equal(dev.pairs(qi, ci, chunk=7),
                                np.einsum("md,mstd->mst", q[qi], c[ci]).max(-1))
  with pytest.raises(IndexError, match="corpus index out of range"):
    dev.pairs(qi, ci + 45)


def _cirr_split(rng, n, nq):
  corpus = [f"im{i}" for i in range(n)]
  qs = []
  for i in range(nq):
    ref = int(rng.integers(n))
    others = rng.choice(np.setdiff1d(np.arange(n), [ref]), 4, replace=False)
    tgt = corpus[others[0]]
    qs.append(Query(str(i), corpus[ref], "t", target=tgt, relevant=(tgt,),
                    subset=tuple(corpus[j] for j in others)))
  return CIRSplit("cirr", "val", qs, corpus, {x: ImageRef(Path(f"/x/{x}.png")) for x in corpus})


@pytest.mark.parametrize("path", retrieval.PATHS)
def test_evaluation_brings_only_top_k_sized_results_to_the_host(monkeypatch, path):
  """From encoded features to CIRR metrics: no implicit device-to-host transfer, and what is
  fetched is [query block, k] (ranking), [queries, set size] (Recall_subset) or a flag; the
  CPU's host path reads its [query block, corpus rows] score keys where they already are."""
  monkeypatch.setattr(retrieval, "default_path", lambda scorer: path)
  rng = np.random.default_rng(2)
  mesh = retrieval.make_mesh()
  split = _cirr_split(rng, 70, 30)
  q, c, _ = _problem(3, 30, 70, 2)
  fetched = []
  real = placement.to_host
  monkeypatch.setattr(placement, "to_host", lambda x: fetched.append(x.shape) or real(x))
  with jax.transfer_guard_device_to_host("disallow"):
    res = evaluate.evaluate_encoded(split, {}, lambda p, x: x, lambda p, x: x, c, q, mesh=mesh,
                                    batch_size=16)
  want = evaluate.evaluate_split(split, retrieval.FeatureScorer(q, c))
  assert res.metrics == want.metrics
  np.testing.assert_array_equal(res.ranking, want.ranking)
  np.testing.assert_array_equal(res.subset_ranking, want.subset_ranking)
  k = res.ranking.shape[1]
  ranked = (30, 72) if path == "host" else (30, k)  # 70 images: 72 rows on 4 devices
  assert set(fetched) == {(), ranked, (30, 4)}, fetched


MP_SCRIPT = textwrap.dedent("""
  import json, sys
  import jax
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", 2)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
  import numpy as np
  sys.path.insert(0, sys.argv[3])
  from tests import test_retrieval_device as t
  from cirjax.eval import evaluate, retrieval
  split = t._cirr_split(np.random.default_rng(2), 70, 30)
  q, c, _ = t._problem(3, 30, 70, 2)
  res = evaluate.evaluate_encoded(split, {}, lambda p, x: x, lambda p, x: x, c, q,
                                  mesh=retrieval.make_mesh(), batch_size=16)
  print("RESULT " + json.dumps({"metrics": res.metrics, "ranking": res.ranking.tolist(),
                                "subset": res.subset_ranking.tolist()}), flush=True)
""")


@pytest.mark.slow  # two JAX processes (gloo): 3 s alone, far more beside other jobs
def test_two_processes_rank_as_one(tmp_path):
  sys.path.insert(0, str(REPO / "launch"))
  import multiprocess  # pylint: disable=import-outside-toplevel
  script = tmp_path / "mp.py"
  script.write_text(MP_SCRIPT)
  addr = f"127.0.0.1:{multiprocess.free_port()}"
  env = dict(os.environ, PYTHONPATH=str(REPO))
  procs = [subprocess.Popen([sys.executable, str(script), addr, str(i), str(REPO)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  got = [json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
         for out, _ in outs]
  assert got[0] == got[1]
  split = _cirr_split(np.random.default_rng(2), 70, 30)
  q, c, _ = _problem(3, 30, 70, 2)
  want = evaluate.evaluate_split(split, retrieval.FeatureScorer(q, c))
  assert got[0]["metrics"] == want.metrics
  assert got[0]["ranking"] == want.ranking.tolist()
  assert got[0]["subset"] == want.subset_ranking.tolist()
