"""Shared command-line plumbing."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reports a bad flag as one line on stderr and exits with 2
    (no usage dump), like every other user mistake in the project's commands."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)
