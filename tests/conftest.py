"""Test-session setup: JAX on the CPU, one persistent XLA compilation cache per session.

The tests run on the CPU (``JAX_PLATFORMS=cpu`` unless set): with JAX's CUDA plugin
installed (the ``h100`` extra) the plugin still offers its compile-only GPUs, and no test or
subprocess looks for a GPU driver.

Many tests compile the same programs (the demo's train step, in this process and in the
subprocesses of the CLI and mesh tests); with the cache, those that take a second or more
to compile are compiled once per session. It lives in a fresh temporary directory per
session, so no result carries over between sessions.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before JAX initialises; inherited

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # Set before JAX initialises; subprocesses inherit it through the environment.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="falqon-jax-xla-cache-")
