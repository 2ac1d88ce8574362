"""A loaded model: one type for both families, with the same verbs.

`cirjax.load(path)` (the one loader, `cirjax.train.workdir.load_model`) returns a `Model`
whatever the family (BLIP-2 for QuRe, LLaVA-Phi for InstructCIR) and whatever the source (a
training workdir, a cirjax / HF directory, a LAVIS file, a hub id):

    model.image(pixels)            target features, [B, Q, D] (BLIP-2) or [B, D] (LLaVA)
    model.text(texts)              text features [B, D]
    model.query(pixels, texts)     composed queries (reference image + modification) [B, D]
    model.score(queries, targets)  [Bq, Bt]: max over a target's tokens of the dot product
    model.pixels(images)           PIL images or paths -> the model's preprocessed pixels

Every feature is L2-normalised. The verbs are thin wrappers over the family's pure functions
(`registry.Family.image` / `query` / `text`, i.e. `cirjax.models.blip2`, `llava.embed`), the
same ones `retrieval_fns` hands the data-parallel encode loop: what the verbs compute is what
`cirjax eval` scores. A prompted family (LLaVA) embeds text inside InstructCIR's zero-shot
prompts (appendix D.2; CIRR's wording unless a split names another dataset) and embeds a
caption with stage 1's caption prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cirjax import prompts
from cirjax.convert import registry
from cirjax.data import images, text as text_lib
from cirjax.data.tokenizer import load_tokenizer
from cirjax.errors import UsageError
from cirjax.models import blip2

DEFAULT_IMAGE_SIZE = 224


@dataclasses.dataclass(frozen=True, eq=False)  # equal only to itself: params are arrays
class Model:
  """A loaded model: family ('blip2' | 'llava'), config, params on device, its tokenizer (or
  None where none was found beside it) and where it came from."""
  family: str
  config: Any
  params: Any
  tokenizer: Any = None
  source: str = ""

  @property
  def image_size(self) -> int:
    """The input resolution its config states (else 224)."""
    return model_image_size(self)

  def transform(self, name: str | None = None, size: int | None = None) -> images.Transform:
    """The image preprocessing: the family's (`Family.image_transform`) at its resolution
    unless `name` / `size` say otherwise."""
    return images.make_transform(name or registry.family(self.family).image_transform,
                                 size or self.image_size)

  def pixels(self, imgs: Sequence[Any]) -> np.ndarray:
    """[B, H, W, 3] float32 pixels of PIL images or image files, preprocessed as the model
    expects."""
    tf = self.transform()
    return np.stack([tf(images.open_rgb(x) if isinstance(x, (str, os.PathLike)) else x)
                     for x in imgs])

  def image(self, pixels) -> jax.Array:
    px = self._checked(pixels)
    ids, mask = image_prompt(self, None, px.shape[0])
    return _jit(registry.family(self.family).image)(self.params, self.config, px, ids, mask)

  def query(self, pixels, texts: Sequence[str]) -> jax.Array:
    px = self._checked(pixels)
    ids, mask = query_tokenizer(self)(list(texts))
    return _jit(registry.family(self.family).query)(self.params, self.config, px, ids, mask)

  def text(self, texts: Sequence[str]) -> jax.Array:
    ids, mask = _text_tokenizer(self, prompts.STAGE1_CAPTION, "caption")(list(texts))
    return _jit(registry.family(self.family).text)(self.params, self.config, ids, mask)

  def score(self, queries, targets) -> jax.Array:
    """[Bq, Bt] scores of queries [Bq, D] against targets [Bt, Q, D] or [Bt, D]."""
    t = jnp.asarray(targets)
    return blip2.score(queries, t if t.ndim == 3 else t[:, None])

  def _checked(self, pixels) -> jax.Array:
    px = jnp.asarray(pixels)
    n = self.image_size
    if px.ndim != 4 or px.shape[1:] != (n, n, 3) or not jnp.issubdtype(px.dtype, jnp.floating):
      raise ValueError(f"pixels must be float [B, {n}, {n}, 3] (NHWC, preprocessed: "
                       f"model.pixels(images)), got {px.dtype} {tuple(px.shape)}")
    return px

  def __repr__(self):
    summary = getattr(self.config, "summary", None)
    what = summary() if callable(summary) else type(self.config).__name__
    return f"Model({self.family} from {self.source or 'random init'}: {what})"


def make_model(family: str, config: Any, params: Any, tokenizer: Any = None, source: str = "",
               **overrides) -> Model:
  """A `Model` from host or device params: `overrides` (e.g. `dtype`, `vision_dtype`,
  `param_dtype`) replace dtype fields of the config, then the family's `device_params`
  places the arrays it computes with."""
  fam = registry.family(family)
  given = {k: jnp.dtype(v).name for k, v in overrides.items() if v is not None}
  config = config.replace(**given) if given else config
  return Model(fam.name, config, fam.device_params(params, config), tokenizer, str(source))


def from_loaded(loaded: registry.Loaded, **overrides) -> Model:
  """The `Model` of a `registry.load` result, with the tokenizer found beside it."""
  d = Path(loaded.source)
  return make_model(loaded.family, loaded.config, loaded.params,
                    load_tokenizer(d if d.is_dir() else d.parent, loaded.family,
                                   required=False),
                    loaded.source, **overrides)


def model_image_size(model: Any, default: int = DEFAULT_IMAGE_SIZE) -> int:
  """The model's input resolution from its config, if it states one."""
  cfg = getattr(model, "config", None)
  for path in (("vision", "image_size"), ("vision_config", "image_size"), ("image_size",)):
    obj = cfg
    for key in path:
      if obj is None:
        break
      obj = obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)
    if isinstance(obj, int) and obj > 0:
      return obj
  return default


# ------------------------------------------------------------------ the encode loop's view


class RetrievalFns(NamedTuple):
  """What evaluation and search run: pure functions of explicit params, which the encode
  loop jits once (params replicated and passed as an argument, never baked in)."""
  params: Any
  image: Callable    # (params, pixels) -> [B, Q, D] or [B, D], L2-normalised
  compose: Callable  # (params, pixels, input_ids, attention_mask) -> [B, D], L2-normalised


# The InstructCIR prompt set each dataset is scored with (the synthetic set is CIRR-shaped).
_PROMPT_DATASET = {"synthetic": "cirr", "cirr": "cirr", "circo": "circo",
                   "fashioniq": "fashioniq", "genecis": "genecis"}


def retrieval_fns(model: Model, split: Any = None, *, max_length: int = 32,
                  pad_to_multiple_of: int = 16
                  ) -> tuple[RetrievalFns, Callable, Callable | None]:
  """(RetrievalFns, tokenize_fn, text_fn) scoring `split` (None: no dataset, CIRR's prompts)
  with `model` through its family's functions; `model.tokenizer` tokenises.

  Unprompted (BLIP-2): the query text (text_fn None: `loader.default_text`) BERT-tokenised
  to `max_length`. Prompted (LLaVA-Phi): the targets are embedded with the dataset's "image"
  prompt (FashionIQ's names the category), the queries with its "query" prompt filled with
  the modification text (GeneCIS: the task's prompt filled with the condition), each the
  final hidden state of the left-padded prompt's last (EOS) token (InstructCIR appendix
  D.2); query prompts are padded to a multiple of `pad_to_multiple_of` tokens (few compiled
  shapes).
  """
  fam, cfg = registry.family(model.family), model.config
  tokenize = query_tokenizer(model, split, max_length=max_length,
                             pad_to_multiple_of=pad_to_multiple_of)
  ids0, mask0 = image_prompt(model, split)

  def image_fn(params, pixels):
    b = pixels.shape[0]
    ids = mask = None
    if ids0 is not None:
      ids = jnp.broadcast_to(ids0, (b, ids0.shape[1]))
      mask = jnp.broadcast_to(mask0, (b, mask0.shape[1]))
    return fam.image(params, cfg, pixels, ids, mask)

  def compose_fn(params, pixels, ids, mask):
    return fam.query(params, cfg, pixels, ids, mask)

  text_fn = (lambda q: q.text) if fam.prompted else None
  return RetrievalFns(model.params, image_fn, compose_fn), tokenize, text_fn


def _prompt_set(split: Any) -> tuple[str, dict, str, str]:
  """(dataset whose prompts apply, fixed template fields, query template kind, the field
  the query text fills) for a split (None: CIRR's)."""
  name = getattr(split, "dataset", None) or "cirr"
  ds = _PROMPT_DATASET.get(name)
  if ds is None:
    raise UsageError(f"no InstructCIR prompts for {name!r}: a LLaVA-Phi model is evaluated on "
                     f"{', '.join(sorted(_PROMPT_DATASET))}")
  fields: dict[str, str] = {}
  if ds == "fashioniq":
    fields["category"] = prompts.FASHIONIQ_CATEGORY_WORDS[split.split.split(".")[0]]
  if ds == "genecis":
    return ds, fields, split.split, ("attribute" if split.split.endswith("attribute")
                                     else "object")
  return ds, fields, "query", "modifier"


def image_prompt(model: Model, split: Any = None, batch: int | None = None):
  """(input_ids, attention_mask) of the target-image prompt of a prompted family ([1, L],
  or [batch, L]), unpadded; (None, None) for an unprompted one."""
  if not registry.family(model.family).prompted:
    return None, None
  ds, fields, _, _ = _prompt_set(split)
  ids, mask = _text_tokenizer(model, prompts.inference_template(ds, "image"), None, fields,
                              image=True, pad_to_multiple_of=None)([""])
  if batch is not None:
    ids, mask = np.repeat(ids, batch, 0), np.repeat(mask, batch, 0)
  return ids, mask


def query_tokenizer(model: Model, split: Any = None, *, max_length: int = 32,
                    pad_to_multiple_of: int = 16) -> Callable:
  """texts -> (input_ids, attention_mask) of composed queries, as `model` reads them."""
  ds, fields, kind, field = _prompt_set(split) if registry.family(
      model.family).prompted else ("cirr", {}, "query", "modifier")
  return _text_tokenizer(model, prompts.inference_template(ds, kind), field, fields,
                         image=True, pad_to_multiple_of=pad_to_multiple_of,
                         max_length=max_length)


@functools.cache
def _jit(fn: Callable) -> Callable:
  """One jitted wrapper per family function (static config): the verbs compile once per
  (config, shapes)."""
  return jax.jit(fn, static_argnums=1)


def _text_tokenizer(model: Model, template: str, field: str | None, fields=None, *,
                    image: bool = False, pad_to_multiple_of: int | None = 16,
                    max_length: int = text_lib.BLIP2_MAX_LENGTH) -> Callable:
  """texts -> (input_ids, attention_mask) as the model reads text: inside `template` (its
  `field` filled with each text) for a prompted family, else the text itself, BERT-tokenised
  to `max_length`."""
  prompted = registry.family(model.family).prompted
  if model.tokenizer is None:
    raise FileNotFoundError(
        f"{model.source}: no tokenizer (tokenizer.json / tokenizer_config.json"
        f"{'' if prompted else ' / vocab.txt'}) beside the model"
        f"{'; the InstructCIR prompts need it' if prompted else ''}; copy it next to the "
        "weights" + ("" if prompted else " or pass --tokenizer PATH"))
  if not prompted:
    return lambda texts: text_lib.tokenize(model.tokenizer, texts, max_length)
  cfg = model.config
  n_img = prompts.num_image_tokens(cfg.vision.image_size, cfg.vision.patch_size,
                                   cfg.vision_feature_select_strategy)

  def tokenize(texts):
    rows = [dict(fields or {}, **({field: t} if field else {})) for t in texts]
    enc = prompts.encode(model.tokenizer, template, rows, num_image_tokens=n_img, image=image,
                         pad_to_multiple_of=pad_to_multiple_of)
    return enc["input_ids"], enc["attention_mask"]

  return tokenize
