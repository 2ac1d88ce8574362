"""Image loading and the reference preprocessing pipelines, on PIL (as torchvision does it).

* `targetpad_transform(1.25, 224)` — QuRe/SPRC/CLIP4Cir: `TargetPad` (pad the shorter side
  only when the aspect ratio is at least 1.25, to max(w, h)/1.25, with int(...) / 2 black
  borders on both sides), resize the shortest edge to 224 (bicubic), centre crop 224,
  RGB, scale to [0, 1], OpenAI CLIP mean/std.
* `squarepad_transform(dim)` — the same with pad-to-square.
* `clip_transform(dim)` — CLIP/LLaVA: resize shortest edge (bicubic), centre crop.
Outputs are float32 HWC (NHWC when batched), the layout the JAX models take; `Transform.pixels`
gives the uint8 image before normalisation (what `cirjax.data.pixel_store` keeps).

torchvision semantics reproduced: `Resize(int)` makes the short side `size` and the long side
`int(size * long / short)`; `CenterCrop` uses `int(round((H - h) / 2))` offsets; `F.pad`
with a 4-list pads left, top, right, bottom.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from pathlib import Path
from typing import Callable

import numpy as np
import tqdm
from PIL import Image

from cirjax.data import records
from cirjax.data.records import CIRSplit, DataError, ImageRef

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
QURE_TARGET_RATIO = 1.25
GENECIS_DILATE = 0.7  # GeneCIS VAWDataset's crop dilation (check against your GeneCIS copy)


def open_rgb(path: str | Path) -> Image.Image:
  """Opens an image as RGB; a missing or undecodable file is an error naming it."""
  try:
    with Image.open(path) as im:
      return im.convert("RGB")
  except FileNotFoundError:
    raise DataError(f"image file not found: {path}") from None
  except (OSError, ValueError) as e:
    raise DataError(f"cannot decode image {path}: {e}") from None


def load_genecis_crop(ref: ImageRef, dilate: float = GENECIS_DILATE,
                      pad_crop: bool = True) -> Image.Image:
  """GeneCIS VAW crop: the box grown by `dilate` (clipped), then padded square with black."""
  im = open_rgb(ref.path)
  x, y, w, h = ref.bbox
  W, H = im.size
  if dilate:
    left, top = max(0, x - dilate * w), max(0, y - dilate * h)
    right, bottom = min(W, left + (1 + dilate) * w), min(H, top + (1 + dilate) * h)
  else:
    left, top, right, bottom = x, y, x + w, y + h
  im = im.crop((left, top, right, bottom))
  if pad_crop and im.size[0] != im.size[1]:
    s = max(im.size)
    sq = Image.new("RGB", (s, s), (0, 0, 0))
    sq.paste(im, ((s - im.size[0]) // 2, (s - im.size[1]) // 2))
    im = sq
  return im


def load_image(ref: ImageRef | str | Path) -> Image.Image:
  """An `ImageRef` (cropped when it has a box) or a path, as RGB."""
  if isinstance(ref, ImageRef):
    return load_genecis_crop(ref) if ref.bbox is not None else open_rgb(ref.path)
  return open_rgb(ref)


def target_pad(im: Image.Image, target_ratio: float = QURE_TARGET_RATIO) -> Image.Image:
  """CLIP4Cir/SPRC `TargetPad`: pads only images at least `target_ratio` elongated."""
  w, h = im.size
  if max(w, h) / min(w, h) < target_ratio:
    return im
  scaled_max_wh = max(w, h) / target_ratio
  hp = max(int((scaled_max_wh - w) / 2), 0)
  vp = max(int((scaled_max_wh - h) / 2), 0)
  return _pad(im, hp, vp)


def square_pad(im: Image.Image) -> Image.Image:
  """CLIP4Cir `SquarePad`."""
  w, h = im.size
  m = max(w, h)
  return _pad(im, int((m - w) / 2), int((m - h) / 2))


def _pad(im: Image.Image, hp: int, vp: int) -> Image.Image:
  if hp == 0 and vp == 0:
    return im
  out = Image.new(im.mode, (im.size[0] + 2 * hp, im.size[1] + 2 * vp), 0)
  out.paste(im, (hp, vp))
  return out


def resize_shortest(im: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
  """torchvision `Resize(size)` on a PIL image."""
  w, h = im.size
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  if (new_w, new_h) == (w, h):
    return im
  return im.resize((new_w, new_h), resample)


def center_crop(im: Image.Image, size: int) -> Image.Image:
  """torchvision `CenterCrop(size)` (inputs are at least `size` after `resize_shortest`)."""
  w, h = im.size
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return im.crop((left, top, left + size, top + size))


def normalize_pixels(x: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
  """uint8 RGB [..., H, W, 3] -> float32, (x/255 - mean) / std. Element by element, so a
  batch of stored uint8 images normalises to the same bits as each image did alone."""
  x = np.asarray(x, dtype=np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def normalize(im: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
  """RGB uint8 -> float32 HWC, (x/255 - mean) / std."""
  return normalize_pixels(np.asarray(im.convert("RGB")), mean, std)


@dataclasses.dataclass(frozen=True)
class Transform:
  """A named preprocessing pipeline: PIL image -> float32 [dim, dim, 3], in two halves:
  `pixels` (pad, resize, crop: uint8, what the pixel store keeps) and `normalize_pixels`.
  Every step is deterministic (no random augmentation), so stored pixels are exact."""
  name: str
  dim: int
  pad: Callable[[Image.Image], Image.Image] | None

  def pixels(self, im: Image.Image) -> np.ndarray:
    """The preprocessed image before normalisation: uint8 [dim, dim, 3]."""
    im = im.convert("RGB")
    if self.pad is not None:
      im = self.pad(im)
    return np.asarray(center_crop(resize_shortest(im, self.dim), self.dim).convert("RGB"))

  def __call__(self, im: Image.Image) -> np.ndarray:
    return normalize_pixels(self.pixels(im))


def targetpad_transform(target_ratio: float = QURE_TARGET_RATIO, dim: int = 224) -> Transform:
  """QuRe's image pipeline (BLIP-2): target pad 1.25, resize 224, centre crop, CLIP norm."""
  return Transform(f"targetpad{target_ratio:g}", dim, lambda im: target_pad(im, target_ratio))


def squarepad_transform(dim: int = 224) -> Transform:
  return Transform("squarepad", dim, square_pad)


def clip_transform(dim: int = 224) -> Transform:
  """CLIP/LLaVA image pipeline: resize shortest edge, centre crop, CLIP norm."""
  return Transform("clip", dim, None)


TRANSFORMS = {"targetpad": targetpad_transform, "squarepad": squarepad_transform,
              "clip": clip_transform}


def make_transform(name: str, dim: int) -> Transform:
  """'targetpad' (QuRe default), 'squarepad' or 'clip', at `dim` pixels."""
  if name not in TRANSFORMS:
    raise ValueError(f"unknown image transform {name!r}; choose from {sorted(TRANSFORMS)}")
  return TRANSFORMS[name](dim=dim)


def decode_error(path: str | Path) -> str | None:
  """Why `path` cannot be decoded as an image (None when it can): a full decode, as training
  and evaluation will do, so a file cut short fails here and not hours into a run."""
  try:
    with Image.open(path) as im:
      im.load()
    return None
  except FileNotFoundError:
    return "file not found"
  except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for bad files
    return f"{type(e).__name__}: {e}"


def decode_errors(paths, workers: int | None = None, progress: str | None = None
                  ) -> list[str | None]:
  """`decode_error` of every path, in `workers` threads (PIL releases the GIL while
  decoding; default 2 x cores, at most 16), with a progress bar titled `progress` if given."""
  workers = workers or min(16, (os.cpu_count() or 1) * 2)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    errors = pool.map(decode_error, paths)
    if progress:
      errors = tqdm.tqdm(errors, total=len(paths), desc=progress, unit="img", mininterval=1.0)
    # Drawn to the end here: pairing the bar with the paths in a zip would stop on the paths
    # and leave the bar one short of its total (39/40), never closed.
    return list(errors)


def check_images_decode(split: CIRSplit, on_bad: str = "error", workers: int | None = None,
                        progress: bool = False) -> CIRSplit:
  """Decodes every image the split uses, in `workers` threads (PIL releases the GIL while
  decoding). `on_bad`: "error" names every undecodable file (up to 10) and how many there are;
  "skip" drops them and the queries that use them, counted in `split.skipped`
  (`undecodable_images`), as `records.check_images_exist` does for missing files."""
  if on_bad not in ("error", "skip"):
    raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
  names = list(split.images)
  errs = decode_errors([split.images[n].path for n in names], workers,
                       f"decoding {split.name}" if progress else None)
  bad = {n: e for n, e in zip(names, errs) if e is not None}
  if not bad:
    return split
  if on_bad == "error":
    listed = "\n".join(f"  {split.images[n].path}: {e}" for n, e in sorted(bad.items())[:10])
    more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
    raise DataError(f"{split.name}: {len(bad)} image file(s) cannot be decoded:\n{listed}{more}\n"
                    "(pass --skip-missing to drop them and count them)")
  return records.drop_images(split, set(bad), "undecodable")
