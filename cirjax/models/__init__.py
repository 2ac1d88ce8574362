"""Flax models: the shared vision transformer (`vit`), BLIP-2 (`qformer`, `blip2`), LLaVA-Phi
(`phi3`, `llava`). Their weight converters and parity checks live in `cirjax.convert`. Import
the submodule you need; nothing heavy loads here.

`Model` is how a loaded model is held: its family's functional API (`cirjax.models.blip2`,
`cirjax.models.llava`) is called as `fn(model.params, model.config, ...)`.
"""

from typing import Any, NamedTuple


class Model(NamedTuple):
  """A loaded model: family ('blip2' | 'llava'), config, params (+ tokenizer, source)."""
  family: str
  config: Any
  params: Any
  tokenizer: Any = None
  source: str = ""

  def __repr__(self):
    summary = getattr(self.config, "summary", None)
    what = summary() if callable(summary) else type(self.config).__name__
    return f"Model({self.family} from {self.source or 'random init'}: {what})"
