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


import pytest  # noqa: E402


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A stand-in Hugging Face Hub on localhost (:mod:`tests.hub_server`) that this process's
    huggingface_hub talks to, with an empty Hugging Face cache under ``tmp_path``, online and
    without a token. ``datasets`` keeps its prepared copies under ``tmp_path`` too."""
    from huggingface_hub import constants

    from tests.hub_server import FakeHub

    hub = FakeHub()
    hub.start()
    hub.patch(monkeypatch)
    home = tmp_path / "hf-home"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        import datasets.config

        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(home / "datasets"))
    except ImportError:
        pass
    yield hub
    hub.stop()
