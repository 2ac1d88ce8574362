"""cirjax: Composed Image Retrieval in JAX/Flax (QuRe on BLIP-2, InstructCIR on LLaVA-Phi).

`cirjax.load(path)` reads any trained model (a training workdir, a cirjax / HF directory, a
LAVIS file, a hub id) into one `Model` type with the same verbs for both families:
`model.image(pixels)`, `model.text(texts)`, `model.query(pixels, texts)`,
`model.score(queries, targets)` (see `cirjax.eval.model`).
"""

__version__ = "0.1.0"


def load(path, **kwargs):
  """The model at `path`, any `--checkpoint` (`cirjax.train.workdir.load_model`); `kwargs`:
  `family` to check, dtype overrides (`dtype`, `vision_dtype`, `param_dtype`)."""
  # Imported on use: `import cirjax` (and so `cirjax --help`) stays free of jax and flax.
  from cirjax.train import workdir  # pylint: disable=g-import-not-at-top
  return workdir.load_model(path, **kwargs)


def load_blip2(path, *, vision_dtype=None, dtype=None):
  """`load(path)` of a BLIP-2 model (an error names any other family)."""
  return load(path, family="blip2", vision_dtype=vision_dtype, dtype=dtype)


def load_llava(path, *, dtype=None, param_dtype=None):
  """`load(path)` of a LLaVA-Phi model (an error names any other family)."""
  return load(path, family="llava", dtype=dtype, param_dtype=param_dtype)
