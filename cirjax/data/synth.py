"""A synthetic CIR benchmark with known false negatives, written in the CIRR layout.

Every image shows one object described by six attributes (shape, colour, size, position,
pattern, background), rendered with small random jitter (exact position, size, rotation,
tint). A corpus holds several images of many attribute combinations, so for every query
(reference image + a text changing one or two attributes) the *relevant set* — all corpus
images whose attributes equal the modified reference's — is known by construction: one of
them is annotated as the target (as CIRR annotates one), the rest are true false negatives.

On disk (ROOT):
```
captions/cap.rc2.{train,val,test1}.json   CIRR entries (test1 without targets, as CIRR)
image_splits/split.rc2.{split}.json      name -> "./images/{split}/{name}.png"
images/{split}/{name}.png
annotations/{split}.json                 CIRCO layout: gt_img_ids = the full relevant set
                                         (integer ids: see attributes file), id = pairid
attributes/{split}.json                  {"image_ids": {name: id}, "attributes": {name: {...}}}
vocab.txt                                BERT WordPiece vocab covering every word used
meta.json                                generator version, seed, sizes, attribute values
```
Everything is a deterministic function of the seed and the size flags.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from cirjax.data import cirr, records
from cirjax.data.circo import parse_annotations
from cirjax.data.records import CIRSplit, DataError
from cirjax.data.text import SPECIAL_TOKENS
from cirjax.errors import UsageError

VERSION = 1
SPLITS = ("train", "val", "test1")

ATTRIBUTES = {
    "shape": ("circle", "square", "triangle", "star", "diamond"),
    "colour": ("red", "green", "blue", "yellow", "purple", "orange"),
    "size": ("small", "large"),
    "position": ("left", "center", "right"),
    "pattern": ("solid", "striped", "dotted"),
    "background": ("black", "gray", "white"),
}
ATTR_NAMES = tuple(ATTRIBUTES)

_RGB = {"red": (220, 40, 40), "green": (40, 175, 60), "blue": (45, 85, 225),
        "yellow": (235, 215, 40), "purple": (150, 60, 190), "orange": (245, 140, 30)}
_BG = {"black": (20, 20, 20), "gray": (128, 128, 128), "white": (235, 235, 235)}
_X = {"left": 0.25, "center": 0.5, "right": 0.75}
_RADIUS = {"small": 0.13, "large": 0.22}

# Phrasings per attribute; {new}/{old} are attribute values.
_PHRASES = {
    "shape": ["change the {old} to a {new}", "make it a {new}", "replace the {old} with a {new}",
              "a {new} instead of a {old}", "turn the {old} into a {new}"],
    "colour": ["make it {new}", "change the colour to {new}", "turn it {new}", "paint it {new}",
               "{new} instead of {old}", "change the color from {old} to {new}"],
    "size": {"large": ["make it larger", "make it bigger", "enlarge it", "a bigger one"],
             "small": ["make it smaller", "shrink it", "a smaller one", "reduce its size"]},
    "position": {"left": ["move it to the left", "put it on the left", "shift it left"],
                 "right": ["move it to the right", "put it on the right", "shift it right"],
                 "center": ["move it to the center", "center it", "put it in the middle"]},
    "pattern": {"solid": ["remove the pattern", "make it plain", "make it solid"],
                "striped": ["add stripes", "make it striped", "give it stripes"],
                "dotted": ["add dots", "make it dotted", "give it polka dots"]},
    "background": ["on a {new} background", "change the background to {new}",
                   "make the background {new}", "{new} background instead of {old}"],
}
_JOINERS = [" and ", ", ", " and also ", ", then "]
_PREFIXES = ["", "", "", "same but ", "please "]


@dataclasses.dataclass(frozen=True)
class SynthConfig:
  """Sizes of the generated benchmark (per split: images in the corpus, queries)."""
  seed: int = 0
  resolution: int = 64
  num_images: tuple[int, int, int] = (1500, 1000, 500)      # train, val, test1 corpora
  num_queries: tuple[int, int, int] = (4000, 1000, 500)     # train triplets, val, test1 queries
  max_duplicates: int = 6   # images per attribute combination: uniform min..max_duplicates
  # More images per combination, more false negatives in every pool (the QuRe study's
  # density axis); 1 draws exactly what the generator drew before the knob existed.
  min_duplicates: int = 1
  two_change_prob: float = 0.4
  set_size: int = 6         # CIRR img_set members (reference + target + 4 others)


class SynthConfigError(UsageError, ValueError):
  """Sizes the generator cannot meet (a bad argument or config value: exit status 2)."""


def config_key(field: str, split: int | None = None) -> str:
  """How `SynthConfig`'s field is named in errors by default (the dataclass's own names)."""
  return field if split is None else f"{field}[{split}]"


def all_combos() -> list[tuple[int, ...]]:
  return list(itertools.product(*[range(len(v)) for v in ATTRIBUTES.values()]))


def combo_attrs(combo: tuple[int, ...]) -> dict[str, str]:
  return {a: ATTRIBUTES[a][i] for a, i in zip(ATTR_NAMES, combo)}


def _words(s: str) -> list[str]:
  """BERT basic tokenization (lower case, punctuation split) of our ASCII texts."""
  return re.findall(r"[a-z0-9]+|[^a-z0-9\s]", s.lower())


def vocabulary() -> list[str]:
  """Every word any generated text can contain, plus BERT's special tokens."""
  words = set()
  for a, ph in _PHRASES.items():
    templates = ph if isinstance(ph, list) else [t for v in ph.values() for t in v]
    for t in templates:
      for old, new in itertools.product(ATTRIBUTES[a], repeat=2):
        words.update(_words(t.format(old=old, new=new)))
  for j in _JOINERS + _PREFIXES:
    words.update(_words(j))
  words.update(_words("."))
  return list(SPECIAL_TOKENS) + sorted(words)


def modification_text(rng: np.random.Generator, ref: tuple[int, ...], tgt: tuple[int, ...]) -> str:
  """A varied phrasing of the attribute changes from `ref` to `tgt`."""
  parts = []
  changed = [i for i in range(len(ATTR_NAMES)) if ref[i] != tgt[i]]
  rng.shuffle(changed)
  for i in changed:
    a = ATTR_NAMES[i]
    old, new = ATTRIBUTES[a][ref[i]], ATTRIBUTES[a][tgt[i]]
    ph = _PHRASES[a]
    templates = ph if isinstance(ph, list) else ph[new]
    parts.append(templates[rng.integers(len(templates))].format(old=old, new=new))
  text = parts[0]
  for p in parts[1:]:
    text += _JOINERS[rng.integers(len(_JOINERS))] + p
  return _PREFIXES[rng.integers(len(_PREFIXES))] + text


# ----------------------------------------------------------------------------- rendering

def sample_jitter(rng: np.random.Generator) -> dict[str, float]:
  return {"dx": float(rng.uniform(-0.03, 0.03)), "dy": float(rng.uniform(-0.06, 0.06)),
          "scale": float(rng.uniform(0.9, 1.1)), "rot": float(rng.uniform(-8, 8)),
          "tint": [int(v) for v in rng.integers(-15, 16, 3)],
          "bg_tint": int(rng.integers(-6, 7))}


def _polygon(shape: str, cx: float, cy: float, r: float, rot_deg: float) -> list[tuple[float, float]]:
  if shape == "square":
    n, r0, phase = 4, r * math.sqrt(2) * 0.85, 45.0
    pts = [(r0, phase + 90 * k) for k in range(n)]
  elif shape == "diamond":
    pts = [(r * 1.1, 90 * k) for k in range(4)]
    pts = [(rad if k % 2 else rad * 0.65, ang) for k, (rad, ang) in enumerate(pts)]
  elif shape == "triangle":
    pts = [(r * 1.1, -90 + 120 * k) for k in range(3)]
  elif shape == "star":
    pts = [(r * (1.15 if k % 2 == 0 else 0.5), -90 + 36 * k) for k in range(10)]
  else:
    raise ValueError(shape)
  return [(cx + rad * math.cos(math.radians(a + rot_deg)),
           cy + rad * math.sin(math.radians(a + rot_deg))) for rad, a in pts]


def render(attrs: dict[str, str], jitter: dict, resolution: int = 64) -> Image.Image:
  """Draws one object (2x supersampled, then downsampled for smooth edges)."""
  s = resolution * 2
  bg = tuple(int(np.clip(c + jitter["bg_tint"], 0, 255)) for c in _BG[attrs["background"]])
  fg = np.clip(np.array(_RGB[attrs["colour"]]) + np.array(jitter["tint"]), 0, 255)
  cx = (_X[attrs["position"]] + jitter["dx"]) * s
  cy = (0.5 + jitter["dy"]) * s
  r = _RADIUS[attrs["size"]] * jitter["scale"] * s
  mask = Image.new("L", (s, s), 0)
  d = ImageDraw.Draw(mask)
  if attrs["shape"] == "circle":
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
  else:
    d.polygon(_polygon(attrs["shape"], cx, cy, r, jitter["rot"]), fill=255)
  yy, xx = np.mgrid[0:s, 0:s]
  period = max(4, s // 10)
  if attrs["pattern"] == "striped":
    on = ((yy // (period // 2)) % 2) == 0
  elif attrs["pattern"] == "dotted":
    on = ((yy % period - period / 2) ** 2 + (xx % period - period / 2) ** 2) > (period * 0.22) ** 2
  else:
    on = np.ones((s, s), bool)
  dark = (fg * 0.3).astype(np.uint8)
  layer = np.where(on[..., None], fg.astype(np.uint8), dark)
  img = np.empty((s, s, 3), np.uint8)
  img[:] = bg
  m = np.asarray(mask) > 127
  img[m] = layer[m]
  return Image.fromarray(img).resize((resolution, resolution), Image.LANCZOS)


# ----------------------------------------------------------------------------- generation

@dataclasses.dataclass
class _Split:
  names: list[str]
  combos: list[tuple[int, ...]]
  jitters: list[dict]
  queries: list[dict]


def _make_corpus(rng: np.random.Generator, split: str, n_images: int, max_dup: int,
                 min_dup: int = 1, key: Callable[..., str] = config_key, si: int = 0):
  if not 1 <= min_dup <= max_dup:
    raise SynthConfigError(f"{key('min_duplicates')}={min_dup} must lie in 1.."
                           f"{key('max_duplicates')}={max_dup}")
  combos = all_combos()
  order = rng.permutation(len(combos))
  img_combos: list[tuple[int, ...]] = []
  for ci in order:
    if len(img_combos) >= n_images:
      break
    m = int(rng.integers(min_dup, max_dup + 1))
    img_combos.extend([combos[ci]] * m)
  if len(img_combos) < n_images:
    raise SynthConfigError(
        f"{key('num_images', si)}={n_images}: more {split} images than the {len(combos)} "
        f"attribute combinations give at {key('min_duplicates')}={min_dup}.."
        f"{key('max_duplicates')}={max_dup} images each ({len(img_combos)} drawn); raise "
        f"{key('max_duplicates')} or lower {key('num_images', si)}")
  img_combos = img_combos[:n_images]
  perm = rng.permutation(n_images)  # interleave so duplicates are not adjacent in the corpus
  img_combos = [img_combos[i] for i in perm]
  names = [f"{split}-{i:05d}" for i in range(n_images)]
  jitters = [sample_jitter(rng) for _ in range(n_images)]
  return names, img_combos, jitters


def _make_queries(rng: np.random.Generator, cfg: SynthConfig, names, img_combos, n_queries: int,
                  pairid_start: int, key: Callable[..., str] = config_key,
                  si: int = 0) -> list[dict]:
  by_combo: dict[tuple[int, ...], list[int]] = {}
  for i, c in enumerate(img_combos):
    by_combo.setdefault(c, []).append(i)
  present = list(by_combo)
  present_arr = np.array(present)
  combos_arr = np.array(img_combos)
  all_idx = np.arange(len(names))
  queries = []
  attempts = 0
  while len(queries) < n_queries:
    attempts += 1
    if attempts > 50 * n_queries:
      raise SynthConfigError(
          f"{key('num_queries', si)}={n_queries}: cannot find that many modifiable references "
          f"in the {SPLITS[si]} corpus of {len(names)} images; lower it or raise "
          f"{key('num_images', si)}")
    ref = int(rng.integers(len(names)))
    rc = np.array(img_combos[ref])
    n_change = 2 if rng.random() < cfg.two_change_prob else 1
    dist = (present_arr != rc).sum(axis=1)
    cands = np.flatnonzero(dist == n_change)
    if cands.size == 0:
      continue
    tc = present[int(cands[rng.integers(cands.size)])]
    relevant = list(by_combo[tc])
    target = relevant[int(rng.integers(len(relevant)))]
    # img_set: reference + target + near misses (never relevant) of the target.
    d_t = (combos_arr != np.array(tc)).sum(axis=1)
    not_ref = all_idx != ref
    near = np.flatnonzero((d_t == 1) & not_ref)
    k = cfg.set_size - 2
    pick = rng.choice(near, min(k, near.size), replace=False) if near.size else np.zeros(0, int)
    if pick.size < k:
      rest = np.flatnonzero((d_t > 0) & not_ref & ~np.isin(all_idx, pick))
      pick = np.concatenate([pick, rng.choice(rest, k - pick.size, replace=False)])
    members = [ref, target] + [int(i) for i in pick]
    members = [members[i] for i in rng.permutation(len(members))]
    rel_sorted = [target] + sorted(i for i in relevant if i != target)
    queries.append({"pairid": pairid_start + len(queries), "reference": ref, "target": target,
                    "relevant": rel_sorted, "members": members,
                    "caption": modification_text(rng, tuple(rc), tc),
                    "modification": {ATTR_NAMES[i]: ATTRIBUTES[ATTR_NAMES[i]][tc[i]]
                                     for i in range(len(tc)) if tc[i] != rc[i]}})
  return queries


def generate(out: str | os.PathLike, cfg: SynthConfig = SynthConfig(),
             progress: Callable[[str], None] | None = print,
             key: Callable[..., str] = config_key) -> dict:
  """Writes the benchmark under `out`; returns a summary (sizes, mean relevant-set size).
  `key(field[, split index])` names a setting in a `SynthConfigError` (see `plan`)."""
  out = Path(out)
  log = progress or (lambda s: None)
  vocab = vocabulary()
  vocab_set = set(vocab)
  summary = {"root": str(out), "seed": cfg.seed, "resolution": cfg.resolution, "splits": {}}
  # Every split is drawn before anything is written: sizes the generator cannot meet are an
  # error that leaves `out` as it was.
  for split, (names, img_combos, jitters, queries) in zip(SPLITS, plan(cfg, key)):
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    n = len(names)
    step = max(1, n // 10)
    for i, (name, c, j) in enumerate(zip(names, img_combos, jitters)):
      render(combo_attrs(c), j, cfg.resolution).save(img_dir / f"{name}.png", optimize=False)
      if (i + 1) % step == 0 or i + 1 == n:
        log(f"[synth] {split}: rendered {i + 1}/{n} images")
    split_map = {nm: f"./images/{split}/{nm}.png" for nm in names}
    caps, ann = [], []
    for q in queries:
      for w in _words(q["caption"]):
        if w not in vocab_set:  # a generator bug, never a user error
          raise AssertionError(f"word {w!r} of {q['caption']!r} missing from the vocabulary")
      members = q["members"]
      e = {"pairid": q["pairid"], "reference": names[q["reference"]], "caption": q["caption"],
           "img_set": {"id": q["pairid"], "members": [names[m] for m in members],
                       "reference_rank": members.index(q["reference"])}}
      if split != "test1":
        e["target_hard"] = names[q["target"]]
        e["target_soft"] = {names[q["target"]]: 1.0}
        e["img_set"]["target_rank"] = members.index(q["target"])
      caps.append(e)
      ann.append({"id": q["pairid"], "reference_img_id": q["reference"],
                  "target_img_id": q["target"], "relative_caption": q["caption"],
                  "shared_concept": "", "gt_img_ids": q["relevant"],
                  "modification": q["modification"]})
    _write(out / "captions" / f"cap.rc2.{split}.json", caps)
    _write(out / "image_splits" / f"split.rc2.{split}.json", split_map)
    _write(out / "annotations" / f"{split}.json", ann)
    _write(out / "attributes" / f"{split}.json", {
        "image_ids": {nm: i for i, nm in enumerate(names)},
        "attributes": {nm: combo_attrs(c) for nm, c in zip(names, img_combos)},
        "jitter": {nm: j for nm, j in zip(names, jitters)}})
    rel = np.array([len(q["relevant"]) for q in queries])
    summary["splits"][split] = {"images": n, "queries": len(queries),
                                "combinations": len(set(img_combos)),
                                "mean_relevant": float(rel.mean()),
                                "min_relevant": int(rel.min()), "max_relevant": int(rel.max())}
    log(f"[synth] {split}: {n} images, {len(queries)} queries, "
        f"{rel.mean():.2f} relevant images per query on average")
  (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
  meta = {"generator": "cirjax.data.synth", "version": VERSION,
          **dataclasses.asdict(cfg), "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
          "summary": summary["splits"]}
  _write(out / "meta.json", meta)
  return summary


def plan(cfg: SynthConfig, key: Callable[..., str] = config_key) -> list[tuple]:
  """Each split's draw, `(names, combos, jitters, queries)`, without rendering or writing:
  a `SynthConfigError` naming the setting (`key(field[, split index])`) when the sizes cannot
  be met. `generate` draws through it; callers check a config with it before generating."""
  out, pairid = [], 0
  for si, split in enumerate(SPLITS):
    rng = np.random.default_rng([cfg.seed, si])
    names, img_combos, jitters = _make_corpus(rng, split, cfg.num_images[si], cfg.max_duplicates,
                                              cfg.min_duplicates, key, si)
    queries = _make_queries(rng, cfg, names, img_combos, cfg.num_queries[si], pairid, key, si)
    pairid += len(queries)
    out.append((names, img_combos, jitters, queries))
  return out


def _write(path: Path, obj) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=None, separators=(",", ":"))


# ----------------------------------------------------------------------------- reading

def is_synthetic(root: str | os.PathLike) -> bool:
  meta = Path(root) / "meta.json"
  if not meta.is_file():
    return False
  try:
    return json.loads(meta.read_text()).get("generator") == "cirjax.data.synth"
  except (OSError, json.JSONDecodeError):
    return False


def read_synthetic(root: str | os.PathLike, split: str = "val", on_missing: str = "error",
                   check_images: bool = True) -> CIRSplit:
  """The CIRR-layout split, with every query's full relevant set from `annotations/`.

  test1 captions carry no target (CIRR layout); the relevant sets still come from the
  annotations file, so all splits can be scored locally.
  """
  root = Path(root)
  s = cirr.read_cirr(root, split, on_missing="error", check_images=False)
  path = root / "annotations" / f"{split}.json"
  entries = records.expect_list(records.load_json(path, "synthetic relevant sets"), path,
                                "synthetic relevant sets")
  attrs = records.load_json(root / "attributes" / f"{split}.json", "synthetic attributes")
  id_to_name = {int(i): n for n, i in attrs["image_ids"].items()}
  by_id = {}
  for q in parse_annotations(entries, path, has_gt=True):
    by_id[q.query_id] = q
  queries = []
  for q in s.queries:
    a = by_id.get(q.query_id)
    if a is None:
      raise DataError(f"{path}: no relevant set for pairid {q.query_id}")
    try:
      rel = tuple(id_to_name[int(i)] for i in a.relevant)
    except KeyError as e:
      raise DataError(f"{path} id {q.query_id}: unknown image id {e}") from None
    if q.target is not None and rel[0] != q.target:
      raise DataError(f"{path} id {q.query_id}: relevant set starts with {rel[0]!r}, but "
                      f"target_hard is {q.target!r}")
    if split == "test1":
      q = dataclasses.replace(q, target=rel[0])
    queries.append(dataclasses.replace(q, relevant=rel))
  out = records.validate_split(dataclasses.replace(s, dataset="synthetic", queries=queries))
  if check_images:
    out = records.check_images_exist(out, on_missing)
  return out


def recompute_relevant(root: str | os.PathLike, split: str, reference: str,
                       modification: dict[str, str]) -> list[str]:
  """From the attributes file alone: every image of `split` whose attributes equal the
  reference's with `modification` applied (what the relevant set must be)."""
  attrs = json.loads((Path(root) / "attributes" / f"{split}.json").read_text())["attributes"]
  want = dict(attrs[reference], **modification)
  return sorted(n for n, a in attrs.items() if a == want)
