"""Test-session setup: one persistent XLA compilation cache for the whole session.

Many tests compile the same programs (the demo's train step, in this process and in the
subprocesses of the CLI and mesh tests); with the cache, those that take a second or more
to compile are compiled once per session. It lives in a fresh temporary directory per
session, so no result carries over between sessions.
"""

import os
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # Set before JAX initialises; subprocesses inherit it through the environment.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="falqon-jax-xla-cache-")
