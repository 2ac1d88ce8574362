"""cirjax: Composed Image Retrieval in JAX/Flax (QuRe on BLIP-2, InstructCIR on LLaVA-Phi)."""

__version__ = "0.1.0"


def load_blip2(path, **kwargs):
  """Loads a BLIP-2 CIR model from an HF directory, a LAVIS file or a cirjax directory."""
  # Deferred so that `import cirjax` stays light (the registry pulls in every model).
  from cirjax.convert import registry  # pylint: disable=g-import-not-at-top
  return registry.load_blip2(path, **kwargs)


def load_llava(path, **kwargs):
  """Loads a LLaVA-Phi embedder from an HF directory or a cirjax checkpoint directory."""
  # Deferred as in load_blip2.
  from cirjax.convert import registry  # pylint: disable=g-import-not-at-top
  return registry.load_llava(path, **kwargs)
