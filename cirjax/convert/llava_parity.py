"""Stage-by-stage numerical parity of the cirjax LLaVA embedder against transformers.

The reference is `transformers.LlavaForConditionalGeneration.from_pretrained(path)` itself
(eager attention, fp32): its CLIP hidden states, projector output (computed from its modules),
per-layer hidden states and the normalised last-token state. cirjax runs either its own
conversion of the same directory (done in memory) or a converted cirjax directory.

Both get the same random inputs: a batch of left-padded prompts of different lengths, every
other row carrying one image (so image and text-only rows are mixed, and images are consumed
in batch order as HF does). Each stage's max abs and max relative error
(max |a - b| / max |b|) is compared with the whole-model tolerance
(docs/reference_semantics.md#parity: 1e-4, fp32, matmul precision highest).

Stages: vision features (the selected CLIP layer, CLS dropped), projector output, input
embeddings (image features merged), decoder layer 1..N, final norm, embedding.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cirjax.convert import registry
from cirjax.convert import io
from cirjax.convert.parity import TOLERANCE, ParityRow, compare, format_table
from cirjax.convert import llava_convert
from cirjax.models import llava


def random_inputs(config: Any, batch: int = 2, text_len: int = 16, seed: int = 0,
                  images: bool = True) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
  """Left-padded ids/mask [B, T] (row b is 3b tokens shorter; even rows hold one image of
  `num_image_tokens` tokens after a first token) and NHWC pixels for the image rows."""
  rng = np.random.default_rng(seed)
  p = config.num_image_tokens if images else 0
  img_rows = [b for b in range(batch) if images and b % 2 == 0]
  seq = text_len + p
  if seq > config.text.max_position_embeddings:
    raise ValueError(f"parity inputs need {seq} positions but the model allows "
                     f"{config.text.max_position_embeddings}; lower text_len")
  vocab = config.text.vocab_size
  special = {config.image_token_id}
  if config.text.pad_token_id is not None:
    special.add(config.text.pad_token_id)
  ids = np.zeros((batch, seq), np.int32)
  mask = np.zeros((batch, seq), np.int32)
  for b in range(batch):
    n_text = max(2, text_len - 3 * b)
    row = rng.integers(0, vocab, n_text + (p if b in img_rows else 0))
    while any(int(x) in special for x in row):  # keep ids clear of the image/pad token
      bad = np.isin(row, list(special))
      row[bad] = rng.integers(0, vocab, int(bad.sum()))
    if b in img_rows:
      row[1:1 + p] = config.image_token_id
    ids[b, seq - len(row):] = row
    mask[b, seq - len(row):] = 1
  pad = config.text.pad_token_id if config.text.pad_token_id is not None else 0
  ids[mask == 0] = pad
  pixels = None
  if img_rows:
    v = config.vision
    pixels = rng.standard_normal((len(img_rows), v.image_size, v.image_size,
                                  v.num_channels)).astype(np.float32)
  return ids, mask, pixels


def torch_stages(model: Any, config: Any, ids: np.ndarray, mask: np.ndarray,
                 pixels: Optional[np.ndarray]) -> dict[str, np.ndarray]:
  """The reference stages from an HF LlavaForConditionalGeneration (fp32, eager)."""
  # heavy, optional dependencies: only the PyTorch reference needs them
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  pix = None if pixels is None else torch.from_numpy(np.ascontiguousarray(
      pixels.transpose(0, 3, 1, 2)))
  out: dict[str, np.ndarray] = {}
  with torch.no_grad():
    res = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                attention_mask=torch.from_numpy(mask.astype(np.int64)), pixel_values=pix,
                output_hidden_states=True)
    if pix is not None:
      vision, projected = hf_image_features(model, config, pix)
      out["vision features"] = vision.numpy()
      out["projector output"] = projected.numpy()
    hs = res.hidden_states
    out.update(_layer_stages([h.numpy() for h in hs]))
    out["embedding"] = F.normalize(hs[-1][:, -1], dim=-1).numpy()
  return out


def hf_image_features(model: Any, config: Any, pix: Any) -> tuple[Any, Any]:
  """(vision features, projector output) of an HF LLaVA model, computed from its modules.

  Computed from the vision tower's hidden states and the projector rather than read from the
  forward output: transformers 5.24 turned `image_hidden_states` into a list (and deprecates
  it), and the replacement field `image_outputs.pooler_output` is absent in 5.23 and `None`
  on some paths. The modules are the same across the 4.x and 5.x key layouts; only where
  they hang differs (`model.model.*` in 5.x, `model.*` in 4.x).
  """
  # heavy, optional dependencies: only the PyTorch reference needs them
  import torch  # pylint: disable=g-import-not-at-top
  inner = model.model if hasattr(model, "model") else model
  with torch.no_grad():
    hs = inner.vision_tower(pix, output_hidden_states=True).hidden_states
    feats = [hs[l] for l in config.feature_layers]
    if config.vision_feature_select_strategy == "default":
      feats = [f[:, 1:] for f in feats]
    vision = torch.cat(feats, dim=-1)
    return vision, inner.multi_modal_projector(vision)


def _layer_stages(hs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
  n = len(hs) - 1
  out = {"input embeddings": np.asarray(hs[0])}
  for i in range(1, n):
    out[f"decoder layer {i}"] = np.asarray(hs[i])
  out[f"decoder layer {n} + final norm"] = np.asarray(hs[n])
  return out


def jax_stages(params: Any, config: Any, ids: np.ndarray, mask: np.ndarray,
               pixels: Optional[np.ndarray]) -> dict[str, np.ndarray]:
  """The same stages from cirjax (jitted)."""
  out: dict[str, np.ndarray] = {}
  fwd = jax.jit(llava.forward, static_argnames=("config", "output_hidden_states"))
  pix = None if pixels is None else jnp.asarray(pixels)
  llava.check_inputs(ids, mask, pixels, config, require_left_padding=True)
  res = fwd(params, config, jnp.asarray(ids), jnp.asarray(mask), pix,
            output_hidden_states=True)
  if pix is not None:
    out["vision features"] = np.asarray(jax.jit(llava.vision_features,
                                                static_argnames=("config",))(
        params, config, pix))
    out["projector output"] = np.asarray(res.image_features)
  out.update(_layer_stages([np.asarray(h) for h in res.hidden_states]))
  out["embedding"] = np.asarray(llava.l2_normalize(res.last_hidden_state[:, -1]))
  return out


def load_reference(path: str | os.PathLike) -> Any:
  """HF LlavaForConditionalGeneration from `path` in fp32 with eager attention."""
  # heavy, optional dependencies: only the PyTorch reference needs them
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.LlavaForConditionalGeneration.from_pretrained(
      os.fspath(path), dtype=torch.float32, attn_implementation="eager")
  return model.eval()


def run_parity(path: str | os.PathLike, *, converted: Optional[str | os.PathLike] = None,
               batch: int = 2, text_len: int = 16, seed: int = 0, images: bool = True,
               tolerance: float = TOLERANCE) -> list[ParityRow]:
  """Compares the HF LLaVA checkpoint at `path` with cirjax, stage by stage.

  Args:
    path: HF LLaVA directory (config.json + weights), the PyTorch reference.
    converted: a cirjax 'llava' directory to test (default: convert `path` in memory now).
    batch, text_len, seed: the random inputs (see `random_inputs`).
    images: include image rows (else text-only prompts).
    tolerance: the 1e-4 whole-model tolerance by default.
  Returns:
    One ParityRow (name, max_abs_err, max_rel_err, tolerance, ok) per stage.
  """
  jax.config.update("jax_default_matmul_precision", "highest")
  if registry.sniff(path)[1] == "cirjax":
    raise io.WeightFileError(f"{path}: parity needs the HF (PyTorch) checkpoint; pass the cirjax "
                             f"directory as `converted`")
  if converted is None:
    config, params = llava_convert.from_hf(path)
  else:
    loaded = registry.load(converted, family="llava")
    if loaded.kind != "cirjax":
      raise io.WeightFileError(f"{converted}: not a cirjax model directory (no cirjax_config.json)")
    config, params = loaded.config, loaded.params
  ref_config = llava_convert.llava_config_from_hf(path)
  if ref_config.replace(dtype=config.dtype, param_dtype=config.param_dtype) != config:
    raise io.WeightFileError(f"{converted}: its config differs from {path}/config.json; was it "
                             f"converted from this checkpoint?")
  config = config.replace(dtype="float32", param_dtype="float32")
  ids, mask, pixels = random_inputs(config, batch, text_len, seed, images)
  want = torch_stages(load_reference(path), config, ids, mask, pixels)
  got = jax_stages(params, config, ids, mask, pixels)
  return [compare(name, got.get(name, np.full((0,), np.nan)), want[name], tolerance)
          for name in want]
