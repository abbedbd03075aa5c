"""A run's output directory (``--out``): which runs may write there, and how its files are
written so that a crash or a full disk never leaves half a file.

* :func:`check_out_dir` -- nothing in ``--out`` is ever overwritten by a different run;
* :func:`fresh_out` -- the default ``--out`` of a second run of the demo or a recipe;
* :func:`write_atomically`, :func:`writing` (an ``OSError`` becomes a one-line
  :class:`~falqon_jax.train.checkpoints.CheckpointError`, exit 74) and
  :func:`truncate_metrics` (``metrics.jsonl`` of a resumed run).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from falqon_jax.train.checkpoints import CheckpointError, has_checkpoints
from falqon_jax.train.config import TrainConfig
from falqon_jax.train.outcome import UserError
from falqon_jax.train.runs import read_json


def fresh_out(default: str) -> str:
    """``default``, or ``default-2``, ``-3``, ... if it already holds a run: running the demo
    (or a recipe) twice without ``--out`` starts a new run instead of refusing."""
    candidate, n = Path(default), 1
    while (candidate / "config.json").exists() or has_checkpoints(candidate):
        n += 1
        candidate = Path(f"{default}-{n}")
    return str(candidate)


def check_out_dir(config: TrainConfig, resume: bool) -> None:
    """Refuse to mix runs: nothing in ``--out`` is ever overwritten by a different run.

    ``--resume`` needs a run in ``--out`` with the same identity settings
    (:meth:`TrainConfig.identity`); with no checkpoint saved yet it starts from step 0.
    Without ``--resume``, ``--out`` must hold no run. Each refusal names what works.
    """
    out = Path(config.out)
    saved = out / "config.json"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory")
    holds_run = saved.exists() or has_checkpoints(out)
    previous = read_json(saved) or {}  # missing or unreadable (e.g. cut short): nothing
    # settings added to the identity since the run was saved compare as their defaults
    before = TrainConfig().identity() | previous if previous else {}
    mismatched = [
        f"{k}={before.get(k)!r} (now {v!r})"
        for k, v in config.identity().items() if before.get(k) != v
    ]
    if resume:
        if not holds_run:
            raise UserError(f"--resume: no checkpoint and no run in {out}; start the run with "
                            "the same command without --resume")
        if mismatched:
            raise UserError(
                f"--resume: the checkpoint in {out} is from a different run: "
                + ", ".join(mismatched[:4])
                + f"; continue it with its own settings (python -m falqon_jax.train --out {out}"
                " --resume) or choose another --out"
            )
    elif holds_run and not mismatched:
        raise UserError(f"--out {out} already holds this run; continue it with python -m "
                        f"falqon_jax.train --out {out} --resume, or choose another --out")
    elif holds_run:
        raise UserError(
            f"--out {out} already holds a run with other settings ("
            + ", ".join(mismatched[:4])
            + f"); choose another --out (python -m falqon_jax.train --out {out} --resume "
            "continues that run)"
        )


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves either the old or the new file."""
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """An ``OSError`` inside (a full disk, a read-only file system) becomes a
    :class:`~falqon_jax.train.checkpoints.CheckpointError` naming ``path``: the run stops
    with one line and exit 74, as when a checkpoint cannot be written."""
    try:
        yield
    except OSError as err:
        raise CheckpointError(f"cannot write {path}: {err.strerror or err}") from None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after ``step`` (a resumed run logs them again) and a last line cut
    short by a crash."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    write_atomically(path, "".join(ln + "\n" for ln in kept))
