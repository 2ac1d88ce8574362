"""Flax models: the shared vision transformer (`vit`), BLIP-2 (`qformer`, `blip2`), LLaVA-Phi
(`phi3`, `llava`). Their weight converters and parity checks live in `cirjax.convert`. Import
the submodule you need; nothing heavy loads here.

A loaded model (`cirjax.load`) is a `cirjax.eval.model.Model`: its family's functional API
here is called as `fn(model.params, model.config, ...)`, and its verbs wrap it.
"""
