"""Weights in and out of cirjax: tables -> engine -> registry.

* `cirjax.convert.io`: reading and writing weight files (safetensors, torch pickles,
  sharded HF layouts) and cirjax model directories.
* `cirjax.convert.engine`: runs a model's row tables (HF/LAVIS key <-> cirjax path, named
  transform) both ways with shape checks and strict key accounting.
* `cirjax.convert.registry`: model families (blip2, llava): detection of any supported
  source, load, save, export to HF.

Nothing is imported here, so that `engine` and `io` load without the model code.
"""
