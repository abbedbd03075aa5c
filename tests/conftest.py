"""Test-session setup: JAX on the CPU, one persistent XLA compilation cache for the whole
session, an empty offline Hugging Face cache, and the ``fake_hub`` fixture.

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

# No test reaches the real Hugging Face Hub or touches the user's Hugging Face caches: an
# empty cache per session, offline (set before huggingface_hub and datasets read them at
# import; subprocesses inherit them). Tests of Hub names use the ``fake_hub`` fixture below.
_HF_HOME = tempfile.mkdtemp(prefix="falqon-jax-hf-home-")
os.environ.update(HF_HOME=_HF_HOME, HF_HUB_CACHE=os.path.join(_HF_HOME, "hub"),
                  HF_DATASETS_CACHE=os.path.join(_HF_HOME, "datasets"), HF_HUB_OFFLINE="1")
os.environ.pop("HF_TOKEN", None)


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
