"""Jitted training for QuRe and InstructCIR: configs, mesh, state, step, checkpoints, loop.

Entry point: `cirjax.train.trainer.train(config, workdir)` (or `cirjax train`).
"""
