"""Evaluation: blocked on-device top-k against a brute-force ranking, sharded encoding, the
dataset protocols (oracle = 100, random = chance), bad input, and submission files."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cirjax.data import synth
from cirjax.data.records import CIRSplit, DataError, ImageRef, Query
from cirjax.eval import baselines, encode, evaluate, metrics, retrieval, submission

TINY = synth.SynthConfig(seed=5, resolution=16, num_images=(60, 150, 80),
                         num_queries=(20, 120, 30))


@pytest.fixture(scope="module")
def mesh():
  return retrieval.make_mesh()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  out = tmp_path_factory.mktemp("synth_eval")
  synth.generate(out, TINY, progress=None)
  return out


def _brute(q, c, exclude, k):
  """Reference ranking: full score matrix, stable sort of -score (ties by index)."""
  s = np.einsum("qd,ntd->qnt", q.astype(np.float64), c.astype(np.float64)).max(-1)
  for i, e in enumerate(exclude):
    if e >= 0:
      s[i, e] = -np.inf
  order = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s, order, 1), order


@pytest.mark.parametrize("tokens", [1, 4])
def test_blocked_top_k_matches_brute_force(mesh, tokens):
  rng = np.random.default_rng(0)
  nq, nc, d, k = 37, 203, 16, 11  # nothing divides evenly: padding of queries and corpus
  q = rng.standard_normal((nq, d)).astype(np.float32)
  c = rng.standard_normal((nc, tokens, d)).astype(np.float32)
  exclude = rng.integers(-1, nc, nq)
  scorer = retrieval.FeatureScorer(q, c if tokens > 1 else c[:, 0])
  s, i = retrieval.top_k(scorer, k, exclude, mesh, query_block=8, corpus_block=50)
  bs, bi = _brute(q, c, exclude, k)
  np.testing.assert_array_equal(i, bi)
  np.testing.assert_allclose(s, bs, rtol=1e-5)
  assert not (i == exclude[:, None]).any()


def test_top_k_ties_by_corpus_index_and_host_scorer(mesh):
  class Const(retrieval.Scorer):
    num_queries, num_corpus = 5, 30

    def block(self, q0, q1, c0, c1):
      return np.zeros((q1 - q0, c1 - c0))

  _, i = retrieval.top_k(Const(), 7, np.array([0, -1, 3, 29, 2]), mesh, corpus_block=8)
  np.testing.assert_array_equal(i[1], np.arange(7))
  np.testing.assert_array_equal(i[0], np.arange(1, 8))
  np.testing.assert_array_equal(i[2], [0, 1, 2, 4, 5, 6, 7])
  with pytest.raises(ValueError, match="only 29 candidates"):
    retrieval.top_k(Const(), 30, np.zeros(5, int), mesh)


def test_encode_pads_and_shards(mesh):
  w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4)), jnp.float32)
  fn = lambda x, y: x @ w + y[:, None]
  xs = np.random.default_rng(2).standard_normal((11, 3)).astype(np.float32)
  ys = np.arange(11, dtype=np.float32)
  want = xs @ np.asarray(w) + ys[:, None]
  batches = [(xs[i:i + 4], ys[i:i + 4]) for i in range(0, 11, 4)]
  seen = []
  out = encode.encode(fn, None, iter(batches), mesh=mesh, batch_size=4, progress=seen.append)
  np.testing.assert_allclose(out, want, rtol=1e-6)
  assert seen == [4, 8, 11]
  with pytest.raises(ValueError, match="no rows"):
    encode.encode(fn, None, iter([]), mesh=mesh, batch_size=4)
  # Rows given whole are batched here; params are the first argument; sharded results.
  pfn = lambda p, x, y: x @ p + y[:, None]
  out = encode.encode(pfn, np.asarray(w), (xs, ys), mesh=mesh, batch_size=4)
  np.testing.assert_allclose(out, want, rtol=1e-6)
  dev = encode.encode(pfn, np.asarray(w), (xs[:8], ys[:8]), mesh=mesh, batch_size=4,
                      sharded=True)
  assert isinstance(dev, jax.Array) and dev.shape == (8, 4)
  assert dev.sharding.spec[0] is not None
  np.testing.assert_allclose(np.asarray(dev), want[:8], rtol=1e-6)
  assert encode.encode(pfn, np.asarray(w), (xs, ys), mesh=mesh, batch_size=4,
                       dtype=np.float16).dtype == np.float16


def test_non_finite_features_refused():
  q = np.ones((2, 4), np.float32)
  c = np.ones((3, 4), np.float32)
  c[1, 2] = np.nan
  with pytest.raises(ValueError, match="non-finite"):
    retrieval.FeatureScorer(q, c)
  with pytest.raises(ValueError, match="do not match"):
    retrieval.FeatureScorer(q, np.ones((3, 5), np.float32))


def test_synthetic_oracle_scores_100_random_near_chance(root, mesh):
  s = synth.read_synthetic(root, "val")
  o = evaluate.evaluate_split(s, evaluate.baseline_scorer("oracle", s), mesh)
  for k in ("R@1", "R@5", "R@10", "R@50", "Rsubset@1", "avg", "mAP@5", "mAP@50", "Rrel@1"):
    assert o.metrics[k] == pytest.approx(100.0), k
  # The oracle fills the top 5 with every relevant image there is.
  rel = np.array([min(5, len(q.relevant)) for q in s.queries])
  assert o.metrics["rel@5"] == pytest.approx(rel.mean() / 5 * 100)
  # The reference image is never retrieved.
  idx = s.corpus_index()
  refs = np.array([idx[q.reference] for q in s.queries])
  assert not (o.ranking == refs[:, None]).any()
  r = evaluate.evaluate_split(s, evaluate.baseline_scorer("random", s, seed=1), mesh)
  nq = len(s.queries)
  for k in ("R@10", "R@50", "Rsubset@1", "Rsubset@2"):
    p = r.chance[k] / 100
    assert abs(r.metrics[k] / 100 - p) < 4 * np.sqrt(p * (1 - p) / nq) + 1e-9, (k, r.metrics[k])
  assert r.metrics["n_queries"] == nq and r.metrics["n_corpus"] == len(s.corpus)
  table = evaluate.format_table(r)
  assert "R@10" in table and "chance" in table


def test_encode_split_with_an_encoder(root, mesh):
  """Model-shaped retrieval functions (image / compose of params) through the loader and
  sharded encoding."""
  from cirjax.data import images
  from cirjax.data.tokenizer import load_tokenizer
  from cirjax.eval import encoders
  s = synth.read_synthetic(root, "val")
  tok = load_tokenizer(root / "vocab.txt", "blip2")
  rng = np.random.default_rng(0)
  params = {"pw": jnp.asarray(rng.standard_normal((3, 2, 8)), jnp.float32),
            "tw": jnp.asarray(rng.standard_normal((len(tok), 8)), jnp.float32)}

  def image(p, px):
    f = jnp.einsum("bhwc,ctd->btd", px, p["pw"])
    return f / jnp.linalg.norm(f, axis=-1, keepdims=True)

  def compose(p, px, ids, mask):
    f = image(p, px).mean(1) + (p["tw"][ids] * mask[..., None]).sum(1)
    return f / jnp.linalg.norm(f, axis=-1, keepdims=True)

  tf = images.make_transform("clip", 16)
  from cirjax.data import loader
  scorer, timings = evaluate.encode_split(encoders.RetrievalFns(params, image, compose), s, tf,
                                          loader.bert_tokenize_fn(tok, 16), batch_size=24,
                                          mesh=mesh, log=None)
  assert scorer.corpus.shape == (len(s.corpus), 2, 8)
  assert scorer.query.shape == (len(s.queries), 8)
  assert timings["corpus_images_per_s"] > 0 and timings["queries_encoded_per_s"] > 0
  # Same features as encoding each image alone, in corpus order.
  one = np.asarray(image(params, tf(images.load_image(s.images[s.corpus[7]]))[None]))
  np.testing.assert_allclose(scorer.corpus[7], one[0], rtol=1e-5, atol=1e-6)
  res = evaluate.evaluate_split(s, scorer, mesh)
  assert set(res.metrics) >= {"R@1", "R@50", "Rsubset@1", "mAP@10", "rel@5"}


def test_scorer_size_mismatch_is_an_error(root, mesh):
  s = synth.read_synthetic(root, "val")
  with pytest.raises(ValueError, match="scorer covers"):
    evaluate.evaluate_split(s, baselines.RandomScorer(3, len(s.corpus)), mesh)
  with pytest.raises(ValueError, match="unknown baseline"):
    evaluate.baseline_scorer("psychic", s)


def _split(dataset, queries, corpus, split="val"):
  return CIRSplit(dataset, split, queries, corpus, {n: ImageRef(Path(f"/x/{n}.png")) for n in corpus})


def test_circo_and_fashioniq_protocols(mesh):
  corpus = [str(i) for i in range(60)]
  qs = [Query(str(i), corpus[i], "t", target=corpus[i + 1],
              relevant=(corpus[i + 1], corpus[i + 2], corpus[i + 3])) for i in range(10)]
  s = _split("circo", qs, corpus)
  o = evaluate.evaluate_split(s, evaluate.baseline_scorer("oracle", s), mesh)
  assert o.metrics["mAP@5"] == pytest.approx(100.0) and o.metrics["mAP@50"] == pytest.approx(100.0)
  # CIRCO keeps the reference among the candidates (official code): ranking covers 50.
  assert o.ranking.shape == (10, 50)
  per = {}
  for cat in ("dress", "shirt", "toptee"):
    f = _split("fashioniq", [dataclass_replace(q, relevant=(q.target,)) for q in qs], corpus,
               f"{cat}.val")
    per[cat] = evaluate.evaluate_split(f, evaluate.baseline_scorer("oracle", f), mesh)
    assert per[cat].metrics["R@10"] == 100.0
  m = evaluate.evaluate_fashioniq(per)
  assert m["avg"] == 100.0 and m["shirt/R@50"] == 100.0


def dataclass_replace(q, **kw):
  import dataclasses
  return dataclasses.replace(q, **kw)


def test_genecis_and_hpfashioniq_protocols(mesh):
  corpus = [f"g{i}" for i in range(20)]
  qs = [Query(str(i), corpus[i], "t", target=corpus[i + 1],
              gallery=tuple(corpus[i + 2:i + 3 + i % 4])) for i in range(8)]  # ragged galleries
  s = _split("genecis", qs, corpus)
  o = evaluate.evaluate_split(s, evaluate.baseline_scorer("oracle", s), mesh)
  assert o.metrics["R@1"] == 100.0
  sizes = np.array([len(q.gallery) + 1 for q in qs])
  assert o.chance["R@1"] == pytest.approx(np.mean(1 / sizes) * 100)
  # Same numbers as scoring each query alone.
  sc = evaluate.baseline_scorer("random", s, seed=2)
  r = evaluate.evaluate_split(s, sc, mesh)
  idx = s.corpus_index()
  ts = np.array([sc.pairs(np.array([i]), np.array([[idx[q.target]]]))[0, 0]
                 for i, q in enumerate(qs)])
  gal = [sc.pairs(np.array([i]), np.array([[idx[g] for g in q.gallery]]))[0]
         for i, q in enumerate(qs)]
  assert r.metrics["R@1"] == metrics.genecis_recall(ts, gal)["R@1"]
  hq = [Query(str(i), corpus[i], "t", target=corpus[i + 1],
              extra={"set1": list(corpus[i + 1:i + 6]), "set2": list(corpus[i + 6:i + 11]),
                     "preferred": 1 if i % 2 else 2}) for i in range(8)]
  h = _split("hpfashioniq", hq, corpus)
  # The oracle gives set1 (which holds the target) the higher mean score every time.
  r = evaluate.evaluate_split(h, evaluate.baseline_scorer("oracle", h), mesh)
  assert r.metrics["preference_rate"] == pytest.approx(50.0) and r.metrics["n_set1_higher"] == 8


def test_cirr_submission_layout(root, mesh, tmp_path):
  s = synth.read_synthetic(root, "test1")
  res = evaluate.evaluate_split(s, evaluate.baseline_scorer("random", s), mesh)
  p1, p2 = submission.write_cirr_submission(res, tmp_path, "run")
  a, b = json.loads(p1.read_text()), json.loads(p2.read_text())
  assert a["version"] == "rc2" and a["metric"] == "recall"
  assert b["version"] == "rc2" and b["metric"] == "recall_subset"
  assert len(a) == len(s.queries) + 2 and len(b) == len(s.queries) + 2
  for q in s.queries:
    top = a[q.query_id]
    assert len(top) == 50 and len(set(top)) == 50 and q.reference not in top
    assert set(top) <= set(s.corpus)
    sub = b[q.query_id]
    assert len(sub) == 3 and set(sub) <= set(q.subset)
  # The files list exactly the ranking.
  q0 = s.queries[0]
  assert a[q0.query_id] == [s.corpus[j] for j in res.ranking[0, :50]]


def test_circo_submission_layout(mesh, tmp_path):
  corpus = [str(100 + i) for i in range(70)]
  qs = [Query(str(i), corpus[i], "t") for i in range(6)]
  s = _split("circo", qs, corpus, "test")
  res = evaluate.evaluate_split(s, evaluate.baseline_scorer("random", s), mesh)
  assert res.metrics == {} or all(k.startswith("skipped/") for k in res.metrics)
  p = submission.write_circo_submission(res, tmp_path / "circo.json")
  sub = json.loads(p.read_text())
  assert sorted(sub) == sorted(q.query_id for q in qs)
  assert all(len(v) == 50 and all(isinstance(x, int) for x in v) for v in sub.values())
  with pytest.raises(ValueError, match="CIRR submissions"):
    submission.write_cirr_submission(res, tmp_path, "x")
  with pytest.raises(DataError, match="oracle needs ground truth"):
    evaluate.baseline_scorer("oracle", s)


def test_cli_eval_baselines_and_submission(root, tmp_path, capsys):
  from cirjax import cli
  out = tmp_path / "m.json"
  assert cli.main(["eval", "--dataset", "synthetic", "--root", str(root), "--baseline", "oracle",
                   "--json", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "R@10" in printed and "chance" in printed
  rep = json.loads(out.read_text())
  m = rep["splits"]["synthetic/val"]["metrics"]
  assert m["R@1"] == 100.0 and m["mAP@10"] == pytest.approx(100.0)
  assert cli.main(["eval", "--dataset", "synthetic", "--root", str(root), "--split", "test1",
                   "--baseline", "random", "--submission-dir", str(tmp_path / "sub"),
                   "--name", "t"]) == 0
  assert (tmp_path / "sub" / "recall_submission_t_test1.json").is_file()
  assert (tmp_path / "sub" / "recall_subset_submission_t_test1.json").is_file()
  # Bad input is a one-line error naming what is wrong, not a traceback.
  assert cli.main(["eval", "--dataset", "cirr", "--root", str(tmp_path / "nope"),
                   "--baseline", "random"]) == 1
  assert "nope" in capsys.readouterr().err


def test_checkpoint_resolution(tmp_path):
  from cirjax.convert import registry
  from cirjax.train import workdir
  wd = tmp_path / "workdir"
  (wd / "checkpoints").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="export the trained model"):
    workdir.model_source(wd)
  # A real training workdir also holds the run's config.json (not an HF model config).
  (wd / "config.json").write_text(json.dumps({"seed": 0, "model": {"init": ""}}))
  assert workdir.model_source(wd) == workdir.Run(wd)
  with pytest.raises(FileNotFoundError, match="training workdir without an exported model"):
    workdir.load_model(wd)
  (wd / "export").mkdir()
  (wd / "export" / "cirjax_config.json").write_text(json.dumps({"model_type": "vqgan",
                                                                "config": {}}))
  assert workdir.model_source(wd) == wd / "export"
  with pytest.raises(ValueError, match="a 'vqgan' checkpoint"):
    workdir.load_model(wd)
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llava"}))
  assert registry.detect(tmp_path / "hf") == "llava"
  (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match="neither BLIP-2 nor LLaVA"):
    workdir.load_model(tmp_path / "hf")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    workdir.model_source(tmp_path / "missing")


def test_cirr_pipeline_matches_reference_code_on_random_features(mesh):
  """End to end: features -> blocked top-k (reference excluded) -> metrics equals the
  CLIP4Cir/SPRC names-based computation on the full host score matrix."""
  rng = np.random.default_rng(4)
  n, nq, d = 90, 30, 8
  corpus = [f"dev-{i}" for i in range(n)]
  qs = []
  for i in range(nq):
    ref = int(rng.integers(n))
    others = rng.choice(np.setdiff1d(np.arange(n), [ref]), 5, replace=False)
    members = [corpus[ref]] + [corpus[j] for j in others]
    tgt = corpus[others[rng.integers(5)]]
    qs.append(Query(str(i), corpus[ref], "t", target=tgt, relevant=(tgt,),
                    subset=tuple(members[1:])))
  s = _split("cirr", qs, corpus)
  qf = rng.standard_normal((nq, d)).astype(np.float32)
  cf = rng.standard_normal((n, 3, d)).astype(np.float32)
  res = evaluate.evaluate_split(s, retrieval.FeatureScorer(qf, cf), mesh)
  full_scores = np.einsum("qd,ntd->qnt", qf.astype(np.float64), cf.astype(np.float64)).max(-1)
  names = np.array(corpus)
  full_sorted = names[np.argsort(-full_scores, axis=1, kind="stable")]
  ref_mask = full_sorted != np.array([q.reference for q in qs])[:, None]
  sorted_names = full_sorted[ref_mask].reshape(nq, n - 1)
  labels = sorted_names == np.array([q.target for q in qs])[:, None]
  members = np.array([[q.reference, *q.subset] for q in qs])
  group_mask = (sorted_names[..., None] == members[:, None, :]).sum(-1).astype(bool)
  group_labels = labels[group_mask].reshape(nq, -1)
  for k in (1, 5, 10, 50):
    assert res.metrics[f"R@{k}"] == pytest.approx(labels[:, :k].sum() / nq * 100), k
  for k in (1, 2, 3):
    assert res.metrics[f"Rsubset@{k}"] == pytest.approx(group_labels[:, :k].sum() / nq * 100), k


@pytest.mark.slow  # ~90 s on 2 shared cores: six compilations of a (tiny) BLIP-2
def test_cli_eval_and_search_with_a_blip2_checkpoint(root, tmp_path, capsys):
  """A real (tiny, random) cirjax BLIP-2 model dir inside a training workdir: `cirjax eval`
  and `cirjax search` through the sharded encode path agree with eager functional calls."""
  import dataclasses
  blip2 = pytest.importorskip("cirjax.models.blip2")
  import cirjax
  from cirjax import cli
  from cirjax.convert import io
  from cirjax.data import images, loader, text
  from cirjax.data.tokenizer import load_tokenizer
  tok = load_tokenizer(root / "vocab.txt", "blip2")
  cfg = blip2.tiny_config()
  cfg = cfg.replace(qformer=dataclasses.replace(cfg.qformer, vocab_size=len(tok)))
  params = blip2.init_blip2(jax.random.PRNGKey(0), cfg)
  model_dir = tmp_path / "workdir" / "model"
  io.save_model_dir(model_dir, jax.tree.map(np.asarray, params), cfg.to_dict(), "blip2")
  (model_dir / "vocab.txt").write_text((root / "vocab.txt").read_text())
  out = tmp_path / "m.json"
  assert cli.main(["eval", "--dataset", "synthetic", "--root", str(root), "--checkpoint",
                   str(tmp_path / "workdir"), "--transform", "clip", "--batch-size", "16",
                   "--json", str(out)]) == 0
  assert "images clip 28px" in capsys.readouterr().out
  got = json.loads(out.read_text())["splits"]["synthetic/val"]["metrics"]
  # The same numbers from eager (input-checked) calls of the functional API.
  model = cirjax.load_blip2(model_dir)
  s = synth.read_synthetic(root, "val")
  tf = images.make_transform("clip", 28)
  px = lambda names: np.stack([tf(images.load_image(s.images[n])) for n in names])
  cf = np.asarray(blip2.encode_image(model.params, model.config, px(s.corpus)))
  ids, mask = text.tokenize(tok, [loader.default_text(q) for q in s.queries], 32)
  qf = np.asarray(blip2.compose(model.params, model.config, px([q.reference for q in s.queries]),
                                ids, mask))
  want = evaluate.evaluate_split(s, retrieval.FeatureScorer(qf, cf), retrieval.make_mesh()).metrics
  for k in ("R@1", "R@10", "R@50", "Rsubset@1", "mAP@10", "rel@5"):
    assert got[k] == pytest.approx(want[k], abs=1e-6), k
  assert cli.main(["search", "--checkpoint", str(tmp_path / "workdir"), "--dataset", "synthetic",
                   "--root", str(root), "--query-id", s.queries[0].query_id, "--k", "4",
                   "--transform", "clip", "--html", str(tmp_path / "s.html")]) == 0
  assert (tmp_path / "s.html").is_file()


def test_ragged_img_sets_and_too_small_corpus(mesh):
  corpus = [f"c{i}" for i in range(70)]
  qs = [Query(str(i), corpus[i], "t", target=corpus[i + 1], relevant=(corpus[i + 1],),
              subset=tuple(corpus[i + 1:i + 1 + (2 + i % 4)])) for i in range(12)]
  s = _split("cirr", qs, corpus)
  o = evaluate.evaluate_split(s, evaluate.baseline_scorer("oracle", s), mesh)
  assert o.metrics["Rsubset@1"] == 100.0
  sizes = np.array([len(q.subset) for q in qs])
  assert o.chance["Rsubset@1"] == pytest.approx(np.mean(1 / sizes) * 100)
  assert ((o.subset_ranking >= 0).sum(1) == sizes).all()
  small = _split("cirr", qs, corpus[:40])
  with pytest.raises(DataError, match="only 39 candidate images"):
    evaluate.evaluate_split(dataclass_replace_split(small, qs[:5]),
                            baselines.RandomScorer(5, 40), mesh)


def dataclass_replace_split(s, queries):
  import dataclasses
  return dataclasses.replace(s, queries=queries)


@pytest.mark.slow  # compiles a tiny LLaVA-Phi twice per split
def test_cli_eval_with_a_llava_checkpoint(root, tmp_path, capsys):
  """An HF LLaVA-Phi directory scored with InstructCIR's zero-shot prompts equals embedding
  the same prompts with `llava.embed` directly."""
  from cirjax import cli, prompts
  from cirjax.models import llava
  from cirjax.data import images
  from cirjax.train import workdir
  from tests import llava_fixtures as fx
  d = tmp_path / "llava"
  fx.llava_model(fx.phi3_config(num_key_value_heads=2), seed=3).save_pretrained(str(d))
  fx.make_tokenizer(d)
  out = tmp_path / "m.json"
  assert cli.main(["eval", "--dataset", "synthetic", "--root", str(root), "--checkpoint", str(d),
                   "--batch-size", "32", "--json", str(out)]) == 0
  assert "images clip 28px" in capsys.readouterr().out
  got = json.loads(out.read_text())["splits"]["synthetic/val"]["metrics"]
  model = workdir.load_model(d)
  s = synth.read_synthetic(root, "val")
  tf = images.make_transform("clip", 28)
  px = lambda names: np.stack([tf(images.load_image(s.images[n])) for n in names])
  n_img = prompts.num_image_tokens(28, 14)
  tmpl = prompts.inference_template("cirr", "image")
  enc = prompts.encode(model.tokenizer, tmpl, [{}] * len(s.corpus), num_image_tokens=n_img,
                       image=True)
  assert model.family == "llava"
  cf = np.asarray(llava.embed(model.params, model.config, enc["input_ids"],
                              enc["attention_mask"], px(s.corpus)))
  qt = prompts.inference_template("cirr", "query")
  enc = prompts.encode(model.tokenizer, qt, [{"modifier": q.text} for q in s.queries],
                       num_image_tokens=n_img, image=True)
  qf = np.asarray(llava.embed(model.params, model.config, enc["input_ids"],
                              enc["attention_mask"], px([q.reference for q in s.queries])))
  want = evaluate.evaluate_split(s, retrieval.FeatureScorer(qf, cf), retrieval.make_mesh()).metrics
  for k in ("R@1", "R@10", "R@50", "Rsubset@1", "mAP@10"):
    assert got[k] == pytest.approx(want[k], abs=1e-6), k


def _png(path, shade):
  from PIL import Image
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", (6, 4), (shade % 256, 0, 0)).save(path)


def test_cli_circo_and_fashioniq_from_published_layouts(tmp_path, capsys):
  from cirjax import cli
  # CIRCO: 60 COCO ids, val with several ground truths, test without.
  root = tmp_path / "circo"
  ids = [100000 + 7 * i for i in range(60)]
  info = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]}
  ann = root / "COCO2017_unlabeled" / "annotations"
  ann.mkdir(parents=True)
  (ann / "image_info_unlabeled2017.json").write_text(json.dumps(info))
  for i in ids:
    _png(root / "COCO2017_unlabeled" / "unlabeled2017" / f"{i:012d}.jpg", i)
  (root / "annotations").mkdir()
  (root / "annotations" / "val.json").write_text(json.dumps([
      {"id": q, "reference_img_id": ids[q], "target_img_id": ids[q + 1],
       "relative_caption": "is red", "shared_concept": "x",
       "gt_img_ids": [ids[q + 1], ids[q + 5], ids[q + 9]]} for q in range(8)]))
  (root / "annotations" / "test.json").write_text(json.dumps([
      {"id": q, "reference_img_id": ids[q], "relative_caption": "is red", "shared_concept": "x"}
      for q in range(5)]))
  out = tmp_path / "circo.json"
  assert cli.main(["eval", "--dataset", "circo", "--root", str(root), "--baseline", "oracle",
                   "--json", str(out)]) == 0
  m = json.loads(out.read_text())["splits"]["circo/val"]["metrics"]
  assert m["mAP@5"] == pytest.approx(100.0) and m["mAP@50"] == pytest.approx(100.0)
  assert cli.main(["eval", "--dataset", "circo", "--root", str(root), "--split", "test",
                   "--baseline", "random", "--submission-dir", str(tmp_path / "sub"),
                   "--name", "x"]) == 0
  sub = json.loads((tmp_path / "sub" / "circo_test_x.json").read_text())
  assert sorted(sub) == [str(q) for q in range(5)]
  assert all(len(v) == 50 and set(v) <= set(ids) for v in sub.values())
  # FashionIQ: all three categories and QuRe's averages.
  fiq = tmp_path / "fiq"
  for c, cat in enumerate(("dress", "shirt", "toptee")):
    names = [f"B{c}{i:03d}" for i in range(55)]
    (fiq / "image_splits").mkdir(parents=True, exist_ok=True)
    (fiq / "captions").mkdir(exist_ok=True)
    (fiq / "image_splits" / f"split.{cat}.val.json").write_text(json.dumps(names))
    (fiq / "captions" / f"cap.{cat}.val.json").write_text(json.dumps([
        {"candidate": names[i], "target": names[i + 2], "captions": ["is red.", "longer"]}
        for i in range(6)]))
    for i, n in enumerate(names):
      _png(fiq / "images" / f"{n}.png", i)
  capsys.readouterr()
  assert cli.main(["eval", "--dataset", "fashioniq", "--root", str(fiq), "--baseline", "oracle",
                   "--out", str(tmp_path / "fiq.json")]) == 0
  assert "FashionIQ (QuRe Table 2 layout)" in capsys.readouterr().out
  rep = json.loads((tmp_path / "fiq.json").read_text())
  assert rep["fashioniq"]["avg"] == 100.0 and rep["fashioniq"]["toptee/R@10"] == 100.0
  assert set(rep["splits"]) == {"fashioniq/dress.val", "fashioniq/shirt.val", "fashioniq/toptee.val"}


def test_feature_pairs_chunked():
  rng = np.random.default_rng(5)
  q = rng.standard_normal((9, 4)).astype(np.float32)
  c = rng.standard_normal((20, 3, 4)).astype(np.float32)
  sc = retrieval.FeatureScorer(q, c)
  qi, ci = np.arange(9), rng.integers(0, 20, (9, 5))
  want = np.einsum("md,mstd->mst", q[qi], c[ci]).max(-1)
  np.testing.assert_allclose(sc.pairs(qi, ci, chunk=2), want, rtol=1e-5)
  np.testing.assert_allclose(sc.pairs(qi, ci), want, rtol=1e-5)
