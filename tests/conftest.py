"""Test-wide JAX settings: 4 fake CPU devices, fp32 matmuls at highest precision."""

import os

# Must happen before JAX initialises its backend: sharded code runs on 4 fake CPU devices,
# and TensorFlow (pulled in by tfds) must never see a GPU.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 4)
# SPEC §3: parity is measured at fp32 with the highest matmul precision.
jax.config.update("jax_default_matmul_precision", "highest")
