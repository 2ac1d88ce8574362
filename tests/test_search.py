"""`cirjax search`: ranking matches a brute-force score, the reference is excluded, relevant
results are marked on the HTML page, cached corpus features are reused, bad input is clear."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cirjax import search as search_lib
from cirjax.data import images, loader, synth
from cirjax.data.tokenizer import load_tokenizer
from cirjax.data.records import DataError
from cirjax.eval import encoders
from cirjax.eval.model import Model, RetrievalFns
from cirjax.train import workdir

TINY = synth.SynthConfig(seed=9, resolution=16, num_images=(120, 90, 40),
                         num_queries=(20, 15, 5))


class FakeEncoder:
  """Model-shaped retrieval functions: a fixed random projection of the pixels (and of the
  tokens), as `RetrievalFns` (`.fns`) of explicit params."""

  def __init__(self, vocab_size):
    rng = np.random.default_rng(0)
    params = {"pw": jnp.asarray(rng.standard_normal((3, 2, 8)), jnp.float32),
              "tw": jnp.asarray(rng.standard_normal((vocab_size, 8)), jnp.float32)}
    self.image_calls = 0
    self.fns = RetrievalFns(params, self.encode_image, self.compose)

  def encode_image(self, p, px):
    self.image_calls += 1
    f = jnp.einsum("bhwc,ctd->btd", px, p["pw"])
    return f / jnp.linalg.norm(f, axis=-1, keepdims=True)

  def compose(self, p, px, ids, mask):
    f = jnp.einsum("bhwc,ctd->btd", px, p["pw"]).mean(1) + (p["tw"][ids] * mask[..., None]).sum(1)
    return f / jnp.linalg.norm(f, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  out = tmp_path_factory.mktemp("synth_search")
  synth.generate(out, TINY, progress=None)
  return out


def test_search_ranks_like_brute_force_and_excludes_reference(root, tmp_path):
  split = synth.read_synthetic(root, "val")
  tok = load_tokenizer(root / "vocab.txt", "blip2")
  enc = FakeEncoder(len(tok))
  tf = images.make_transform("clip", 16)
  tk = loader.bert_tokenize_fn(tok, 16)
  corpus = search_lib.corpus_from_dir(root / "images" / "val")
  assert corpus.names == split.corpus  # "val-00000" ... named by stem, sorted
  cache = tmp_path / "feats.npz"
  feats = search_lib.encode_corpus(enc.fns, corpus, tf, 32, cache=cache, model_id="m", log=None)
  calls = enc.image_calls
  again = search_lib.encode_corpus(enc.fns, corpus, tf, 32, cache=cache, model_id="m",
                                   log=None)
  assert enc.image_calls == calls  # served from the cache
  np.testing.assert_array_equal(feats, again)
  q = split.queries[0]
  ref = split.images[q.reference].path
  hits = search_lib.search(enc.fns, corpus, feats, ref, q.text, tf, tk, k=7,
                           relevant=q.relevant, target=q.target)
  assert [h.rank for h in hits] == list(range(1, 8))
  assert q.reference not in [h.name for h in hits]
  # Brute force: every image scored on the host, the reference left out.
  qf = np.asarray(enc.compose(enc.fns.params, tf(images.open_rgb(ref))[None],
                              *tk([q.text])))[0]
  s = np.einsum("d,ntd->nt", qf, feats).max(-1)
  s[corpus.names.index(q.reference)] = -np.inf
  want = np.argsort(-s, kind="stable")[:7]
  assert [h.name for h in hits] == [corpus.names[i] for i in want]
  np.testing.assert_allclose([h.score for h in hits], s[want], rtol=1e-5)
  for h in hits:
    assert h.relevant == (h.name in q.relevant) and h.target == (h.name == q.target)


def test_html_page_marks_relevant_results(root, tmp_path):
  split = synth.read_synthetic(root, "val")
  q = split.queries[1]
  paths = [split.images[n].path for n in split.corpus[:4]]
  hits = [search_lib.SearchHit(i + 1, split.corpus[i], paths[i], 1.0 - i / 10,
                               relevant=i in (0, 2), target=i == 0) for i in range(4)]
  page = search_lib.write_html(tmp_path / "p.html", split.images[q.reference].path,
                               "make it <b>red</b>", hits, num_relevant=3).read_text()
  assert page.count('<figure class="hit rel">') == 2 and page.count('<figure class="hit">') == 2
  assert "make it &lt;b&gt;red&lt;/b&gt;" in page  # the text is escaped
  assert "2 of the 4 results are relevant (3 relevant images known)" in page
  assert len(re.findall(r"data:image/png;base64,", page)) == 5  # reference + 4 thumbnails
  assert "<b>target</b>" in page


def test_cli_search_with_a_checkpoint(root, tmp_path, monkeypatch, capsys):
  from cirjax import cli
  tok = load_tokenizer(root / "vocab.txt", "blip2")
  enc = FakeEncoder(len(tok))
  model = Model("blip2", {"vision": {"image_size": 16}}, enc.fns.params)
  monkeypatch.setattr(workdir, "load_model", lambda path: model)
  monkeypatch.setattr(encoders, "retrieval_fns", lambda m, *a, **k: (
      enc.fns, loader.bert_tokenize_fn(m.tokenizer, k["max_length"]), None))
  split = synth.read_synthetic(root, "val")
  q = split.queries[2]
  out = tmp_path / "s.html"
  assert cli.main(["search", "--checkpoint", str(tmp_path), "--dataset", "synthetic",
                   "--root", str(root), "--query-id", q.query_id, "--k", "5",
                   "--transform", "clip", "--html", str(out)]) == 0
  printed = capsys.readouterr().out
  assert printed.count("\n  ") >= 6 and f"+ \"{q.text}\"" in printed
  assert out.is_file() and "relevant images known" in out.read_text()
  # Plain directory corpus with a reference file that is not in it.
  ref = tmp_path / "ref.png"
  Image.new("RGB", (20, 12), (200, 10, 10)).save(ref)
  assert cli.main(["search", "--checkpoint", str(tmp_path), "--corpus",
                   str(root / "images" / "test1"), "--reference", str(ref), "--text",
                   "make it red", "--k", "3", "--html", str(tmp_path / "t.html"),
                   "--tokenizer", str(root / "vocab.txt")]) == 0
  # Errors name what is wrong.
  assert cli.main(["search", "--checkpoint", str(tmp_path), "--corpus", str(tmp_path / "none"),
                   "--reference", str(ref), "--text", "x"]) == 1
  assert "none" in capsys.readouterr().err
  assert cli.main(["search", "--checkpoint", str(tmp_path), "--dataset", "synthetic",
                   "--root", str(root), "--query-id", "nope"]) == 1
  assert "no query with id 'nope'" in capsys.readouterr().err


def test_corpus_dir_errors(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="holds no images"):
    search_lib.corpus_from_dir(tmp_path / "empty")
  d = tmp_path / "dup"
  d.mkdir()
  Image.new("RGB", (4, 4)).save(d / "a.png")
  Image.new("RGB", (4, 4)).save(d / "a.jpg")
  with pytest.raises(DataError, match="share the name 'a'"):
    search_lib.corpus_from_dir(d)
