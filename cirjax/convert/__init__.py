"""Weights in and out of cirjax: tables -> engine -> registry.

* `cirjax.convert.io`: reading and writing weight files (safetensors, torch pickles,
  sharded HF layouts) and cirjax model directories.
* `cirjax.convert.engine`: runs a model's row tables (HF/LAVIS key <-> cirjax path, named
  transform) both ways with shape checks and strict key accounting.
* `cirjax.convert.blip2_convert`, `cirjax.convert.llava_convert`: one family's readers,
  writers and row tables (HF and LAVIS keys <-> the `cirjax.models` trees).
* `cirjax.convert.registry`: model families (blip2, llava): detection of any supported
  source, load, save, export to HF.
* `cirjax.convert.parity` (the report), `blip2_parity`, `llava_parity`: each family's
  converted model against its PyTorch reference, stage by stage.
* `cirjax.convert.hub`: hub ids -> local snapshots.

Nothing is imported here, so that `engine` and `io` load without the model code.
"""
