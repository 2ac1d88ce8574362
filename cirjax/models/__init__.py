"""Flax models: the shared vision transformer (`vit`), BLIP-2 (`qformer`, `blip2`) and their
weight converters and parity checks. Import the submodule you need; nothing heavy loads here."""
