"""Shared command-line plumbing."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from falqon_jax.targets import plugin_installed


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
    if plugin_installed():
        os.environ["JAX_PLATFORMS"] = "cpu"
        if "jax" in sys.modules:  # imported already: its config read the environment
            sys.modules["jax"].config.update("jax_platforms", "cpu")


def quiet_output() -> None:
    """For the command lines: print only what concerns the user. transformers' notice that
    PyTorch was not found is turned off (``TRANSFORMERS_NO_ADVISORY_WARNINGS``; an explicit
    setting wins): the project uses transformers' tokenizers and configs, never its PyTorch
    models. The project's own warnings print as one ``note:`` line each, without a file name
    or source line. Call before transformers is imported."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    show = warnings.showwarning
    if getattr(show, "one_line_notes", False):
        return
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
        if issubclass(category, UserWarning) and os.path.abspath(filename).startswith(package):
            print(f"note: {message}", file=sys.stderr if file is None else file)
        else:
            show(message, category, filename, lineno, file, line)

    one_line.one_line_notes = True  # type: ignore[attr-defined]
    warnings.showwarning = one_line


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.ERROR) -> Iterator[None]:
    """While inside, the logger ``name`` shows only records of ``level`` and above: a
    library's notes that do not concern the user stay off the screen, its errors still
    show."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def one_line_errors(run: Callable[[], int],
                    codes: Sequence[tuple[type[Exception] | tuple[type[Exception], ...], int]]
                    ) -> int:
    """``run()``'s exit code; an error listed in ``codes`` (``(error types, exit code)``
    pairs, first match wins) prints as one ``error:`` line on stderr and returns its code.
    Anything else propagates (a bug, with its traceback)."""
    try:
        return run()
    except Exception as err:
        for types, code in codes:
            if isinstance(err, types):
                print(f"error: {err}", file=sys.stderr)
                return code
        raise
