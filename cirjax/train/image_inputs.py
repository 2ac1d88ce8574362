"""What a QuRe run's encoders and steps read for its images: the frozen vision features of the
feature cache (`config.qure.cache_features`, `cirjax.train.feature_store.FeatureCache`), or
preprocessed pixels, decoded on demand or read from the pixel store
(`config.data.pixel_store`, `cirjax.data.loader.Pixels`); and the BLIP-2 encoders that take
those inputs (targets and composed queries from features or from pixels).

Images are addressed by global index (`image_names[i]`), training images first.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np

from cirjax.data import images as images_lib
from cirjax.data.loader import ImageSource, Pixels, file_image_source
from cirjax.models import blip2
from cirjax.train.feature_store import FeatureCache


class _AllImages:
  """The `split` `file_image_source` needs (`.images`, `.name`), over every split's images."""

  def __init__(self, refs):
    self.images = dict(refs)
    self.name = "qure training+evaluation images"


class ImageInputs:
  """A run's images as encoder inputs: `self[rows]` are cached features when `cache`, else
  pixels; `batches` cuts index lists into encoder batches; `encoders` are the pure functions
  (`vision`, `targets`, `compose`) taking them. `open(params)` opens (or builds) the pixel
  store and the feature store before first use; call it on every process, outside worker
  threads.

  Args:
    config: the run's config (`data.transform`, `data.pixel_store`, the `qure.feature_*` keys).
    cfg: the BLIP-2 config (the feature store's identity); `run_cfg` the one the steps and
      encoders run (compute dtype, run options).
    image_source: name -> PIL image (None: each image's file, `refs[name]`).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, cfg: blip2.Blip2Config,
               run_cfg: blip2.Blip2Config, *, image_names: Sequence[str], refs: dict[str, Any],
               image_source: ImageSource | None, cache: bool, mesh: jax.sharding.Mesh,
               batch_size: int, log: Callable[[str], None]):
    self.config, self.workdir, self.log = config, workdir, log
    self.image_names, self.refs, self.batch_size = list(image_names), refs, batch_size
    transform = images_lib.make_transform(config.data.get("transform", "targetpad"),
                                          cfg.vision.image_size)
    self.decoded = Pixels(transform, image_source or file_image_source(_AllImages(refs)))
    self.encoders = {
        "vision": functools.partial(_vision_features, cfg=run_cfg),
        "targets": functools.partial(_targets_from_feats if cache else _targets_from_pixels,
                                     cfg=run_cfg),
        "compose": functools.partial(_compose_from_feats if cache else _compose_from_pixels,
                                     cfg=run_cfg),
    }
    self.features = FeatureCache(
        config, workdir, cfg, compute_dtype=run_cfg.dtype, image_names=self.image_names,
        refs=refs, encoder=self.encoders["vision"], pixels=self.pixels, mesh=mesh,
        batch_size=batch_size, log=log) if cache else None
    self.pixel_store_stats: dict | None = None  # None: not asked yet

  def pixels(self, idx: np.ndarray) -> np.ndarray:
    """[len(idx), H, W, 3] preprocessed pixels of global images `idx`."""
    return self.decoded([self.image_names[int(i)] for i in idx])

  def __getitem__(self, idx: np.ndarray) -> np.ndarray:
    return self.features[idx] if self.features is not None else self.pixels(idx)

  def batches(self, idx: np.ndarray, *extra: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
    """Encoder input batches for global images `idx` (one batch read at a time) with the
    rows of `extra` arrays (token ids, masks) beside them."""
    for i in range(0, len(idx), self.batch_size):
      yield (self[idx[i:i + self.batch_size]],) + tuple(
          a[i:i + self.batch_size] for a in extra)

  def open(self, params) -> None:
    """The pixel store (once) and the feature store for `params`' vision tower."""
    if self.pixel_store_stats is None:
      self.pixel_store_stats = self.open_pixel_store(cached=self.features is not None)
    if self.features is not None:
      self.features.open(params)

  def open_pixel_store(self, cached: bool) -> dict:
    """Opens the pixel store of every image of the run (`config.data.pixel_store`); its
    facts ({} when the run decodes). Without the feature cache every step, mining round and
    evaluation reads pixels; with it (`cached`) each image is read once, for the feature
    store."""
    return self.decoded.open_store(self.config.data, self.workdir, self.image_names, self.refs,
                                   reads_per_image=1.0 if cached else float("inf"),
                                   log=self.log)


# Pure encoders (module level so jit caches by identity).
def _vision_features(params, pixels, *, cfg):
  return blip2.vision_features(params, cfg, pixels)


def _targets_from_feats(params, feats, *, cfg):
  return blip2.encode_target_from_features(params, cfg, feats)


def _targets_from_pixels(params, pixels, *, cfg):
  return blip2.encode_image(params, cfg, pixels)


def _compose_from_feats(params, feats, ids, mask, *, cfg):
  return blip2.compose_from_features(params, cfg, feats, ids, mask)


def _compose_from_pixels(params, pixels, ids, mask, *, cfg):
  return blip2.compose(params, cfg, pixels, ids, mask)
