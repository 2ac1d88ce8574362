"""TFDS builders for the CIR datasets, in the ArrayRecord format (no TensorFlow needed).

Every dataset becomes two TFDS configs that share split names:

* `<builder>/queries` — one record per query: `index` (order in the published file),
  `query_id`, `reference`, `text`, `target` ("" when the split has none), `relevant`,
  `subset` (CIRR img_set members), `gallery` (GeneCIS), `extra_json` (dataset specifics:
  CIRR `target_soft`, CIRCO's BLIP-2 phrasing, HP-FashionIQ sets, synthetic modification).
* `<builder>/images` — one record per image the split uses: `name`, `image` (the original
  encoded bytes; GeneCIS attribute crops are cut and stored as PNG), `corpus_index` (position
  in the evaluation corpus, -1 for images outside it).

Builders (`tfds.builder` names): `cirjax_synthetic` (generated from a seed, or read from a
`manual_dir` holding a `cirjax data synth` output), `cirjax_cirr`, `cirjax_fashion_iq`
(splits `dress_val`, ...), `cirjax_circo`, `cirjax_genecis` (one split per task) and
`cirjax_hp_fashion_iq` (split `val`; `root` = the FashionIQ root holding `hpfiq.json`, or the
file with `fashioniq_root`). Real datasets are read from
`manual_dir` with the validating readers of `cirjax.data`, so a malformed file fails the build
naming the file and entry.

Why ArrayRecord: random access by index (what `grain` and `tfds.data_source` need for
seeded shuffles and resuming at a step), and writing/reading it needs no TensorFlow, so
TFDS never claims GPU memory. Building only uses TensorFlow for image *arrays*; cirjax
always passes encoded files, so `tensorflow` is not required. (TFRecord output and
`tfds.load(...)` as a `tf.data.Dataset` do need TensorFlow: use `file_format='tfrecord'`
yourself if you want that.)

Reading back: `load_split(data_dir, builder, split)` returns the `CIRSplit` plus an image
source that decodes images from the ArrayRecord files; pass it to `cirjax.data.loader`
(`image_source=`) and `cirjax.eval.evaluate.encode_split`.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import importlib.util

import numpy as np
from PIL import Image

from cirjax.errors import MissingDependencyError
from cirjax.data import (build_lock, circo, cirr, fashioniq, genecis, hpfashioniq, images,
                         records, synth)
from cirjax.data.records import CIRSplit, DataError, ImageRef, Query

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

BUILDERS = {"synthetic": "cirjax_synthetic", "cirr": "cirjax_cirr",
            "fashioniq": "cirjax_fashion_iq", "circo": "cirjax_circo",
            "genecis": "cirjax_genecis", "hpfashioniq": "cirjax_hp_fashion_iq"}


OPTIONAL = ("tensorflow_datasets", "array_record")  # the `tfds` extra (setup.cfg)


def installed() -> bool:
  """Whether the `tfds` extra is installed (TFDS and the ArrayRecord reader/writer)."""
  return all(importlib.util.find_spec(m) is not None for m in OPTIONAL)


def require():
  """The tensorflow_datasets module; MissingDependencyError naming the `tfds` extra if absent."""
  # tensorflow_datasets is heavy and optional: only building or reading TFDS data needs it.
  missing = [m for m in OPTIONAL if importlib.util.find_spec(m) is None]
  if missing:
    raise MissingDependencyError(
        f"TFDS builds (`cirjax data tfds`, `cirjax eval --tfds-dir`) need the optional "
        f"package(s) {', '.join(missing)}, not installed: install cirjax's `tfds` extra "
        "(pip install -e '.[tfds]' in the cirjax checkout, or pip install tensorflow-datasets "
        "array_record)")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


# ----------------------------------------------------------------------------- split listing

def available_splits(dataset: str, root: str | os.PathLike) -> list[str]:
  """The TFDS split names a dataset root provides (only those whose files exist)."""
  root = Path(root)
  if dataset in ("synthetic", "cirr"):
    names = synth.SPLITS if dataset == "synthetic" else cirr.SPLITS
    out = [s for s in names if (root / "captions" / f"cap.rc2.{s}.json").is_file()]
  elif dataset == "fashioniq":
    out = [f"{c}_{s}" for c in fashioniq.CATEGORIES for s in ("train", "val", "test")
           if (root / "captions" / f"cap.{c}.{s}.json").is_file()]
  elif dataset == "circo":
    out = [s for s in circo.SPLITS if (root / "annotations" / f"{s}.json").is_file()]
  elif dataset == "genecis":
    out = [t for t in genecis.TASKS if (root / "genecis" / f"{t}.json").is_file()]
  elif dataset == "hpfashioniq":
    try:
      hpfashioniq.find_file(root)
      out = ["val"]
    except DataError:
      out = []
  else:
    raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(BUILDERS)}")
  if not out:
    raise DataError(f"{dataset}: no split files found under {root} (is this the dataset root?)")
  return out


def read_for_tfds(dataset: str, root: str | os.PathLike, split: str,
                  fashioniq_root: str | os.PathLike | None = None) -> CIRSplit:
  """Reads one split with the validating reader (images must exist)."""
  if dataset == "synthetic":
    return synth.read_synthetic(root, split)
  if dataset == "cirr":
    return cirr.read_cirr(root, split)
  if dataset == "fashioniq":
    cat, _, sp = split.partition("_")
    return fashioniq.read_fashioniq(root, cat, sp)
  if dataset == "circo":
    return circo.read_circo(root, split)
  if dataset == "genecis":
    return genecis.read_genecis(root, split)
  if dataset == "hpfashioniq":
    return hpfashioniq.read_hpfashioniq(root, fashioniq_root)
  raise ValueError(f"unknown dataset {dataset!r}")


# ----------------------------------------------------------------------------- records

def _image_bytes(ref: ImageRef) -> bytes:
  if ref.bbox is None:
    try:
      return Path(ref.path).read_bytes()
    except OSError as e:
      raise DataError(f"cannot read image {ref.path}: {e}") from None
  buf = io.BytesIO()
  images.load_image(ref).save(buf, format="PNG")
  return buf.getvalue()


def query_records(split: CIRSplit) -> Iterator[tuple[str, dict]]:
  for i, q in enumerate(split.queries):
    yield f"q{i:09d}", {
        "index": i, "query_id": q.query_id, "reference": q.reference, "text": q.text,
        "target": q.target or "", "relevant": list(q.relevant), "subset": list(q.subset),
        "gallery": list(q.gallery), "extra_json": json.dumps(q.extra, sort_keys=True)}


def image_records(split: CIRSplit) -> Iterator[tuple[str, dict]]:
  cidx = split.corpus_index()
  for name, ref in split.images.items():
    yield name, {"name": name, "image": _image_bytes(ref), "corpus_index": cidx.get(name, -1)}


def _features(config: str):
  tfds = require()
  f = tfds.features
  if config == "queries":
    return f.FeaturesDict({
        "index": f.Scalar(dtype=np.int64), "query_id": f.Text(), "reference": f.Text(),
        "text": f.Text(), "target": f.Text(), "relevant": f.Sequence(f.Text()),
        "subset": f.Sequence(f.Text()), "gallery": f.Sequence(f.Text()),
        "extra_json": f.Text()})
  return f.FeaturesDict({"name": f.Text(), "image": f.Image(shape=(None, None, 3)),
                         "corpus_index": f.Scalar(dtype=np.int64)})


# ----------------------------------------------------------------------------- builders

def _make_builder_class(dataset: str, register: bool = True):
  tfds = require()
  # tensorflow_datasets is heavy and optional (see require).
  from tensorflow_datasets.core import registered  # pylint: disable=g-import-not-at-top
  # Register under `cirjax_<dataset>` (so tfds.builder / tfds.data_source find it) unless a
  # class of that name is already registered (a module reload).
  skip = not register or BUILDERS[dataset] in registered.list_imported_builders()

  class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=skip):
    name = BUILDERS[dataset]
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "cirjax layout: queries + images configs."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="queries", description="one record per query"),
                       tfds.core.BuilderConfig(name="images", description="one record per image")]
    # No checksums file beside our code: TFDS's lookup of it would import
    # `importlib_resources` (not a TFDS dependency) for a package module.
    code_path = None
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Point manual_dir at the {dataset} root in its published layout (see docs/data.md).")

    def __init__(self, *, root: str | os.PathLike | None = None,
                 synth_config: Any = None, fashioniq_root: str | os.PathLike | None = None,
                 **kwargs):
      self._root = root
      self._synth_config = synth_config
      self._fashioniq_root = fashioniq_root
      super().__init__(**kwargs)

    def _info(self):
      return self.dataset_info_from_configs(
          features=_features(self.builder_config.name),
          description=f"cirjax {dataset} ({self.builder_config.name})",
          homepage="https://github.com/cirjax/cirjax")

    def _source_root(self, dl_manager) -> Path:
      if self._root is not None:
        return Path(self._root)
      if dataset == "synthetic":
        manual = getattr(dl_manager, "_manual_dir", None)
        if manual and synth.is_synthetic(manual):
          return Path(manual)
        out = Path(dl_manager.download_dir) / "cirjax_synthetic"
        if not synth.is_synthetic(out):
          synth.generate(out, self._synth_config or synth.SynthConfig(), progress=print)
        return out
      return Path(dl_manager.manual_dir)

    def _split_generators(self, dl_manager):
      root = self._source_root(dl_manager)
      return {s: self._generate_examples(root, s) for s in available_splits(dataset, root)}

    def _generate_examples(self, root, split):
      s = read_for_tfds(dataset, root, split, self._fashioniq_root)
      if self.builder_config.name == "queries":
        yield from query_records(s)
      else:
        yield from image_records(s)

  _Builder.__name__ = "".join(p.capitalize() for p in BUILDERS[dataset].split("_"))
  return _Builder


_CLASSES: dict[str, type] = {}


def builder_class(dataset: str) -> type:
  """The TFDS builder class of a dataset (created once)."""
  if dataset not in BUILDERS:
    raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(BUILDERS)}")
  if dataset not in _CLASSES:
    _CLASSES[dataset] = _make_builder_class(dataset)
  return _CLASSES[dataset]


def build(dataset: str, root: str | os.PathLike | None, data_dir: str | os.PathLike,
          synth_config: Any = None, fashioniq_root: str | os.PathLike | None = None) -> Path:
  """Builds both configs of a dataset into `data_dir`; returns the builder's directory.
  Concurrent builds of one dataset into one `data_dir` take turns (`cirjax.data.build_lock`):
  the second finds the first's output and reuses it."""
  tfds = require()
  out = None
  # A second build of this dataset into this data_dir (another run, another job) waits for
  # the first, then finds both configs prepared and reuses them.
  with build_lock.build_lock(Path(data_dir) / f".{BUILDERS[dataset]}.lock",
                             f"TFDS build of {BUILDERS[dataset]}", log=print):
    for cfg in ("queries", "images"):
      b = builder_class(dataset)(config=cfg, data_dir=str(data_dir), root=root,
                                 synth_config=synth_config, fashioniq_root=fashioniq_root,
                                 file_format="array_record")
      b.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=str(root) if root else None))
      out = Path(b.data_dir).parent.parent
  return out


# ----------------------------------------------------------------------------- reading back

class TfdsImageSource:
  """name -> PIL image, decoded with PIL from the bytes stored in the `images` ArrayRecords."""

  def __init__(self, source, names: list[str]):
    self._source = source
    self._pos = {n: i for i, n in enumerate(names)}

  def __call__(self, name: str):
    i = self._pos.get(name)
    if i is None:
      raise DataError(f"image {name!r} is not in the TFDS images split")
    data = self._source[i]["image"]  # the stored file bytes (SkipDecoding)
    try:
      with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")
    except OSError as e:
      raise DataError(f"cannot decode TFDS image {name!r}: {e}") from None


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def load_split(data_dir: str | os.PathLike, dataset: str, split: str
               ) -> tuple[CIRSplit, TfdsImageSource]:
  """A built split as (`CIRSplit`, image source) in the original query and corpus order."""
  b_q = builder_class(dataset)(config="queries", data_dir=str(data_dir))
  b_i = builder_class(dataset)(config="images", data_dir=str(data_dir))
  for b in (b_q, b_i):
    if not b.is_prepared():
      raise DataError(f"{b.name}/{b.builder_config.name} is not built in {data_dir}: run "
                      f"`cirjax data tfds --dataset {dataset} --root ROOT --data-dir {data_dir}`")
  if split not in b_q.info.splits:
    raise DataError(f"{b_q.name}: no split {split!r} (have {sorted(b_q.info.splits)})")
  qsrc = b_q.as_data_source(split=split)
  qrecs = sorted((qsrc[i] for i in range(len(qsrc))), key=lambda r: int(r["index"]))
  # Names and corpus positions without decoding any pixels (SkipDecoding keeps the bytes).
  meta_src = b_i.as_data_source(split=split, decoders={"image": require().decode.SkipDecoding()})
  meta = [(_text(r["name"]), int(r["corpus_index"])) for r in (meta_src[i]
                                                                for i in range(len(meta_src)))]
  names = [m[0] for m in meta]
  corpus = [n for p, n in sorted((p, n) for n, p in meta if p >= 0)]
  if [p for p, _ in sorted((p, n) for n, p in meta if p >= 0)] != list(range(len(corpus))):
    raise DataError(f"{b_i.name}/{split}: corpus positions are not 0..{len(corpus) - 1}; "
                    "the build is corrupt, rebuild it")
  where = str(Path(data_dir) / b_i.name)
  image_refs = {n: ImageRef(Path(f"{where}#{n}")) for n in names}
  queries = []
  for r in qrecs:
    queries.append(Query(
        query_id=_text(r["query_id"]), reference=_text(r["reference"]), text=_text(r["text"]),
        target=_text(r["target"]) or None, relevant=tuple(_text(x) for x in r["relevant"]),
        subset=tuple(_text(x) for x in r["subset"]), gallery=tuple(_text(x) for x in r["gallery"]),
        extra=json.loads(_text(r["extra_json"]))))
  ds_name = dataset
  sp = split.replace("_", ".", 1) if dataset == "fashioniq" else split
  s = CIRSplit(ds_name, sp, queries, corpus, image_refs)
  return records.validate_split(s), TfdsImageSource(meta_src, names)


def split_files(data_dir: str, dataset: str, config: str, split: str) -> list[str]:
  """The ArrayRecord files of one split of a `cirjax data tfds` build (DataError if the
  build or the split is missing)."""
  b = builder_class(dataset)(config=config, data_dir=str(data_dir))
  if not b.is_prepared():
    raise DataError(f"{b.name}/{config} is not built in {data_dir}: run "
                    f"`cirjax data tfds --dataset {dataset} --root ROOT --data-dir {data_dir}`")
  if split not in b.info.splits:
    raise DataError(f"{b.name}/{config} in {data_dir}: no split {split!r} "
                    f"(have {sorted(b.info.splits)})")
  return [str(p) for p in b.info.splits[split].filepaths]


def image_source_for(data_dir: str | Path, dataset: str, splits: Sequence[str]):
  """(CIRSplit per split, one image source over all of them) of a TFDS build; each split's
  image references name its `images` ArrayRecord file (`FILE#name`), so the stores' image
  identities change when the build does."""
  out, sources = [], {}
  for split in splits:
    s, source = load_split(data_dir, dataset, split)
    files = split_files(str(data_dir), dataset, "images", split)
    s.images.update({n: ImageRef(Path(f"{files[0]}#{n}")) for n in s.images})
    for n in s.images:
      sources.setdefault(n, source)
    out.append(s)

  def load(name: str):
    src = sources.get(name)
    if src is None:
      raise DataError(f"image {name!r} is in no split of the TFDS build in {data_dir}")
    return src(name)
  return out, load


def register_all() -> None:
  """Creates (and registers with TFDS) every builder class; done on import when installed."""
  for d in BUILDERS:
    builder_class(d)


if installed():
  register_all()
