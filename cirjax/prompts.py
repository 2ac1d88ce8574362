"""InstructCIR prompt templates (as data) and their tokenisation for the LLaVA-Phi embedder.

Templates come from the InstructCIR paper (§2.3 and appendix D, table 9 and the zero-shot
inference templates). In each, `<image>` marks where the image goes and `{modifier}`,
`{caption}`, `{category}`, `{attribute}`, `{object}` are filled in. The paper writes
`<Image> text`; we render the image placeholder followed by a newline, the LLaVA convention
(`<image>\\n...`) that LLaVA-Phi checkpoints were instruction-tuned with.

Rendering a prompt (`render`): fill the template, wrap it as one user turn with the
tokenizer's chat template (when it has one; Phi-3's gives `<|user|>\\n...<|end|>\\n
<|assistant|>\\n`), then append the EOS token whose final hidden state InstructCIR takes as
the embedding. Encoding (`batch_encode`): tokenise, expand each `<image>` token into the
number of features the vision tower yields (256 at 224 px, 576 at 336 px, patch 14,
CLS dropped), and left-pad, so the last position of every row is its EOS token.

Tokenizers load from the checkpoint directory (`tokenizer.json` / `tokenizer_config.json`,
see `cirjax.data.tokenizer.load_tokenizer`).
"""

from __future__ import annotations

import random
import string
from typing import Any, Mapping, Sequence

import numpy as np

from cirjax.errors import CirjaxError

IMAGE = "<image>"

# Stage 1 (§2.3): image-caption contrastive learning, "Summarize the image (caption) in one
# word:".
STAGE1_IMAGE = "<image>\nSummarize the image in one word:"
STAGE1_CAPTION = "{caption}\nSummarize the caption in one word:"

# Stage 2 (appendix D.1, table 9): one template per example is sampled from each set.
STAGE2_IMAGE_TEMPLATES = (
    "<image>\nThe image is conditioned on the following prompt: {modifier}, summarize the image "
    "and the prompt to retrieve a description of the image changed by the condition:",
    "<image>\nGiven the image conditioned by the prompt: {modifier}, condense the essence of the "
    "image and the prompt into a single word to fetch a description of the altered image:",
    "<image>\nUsing the prompt to condition the image: {modifier}, provide one word that "
    "encapsulates the overall concept of the conditioned image to retrieve its description:",
    "<image>\nBased on the image influenced by this prompt: {modifier}, distill the description "
    "of the conditioned image and the prompt into one word to access the altered description:",
    "<image>\nWith the image modified according to the prompt: {modifier}, summarize both the "
    "image and the prompt to obtain a description of the conditioned image:",
    "<image>\nCondition the image with this condition: {modifier}. Summarize the result:",
    "<image>\nUsing this prompt: {modifier}, describe the conditioned image:",
    "<image>\nApply the prompt: {modifier} to the image. Provide one word for the conditioned "
    "image:",
    "<image>\nGiven this prompt: {modifier}, condense the conditioned image into one word:",
    "<image>\n{modifier}:",
)
# The last row of table 9 prints as `<Caption> ""`: we read it as the caption in quotes.
STAGE2_CAPTION_TEMPLATES = (
    "{caption} Summary:",
    "{caption} Summarize the caption for retrieval:",
    "{caption} A shorter description is:",
    "{caption} Shorter caption:",
    "\"{caption}\"",
)

# Zero-shot inference (appendix D.2): per dataset, the target-image ("image") template and
# the composed-query template(s).
INFERENCE_TEMPLATES: dict[str, dict[str, str]] = {
    "cirr": {
        "image": "<image>\nDescribe this image in one word:",
        "query": "<image>\nModify this image with {modifier}, describe the modified image in "
                 "one word:",
    },
    "fashioniq": {
        "image": "<image>\nDescribe this {category} in one word based on its style:",
        "query": "<image>\nModify the style of this {category} based on {modifier}. describe "
                 "this modified {category} in one word based on its style:",
    },
    "genecis": {
        "image": "<image>\nSummarize the image for retrieval:",
        "focus_attribute": "<image>\nDescribe the image in one word with a specific focus on the "
                           "attribute {attribute}:",
        "change_attribute": "<image>\nDescribe the image in one word with a specific change of "
                            "the attribute {attribute}:",
        "focus_object": "<image>\nDescribe the image in one word with a specific focus on the "
                        "object {object}:",
        "change_object": "<image>\nDescribe the image in one word with a specific change of the "
                         "object {object}:",
    },
}
INFERENCE_TEMPLATES["circo"] = INFERENCE_TEMPLATES["cirr"]
# FashionIQ category names as they read in a sentence.
FASHIONIQ_CATEGORY_WORDS = {"dress": "dress", "shirt": "shirt", "toptee": "top tee"}


class PromptError(CirjaxError, ValueError):
  """A template, field or tokenised prompt that cannot be used as asked."""


def num_image_tokens(image_size: int, patch_size: int = 14, strategy: str = "default") -> int:
  """`<image>` tokens per image: (image_size / patch)^2, +1 when the CLS token is kept."""
  if image_size % patch_size:
    raise PromptError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
  return (image_size // patch_size) ** 2 + (strategy == "full")


def inference_template(dataset: str, kind: str) -> str:
  """The appendix-D.2 template for `dataset` ('cirr', 'circo', 'fashioniq', 'genecis') and
  `kind` ('image', 'query', or a GeneCIS task such as 'change_object')."""
  if dataset not in INFERENCE_TEMPLATES:
    raise PromptError(f"no inference templates for dataset {dataset!r}; known: "
                      f"{sorted(INFERENCE_TEMPLATES)}")
  kinds = INFERENCE_TEMPLATES[dataset]
  if kind not in kinds:
    raise PromptError(f"dataset {dataset!r} has no {kind!r} template; known: {sorted(kinds)}")
  return kinds[kind]


def template_fields(template: str) -> set[str]:
  return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def fill(template: str, **fields: Any) -> str:
  """Fills `{field}`s; an error names any field the template needs but was not given."""
  need = template_fields(template)
  missing = sorted(need - set(fields))
  if missing:
    raise PromptError(f"template needs {missing} (got {sorted(fields)}): {template!r}")
  for k in need:
    if not isinstance(fields[k], str) or not fields[k].strip():
      raise PromptError(f"template field {k!r} must be a non-empty string, got {fields[k]!r}")
  # Only the template's own fields are formatted: user text may contain braces.
  out = template
  for k in need:
    out = out.replace("{" + k + "}", fields[k].strip())
  return out


def render(template: str, tokenizer: Any = None, *, image: bool | None = None,
           use_chat_template: bool = True, append_eos: bool = True,
           image_token: str = IMAGE, **fields: Any) -> str:
  """The full prompt string for one input.

  Args:
    template: a template from this module (or your own) with `<image>` and `{fields}`.
    tokenizer: an HF tokenizer; supplies the chat template and the EOS token.
    image: whether an image goes with this prompt; checked against the template (an image
      without `<image>` in the template, or the reverse, is an error). None: as the template.
    use_chat_template: wrap as a user turn with `tokenizer.chat_template` (if it has one).
    append_eos: append `tokenizer.eos_token`, the token whose state is the embedding.
    image_token: the tokenizer's image placeholder string.
    **fields: `modifier=`, `caption=`, `category=`, ...
  """
  has_image = template.count(IMAGE)
  if has_image > 1:
    raise PromptError(f"template has {has_image} image placeholders; one image per prompt")
  if image is not None and bool(has_image) != image:
    raise PromptError("an image was given but the template has no <image> placeholder"
                      if image else "the template has an <image> placeholder but no image was "
                      f"given; use a text template: {template!r}")
  text = fill(template, **fields).replace(IMAGE, image_token)
  if tokenizer is not None and use_chat_template and getattr(tokenizer, "chat_template", None):
    text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
  if append_eos:
    if tokenizer is None or tokenizer.eos_token is None:
      raise PromptError("append_eos needs a tokenizer with an eos_token")
    text = text + tokenizer.eos_token
  return text


def stage2_prompts(rng: random.Random, instruction: str, modified_caption: str,
                   original_caption: str, tokenizer: Any = None, *,
                   fixed: bool = False, **kw) -> tuple[str, str, str]:
  """(query, target, hard negative) prompts for one CC3M-Instruct triplet: a randomly drawn
  image template (table 9, first set) with the instruction, and one caption template (second
  set) for both captions. `fixed=True` always takes the first template of each set (the
  paper's ablation)."""
  qt = STAGE2_IMAGE_TEMPLATES[0] if fixed else rng.choice(STAGE2_IMAGE_TEMPLATES)
  ct = STAGE2_CAPTION_TEMPLATES[0] if fixed else rng.choice(STAGE2_CAPTION_TEMPLATES)
  return (render(qt, tokenizer, image=True, modifier=instruction, **kw),
          render(ct, tokenizer, image=False, caption=modified_caption, **kw),
          render(ct, tokenizer, image=False, caption=original_caption, **kw))


def image_token_id(tokenizer: Any, image_token: str = IMAGE) -> int:
  tid = tokenizer.convert_tokens_to_ids(image_token)
  if tid is None or tid == tokenizer.unk_token_id:
    raise PromptError(f"the tokenizer has no {image_token!r} token; LLaVA tokenizers add it "
                      f"as a special token (tokenizer.add_special_tokens)")
  return int(tid)


def expand_image_tokens(ids: Sequence[int], image_id: int, n: int, row: int = 0) -> list[int]:
  """Replaces each single image token by `n` copies (runs of exactly `n` are kept)."""
  out, i = [], 0
  ids = list(ids)
  while i < len(ids):
    if ids[i] != image_id:
      out.append(ids[i])
      i += 1
      continue
    j = i
    while j < len(ids) and ids[j] == image_id:
      j += 1
    run = j - i
    if run not in (1, n):
      raise PromptError(f"prompt {row}: a run of {run} image tokens; expected 1 (to expand) "
                        f"or {n} (already expanded)")
    out += [image_id] * n
    i = j
  return out


def batch_encode(tokenizer: Any, prompts: Sequence[str], *, num_image_tokens: int,
                 image_token: str = IMAGE, max_length: int | None = None,
                 pad_to_multiple_of: int | None = None, pad_to: int | None = None,
                 add_special_tokens: bool | None = None) -> dict[str, np.ndarray]:
  """Tokenises rendered prompts into left-padded int32 `input_ids` and `attention_mask`.

  Each `<image>` becomes `num_image_tokens` image tokens. Rows are left-padded with the pad
  token (EOS if the tokenizer has none) to the longest row, rounded up to
  `pad_to_multiple_of` (fewer distinct shapes under `jax.jit`) or to exactly `pad_to`.
  A row longer than `max_length` is an error naming it. `add_special_tokens=None` adds the
  tokenizer's BOS only when the rendered prompt does not already start with it.
  Returns {'input_ids', 'attention_mask', 'num_images' (per row)}.
  """
  if not prompts:
    raise PromptError("no prompts to encode")
  image_id = None
  rows = []
  for r, p in enumerate(prompts):
    if not isinstance(p, str):
      raise PromptError(f"prompt {r} is a {type(p).__name__}, not a string (render it first)")
    special = add_special_tokens
    if special is None:
      bos = getattr(tokenizer, "bos_token", None)
      special = not (bos and p.startswith(bos))
    ids = tokenizer(p, add_special_tokens=special)["input_ids"]
    if image_token in p:
      image_id = image_token_id(tokenizer, image_token) if image_id is None else image_id
      ids = expand_image_tokens(ids, image_id, num_image_tokens, r)
    rows.append(ids)
  longest = max(len(r) for r in rows)
  if max_length is not None:
    over = [(i, len(r)) for i, r in enumerate(rows) if len(r) > max_length]
    if over:
      raise PromptError(f"{len(over)} prompt(s) exceed max_length={max_length} tokens "
                        f"(row, length): {over[:5]}; shorten the text or raise max_length")
  width = longest
  if pad_to is not None:
    if pad_to < longest:
      raise PromptError(f"pad_to={pad_to} but the longest prompt has {longest} tokens")
    width = pad_to
  elif pad_to_multiple_of:
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
  pad_id = tokenizer.pad_token_id
  if pad_id is None:
    pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
  ids = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    if r:
      ids[i, width - len(r):] = r
      mask[i, width - len(r):] = 1
  n_img = np.zeros(len(rows), np.int32)
  if image_id is not None:
    n_img = ((ids == image_id) & (mask > 0)).sum(1).astype(np.int32) // num_image_tokens
  return {"input_ids": ids, "attention_mask": mask, "num_images": n_img}


def encode(tokenizer: Any, templates: str | Sequence[str], fields: Sequence[Mapping[str, str]],
           *, num_image_tokens: int, image: bool | None = None, **kw) -> dict[str, np.ndarray]:
  """Renders one prompt per `fields` entry (one template for all, or one each) and encodes
  the batch: the usual way to build an embedder batch."""
  if isinstance(templates, str):
    templates = [templates] * len(fields)
  if len(templates) != len(fields):
    raise PromptError(f"{len(templates)} templates for {len(fields)} field sets")
  render_kw = {k: kw.pop(k) for k in ("use_chat_template", "append_eos", "image_token")
               if k in kw}
  prompts = [render(t, tokenizer, image=image, **render_kw, **f)
             for t, f in zip(templates, fields)]
  if "image_token" in render_kw:
    kw["image_token"] = render_kw["image_token"]
  return batch_encode(tokenizer, prompts, num_image_tokens=num_image_tokens, **kw)


def training_prompts(tokenizer: Any, stage: int, records: Sequence[tuple[str, str, str]],
                     seed: int, fixed: bool = False) -> list[tuple[str, str, str]]:
  """(query, target, hard negative) prompts of an InstructCIR training batch, one per
  `(instruction, caption, original caption)` record. Stage 1: the image prompt vs the caption
  prompt (no hard negative); stage 2: `stage2_prompts`, drawn in order from one generator
  seeded with `seed`, so every process and a resumed run draw the same templates."""
  if stage == 1:
    q = render(STAGE1_IMAGE, tokenizer, image=True)
    return [(q, render(STAGE1_CAPTION, tokenizer, image=False, caption=c), "")
            for _, c, _ in records]
  rng = random.Random(seed)
  return [stage2_prompts(rng, i, c, o, tokenizer, fixed=fixed) for i, c, o in records]


def held_out_prompts(tokenizer: Any, stage: int, instructions: Sequence[str],
                     captions: Sequence[str]) -> tuple[list[str], list[str]]:
  """(query prompts, caption prompts) of InstructCIR's held-out evaluation, the first template
  of each set: stage 1, the image prompt per record; stage 2, the image template with each
  record's instruction; the caption prompt of every caption of the corpus."""
  if stage == 1:
    qt, ct = STAGE1_IMAGE, STAGE1_CAPTION
    queries = [render(qt, tokenizer, image=True)] * len(instructions)
  else:
    qt, ct = STAGE2_IMAGE_TEMPLATES[0], STAGE2_CAPTION_TEMPLATES[0]
    queries = [render(qt, tokenizer, image=True, modifier=i) for i in instructions]
  return queries, [render(ct, tokenizer, image=False, caption=c) for c in captions]


def prompt_lengths(tok: Any, stage: int, captions: Sequence[str], instructions: Sequence[str],
                   n_img: int, max_length: int, max_positions: int) -> tuple[int, int]:
  """Fixed (query, caption) prompt lengths of an InstructCIR stage's training prompts (one
  compiled step): the longest template overhead plus the longest field (`captions`: the
  target and original captions; `instructions`), with a small margin, rounded up to 8;
  PromptError beyond `max_length` or the model's `max_positions`."""

  def overhead(template, field, image):
    fields = {field: "x"} if field else {}
    enc = encode(tok, template, [fields], num_image_tokens=n_img, image=image)
    return int(enc["attention_mask"].sum()) - (1 if field else 0)

  def longest(texts):
    texts = sorted(set(t for t in texts if t))
    if not texts:
      return 0
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    return max(len(x) for x in enc)

  def round8(n):
    return -(-(n + 4) // 8) * 8

  if stage == 1:
    q_len = round8(overhead(STAGE1_IMAGE, None, True))
    t_len = round8(overhead(STAGE1_CAPTION, "caption", False) + longest(captions))
  else:
    q_len = round8(max(overhead(t, "modifier", True) for t in STAGE2_IMAGE_TEMPLATES)
                   + longest(instructions))
    t_len = round8(max(overhead(t, "caption", False) for t in STAGE2_CAPTION_TEMPLATES)
                   + longest(captions))
  for name, n in (("query", q_len), ("caption", t_len)):
    if n > max_length:
      raise PromptError(f"the longest {name} prompt needs {n} tokens > config.data.max_length="
                        f"{max_length}; shorten the texts or raise it")
    if n > max_positions:
      raise PromptError(f"{name} prompts of {n} tokens exceed the model's {max_positions} "
                        "positions")
  return q_len, t_len


# ------------------------------------------------------------------ offline word tokenizers
# LLaVA-Phi's special tokens at fixed ids (<image> = 5) and Phi-3's chat template
# (microsoft/Phi-3.5-mini-instruct), for tokenizers built without a checkpoint.
LLAVA_PHI_SPECIAL_TOKENS = ["<pad>", "<s>", "<|endoftext|>", "<unk>", "<|user|>", IMAGE,
                            "<|end|>", "<|assistant|>"]
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")


def save_word_level_tokenizer(words: Sequence[str], out_dir: Any, *, lowercase: bool = True,
                              chat_template: bool = True, vocab_size: int | None = None) -> None:
  """Saves an HF fast word-level tokenizer (tokenizer.json + tokenizer_config.json) to
  `out_dir`: LLaVA-Phi's special tokens first, then `words` in order (duplicates dropped, at
  most `vocab_size` entries in all), `<s>` prepended, other words read as `<unk>`. For
  random-init runs and tests, where no checkpoint tokenizer exists."""
  # transformers (and its tokenizers) is heavy: only building a tokenizer needs it.
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from tokenizers import normalizers, pre_tokenizers  # pylint: disable=g-import-not-at-top
  vocab = {t: i for i, t in enumerate(LLAVA_PHI_SPECIAL_TOKENS)}
  for w in words:
    if vocab_size is not None and len(vocab) >= vocab_size:
      break
    vocab.setdefault(w, len(vocab))
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  if lowercase:
    tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                               pre_tokenizers.Punctuation()])
  tok.add_special_tokens(LLAVA_PHI_SPECIAL_TOKENS)
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", 1)])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<pad>",
      unk_token="<unk>", additional_special_tokens=LLAVA_PHI_SPECIAL_TOKENS[4:])
  if chat_template:
    fast.chat_template = PHI3_CHAT_TEMPLATE
  fast.save_pretrained(str(out_dir))
