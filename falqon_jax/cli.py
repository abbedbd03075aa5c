"""Shared command-line plumbing."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reports a bad flag as one line on stderr and exits with 2
    (no usage dump), like every other user mistake in the project's commands."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def cpu_unless_gpu() -> None:
    """For the command lines: where JAX's CUDA plugin is installed (the ``h100`` extra) but
    the machine has no NVIDIA driver, run JAX on the CPU (``JAX_PLATFORMS=cpu``) instead of
    letting the plugin fail loudly at start-up. An explicit ``JAX_PLATFORMS`` wins. Call
    before JAX first uses a device."""
    if "JAX_PLATFORMS" in os.environ:
        return
    if Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia").exists():
        return
    plugins = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")
    if any(importlib.util.find_spec(name) is not None for name in plugins):
        os.environ["JAX_PLATFORMS"] = "cpu"
        if "jax" in sys.modules:  # imported already: its config read the environment
            sys.modules["jax"].config.update("jax_platforms", "cpu")
