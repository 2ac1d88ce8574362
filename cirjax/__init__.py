"""cirjax: Composed Image Retrieval in JAX/Flax (QuRe on BLIP-2, InstructCIR on LLaVA-Phi)."""

__version__ = "0.1.0"


def load_blip2(path, **kwargs):
  """Loads a BLIP-2 CIR model from an HF directory or a cirjax checkpoint directory."""
  # Imported on use: `import cirjax` (and so `cirjax --help`) stays free of jax and flax.
  from cirjax.models.blip2 import load_blip2 as _load
  return _load(path, **kwargs)


def load_llava(path, **kwargs):
  """Loads a LLaVA-Phi embedder from an HF directory or a cirjax checkpoint directory."""
  # Imported on use, as above.
  from cirjax.models.llava import load_llava as _load
  return _load(path, **kwargs)
