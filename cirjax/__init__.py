"""cirjax: Composed Image Retrieval in JAX/Flax (QuRe on BLIP-2, InstructCIR on LLaVA-Phi)."""

__version__ = "0.1.0"


def load_blip2(path, **kwargs):
  """Loads a BLIP-2 CIR model from an HF directory, a LAVIS file or a cirjax directory."""
  # Imported on use: `import cirjax` (and so `cirjax --help`) stays free of jax and flax.
  from cirjax.convert import registry  # pylint: disable=g-import-not-at-top
  return registry.load_blip2(path, **kwargs)


def load_llava(path, **kwargs):
  """Loads a LLaVA-Phi embedder from an HF directory or a cirjax checkpoint directory."""
  # Imported on use, as above.
  from cirjax.convert import registry  # pylint: disable=g-import-not-at-top
  return registry.load_llava(path, **kwargs)
