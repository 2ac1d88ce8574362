"""Test-wide settings: 4 fake CPU JAX devices, fp32 matmuls at highest precision, the
Hypothesis profile (fixed examples unless asked for random ones), and how many test
processes `-n auto` starts (pytest-xdist, setup.cfg)."""

import os

# Must happen before JAX initialises its backend: sharded code runs on 4 fake CPU devices,
# and TensorFlow (pulled in by tfds) must never see a GPU.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import hypothesis  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

# Property tests draw the same examples on every run (CI included), so a failure reproduces and
# a pass means the same thing everywhere. HYPOTHESIS_PROFILE=random (or pytest's
# `--hypothesis-profile=random`) draws new examples each run; a failure prints the
# `@reproduce_failure` / `--hypothesis-seed` to rerun it (README, "Tests").
hypothesis.settings.register_profile("fixed", derandomize=True, print_blob=True)
hypothesis.settings.register_profile("random", derandomize=False, print_blob=True)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 4)
# docs/reference_semantics.md#parity: parity is measured at fp32 with the highest matmul precision.
jax.config.update("jax_default_matmul_precision", "highest")
# Many tests build their own trainers and models, so identical programs are traced by
# different jitted functions: a compilation cache shared by the session (an empty directory
# per run, deleted at exit) compiles each of them once. Override with JAX_COMPILATION_CACHE_DIR.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  import atexit  # noqa: E402
  import shutil  # noqa: E402
  import tempfile  # noqa: E402
  _CACHE = tempfile.mkdtemp(prefix="cirjax-test-xla-cache-")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  jax.config.update("jax_compilation_cache_dir", _CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (setup.cfg): one test process per core, at most 4 -- each holds JAX, torch and
  its own compilation cache (about 1-2 GiB), and the suite's longest file bounds the gain."""
  del config
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, min(4, cores or 1))


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
  """A tiny synthetic benchmark (CIRR layout + vocab.txt), shared by a module's tests: the
  same sizes as the `tiny` variants of the training configs."""
  from cirjax.data import synth
  root = tmp_path_factory.mktemp("data") / "synthetic_tiny"
  synth.generate(root, synth.SynthConfig(seed=0, resolution=32, num_images=(60, 60, 20),
                                         num_queries=(64, 32, 16)), progress=None)
  return root
